"""One Tune trial: build its TrainConfig, train (or reuse) stage 1 and the family, report.

Per-epoch figures reach Tune from the fold workers through `TuneReportCallback` (every worker
already reports the fold mean, so rank 0's copy is the CV figure ASHA needs). The last report
carries the result re-scored under the trial's own top-N rule, so a trial that differs from a
finished one only in N reuses its fold models and out-of-fold predictions and costs seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cspine_ray.preprocess.shards import ShardSet
from cspine_ray.train.config import build_config
from cspine_ray.train.placement import Cluster
from cspine_ray.tune.space import trial_values

log = logging.getLogger(__name__)


@dataclass
class TrialSetup:
    """What every trial of a search shares (passed with tune.with_parameters)."""

    base: dict[str, Any]
    shards: ShardSet                # read once by the driver
    storage: str
    gpus_per_trial: float = 0.0
    cpus_per_worker: float = 1.0
    pretrained: bool = False
    weights: str | None = None      # local pretrained backbone weights (file or folder)
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. resources.num_workers in tests
    cluster: Cluster | None = None  # the driver's view (autoscaler limits), for every trial


def trial_config(config: dict, setup: TrialSetup):
    values = trial_values(config)
    values.update(setup.overrides)
    values["resources.gpus"] = setup.gpus_per_trial
    values["resources.cpus_per_worker"] = setup.cpus_per_worker
    if setup.pretrained:
        values["pretrained"] = True
    if setup.weights:
        values["weights"] = setup.weights
    return build_config(setup.base, values)


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune function trainable."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_result

    start = time.time()
    cfg = trial_config(config, setup)
    # per-epoch reports come only from a trial that really trains: a reused result starts no
    # Ray Train run (nor its callbacks)
    result = train(cfg, setup.shards, setup.storage, callbacks=[TuneReportCallback()],
                   cluster=setup.cluster)
    figures = evaluate_result(result, setup.shards, cfg.effective_top_n, cfg.calibrate)
    ray.tune.report({
        "cv_metric": figures["cv_metric"],          # first: the keys progress tables show
        "oof_auc_mean": figures["oof_auc_mean"],
        "reused": result.reused,
        **figures,
        "epoch": result.info.best_epoch,
        "best_epoch": result.info.best_epoch,
        "last_epoch_cv_metric": result.info.last["cv_metric"],  # not chosen on the folds
        "trial_seconds": time.time() - start,
        "result_dir": str(result.path),
        "stage1_dir": result.info.stage1_dir or "",
        **stage1_figures(result.info.stage1_dir),  # stage 1's best epoch: beside every trial
        "training_key": result.info.key,
        "top_n": cfg.effective_top_n,               # None: the model predicts patient_overall
        "calibrate": cfg.calibrate,                 # the second-level model instead of top-N
        "final": True,
    })


def stage1_figures(stage1_dir: str | None) -> dict[str, float]:
    """The stage-1 result's best-epoch CV figures (ratio+box error, ratio error, z_error in
    slices) as stage1_cv_*; none for a family without stage 1."""
    if not stage1_dir:
        return {}
    from cspine_ray.train.result import load_result

    best = load_result(stage1_dir).info.best
    return {f"stage1_{k}": float(best.get(k, float("nan")))
            for k in ("cv_metric", "cv_ratio_mae", "cv_z_error")}
