"""`python -m cspine_ray.promote`: register the best trial's fold ensemble; move `champion` if it wins.

The chosen run (the best finished trial of an experiment by CV metric, or `--run-id`) is
packaged as one `mlflow.pyfunc` model (its fold models, stage 1 and the preprocessing
settings; see `cspine_ray.predict.pyfunc`), logged into that run and registered. The
`champion` alias moves to the new version only when its CV metric beats the current
champion's (lower is better), or with `--force`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cspine_ray
from cspine_ray.runtime import TRACKING_HELP

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
    from cspine_ray.runtime import mlflow_store

    with mlflow_store(tracking_uri):  # MLflow's logging and registry calls, this store only
        return _promote(tracking_uri, experiment, run_id, name, force)


def _promote(tracking_uri: str, experiment: str | None, run_id: str | None, name: str,
             force: bool) -> Promotion:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cspine_ray.predict.pyfunc import EnsembleModel, make_bundle
    from cspine_ray.train.result import fit_result_calibrator, load_result

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
    result = load_result(tags["result_dir"])
    top_n = params.get("top_n")  # logged only for families with a patient rule
    calibrate = params.get("calibrate") == "True"
    info = {"run_id": run.info.run_id, "cv_metric": cv, "family": result.family,
            "top_n": int(top_n) if top_n is not None else None, "calibrate": calibrate,
            "oof_metric": metrics.get("oof_metric"), "oof_auc_mean": metrics.get("oof_auc_mean")}
    # the ensemble applies the calibrator fitted on all out-of-fold predictions (the trial's
    # figures are of calibrators fitted on the other folds only)
    calibrator = asdict(fit_result_calibrator(result, result.info.shards_dir)) if calibrate else None

    with tempfile.TemporaryDirectory(prefix="cspine-bundle-") as tmp:
        bundle = make_bundle(result.path, result.info.stage1_dir, result.info.shards_dir,
                             Path(tmp) / "bundle", {**info, "calibrator": calibrator})
        with mlflow.start_run(run_id=run.info.run_id):
            # the package travels with the model (code_paths), so it loads wherever MLflow
            # runs, with or without this checkout; its dependencies are pinned installables
            logged = mlflow.pyfunc.log_model(
                name="ensemble", python_model=EnsembleModel(), artifacts={"bundle": str(bundle)},
                code_paths=[str(Path(cspine_ray.__file__).parent)], signature=signature(),
                input_example=input_example(), metadata=info,
                pip_requirements=requirements())
            # MLflow 3 shows a logged model's metrics and dataset on its page: the trial's
            # cross-validated figures, on the shard set it was trained on
            figures = {k: float(v) for k, v in metrics.items() if k.startswith(("cv_", "oof_"))}
            mlflow.log_metrics(figures, model_id=logged.model_id,
                               dataset=training_dataset(result.info.shards_dir))
    version = mlflow.register_model(logged.model_uri, name, tags={k: str(v) for k, v in info.items()})
    client.update_model_version(name, version.version, description=model_card(info, result, metrics))
    if tags.get("mlflow.parentRunId"):  # the search's run links to what it produced
        client.set_tag(tags["mlflow.parentRunId"], "registered_model",
                       f"models:/{name}/{version.version}")

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


def training_dataset(shards_dir: str):
    """The shard set a result was trained on, as the search logs it (`tune/tracking.py`)."""
    from cspine_ray.preprocess.shards import ShardSet
    from cspine_ray.tune.tracking import shard_dataset

    return shard_dataset(ShardSet.open(shards_dir))


def requirements() -> list[str]:
    """The package's own dependencies (pyproject.toml), pinned to the versions installed here,
    without local version labels (a CPU build's `2.x+cpu` is a pin no index serves; the public
    version is).

    cspine-ray itself is not on any index: it travels as the model's code instead."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    reqs = []
    for spec in requires("cspine-ray") or []:
        req = Requirement(spec)
        if req.marker is not None:  # extras (dev) are not needed to predict
            continue
        try:
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            reqs.append(pin(f"{req.name}{extras}", version(req.name)))
        except PackageNotFoundError:
            continue
    return reqs


def pin(requirement: str, installed: str) -> str:
    """`requirement==X`, X the installed release's public version: a local label (`+cpu`,
    `+cu130`) names a build no package index serves."""
    from packaging.version import Version

    return f"{requirement}=={Version(installed).public}"


def signature():
    """One row per study in (its archive's bytes or its folder; its UID), one row per study out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from cspine_ray import TARGETS

    inputs = Schema([ColSpec("binary", "archive", required=False),
                     ColSpec("string", "study_dir", required=False),
                     ColSpec("string", "study_uid", required=False)])
    outputs = Schema([ColSpec("string", "study_uid"), *[ColSpec("double", t) for t in TARGETS],
                      ColSpec("string", "status"), ColSpec("string", "reason"),
                      ColSpec("string", "warnings")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example():
    """A real study, predicted when the model is logged: the tiny generated one as an archive."""
    import pandas as pd

    from cspine_ray.predict.example import example_archive

    return pd.DataFrame({"archive": [example_archive()], "study_uid": ["example"]})


def model_card(info: dict, result, metrics: dict) -> str:
    """The registered version's description: what it is for, what it was trained on, how well
    it did out of fold and how that figure was chosen, and what it is not."""
    from cspine_ray.train.result import evaluate_prior

    trained, oof = result.info, result.oof()
    prior = evaluate_prior(trained.shards_dir)["oof_metric"]

    def fig(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join([
        f"# cspine-ray {info['family']} ensemble ({trained.n_folds * result.n_members} fold "
        "models)",
        "",
        "**Intended use**: research on cervical-spine (C1-C7) fracture detection in axial CT, "
        "as in the RSNA 2022 challenge. **Research use only: not a medical device**, not "
        "validated for clinical decisions; it must not be used to diagnose or to rule out a "
        "fracture.",
        "",
        "## Training data and split",
        f"- shards: `{trained.shards_dir}` (manifest hash {trained.manifest_hash})",
        f"- {len(oof)} labelled studies in {trained.n_folds} folds, one study per group, "
        "stratified on the labels and on having a segmentation; fold model k never saw fold k",
        "",
        "## Out-of-fold figures (weighted log loss, lower is better; AUCs)",
        f"- CV metric {fig('cv_metric')} (mean of the folds), pooled OOF metric "
        f"{fig('oof_metric')}, mean AUC {fig('oof_auc_mean')}, patient AUC "
        f"{fig('oof_auc_patient_overall')}; the constant prior (each fold predicted with the "
        f"other folds' prevalences) scores {prior:.4f}",
        f"- how chosen: {trained.how_chosen()}; this trial was the search's best by the CV "
        "metric, so both choices are optimistic",
        patient_rule(info),
        "",
        "## Known limits",
        "- trained on one challenge dataset; on other hospitals, the challenge's top models fell "
        "from 0.95-0.97 to 0.79-0.92 AUC (Hu et al., Radiology: AI 2024): validate locally first",
        "- a study that cannot be read gets the training prior and its reason, not a score",
        "- vertebrae stage 1 does not find fall back to the prior",
    ])


def patient_rule(info: dict) -> str:
    if info.get("calibrate"):
        return ("- probabilities: a calibrator (models/calibrator.py) fitted on all out-of-fold "
                "predictions maps the 7 vertebra scores and found flags to the 8 outputs; the "
                "figures above are cross-fitted (each fold calibrated by the other folds)")
    if info.get("top_n"):
        return f"- patient_overall rule: top-N with N = {info['top_n']}"
    return "- patient_overall: predicted by the model itself"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="promote this experiment's best finished trial "
                                            "(default: the last search's from this folder)")
    which.add_argument("--run-id", help="promote this trial run")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"registered model name (default {DEFAULT_NAME})")
    parser.add_argument("--force", action="store_true", help="move the champion alias even if not better")


def run(args: argparse.Namespace) -> int:
    from cspine_ray.runtime import resolve_tracking

    tracking = resolve_tracking(args.tracking_uri)
    experiment = args.experiment or (None if args.run_id else tracking.experiment)
    print(f"MLflow: {tracking.uri} ({tracking.source})")
    p = promote(tracking.uri, experiment=experiment, run_id=args.run_id, name=args.name,
                force=args.force)
    verdict = "promoted to @champion" if p.promoted else "registered, NOT promoted"
    print(f"{p.name} version {p.version} (run {p.run_id}, cv_metric {p.cv_metric:.4f}): {verdict}")
    print(f"  why: {p.reason}")
    print(f"  champion is now version {p.champion_version}: models:/{p.name}@{ALIAS}")
    return 0


if __name__ == "__main__":
    from cspine_ray.cli import step_main

    sys.exit(step_main("cspine_ray.promote", "register the best ensemble; move @champion if it wins"))
