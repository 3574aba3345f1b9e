"""A finished training result as exported: its record (`ResultInfo`), its files, its figures.

An exported result folder holds `result.json` (a `ResultInfo`), `config.yaml`, `fold_<k>.pt`
(best-epoch weights, loadable with weights_only=True; a seed ensemble also fold_<k>.m<i>.pt),
`oof.parquet` (each training study exactly once, predicted by the fold model that did not see
it), `oof_last.parquet` (the same at the last epoch, which nothing chose) and, for stage 1,
`slice_tables.npz`. Everything that reads a result reads it through `load_result`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cspine_ray import N_VERTEBRAE, TARGETS, VERTEBRAE
from cspine_ray.config import from_dict, to_dict
from cspine_ray.datasets.sequences import found_vertebrae
from cspine_ray.metric import evaluate
from cspine_ray.models.calibrator import Calibrator, cross_fit, fit_calibrator
from cspine_ray.preprocess.shards import ShardSet
from cspine_ray.train.config import TrainConfig
from cspine_ray.train.tasks.base import (SLICE_TABLES, JobData, load_slice_tables, score_targets,
                                         to_targets)

RESULT = "result.json"
LAST_OOF = "oof_last.parquet"  # the last epoch's out-of-fold predictions


@contextlib.contextmanager
def writing_result(out: Path):
    """A fresh folder beside `out` to write a result into: it becomes `out` (replacing an older
    one) when the block finishes and is removed when it fails, so `out` is whole or absent."""
    tmp = out.with_name(f".tmp-{out.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class ModelSpec:
    """How to rebuild a fold model: a registered model name and its create_model arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResultInfo:
    """What result.json records about a finished training job."""

    task: str                       # a family name or "locator" (stage 1)
    key: str                        # the training (or stage-1) key it is stored under
    config: TrainConfig
    n_folds: int
    manifest_hash: str              # the shard set it was trained on
    shards_dir: str
    stage1_dir: str | None          # the stage-1 result whose slice tables it trained on
    model: ModelSpec
    prior: list[float]              # training prevalence of the 8 targets (unreadable studies)
    history: list[dict[str, Any]]   # every epoch's report (train/loop.py epoch_report)
    best_epoch: int                 # 1-based epoch with the best cv_<selected_on> (the fold weights)
    cv_metric: float                # the CV metric of that epoch
    created: str
    selected_on: str = "metric"     # the fold figure the epoch was chosen on (Task.selected_on)
    # a seed ensemble (config.ensemble > 1, train/seeds.py): each member's chosen epoch and
    # result folder; its history is the members' mean per epoch, best_epoch their median
    member_epochs: list[int] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    # a seed ensemble's own last-epoch figures (epoch, cv_*, fold_*, oof_*: those of its members'
    # averaged last-epoch predictions); empty when a member kept none (results before 2026-12-02)
    last_figures: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any]:
        """The report of the best epoch."""
        return next(h for h in self.history if h["epoch"] == self.best_epoch)

    @property
    def last(self) -> dict[str, Any]:
        """The figures of the last epoch, which nothing chose on the validation folds (a seed
        ensemble's: of its averaged last-epoch predictions, else its members' mean report)."""
        return self.last_figures or self.history[-1]

    def how_chosen(self) -> str:
        """How the fold weights' epoch was chosen and what nothing chose, in words."""
        last = self.last
        if self.member_epochs:
            seeds = f"seeds {self.config.seed}..{self.config.seed + len(self.member_epochs) - 1}"
            whose = "the ensemble's" if self.last_figures else "the members' mean"
            return (f"a seed ensemble of {len(self.member_epochs)} ({seeds}), each member at the "
                    f"epoch of its best cv_{self.selected_on} on these same {self.n_folds} folds "
                    f"(epochs {self.member_epochs} of {last['epoch']}); {whose} "
                    f"last-epoch CV metric: {last['cv_metric']:.4f}")
        return (f"epoch {self.best_epoch} of {last['epoch']}, the epoch of the best "
                f"cv_{self.selected_on} on these same {self.n_folds} folds; the last epoch's CV "
                f"metric: {last['cv_metric']:.4f}")


def torch_load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class TrainResult:
    """A finished training job, as exported."""

    path: Path
    info: ResultInfo
    reused: bool = False  # True when an earlier job's result served this request

    @property
    def config(self) -> TrainConfig:
        return self.info.config

    @property
    def family(self) -> str:
        return self.info.task

    @property
    def n_folds(self) -> int:
        return self.info.n_folds

    def oof(self) -> pd.DataFrame:
        """Raw out-of-fold study predictions: study_uid, fold, C1..C7 (+ patient_model)."""
        return pd.read_parquet(self.path / "oof.parquet")

    def oof_last(self) -> pd.DataFrame | None:
        """The same at the last epoch; None for a result that kept none."""
        path = self.path / LAST_OOF
        return pd.read_parquet(path) if path.exists() else None

    @property
    def n_members(self) -> int:
        """Models per fold: the seeds of a seed ensemble, else 1."""
        return self.info.config.ensemble

    def fold_weights(self, fold: int, member: int = 0) -> dict:
        """Best-epoch state dict of one fold model (of one member of a seed ensemble)."""
        return torch_load(self.path / weights_file(fold, member))["model"]


def weights_file(fold: int, member: int = 0) -> str:
    """fold_<k>.pt; a seed ensemble's further members fold_<k>.m<i>.pt."""
    return f"fold_{fold}.pt" if member == 0 else f"fold_{fold}.m{member}.pt"


def write_info(info: ResultInfo, path: Path) -> None:
    path.write_text(json.dumps(to_dict(info), indent=1, default=float))


def load_result(path: str | Path) -> TrainResult:
    path = Path(path)
    return TrainResult(path=path, info=from_dict(ResultInfo, json.loads((path / RESULT).read_text())))


def summarize_folds(per_fold: dict[int, dict]) -> dict[str, float]:
    """Each fold figure's CV mean (cv_<name>, NaN folds skipped) and every fold's own value."""
    keys = sorted({k for m in per_fold.values() for k in m})
    out = {}
    for key in keys:
        values = [per_fold[f].get(key, math.nan) for f in sorted(per_fold)]
        finite = [v for v in values if v == v]
        out[f"cv_{key}"] = float(np.mean(finite)) if finite else math.nan
        for f in sorted(per_fold):
            out[f"fold_{f}_{key}"] = float(per_fold[f].get(key, math.nan))
    return out


def evaluate_result(result: TrainResult, shards: ShardSet | str | Path,
                    top_n: int | None, calibrate: bool = False) -> dict[str, float]:
    """A result's figures under the top-N rule (or the calibrator), from its out-of-fold
    predictions.

    cv_<name> and fold_<k>_<name> are per-fold figures and their mean (as during training);
    oof_<name> pools all studies (the competition metric, its global variant, the AUCs).
    calibrate: the second-level model instead of the top-N rule, cross-fitted (each fold's
    studies calibrated by a model fitted on the other folds' out-of-fold predictions).
    """
    data = JobData.load(shards)
    oof = result.oof().set_index("study_uid")
    wide = calibrated_oof(result, data, oof) if calibrate else to_targets(oof, top_n)
    return oof_figures(wide, oof["fold"], data)


def oof_figures(wide: pd.DataFrame, folds: pd.Series, data: JobData) -> dict[str, float]:
    """The per-fold, CV and pooled figures of 8-column out-of-fold predictions (index
    study_uid; `folds`: each study's fold, same index)."""
    per_fold = {int(k): score_targets(wide.loc[part.index], data) for k, part in folds.groupby(folds)}
    return {**summarize_folds(per_fold),
            **{f"oof_{k}": v for k, v in evaluate(data.label_frame(wide.index), wide).items()}}


def found_flags(result: TrainResult, uids: list[str],
                tables: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(n, 7) bool: the vertebrae stage 1 found in each study by stage 2's found rule, in
    `tables` (default: the out-of-fold slice tables of the training studies); all True for a
    family without stage 1."""
    if not result.config.needs_stage1:
        return np.ones((len(uids), N_VERTEBRAE), bool)
    if tables is None:
        tables = load_slice_tables(Path(result.info.stage1_dir) / SLICE_TABLES)
    seq = result.config.sequence
    return np.stack([found_vertebrae(tables[u][:, :N_VERTEBRAE], seq.threshold, seq.smooth)
                     for u in uids])


def _calibration_table(result: TrainResult, data: JobData, oof: pd.DataFrame):
    uids = list(oof.index)
    scores = oof[list(VERTEBRAE)].to_numpy(np.float64)
    return scores, found_flags(result, uids), data.label_frame(uids).to_numpy(), uids


def calibrated_oof(result: TrainResult, data: JobData, oof: pd.DataFrame) -> pd.DataFrame:
    """Honest calibrated out-of-fold predictions (TARGETS columns), cross-fitted on the folds."""
    scores, found, labels, uids = _calibration_table(result, data, oof)
    out = cross_fit(scores, found, labels, oof["fold"].to_numpy())
    return pd.DataFrame(out, index=uids, columns=list(TARGETS))


def fit_result_calibrator(result: TrainResult, shards: ShardSet | str | Path) -> Calibrator:
    """The calibrator a promoted ensemble applies: fitted on every out-of-fold prediction."""
    data = JobData.load(shards)
    scores, found, labels, _ = _calibration_table(result, data, result.oof().set_index("study_uid"))
    return fit_calibrator(scores, found, labels)


def evaluate_prior(shards: ShardSet | str | Path) -> dict[str, float]:
    """The out-of-fold figures of the constant-prior baseline every model must beat.

    Each study is predicted with the prevalence of every target among the studies of the
    OTHER folds (as the fold model that did not see it would be), so no label leaks in.
    """
    data = JobData.load(shards)
    fold_prior = {f: data.prior(data.split(f)[0]) for f in set(data.folds.values())}
    preds = pd.DataFrame([fold_prior[data.folds[u]] for u in data.uids], index=data.uids,
                         columns=list(TARGETS))
    figures = evaluate(data.label_frame(data.uids), preds.astype(np.float64))
    return {f"oof_{k}": v for k, v in figures.items()}
