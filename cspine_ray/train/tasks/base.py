"""What a training worker knows about the data, and the recipe every family task follows.

A *task* says how one family trains and predicts ONE fold: its model, its batches, its loss, its
study-level predictions and their score. The fold loop (`cspine_ray.train.loop`) is the same for
every family; only the task differs. Tasks also serve inference: `predict` takes a list of
models (the fold ensemble) and runs each batch through all of them, so a study is read, windowed
and cropped once per stage however many folds there are; for it a task needs only `Studies`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cspine_ray import TARGETS, VERTEBRAE
from cspine_ray.datasets import study_labels
from cspine_ray.metric import evaluate, vertebra_loss
from cspine_ray.models import create_model, patient_overall
from cspine_ray.preprocess.shards import ShardSet
from cspine_ray.train.config import OptimConfig, TrainConfig

SLICE_TABLES = "slice_tables.npz"


@dataclass
class Studies:
    """What prediction reads: where the shards are, and the stage-1 slice tables (uid -> (z, 11))
    for the families that use them."""

    shards_dir: str
    slice_tables: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class JobData:
    """The training studies of a job: labels, folds, and (for 2D families) stage-1 slice tables."""

    shards_dir: str
    uids: list[str]
    folds: dict[str, int]
    labels: dict[str, np.ndarray]            # uid -> float32 (8) in TARGETS order
    segmented: set[str]
    slice_tables: dict[str, np.ndarray] = field(default_factory=dict)  # uid -> (z, 11 or 39)
    stage1_dir: str | None = None            # the stage-1 result the slice tables come from

    @classmethod
    def load(cls, shards: ShardSet | str | Path, stage1_dir: str | Path | None = None) -> JobData:
        """The labelled training studies of a shard set (and a stage-1 result's slice tables)."""
        shards = ShardSet.of(shards)
        train = shards.usable("train")
        train = train[train["fold"] >= 0]
        data = cls(
            shards_dir=str(shards.root),
            uids=train["study_uid"].tolist(),
            folds=dict(zip(train["study_uid"], train["fold"].astype(int))),
            labels=study_labels(train),
            segmented=set(train.loc[train["has_segmentation"], "study_uid"]),
        )
        return data.with_slice_tables(stage1_dir) if stage1_dir else data

    def with_slice_tables(self, stage1_dir: str | Path) -> JobData:
        """The same studies with a stage-1 result's out-of-fold slice tables."""
        return dataclasses.replace(self, slice_tables=load_slice_tables(Path(stage1_dir) / SLICE_TABLES),
                                   stage1_dir=str(stage1_dir))

    @property
    def n_folds(self) -> int:
        return max(self.folds.values()) + 1 if self.folds else 0

    def split(self, fold: int, segmented_only: bool = False) -> tuple[list[str], list[str]]:
        """(training uids, validation uids) of one fold."""
        uids = [u for u in self.uids if u in self.segmented] if segmented_only else self.uids
        return ([u for u in uids if self.folds[u] != fold], [u for u in uids if self.folds[u] == fold])

    def fold_uids(self, fold: int) -> list[str]:
        return [u for u in self.uids if self.folds[u] == fold]

    def label_frame(self, uids) -> pd.DataFrame:
        """The 8 labels of `uids` (index study_uid, columns TARGETS)."""
        return pd.DataFrame([self.labels[u] for u in uids], index=uids, columns=list(TARGETS))

    def prior(self, uids: list[str]) -> np.ndarray:
        """Prevalence of each target among `uids` (the fallback for a vertebra not found)."""
        y = np.stack([self.labels[u] for u in uids]) if uids else np.full((1, 8), 0.5)
        return np.clip(y.mean(0), 0.01, 0.99).astype(np.float32)


def load_slice_tables(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_slice_tables(tables: dict[str, np.ndarray], path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:  # np.savez on a path would append ".npz" to the temp name
        np.savez(f, **tables)
    tmp.replace(path)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that have it (no loss scaling needed), fp16 elsewhere; off on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class Task(ABC):
    """One family's recipe for one fold. Subclasses fill in the family-specific parts."""

    name = ""

    def __init__(self, cfg: TrainConfig, data: JobData | Studies):
        self.cfg = cfg
        self.data = data

    # --- what to build ---------------------------------------------------------------------
    @abstractmethod
    def model_spec(self) -> tuple[str, dict[str, Any]]:
        """(registered model name, create_model kwargs): stored with every fold checkpoint."""

    def build_model(self) -> nn.Module:
        name, kwargs = self.model_spec()
        return create_model(name, **kwargs)

    def initial_model(self, fold: int) -> nn.Module:
        """The model fold `fold` starts training from."""
        return self.build_model()

    def optim(self) -> OptimConfig:
        return self.cfg.optim

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        return self.data.split(fold)

    @property
    def selected_on(self) -> str:
        """The fold figure the best epoch is chosen on. With a patient rule it is the vertebra
        loss, which does not depend on N: a result shared by trials that differ only in N is
        then the same whichever N trained it. cnn3d predicts patient_overall itself: the metric."""
        return "val_loss" if self.cfg.effective_top_n is not None else "metric"

    # --- training --------------------------------------------------------------------------
    @abstractmethod
    def train_dataset(self, uids: list[str], epoch: int, fold: int) -> Dataset:
        """The samples of one training epoch for one fold."""

    def loader(self, dataset: Dataset, train: bool, device: torch.device,
               seed: int = 0) -> DataLoader:
        """Shuffled (by `seed`) for training, in order for prediction."""
        batch = self.optim().batch_size
        return DataLoader(dataset, batch_size=batch, shuffle=train,
                          drop_last=train and len(dataset) > batch,
                          num_workers=self.cfg.input.loader_workers,
                          pin_memory=device.type == "cuda",
                          generator=torch.Generator().manual_seed(seed) if train else None)

    def refresh_targets(self, fold: int, epoch: int, targets: dict[str, np.ndarray],
                        best_model, device: torch.device) -> dict[str, np.ndarray]:
        """The loop asks before every epoch: extra training targets of `fold` (uid -> slice
        table; stage 1's pseudo labels), checkpointed with the fold. None by default."""
        return targets

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Training loss of one batch already on the model's device (augmented here)."""

    # --- prediction ------------------------------------------------------------------------
    @abstractmethod
    def predict(self, models: Sequence[nn.Module], uids: list[str], device: torch.device) -> pd.DataFrame:
        """Study-level probabilities, the mean over `models`: index study_uid, columns C1..C7
        (+ patient_model). Validation passes the one fold model."""

    def score(self, preds: pd.DataFrame, uids: list[str]) -> dict[str, float]:
        """Validation figures of one fold: the competition metric, AUCs and the vertebra loss."""
        return score_predictions(preds.loc[uids], self.data, self.cfg.effective_top_n)

    def final_outputs(self, model: nn.Module, fold: int, device: torch.device) -> dict[str, np.ndarray]:
        """Extra arrays saved with the fold at the end of training (stage-1 slice tables)."""
        return {}


def to_targets(preds: pd.DataFrame, top_n: int | None) -> pd.DataFrame:
    """Study-level C1..C7 (+ patient_model) -> the 8 submission columns, with the top-N rule."""
    out = preds[list(VERTEBRAE)].astype(float).copy()
    if top_n is None:
        out["patient_overall"] = preds["patient_model"].astype(float)
    else:
        out["patient_overall"] = patient_overall(out.to_numpy(), top_n)
    return out[list(TARGETS)]


def score_predictions(preds: pd.DataFrame, data: JobData, top_n: int | None) -> dict[str, float]:
    return score_targets(to_targets(preds, top_n), data)


def score_targets(wide: pd.DataFrame, data: JobData) -> dict[str, float]:
    """The figures of 8-column predictions: the metric, its AUCs and the vertebra loss."""
    labels = data.label_frame(wide.index)
    scores = evaluate(labels, wide)
    scores["val_loss"] = vertebra_loss(labels.to_numpy(), wide.to_numpy())
    return scores


def sample_cervical_slices(table: np.ndarray | None, n_slices: int, count: int,
                           rng: np.random.Generator) -> np.ndarray:
    """`count` slice indices, mostly where the slice table shows a cervical vertebra.

    Three quarters come from the cervical range (any ratio > 0.1) so the 2D families see the
    vertebrae they must judge; a quarter from anywhere so they also learn what is not one.
    """
    everywhere = np.arange(n_slices)
    cervical = everywhere
    if table is not None:
        shown = np.flatnonzero(np.nan_to_num(table[:, : len(VERTEBRAE)]).max(1) > 0.1)
        if len(shown):
            cervical = shown
    n_cervical = count - count // 4
    picks = np.concatenate([rng.choice(cervical, n_cervical), rng.choice(everywhere, count - n_cervical)])
    return np.sort(picks)
