"""The Ray Train worker loop: every worker trains its own fold(s) of one task; no DDP.

World rank r trains folds r, r + W, r + 2W, ... (one fold per worker with the default one worker
per fold; all folds in-process with `ScalingConfig(num_workers=0)`). After each epoch the
workers exchange their fold figures (a gloo all-gather), so every worker reports the same
cross-validation mean and agrees on whether the epoch is the best so far.

Each epoch's checkpoint holds, per fold: the latest state (to resume after a lost worker), the
weights of the best epoch and that epoch's out-of-fold predictions (and the extra training
targets a task made for the fold, e.g. stage 1's pseudo labels), so the latest checkpoint
alone is enough both to resume and to export the result.

With `optim.ema` > 0 a fold also keeps an exponential moving average of its weights (timm's
ModelEmaV3, decay warming up from 0 so a short run is not frozen near its start); validation,
the best epoch's weights and the exported models are the average's, the usual way to steady a
model trained on few positives.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cspine_ray.train.config import TrainConfig
from cspine_ray.train.result import summarize_folds, torch_load
from cspine_ray.train.tasks import JobData, Task, make_task
from cspine_ray.train.tasks.base import autocast, to_device

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    """What every worker of a job is told: the task, its settings and its studies."""

    task: str                     # a family name or "locator"
    config: TrainConfig
    data: JobData                 # the training studies, labels and folds (no slice tables)
    stage1_dir: str | None        # the stage-1 result whose slice tables the task reads
    local_mode: bool              # every fold in the driver's process (num_workers=0)
    threads: int                  # torch threads per worker
    scratch: str | None           # local mode: where checkpoints are written (on storage)


def fold_file(fold: int, kind: str) -> str:
    """Checkpoint file names: fold_<k>.state.pt, .best.pt, .oof.parquet (best epoch),
    .last.parquet (latest epoch), .tables.npz, .targets.npz."""
    return f"fold_{fold}.{kind}"


class FoldRun:
    """The model, optimiser and best-so-far record of one fold on this worker."""

    def __init__(self, task: Task, fold: int, device: torch.device):
        self.task, self.fold, self.device = task, fold, device
        self.train_uids, self.val_uids = task.split(fold)
        if not self.train_uids:
            raise ValueError(f"fold {fold}: no training studies for {task.name} "
                             "(stage 1 needs segmented studies in at least two folds)")
        opt = task.optim()
        torch.manual_seed(task.cfg.seed * 1000 + fold)  # fold models do not depend on placement
        self.model = task.initial_model(fold).to(device)
        self.ema = None
        if opt.ema > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=opt.ema, use_warmup=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr,
                                           weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=opt.t0, eta_min=opt.eta_min)
        fp16 = device.type == "cuda" and opt.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.generator = torch.Generator(device=device).manual_seed(task.cfg.seed * 1000 + fold)
        self.best_state: dict | None = None
        self.best_preds: pd.DataFrame | None = None
        self.last_preds: pd.DataFrame | None = None
        # training targets the task made for this fold (stage 1's pseudo labels: uid -> slice
        # table), from its refresh_targets hook; checkpointed so a resumed fold trains on the same
        self.targets: dict[str, np.ndarray] = {}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        task, model = self.task, self.model
        dataset = task.train_dataset(self.train_uids, epoch, self.fold)
        loader = task.loader(dataset, train=True, device=self.device,
                             seed=task.cfg.seed * 100_000 + self.fold * 1000 + epoch)
        model.train()
        total, count, waited = 0.0, 0, 0.0
        steps = max(1, len(loader))
        start = tick = time.perf_counter()
        for i, batch in enumerate(loader):
            waited += time.perf_counter() - tick
            batch = to_device(batch, self.device)
            with autocast(self.device, task.optim().amp):
                loss = task.loss(model, batch, self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.scheduler.step(epoch + (i + 1) / steps)  # warm restarts on fractional epochs
            if self.ema is not None:  # the step count (warm-up) survives a resume
                self.ema.update(model, step=epoch * steps + i + 1)
            n = len(batch["uid"])
            total += float(loss.detach()) * n
            count += n
            tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        figures = {"train_loss": total / max(count, 1), "train_seconds": elapsed,
                   "data_wait_fraction": waited / elapsed if elapsed > 0 else 0.0,
                   "samples_per_second": count / elapsed if elapsed > 0 else 0.0}
        if self.device.type == "cuda":  # what a batch size or image size costs on the card
            figures["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return figures

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model validation scores and the result keeps: the weight average when on."""
        return self.model if self.ema is None else self.ema.module

    def validate(self) -> dict[str, float]:
        self.last_preds = self.task.predict([self.evaluated], self.val_uids, self.device)
        return self.task.score(self.last_preds, self.val_uids)

    def keep_if_best(self, improved: bool) -> None:
        if improved or self.best_state is None:
            self.best_state = {k: v.detach().cpu().clone()
                               for k, v in self.evaluated.state_dict().items()}
            self.best_preds = self.last_preds

    def best_model(self) -> torch.nn.Module:
        model = copy.deepcopy(self.evaluated)
        model.load_state_dict(self.best_state)
        return model

    # --- checkpoint --------------------------------------------------------------------------
    def save(self, folder: Path, progress: dict, extras: dict[str, np.ndarray] | None) -> None:
        torch.save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "generator": self.generator.get_state(),
            "ema": self.ema.module.state_dict() if self.ema is not None else {}, **progress,
        }, folder / fold_file(self.fold, "state.pt"))
        torch.save({"model": self.best_state, "epoch": progress["best_epoch"]},
                   folder / fold_file(self.fold, "best.pt"))
        oof = self.best_preds.reset_index(names="study_uid").assign(fold=self.fold)
        oof.to_parquet(folder / fold_file(self.fold, "oof.parquet"), index=False)
        if self.last_preds is not None:  # the latest epoch's: predictions nothing chose
            last = self.last_preds.reset_index(names="study_uid").assign(fold=self.fold)
            last.to_parquet(folder / fold_file(self.fold, "last.parquet"), index=False)
        if extras is not None:
            with open(folder / fold_file(self.fold, "tables.npz"), "wb") as f:
                np.savez(f, **extras)
        if self.targets:
            with open(folder / fold_file(self.fold, "targets.npz"), "wb") as f:
                np.savez(f, **self.targets)

    def restore(self, folder: Path) -> dict:
        state = torch_load(folder / fold_file(self.fold, "state.pt"))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.best_state = torch_load(folder / fold_file(self.fold, "best.pt"))["model"]
        oof = pd.read_parquet(folder / fold_file(self.fold, "oof.parquet"))
        self.best_preds = oof.drop(columns="fold").set_index("study_uid")
        targets = folder / fold_file(self.fold, "targets.npz")
        if targets.exists():
            with np.load(targets, allow_pickle=False) as z:
                self.targets = {k: z[k] for k in z.files}
        return {k: state[k] for k in ("epoch", "best_epoch", "best_cv", "history")}


def _device() -> torch.device:
    import ray.train.torch

    try:
        device = ray.train.torch.get_device()
    except Exception:  # local mode has no Train device context
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        # Ray granted a GPU that torch cannot see (a node declaring GPUs it lacks, a broken
        # driver): train on the CPU rather than fail, and say so
        log.warning("Ray assigned a GPU to this worker but torch sees no CUDA device "
                    "(CUDA_VISIBLE_DEVICES=%s): training on the CPU",
                    os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        device = torch.device("cpu")
    return device


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report's full metrics dict at INFO (50+ keys per epoch per worker)."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class _Exchange:
    """All-gather of small Python objects between the workers (gloo, whatever the GPU backend)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def gather(self, local: dict) -> dict:
        if self.group is None:
            return dict(local)
        parts = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(parts, local, group=self.group)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged


def cv_metric(per_fold: dict[int, dict], key: str = "metric") -> float:
    """The epoch's CV mean of fold figure `key`: over the folds that have one (a fold without
    validation studies, or without a finite figure, is left out); NaN when none has."""
    values = [m[key] for m in per_fold.values() if math.isfinite(m.get(key, math.nan))]
    return float(np.mean(values)) if values else math.nan


def improves(cv: float, best_cv: float, best_epoch: int) -> bool:
    """Whether this epoch becomes the best: the first epoch at all, a lower CV figure, or the
    first finite one after NaN. A run whose CV is NaN throughout keeps epoch 1; a NaN epoch
    never replaces a real one."""
    return best_epoch < 0 or cv < best_cv or (math.isnan(best_cv) and math.isfinite(cv))


def epoch_report(epoch: int, per_fold: dict[int, dict], history: list[dict], best_epoch: int) -> dict:
    """The figures every worker reports after an epoch (cv_metric is the one searches use).

    best_cv_metric is the CV metric of the best epoch so far, an epoch chosen on the task's
    `selected_on` figure (for a family with a patient rule the vertebra loss: N-independent)."""
    figures = summarize_folds(per_fold)
    cv = figures.pop("cv_metric")
    best = cv if best_epoch == epoch else history[best_epoch]["cv_metric"]
    # the first keys are the ones progress tables show
    return {"cv_metric": cv, "cv_auc_mean": figures.pop("cv_auc_mean", math.nan),
            "epoch": epoch + 1, "best_cv_metric": best, "best_epoch": best_epoch + 1, **figures}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. config = {"job": JobSpec}."""
    import ray.train

    job: JobSpec = config["job"]
    torch.set_num_threads(max(1, job.threads))
    _quiet_ray_train_reports()
    data = job.data.with_slice_tables(job.stage1_dir) if job.stage1_dir else job.data
    task = make_task(job.task, job.config, data)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device()
    runs = {k: FoldRun(task, k, device) for k in range(data.n_folds) if k % world == rank}
    exchange = _Exchange()

    start, best_cv, best_epoch, history = 0, math.inf, -1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            for run in runs.values():
                progress = run.restore(Path(folder))
        start, best_cv = progress["epoch"] + 1, progress["best_cv"]
        best_epoch, history = progress["best_epoch"], progress["history"]
        log.info("rank %d resumed folds %s at epoch %d", rank, sorted(runs), start + 1)

    epochs = task.optim().epochs
    previous: Path | None = None
    for epoch in range(start, epochs):
        local = {}
        for k, run in runs.items():
            run.targets = task.refresh_targets(k, epoch, run.targets, run.best_model, device)
            figures = run.train_epoch(epoch)
            figures.update(run.validate() if run.val_uids else {"metric": math.nan})
            local[k] = figures
        per_fold = exchange.gather(local)
        cv = cv_metric(per_fold, task.selected_on)
        improved = improves(cv, best_cv, best_epoch)
        if improved:
            best_cv, best_epoch = cv, epoch
        for run in runs.values():
            run.keep_if_best(improved)
        report = epoch_report(epoch, per_fold, history, best_epoch)
        history.append(report)

        folder = Path(tempfile.mkdtemp(prefix="cspine-ckpt-", dir=job.scratch))
        last = epoch == epochs - 1
        for k, run in runs.items():
            extras = task.final_outputs(run.best_model(), k, device) if last else None
            run.save(folder, {"epoch": epoch, "best_epoch": best_epoch, "best_cv": best_cv,
                              "history": history}, extras or None)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if job.local_mode:  # the checkpoint is this folder itself: keep the latest
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            previous = folder
        else:  # uploaded to the run's storage by now
            shutil.rmtree(folder, ignore_errors=True)
