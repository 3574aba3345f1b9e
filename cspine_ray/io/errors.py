"""The error types for input that cannot be used: one study (StudyError, always naming the
study) or a whole file of the layout (LayoutError, always naming the file)."""


class StudyError(Exception):
    """A study (or one of its files) cannot be used; the message names the study and the problem."""

    def __init__(self, study: str, problem: str):
        self.study = study
        self.problem = problem
        super().__init__(f"study {study}: {problem}")

    def __reduce__(self):  # keep it picklable across Ray workers
        return (type(self), (self.study, self.problem))


class LayoutError(ValueError):
    """A file-level fault of the input (a CSV without its columns, undecodable, not a CSV; a root
    that is no RSNA layout): nothing can go on. The message names the file; the command-line
    steps print it as one line and exit with code 2."""
