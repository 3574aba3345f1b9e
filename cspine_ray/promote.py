"""`python -m cspine_ray.promote`: register the best trial's fold ensemble; move `champion` if it wins.

The chosen run (the best finished trial of an experiment by CV metric, or `--run-id`) is
packaged as one `mlflow.pyfunc` model (its fold models, stage 1 and the preprocessing
settings; see `cspine_ray.predict.pyfunc`), logged into that run and registered. The
`champion` alias moves to the new version only when its CV metric beats the current
champion's (lower is better), or with `--force`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ALIAS = "champion"
DEFAULT_NAME = "cspine-fracture"


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    cv_metric: float
    promoted: bool
    reason: str
    champion_version: str


def best_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.kind = 'trial' and attributes.status = 'FINISHED'",
        order_by=["metrics.cv_metric ASC"], max_results=50)
    runs = [r for r in runs if "cv_metric" in r.data.metrics and r.data.tags.get("result_dir")]
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished trial with a result")
    return runs[0]


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def promote(tracking_uri: str, experiment: str | None = None, run_id: str | None = None,
            name: str = DEFAULT_NAME, force: bool = False) -> Promotion:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cspine_ray.predict.pyfunc import EnsembleModel, make_bundle

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id:
        run = client.get_run(run_id)
    elif experiment:
        run = best_run(client, experiment)
    else:
        raise ValueError("give --experiment (promote its best trial) or --run-id")
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    if "cv_metric" not in metrics or not tags.get("result_dir"):
        raise ValueError(f"run {run.info.run_id} is not a finished trial with a result")
    cv = float(metrics["cv_metric"])
    top_n = params.get("top_n")
    info = {"run_id": run.info.run_id, "cv_metric": cv, "family": tags.get("family", ""),
            "top_n": int(top_n) if top_n not in (None, "None", "") else None,
            "oof_metric": metrics.get("oof_metric"), "oof_auc_mean": metrics.get("oof_auc_mean")}

    with tempfile.TemporaryDirectory(prefix="cspine-bundle-") as tmp:
        bundle = make_bundle(tags["result_dir"], tags.get("stage1_dir") or None,
                             json.loads((Path(tags["result_dir"]) / "result.json").read_text())["shards_dir"],
                             Path(tmp) / "bundle", info)
        with mlflow.start_run(run_id=run.info.run_id):
            logged = mlflow.pyfunc.log_model(
                name="ensemble", python_model=EnsembleModel(), artifacts={"bundle": str(bundle)},
                metadata=info, pip_requirements=_requirements())
    version = mlflow.register_model(logged.model_uri, name, tags={k: str(v) for k, v in info.items()})

    champion = _champion(client, name)
    old_cv = float(champion.tags["cv_metric"]) if champion and "cv_metric" in champion.tags else None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif force:
        promoted, reason = True, f"--force (champion v{champion.version} had cv_metric {old_cv})"
    elif old_cv is None or cv < old_cv:
        promoted, reason = True, f"cv_metric {cv:.4f} beats champion v{champion.version}'s {old_cv}"
    else:
        promoted, reason = False, (f"cv_metric {cv:.4f} does not beat champion v{champion.version}'s "
                                   f"{old_cv:.4f} (use --force to promote anyway)")
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version.version)
    current = _champion(client, name)
    return Promotion(name=name, version=str(version.version), run_id=run.info.run_id, cv_metric=cv,
                     promoted=promoted, reason=reason,
                     champion_version=str(current.version) if current else "")


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("cspine-ray", "torch", "timm", "pydicom", "numpy", "pandas", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite:///runs/mlflow.db)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="promote this experiment's best finished trial")
    which.add_argument("--run-id", help="promote this trial run")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"registered model name (default {DEFAULT_NAME})")
    parser.add_argument("--force", action="store_true", help="move the champion alias even if not better")


def run(args: argparse.Namespace) -> int:
    from cspine_ray.runtime import sqlite_uri

    uri = args.tracking_uri or sqlite_uri(Path("runs") / "mlflow.db")
    p = promote(uri, experiment=args.experiment, run_id=args.run_id, name=args.name, force=args.force)
    verdict = "promoted to @champion" if p.promoted else "registered, NOT promoted"
    print(f"{p.name} version {p.version} (run {p.run_id}, cv_metric {p.cv_metric:.4f}): {verdict}")
    print(f"  why: {p.reason}")
    print(f"  champion is now version {p.champion_version}: models:/{p.name}@{ALIAS}")
    return 0


if __name__ == "__main__":
    from cspine_ray.cli import step_main

    sys.exit(step_main("cspine_ray.promote", "register the best ensemble; move @champion if it wins"))
