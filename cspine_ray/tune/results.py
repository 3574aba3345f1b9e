"""`cspine-ray results`: the leaderboard of a search, running or finished, read from MLflow.

One row per trial run of the experiment: its state (MLflow's, plus "stopped early" by ASHA or
"interrupted" by a stop by hand), family, the values the search varied, the CV metric at the
epoch the trial was judged by and at its last epoch, whether the patient rule is the
calibrator, whether the training was reused from an earlier trial, and minutes. Finished trials
come first, best (lowest) CV metric first; a trial still running shows its latest epoch's CV
metric. The varied values are the parameters that take more than one value among the finished
trials that have them (a family's own settings are absent from another family's trials; a
trial's parameters are logged when it finishes, before that only its family is known).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pandas as pd

from cspine_ray.runtime import TRACKING_HELP

FIXED = ("trial", "state", "family", "cv_metric", "last_epoch_cv", "calibrated", "reused", "minutes")


UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def runs_page(tracking_uri: str, experiment: str) -> str:
    """The MLflow UI page of the experiment's training runs. The bare experiment page is not it:
    MLflow 3.17 opens an experiment on its GenAI overview (traces, token usage) while the UI's
    sidebar toggle is on GenAI, its default in a fresh browser, whatever the experiment's kind."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI
    return f"{base}/#/experiments/{exp.experiment_id}/runs"


def leaderboard(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's trials as a table (FIXED columns, then the varied parameters), sorted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'",
                              max_results=10_000)
    finished = [r.data.params for r in runs if r.info.status == "FINISHED"]
    # a setting one family has and another lacks is not a searched value; the family and the
    # patient rule have their own columns
    varied = sorted(k for k in {k for p in finished for k in p} - {"family", "calibrate"}
                    if len({p[k] for p in finished if k in p}) > 1)
    rows = []
    for r in runs:
        tags, metrics, params = r.data.tags, r.data.metrics, r.data.params
        state = r.info.status
        if tags.get("stopped_early") == "true":
            state += " (stopped early)"
        elif tags.get("interrupted") == "true":
            state += " (interrupted)"
        seconds = metrics.get("trial_seconds")
        if seconds is None and r.info.start_time:
            end = r.info.end_time or time.time() * 1000  # still running: until now
            seconds = (end - r.info.start_time) / 1000
        rows.append({
            "trial": r.info.run_name, "state": state, "family": tags.get("family", ""),
            "cv_metric": metrics.get("cv_metric", math.nan),
            "last_epoch_cv": metrics.get("last_epoch_cv_metric", math.nan),
            "calibrated": params.get("calibrate", ""),
            "reused": {"True": "reused", "False": "trained"}.get(tags.get("reused", ""), ""),
            "minutes": math.nan if seconds is None else seconds / 60,
            **{k: params.get(k, "") for k in varied},
        })
    table = pd.DataFrame(rows, columns=[*FIXED, *varied])
    done = table["state"].eq("FINISHED")
    return (table.assign(_done=~done).sort_values(["_done", "cv_metric", "trial"])
            .drop(columns="_done").reset_index(drop=True))


def markdown(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", help="the search's MLflow experiment (default: the last "
                                             "search started from this folder)")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")


def run(args: argparse.Namespace) -> int:
    from cspine_ray.runtime import resolve_tracking

    tracking = resolve_tracking(args.tracking_uri)
    experiment = args.experiment or tracking.experiment
    if not experiment:
        print("cspine-ray results: give --experiment (no search was started from this folder)",
              file=sys.stderr)
        return 2
    try:
        table = leaderboard(tracking.uri, experiment)
    except LookupError as e:
        print(f"cspine-ray results: {e.args[0]}", file=sys.stderr)
        return 2
    if args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    else:
        print(f"{experiment} at {tracking.uri} ({tracking.source}): {len(table)} trials\n")
        print(markdown(table))
    return 0


if __name__ == "__main__":
    from cspine_ray.cli import step_main

    sys.exit(step_main("cspine_ray.tune.results", "the leaderboard of a search (MLflow)"))
