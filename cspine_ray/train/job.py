"""Driver side of training: run a task on Ray Train, export its result, reuse finished results.

Storage layout (a local folder, or shared storage such as EFS/NFS mounted on every node):

    <storage>/ray/                       Ray Train's run folders (checkpoints of running jobs)
    <storage>/stage1/<key>/              a finished stage-1 (locator) result, reused by key
    <storage>/results/<family>-<key>/    a finished training result, reused by key

What a result folder holds is described in `cspine_ray.train.result`; how the keys are made,
in docs/ARCHITECTURE.md ("Keys").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from cspine_ray.config import to_dict
from cspine_ray.preprocess.shards import ShardSet
from cspine_ray.train.config import TrainConfig
from cspine_ray.train.loop import JobSpec, fold_file, train_loop_per_worker
from cspine_ray.train.placement import Cluster, FoldLayout, current_cluster, fold_layout
from cspine_ray.train.result import (LAST_OOF, RESULT, ModelSpec, ResultInfo, TrainResult,
                                     load_result, torch_load, weights_file, write_info,
                                     writing_result)
from cspine_ray.train.seeds import member_configs, write_seed_ensemble
from cspine_ray.train.tasks import JobData, make_task
from cspine_ray.train.tasks.base import SLICE_TABLES, save_slice_tables

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive file lock: two trials needing the same result train it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fit(task_name: str, cfg: TrainConfig, data: JobData, storage: Path, run_name: str,
         stage1_dir: Path | None, callbacks: list, cluster: Cluster | None) -> "ray.train.Result":
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    layout = job_layout(cfg, data.n_folds, cluster)
    local_mode = layout.num_workers == 0
    log.info("%s: %s", run_name, layout.describe())
    scaling = ray.train.ScalingConfig(
        num_workers=layout.num_workers,
        use_gpu=layout.gpus_per_worker > 0,
        resources_per_worker=layout.resources_per_worker if not local_mode else None,
    )
    res = cfg.resources
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": JobSpec(
            task=task_name, config=cfg, data=data,
            stage1_dir=str(stage1_dir) if stage1_dir else None,
            local_mode=local_mode, threads=max(1, int(res.cpus_per_worker)),
            # local_mode: the checkpoint folder is kept as it is, so it must be on storage;
            # workers stage theirs on local disk and Ray uploads them once
            scratch=str(storage / "scratch") if local_mode else None,
        )},
        # folds never all-reduce gradients: gloo needs no NCCL (nor CUDA behind a Ray GPU)
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage / "ray"),
            failure_config=ray.train.FailureConfig(
                max_failures=res.max_failures, controller_failure_limit=res.start_attempts),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or None,
        ),
    )
    if local_mode:
        (storage / "scratch").mkdir(parents=True, exist_ok=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    return result


def job_layout(cfg: TrainConfig, n_folds: int, cluster: Cluster | None = None) -> FoldLayout:
    """The fold layout of a job with these resources on `cluster` (default: the connected one,
    as seen from this process; a Tune trial gets the driver's view, which knows the autoscaler
    even when the trial runs on a worker node)."""
    res = cfg.resources
    if res.num_workers == 0:
        cluster = Cluster(())
    elif cluster is None:
        cluster = current_cluster()
    return fold_layout(n_folds, cluster, res.cpus_per_worker, res.gpus, res.num_workers)


def _export(checkpoint, out: Path, info: ResultInfo) -> None:
    """Copy the best-epoch fold weights and OOF predictions out of a checkpoint, atomically."""
    with writing_result(out) as tmp:
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            oofs, tables = [], {}
            for k in range(info.n_folds):
                best = torch_load(folder / fold_file(k, "best.pt"))
                torch.save({"model": best["model"], "epoch": best["epoch"]}, tmp / weights_file(k))
                oofs.append(pd.read_parquet(folder / fold_file(k, "oof.parquet")))
                extra = folder / fold_file(k, "tables.npz")
                if extra.exists():
                    with np.load(extra, allow_pickle=False) as z:
                        tables.update({key: z[key] for key in z.files})
            history = torch_load(folder / fold_file(0, "state.pt"))["history"]
            lasts = [folder / fold_file(k, "last.parquet") for k in range(info.n_folds)]
            if all(p.exists() for p in lasts):  # not when a fold had no validation studies
                last_oof = pd.concat([pd.read_parquet(p) for p in lasts], ignore_index=True)
                last_oof.sort_values("study_uid").to_parquet(tmp / LAST_OOF, index=False)
        oof = pd.concat(oofs, ignore_index=True).sort_values("study_uid")
        oof.to_parquet(tmp / "oof.parquet", index=False)
        if tables:
            save_slice_tables(tables, tmp / SLICE_TABLES)
        info.history = history
        info.best_epoch = history[-1]["best_epoch"]
        info.cv_metric = info.best["cv_metric"]
        info.created = time.strftime("%Y-%m-%dT%H:%M:%S")
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(info.config), sort_keys=False))
        write_info(info, tmp / RESULT)


def _finished(out: Path, task_name: str) -> TrainResult | None:
    """The finished result in `out`, marked reused; None when there is none."""
    if not (out / RESULT).exists():
        return None
    log.info("%s: reusing the finished result %s", task_name, out)
    result = load_result(out)
    result.reused = True
    return result


def result_folder(storage: str | Path, task_name: str, key: str) -> Path:
    """Where the finished result of `task_name` under `key` lives."""
    storage = Path(storage).resolve()
    if task_name == "locator":
        return storage / "stage1" / key
    return storage / "results" / f"{task_name}-{key}"


def run_task(task_name: str, cfg: TrainConfig, shards: ShardSet | str | Path, storage: str | Path,
             key: str, stage1_dir: Path | None = None, callbacks: list | None = None,
             reuse: bool = True, cluster: Cluster | None = None) -> TrainResult:
    """Train `task_name` on every fold (or reuse the finished result stored under `key`).

    `cluster` is what the fold workers are fitted to (default: the connected cluster)."""
    shards, storage = ShardSet.of(shards), Path(storage).resolve()
    out = result_folder(storage, task_name, key)
    run_name = f"{task_name}-{key}"
    with _lock(storage / "locks" / f"{out.name}.lock"):
        if not reuse:  # train again from scratch: not from an earlier run's checkpoints either
            shutil.rmtree(storage / "ray" / run_name, ignore_errors=True)
        elif (finished := _finished(out, task_name)) is not None:
            return finished
        data = JobData.load(shards)
        if data.n_folds < 2:
            raise ValueError(f"{shards.root}: training needs at least 2 folds of usable studies")
        task = make_task(task_name, cfg, data)
        for fold in range(data.n_folds):  # fail here, not in every worker after Ray retries
            if not task.split(fold)[0]:
                raise ValueError(f"{task_name}: fold {fold} has no training studies"
                                 + (" (stage 1 needs segmented studies in at least two folds)"
                                    if task_name == "locator" else ""))
        model_name, model_kwargs = task.model_spec()
        log.info("%s: training %d folds (key %s)", task_name, data.n_folds, key)
        result = _fit(task_name, cfg, data, storage, run_name, stage1_dir, callbacks or [], cluster)
        info = ResultInfo(
            task=task_name, key=key, config=cfg, n_folds=data.n_folds, manifest_hash=shards.hash,
            shards_dir=str(shards.root), stage1_dir=str(stage1_dir) if stage1_dir else None,
            model=ModelSpec(model_name, model_kwargs),
            prior=data.prior(data.uids).tolist(),  # the fallback for unreadable studies
            history=[], best_epoch=0, cv_metric=float("nan"), created="",  # filled by _export
            selected_on=task.selected_on)
        _export(result.checkpoint, out, info)
        return load_result(out)


def ensure_stage1(cfg: TrainConfig, shards: ShardSet | str | Path, storage: str | Path,
                  reuse: bool = True, cluster: Cluster | None = None) -> TrainResult:
    """The stage-1 locator result for these settings and data: reused when it exists."""
    shards = ShardSet.of(shards)
    return run_task("locator", cfg, shards, storage, cfg.stage1_key(shards.hash), reuse=reuse,
                    cluster=cluster)


def train(cfg: TrainConfig, shards: ShardSet | str | Path, storage: str | Path,
          callbacks: list | None = None, reuse: bool = True,
          cluster: Cluster | None = None) -> TrainResult:
    """Train a family end to end (its stage 1 first when it needs one); returns the result.

    reuse=False trains both stages again from scratch, replacing the stored results. Per-epoch
    `callbacks` (e.g. Tune's report callback) see only the family's own training: a reused
    result starts no Ray Train run, so they see nothing then.
    """
    shards = ShardSet.of(shards)
    key = cfg.training_key(shards.hash)
    if cfg.ensemble > 1:
        return _train_seed_ensemble(cfg, shards, storage, key, callbacks, reuse, cluster)
    stage1 = ensure_stage1(cfg, shards, storage, reuse, cluster) if cfg.needs_stage1 else None
    return run_task(cfg.family, cfg, shards, storage, key, stage1_dir=stage1.path if stage1 else None,
                    callbacks=callbacks, reuse=reuse, cluster=cluster)


def _train_seed_ensemble(cfg: TrainConfig, shards: ShardSet, storage: str | Path, key: str,
                         callbacks: list | None, reuse: bool, cluster: Cluster | None) -> TrainResult:
    """Each member as its seed's plain training (reused when it exists), then their
    combination (train/seeds.py)."""
    out = result_folder(storage, cfg.family, key)
    if reuse and (finished := _finished(out, cfg.family)) is not None:
        return finished
    members = []
    for i, member in enumerate(member_configs(cfg)):
        log.info("%s: seed-ensemble member %d of %d (seed %d)", cfg.family, i + 1, cfg.ensemble,
                 member.seed)
        # per-epoch reports (and ASHA's decisions) follow the first member only: Tune would
        # read a second member's epoch 1 as the trial's epoch E + 1
        members.append(train(member, shards, storage, callbacks=callbacks if i == 0 else None,
                             reuse=reuse, cluster=cluster))
    with _lock(Path(storage).resolve() / "locks" / f"{out.name}.lock"):
        # another trial may have combined the same members while these were reused
        if not (reuse and (out / RESULT).exists()):
            write_seed_ensemble(cfg, key, members, JobData.load(shards), out)
    return load_result(out)
