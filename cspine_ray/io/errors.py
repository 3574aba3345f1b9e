"""The one error type for input that cannot be used, always naming the study."""


class StudyError(Exception):
    """A study (or one of its files) cannot be used; the message names the study and the problem."""

    def __init__(self, study: str, problem: str):
        self.study = study
        self.problem = problem
        super().__init__(f"study {study}: {problem}")

    def __reduce__(self):  # keep it picklable across Ray workers
        return (type(self), (self.study, self.problem))
