"""The `cspine-ray` console script: one subcommand per step.

Each step's CLI module exposes `add_arguments(parser)` and `run(args) -> int`; the step also
runs as `python -m cspine_ray.<step>` through the same two functions (see `step_main`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

# subcommand -> (module, one-line help). Modules are imported only when their step runs,
# so `cspine-ray score` does not pay for importing torch and Ray.
STEPS = {
    "synth": ("cspine_ray.synth.cli", "generate a synthetic RSNA-layout demo dataset"),
    "preprocess": ("cspine_ray.preprocess.cli", "DICOM studies -> sharded dataset (Ray Data)"),
    "score": ("cspine_ray.metric", "score a submission CSV against labels"),
    "train": ("cspine_ray.train.cli", "fold-parallel training on Ray Train"),
    "tune": ("cspine_ray.tune.cli", "search families and hyperparameters (Ray Tune + Optuna + MLflow)"),
    "results": ("cspine_ray.tune.results", "the leaderboard of a search, running or finished (MLflow)"),
    "promote": ("cspine_ray.promote", "register the best ensemble; move @champion if it wins"),
    "predict": ("cspine_ray.predict.cli", "predict new studies with a registered ensemble (Ray Data)"),
    "serve": ("cspine_ray.serve.cli", "serve the champion over HTTP (Ray Serve)"),
}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def step_main(module_name: str, description: str, argv: list[str] | None = None,
              prog: str | None = None) -> int:
    """Parse `argv` with the step's own arguments and run it."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module_name.removesuffix('.cli')}",
                                     description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join([*parser.prog.split(), *(sys.argv[1:] if argv is None else argv)])
    setup_logging(args.verbose)
    from cspine_ray.config import ConfigError
    from cspine_ray.io.errors import LayoutError
    from cspine_ray.train.placement import PlacementError

    try:
        return int(module.run(args) or 0)
    except (PlacementError, LayoutError, ConfigError, FileNotFoundError) as e:
        # a request the cluster can never hold, an input file nothing can be read from or that
        # is not there, a setting that cannot be: one line that says why (the file or key)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def usage() -> str:
    lines = ["usage: cspine-ray STEP [options]   (cspine-ray STEP --help for a step's options)",
             "       cspine-ray --version", "", "steps:"]
    lines += [f"  {name:<12}{help_text}" for name, (_, help_text) in STEPS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from cspine_ray import __version__

        print(f"cspine-ray {__version__}")
        return 0
    if argv[0] not in STEPS:
        print(f"cspine-ray: unknown step {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, help_text = STEPS[argv[0]]
    return step_main(module_name, help_text, argv[1:], prog=f"cspine-ray {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
