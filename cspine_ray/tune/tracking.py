"""MLflow tracking of a search, from the Tune driver (the only process that must reach MLflow).

One experiment per search; a parent run for the search itself; one child run per trial with its
parameters, tags, per-epoch metrics and, when it finishes, its artifacts: out-of-fold
predictions, ROC and calibration figures, a few sagittal views with predicted levels and the
resolved config. Study UIDs appear in the predictions table only; no DICOM patient attribute
(name, ID, dates) is ever read into a run.

A resumed search finds its runs again by tags (`search_id`, `ray_trial_id`) instead of
creating duplicates.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

import cspine_ray

log = logging.getLogger(__name__)

# What a run shows: the CV figures and each fold's metric and AUC per epoch, and the pooled
# out-of-fold figures at the end. (Reports carry ~60 keys; all of them would drown the UI.)
_EPOCH_METRICS = re.compile(r"^(cv_(metric|auc_mean|auc_patient_overall|val_loss|train_loss|"
                            r"data_wait_fraction|samples_per_second|gpu_memory_gb|global_metric)|"
                            r"fold_\d+_(metric|auc_mean)|best_cv_metric)$")
_FINAL_METRICS = re.compile(r"^(oof_.*|trial_seconds|last_epoch_cv_metric|stage1_cv_(metric|ratio_mae|z_error))$")


@functools.cache
def code_version() -> str:
    """Package version plus the git commit of the checkout it runs from, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(cspine_ray.__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{cspine_ray.__version__}+{commit}" if commit else cspine_ray.__version__


# MLflow's UI opens an experiment by its kind; without one, MLflow 3 shows a search as a GenAI
# project (a traces overview) instead of its training runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def get_or_create_experiment(client, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, created (marked as model training) if it does not exist; an
    existing one without a kind (made by an older version) is marked too."""
    key, kind = EXPERIMENT_KIND
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, kind)
        return exp.experiment_id
    location = artifact_root.resolve().joinpath(name).as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location, tags={key: kind})


def numeric_metrics(result: dict) -> dict[str, float]:
    """The finite figures of a Tune result worth a metric in the trial's run."""
    keep = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if _EPOCH_METRICS.match(key) or (result.get("final") and _FINAL_METRICS.match(key)):
            keep[key] = float(value)
    return keep


def trial_artifacts(result, shards, top_n: int | None, out: Path, n_views: int = 3,
                    calibrate: bool = False) -> None:
    """Write a finished trial's artifacts (its TrainResult's predictions, figures, config) into
    `out`; `shards` is the search's ShardSet. calibrate: the cross-fitted calibrated
    predictions (the ones the trial's figures are of) instead of the top-N rule's."""
    import pandas as pd

    from cspine_ray.figures import calibration_figure, roc_figure, sagittal_figure, save
    from cspine_ray.train.result import calibrated_oof
    from cspine_ray.train.tasks import JobData
    from cspine_ray.train.tasks.base import SLICE_TABLES, load_slice_tables, to_targets

    data = JobData.load(shards)
    oof = result.oof().set_index("study_uid")
    preds = calibrated_oof(result, data, oof) if calibrate else to_targets(oof, top_n)
    labels = np.stack([data.labels[u] for u in preds.index])
    table = preds.assign(fold=oof["fold"]).reset_index()
    table.to_csv(out / "oof_predictions.csv", index=False)
    save(roc_figure(labels, preds.to_numpy()), out / "roc.png")
    save(calibration_figure(labels, preds.to_numpy()), out / "calibration.png")
    (out / "config.yaml").write_text((result.path / "config.yaml").read_text())
    (out / "history.json").write_text(json.dumps(result.info.history, indent=1, default=float))

    tables = {}
    if result.info.stage1_dir:
        tables = load_slice_tables(Path(result.info.stage1_dir) / SLICE_TABLES)
    # a caught fracture, a missed one and a confident negative: what reviewers ask to see
    p, y = preds["patient_overall"], pd.Series(labels[:, -1], index=preds.index)
    picks = []
    for candidates, ascending in ((p[y == 1], False), (p[y == 1], True), (p[y == 0], True)):
        for uid in candidates.sort_values(ascending=ascending).index:
            if uid not in picks:
                picks.append(uid)
                break
    views = out / "sagittal"
    views.mkdir()
    for i, uid in enumerate(picks[:n_views]):
        shard = shards.open_shard(uid)
        truth = data.labels[uid]
        fig = sagittal_figure(shard.volume, shard.spacing, preds.loc[uid].to_numpy(),
                              tables.get(uid), truth,
                              title=f"out-of-fold study {i + 1} (fold {int(oof.loc[uid, 'fold'])}),"
                                    f" {'fractured' if truth[-1] else 'no fracture'}")
        save(fig, views / f"study_{i + 1}.png")


class MlflowTracker(Callback):
    """Tune callback; holds only plain settings so Tune can pickle it with the experiment."""

    def __init__(self, tracking_uri: str, experiment: str, search_id: str, space_file: str,
                 shards, artifact_root: str | None, search_params: dict[str, Any],
                 space_base: dict[str, Any], command: str):
        self.tracking_uri = tracking_uri
        self.command = command[:500]  # the search run's Source in MLflow
        self.experiment = experiment
        self.search_id = search_id
        self.space_file = space_file
        self.shards = shards  # the search's ShardSet
        self.artifact_root = artifact_root
        self.search_params = search_params
        self.space_base = space_base  # the base with what it `extends`: the file alone may not say
        self._client = None
        self._experiment_id = None
        self._parent = None
        self._runs: dict[str, str] = {}
        self._dataset = None  # (manifest hash, MLflow dataset entity)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_client=None, _experiment_id=None, _parent=None, _runs={}, _dataset=None)
        return state

    # --- plumbing ----------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            root = Path(self.artifact_root) if self.artifact_root else None
            self._experiment_id = get_or_create_experiment(self._client, self.experiment, root)
        return self._client

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self._experiment_id], filter_string=filter_string,
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def parent_run(self) -> str:
        if self._parent is None:
            client = self.client
            self._parent = self._find(f"tags.search_id = '{self.search_id}' and tags.kind = 'search'")
            if self._parent is None:
                run = client.create_run(self._experiment_id, run_name=self.search_id,
                                        tags={"kind": "search", "search_id": self.search_id,
                                              "code_version": code_version(),
                                              # the runs table's Source column: the command
                                              "mlflow.source.type": "LOCAL",
                                              "mlflow.source.name": self.command})
                self._parent = run.info.run_id
                for k, v in self.search_params.items():
                    client.log_param(self._parent, k, v)
                client.log_artifact(self._parent, self.space_file)
                client.log_dict(self._parent, self.space_base, "space_base.yaml")
        return self._parent

    def trial_run(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        parent = self.parent_run()
        run_id = self._trial_run_if_any(trial)
        if run_id is None:
            from cspine_ray.tune.space import trial_values

            values = trial_values(trial.config)
            run = self.client.create_run(self._experiment_id, run_name=f"trial {trial.trial_id}",
                                         tags={"kind": "trial", "search_id": self.search_id,
                                               "ray_trial_id": trial.trial_id,
                                               "mlflow.parentRunId": parent,
                                               "code_version": code_version(),
                                               **{k: str(values[k]) for k in ("family", "backbone")
                                                  if k in values}})
            run_id = run.info.run_id
        self._runs[trial.trial_id] = run_id
        return run_id

    def _trial_run_if_any(self, trial) -> str | None:
        return self._find(f"tags.search_id = '{self.search_id}' and "
                          f"tags.ray_trial_id = '{trial.trial_id}'")

    def dataset_input(self, manifest_hash: str):
        """The shard set as the run's MLflow dataset (the UI's Dataset column, `shard_dataset`)."""
        from mlflow.entities import DatasetInput, InputTag

        if self._dataset is None or self._dataset[0] != manifest_hash:  # once per search
            self._dataset = (manifest_hash,
                             shard_dataset(self.shards, manifest_hash)._to_mlflow_entity())
        return DatasetInput(self._dataset[1], tags=[InputTag("mlflow.data.context", "training")])

    # --- Tune callback hooks -----------------------------------------------------------------
    def setup(self, **info):
        self.client.update_run(self.parent_run(), status="RUNNING")  # again, on --resume

    def on_trial_start(self, iteration, trials, trial, **info):
        # a resumed trial's run was marked KILLED when the search was interrupted
        self.client.update_run(self.trial_run(trial), status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self.trial_run(trial)
        # Tune's iteration: epochs of a trained trial, then its final (best-epoch) figures last,
        # so MLflow's "latest value" of cv_metric is the figure the trial is judged by
        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[i : i + 500])

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.trial_run(trial)
        result = trial.last_result or {}
        client = self.client
        if result.get("final"):
            from cspine_ray.train.result import load_result

            trained = load_result(result["result_dir"])
            top_n = result.get("top_n")  # the trial's own N; its result may come from another N
            calibrate = bool(result.get("calibrate", False))  # likewise its own patient rule
            settings = trained.config.read_settings()
            if top_n is not None:
                settings["top_n"] = int(top_n)
            settings["calibrate"] = calibrate
            flat = _flatten(settings)
            logged = set(client.get_run(run_id).data.params)
            for k, v in flat.items():
                if k not in logged:
                    client.log_param(run_id, k, str(v)[:6000])
            for k in ("result_dir", "stage1_dir", "training_key", "reused"):
                client.set_tag(run_id, k, str(result.get(k, "")))
            client.set_tag(run_id, "manifest_hash", trained.info.manifest_hash)
            client.log_inputs(run_id, datasets=[self.dataset_input(trained.info.manifest_hash)])
            client.set_tag(run_id, "family", trained.config.family)
            client.set_tag(run_id, "backbone", trained.config.backbone
                           if trained.config.spec.uses_backbone else "")
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    trial_artifacts(trained, self.shards, top_n, Path(tmp), calibrate=calibrate)
                    client.log_artifacts(run_id, tmp)
                except Exception:  # figures must never lose a finished trial's run
                    log.exception("trial %s: could not write artifacts", trial.trial_id)
            client.set_terminated(run_id, "FINISHED")
        else:  # stopped early by ASHA: its epochs are logged, it has no final result
            client.set_tag(run_id, "stopped_early", "true")
            client.set_terminated(run_id, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.trial_run(trial)
        self.client.set_tag(run_id, "error", str(getattr(trial, "error_file", ""))[:5000])
        self.client.set_terminated(run_id, "FAILED")

    def on_experiment_end(self, trials, **info):
        finished = [t for t in trials if (t.last_result or {}).get("final")]
        parent = self.parent_run()
        # a search stopped by hand (Ctrl-C) ends here with trials still running or pending:
        # their runs would read RUNNING in the UI for ever; --resume sets them running again
        interrupted = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
        for trial in interrupted:
            run_id = self._runs.get(trial.trial_id) or self._trial_run_if_any(trial)
            if run_id:  # a trial that never started has no run
                self.client.set_tag(run_id, "interrupted", "true")
                self.client.set_terminated(run_id, "KILLED")
        if finished:
            best = min(finished, key=lambda t: t.last_result["cv_metric"])
            # the parent shows the shard set the search trained on (its Dataset column)
            self.client.log_inputs(parent, datasets=[self.dataset_input(self.shards.hash)])
            self.client.set_tag(parent, "best_run_id", self.trial_run(best))
            self.client.set_tag(parent, "best_trial_id", best.trial_id)
            for k in ("cv_metric", "oof_metric", "oof_auc_mean", "oof_auc_patient_overall"):
                value = best.last_result.get(k)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.client.log_metric(parent, f"best_{k}", float(value))
        self.client.set_tag(parent, "trials_finished", str(len(finished)))
        self.client.set_tag(parent, "trials_interrupted", str(len(interrupted)))
        status = "KILLED" if interrupted else "FINISHED" if finished else "FAILED"
        self.client.set_terminated(parent, status)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested settings; lists as compact JSON; empty mappings left out."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, separators=(",", ":")) if isinstance(v, list) else v
    return out


def shard_dataset(shards, digest: str | None = None):
    """A shard set as an MLflow dataset: name, digest (the manifest hash), source folder, and the
    schema and profile of the manifest's label and split columns (no study UIDs)."""
    import mlflow.data

    from cspine_ray import TARGETS

    columns = ["split", "status", "fold", "has_segmentation", "n_slices", *TARGETS]
    with warnings.catch_warnings():  # a hint about serving schemas, not about datasets
        warnings.filterwarnings("ignore", message=".*integer column")
        return mlflow.data.from_pandas(shards.manifest[columns], source=str(shards.root),
                                       name=f"shards:{shards.root.name}",
                                       digest=digest or shards.hash)
