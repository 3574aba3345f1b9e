"""A search: Ray Tune + Optuna (seeded TPE) + ASHA over fold-parallel training jobs, tracked in MLflow."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cspine_ray.train.config import build_config
from cspine_ray.train.placement import Cluster, FoldLayout, current_cluster, jobs_at_once
from cspine_ray.tune.space import DefineByRun, SearchSpace, is_param
from cspine_ray.tune.tracking import MlflowTracker
from cspine_ray.tune.trial import TrialSetup, run_trial, trial_config

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    space: SearchSpace
    space_file: Path
    shards_dir: Path
    storage: Path
    tracking_uri: str
    experiment: str
    trials: int | None = None
    resume: str | None = None        # "" = the latest search of this space; a name = that one
    gpus_per_trial: float = 0.0
    cpus_per_worker: float = 1.0
    seed: int = 0
    max_concurrent: int | None = None  # cap on trials at once (default: what the cluster holds)
    pretrained: bool = False
    weights: str | None = None       # local pretrained backbone weights (file or folder)
    overrides: dict | None = None    # TrainConfig values forced on every trial (tests, tiny runs)
    command: str = "python -m cspine_ray.tune"  # as typed (the CLI's own line when it starts one)


def max_epochs(space: SearchSpace) -> int:
    """The most epochs any trial of the space can train (ASHA's max_t, less the final report)."""
    best = 1
    for family in space.families():
        params = space.fixed_and_sampled(family)
        spec = params.get("optim.epochs")
        if is_param(spec):
            best = max(best, max(spec["choices"]) if spec["type"] == "categorical" else spec["high"])
        else:
            values = {"family": family} if spec is None else {"family": family, "optim.epochs": spec}
            best = max(best, build_config(space.base, values).optim.epochs)
    return int(best)


def concurrency(space: SearchSpace, layout: FoldLayout, cluster: Cluster,
                opts: SearchOptions) -> int:
    """Trials at once: as many trial layouts as the cluster holds at its largest (the
    autoscaler's limits, not only the nodes up now), capped by --max-concurrent and the
    space's budget."""
    fits = jobs_at_once(layout, cluster)
    for cap in (opts.max_concurrent, space.budget.max_concurrent):
        if cap:
            fits = min(fits, cap)
    return fits


def sampler(seed: int):
    """Seeded multivariate TPE; group=True samples each family's conditional parameters
    jointly (define-by-run spaces otherwise fall back to independent sampling)."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # `group` is marked experimental; it is what such spaces need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def search_name(opts: SearchOptions) -> str:
    root = opts.storage / "tune"
    if opts.resume is None:
        return f"{opts.space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if opts.resume:
        return opts.resume
    previous = sorted(p.name for p in root.glob(f"{opts.space.name}-*") if p.is_dir())
    if not previous:
        raise FileNotFoundError(f"--resume: no earlier search of {opts.space.name} under {root}")
    return previous[-1]


def run_search(opts: SearchOptions):
    """Run (or resume) the search; returns (search name, ResultGrid)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cspine_ray.preprocess.shards import ShardSet
    from cspine_ray.train.job import job_layout

    space = opts.space
    storage = opts.storage.resolve()
    shards = ShardSet.open(opts.shards_dir)
    n_folds = int(shards.usable()["fold"].max()) + 1
    name = search_name(opts)
    path = storage / "tune" / name
    cluster = current_cluster()
    setup = TrialSetup(base=space.base, shards=shards,
                       storage=str(storage), gpus_per_trial=opts.gpus_per_trial,
                       cpus_per_worker=opts.cpus_per_worker, pretrained=opts.pretrained,
                       weights=opts.weights,
                       overrides=dict(opts.overrides or {}), cluster=cluster)
    # every trial's jobs get this layout (resources do not depend on the sampled values);
    # it fails here, before any trial, if it can never be placed
    layout = job_layout(trial_config({}, setup), n_folds, cluster)
    at_once = concurrency(space, layout, cluster, opts)
    log.info("each trial: %s; up to %d trial(s) at once on %s", layout.describe(), at_once,
             cluster.describe())
    # The trial function only drives a TorchTrainer: it must hold no CPU the fold workers need
    # (Tune refuses an empty request, so it asks for a token amount of memory instead).
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"memory": 64 * 2**20})

    if opts.resume is not None:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"--resume: {path} holds no search to resume")
        log.info("resuming search %s", path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        trials = opts.trials or space.budget.trials
        searcher = OptunaSearch(space=DefineByRun(space), metric="cv_metric", mode="min",
                                sampler=sampler(opts.seed))
        asha = space.budget.asha
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(space) + 1,
                                  grace_period=asha.grace_period,
                                  reduction_factor=asha.reduction_factor) if asha else None
        tracker = MlflowTracker(
            tracking_uri=opts.tracking_uri, experiment=opts.experiment, search_id=name,
            space_file=str(opts.space_file), space_base=space.base, shards=shards,
            command=opts.command,
            artifact_root=str(storage / "mlartifacts") if opts.tracking_uri.startswith("sqlite") else None,
            search_params={"space": space.name, "trials": trials, "seed": opts.seed,
                           "shards_dir": str(shards.root), "folds": n_folds,
                           "gpus_per_trial": opts.gpus_per_trial,
                           "trial_layout": layout.describe(), "trials_at_once": at_once},
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                        metric="cv_metric", mode="min",
                                        max_concurrent_trials=at_once),
            run_config=tune.RunConfig(name=name, storage_path=str(storage / "tune"),
                                      callbacks=[tracker], verbose=1),
        )
    return name, tuner.fit()


def final_results(grid) -> list[dict]:
    """The trials that finished (not stopped early, not failed), best first."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        if result.error is None and m.get("final"):
            rows.append({**m, "config": result.config})
    return sorted(rows, key=lambda m: m["cv_metric"])
