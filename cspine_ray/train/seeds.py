"""A seed ensemble: one family trained k times, with seeds seed..seed + k - 1, as one result.

With `ensemble: k` the family is trained k times on the same folds, each member with seed
seed + i for both of its stages (its own stage 1 too: on the learning test's set, averaging
members that shared one stage 1 gained half as much; BENCHMARKS.md, "Seed ensembles"), and the
members are combined into one result folder:

    <family>-<key>/   fold_<k>.pt, fold_<k>.m<i>.pt  every member's fold models (hard links)
                      oof.parquet   each study's out-of-fold predictions, the members' mean
                      oof_last.parquet  the same of their last-epoch predictions
                      stage1/       the members' stage-1 fold models and their mean slice tables

Each member predicted a study with the fold model that did not see it, so the mean is out of
fold too. The predictor averages the members' models as it averages folds: the stage-1 tables
over every member's stage-1 models, then every stage-2 model on them.

Each member is the plain result of its seed (its usual key), so a search that already trained
seed 43 reuses it, and growing an ensemble from 3 to 5 trains two more. Each member keeps the
epoch chosen on its own folds; the ensemble's history is the members' mean at each epoch, its
best_epoch their median, and its last-epoch figures (`ResultInfo.last`, which nothing chose)
those of the averaged last-epoch predictions, so the unselected figure is the ensemble's own.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cspine_ray.config import to_dict
from cspine_ray.train.config import TrainConfig
from cspine_ray.train.result import (LAST_OOF, RESULT, ResultInfo, TrainResult, load_result,
                                     oof_figures, weights_file, write_info, writing_result)
from cspine_ray.train.tasks.base import (SLICE_TABLES, JobData, load_slice_tables,
                                         save_slice_tables, to_targets)


def member_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The members' settings: the ensemble's with seed + i (both stages), each a single model."""
    return [dataclasses.replace(cfg, seed=cfg.seed + i, ensemble=1) for i in range(cfg.ensemble)]


def mean_oof(members: list[TrainResult], last: bool = False) -> pd.DataFrame | None:
    """The members' out-of-fold predictions averaged per study (same studies, same folds);
    `last`: their last-epoch predictions, None when a member kept none."""
    frames = [m.oof_last() if last else m.oof() for m in members]
    if any(f is None for f in frames):
        return None
    frames = [f.sort_values("study_uid").reset_index(drop=True) for f in frames]
    first = frames[0]
    for member, frame in zip(members[1:], frames[1:]):
        if not (frame["study_uid"].equals(first["study_uid"]) and frame["fold"].equals(first["fold"])):
            raise ValueError(f"seed ensemble: {member.path} predicted other studies or folds "
                             f"than {members[0].path}")
    columns = [c for c in first.columns if c not in ("study_uid", "fold")]
    out = first.copy()
    out[columns] = np.mean([f[columns].to_numpy(np.float64) for f in frames], axis=0)
    return out


def mean_history(members: list[TrainResult]) -> list[dict]:
    """Each epoch's figures averaged over the members (the keys every member reports)."""
    histories = [m.info.history for m in members]
    out = []
    for epoch in zip(*histories):
        # best_* say where one member stood: the ensemble's are member_epochs, best_epoch
        keys = [k for k in epoch[0] if all(k in e for e in epoch)
                and k not in ("best_epoch", "best_cv_metric")]
        out.append({k: (epoch[0][k] if k == "epoch" else float(np.mean([e[k] for e in epoch])))
                    for k in keys})
    return out


def _link(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights on disk), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def mean_slice_tables(members: list[TrainResult]) -> dict[str, np.ndarray]:
    """The members' stage-1 out-of-fold slice tables averaged per study."""
    tables = [load_slice_tables(m.path / SLICE_TABLES) for m in members]
    for member, table in zip(members[1:], tables[1:]):
        if table.keys() != tables[0].keys():
            raise ValueError(f"seed ensemble: {member.path} has slice tables of other studies "
                             f"than {members[0].path}")
    return {uid: np.mean([t[uid] for t in tables], axis=0) for uid in tables[0]}


def _combine(members: list[TrainResult], tmp: Path, info: ResultInfo, oof: pd.DataFrame) -> None:
    for i, member in enumerate(members):
        for fold in range(info.n_folds):
            _link(member.path / weights_file(fold), tmp / weights_file(fold, i))
    oof.to_parquet(tmp / "oof.parquet", index=False)
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(info.config), sort_keys=False))
    write_info(info, tmp / RESULT)


def _members_info(members: list[TrainResult], config: TrainConfig, **changes) -> ResultInfo:
    epochs = [m.info.best_epoch for m in members]
    return dataclasses.replace(
        members[0].info, config=config, history=mean_history(members),
        best_epoch=int(np.median(epochs)), created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        member_epochs=epochs, members=[m.path.name for m in members], **changes)


def _figures(cfg: TrainConfig, oof: pd.DataFrame, data: JobData) -> dict[str, float]:
    indexed = oof.set_index("study_uid")
    return oof_figures(to_targets(indexed, cfg.effective_top_n), indexed["fold"], data)


def write_seed_ensemble(cfg: TrainConfig, key: str, members: list[TrainResult], data: JobData,
                        out: Path) -> None:
    """Combine finished member results (and their stage 1s) into `out`, atomically."""
    with writing_result(out) as tmp:
        stage1_dir = None
        if cfg.needs_stage1:
            stages = [load_result(m.info.stage1_dir) for m in members]
            stage1_cfg = dataclasses.replace(stages[0].config, ensemble=len(members))
            info = _members_info(stages, stage1_cfg, key=f"{stages[0].info.key}-x{len(members)}",
                                 cv_metric=float(np.mean([s.info.cv_metric for s in stages])))
            (tmp / "stage1").mkdir()
            # stage 1's oof.parquet holds per-study errors: here the members' mean errors
            _combine(stages, tmp / "stage1", info, mean_oof(stages))
            save_slice_tables(mean_slice_tables(stages), tmp / "stage1" / SLICE_TABLES)
            stage1_dir = str(out / "stage1")  # where it will be once tmp is renamed
        oof, last_oof = mean_oof(members), mean_oof(members, last=True)
        info = _members_info(members, cfg, key=key, cv_metric=_figures(cfg, oof, data)["cv_metric"],
                             stage1_dir=stage1_dir)
        if last_oof is not None:  # what the ensemble scores at the epoch nothing chose
            last_oof.to_parquet(tmp / LAST_OOF, index=False)
            info.last_figures = {"epoch": info.history[-1]["epoch"],
                                 **_figures(cfg, last_oof, data)}
        _combine(members, tmp, info, oof)
