"""Deterministic cross-validation folds: one group per study, stratified on the labels, seeded.

Studies are ordered by their label pattern (segmented first, then patient_overall and the
vertebrae from the rarest-positive upwards) and, within equal patterns, by a seeded hash of the
UID; folds are then dealt round-robin along that order. Every stratum is therefore spread evenly
over the folds, the result depends only on (UIDs, labels, seed, n_folds) and never on the order
studies were discovered or processed in.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from cspine_ray import VERTEBRAE

# rarest first (docs/ARCHITECTURE.md, "Field facts": prevalences), so the rare positives are dealt most evenly
_STRATA = ("has_segmentation", "patient_overall", "C3", "C4", "C1", "C5", "C6", "C2", "C7")


def _seeded_hash(uid: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{uid}".encode()).hexdigest()


def assign_folds(studies: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Fold (0..n_folds-1) per row of `studies` (columns study_uid, has_segmentation, labels)."""
    if studies.empty:
        return pd.Series([], dtype="int64", index=studies.index)
    if studies["study_uid"].duplicated().any():
        raise ValueError("assign_folds: duplicated study_uid")
    keys = studies[list(_STRATA)].astype(int).copy()
    keys["_hash"] = [_seeded_hash(u, seed) for u in studies["study_uid"]]
    order = keys.sort_values([*_STRATA, "_hash"], ascending=[False] * len(_STRATA) + [True]).index
    folds = pd.Series(0, index=studies.index, dtype="int64")
    folds.loc[order] = [i % n_folds for i in range(len(order))]
    return folds


def fold_summary(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per fold: studies, positives per target, segmented studies (for logs and tests)."""
    train = manifest[manifest["fold"] >= 0]
    cols = ["patient_overall", *VERTEBRAE, "has_segmentation"]
    summary = train.groupby("fold")[cols].sum().astype(int)
    summary.insert(0, "studies", train.groupby("fold").size())
    return summary
