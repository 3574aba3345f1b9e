"""Per-study tables that datasets take as plain data: study labels and slice tables.

A slice table is a float32 (z, 11) array per study: ratio C1..C7, then the C1-C7 box
(x0, y0, x1, y1, normalised; NaN where no cervical vertebra is seen). Segmented studies have
one in their shard; stage 1 of the two-stage family predicts one for every study.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cspine_ray import N_VERTEBRAE, TARGETS
from cspine_ray.datasets.store import ShardStore
from cspine_ray.io.errors import StudyError

SLICE_TABLE_WIDTH = N_VERTEBRAE + 4  # ratio C1..C7, then the box x0, y0, x1, y1


def study_labels(manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    """uid -> float32 (8) labels in TARGETS order, for the manifest rows that have all 8 labels."""
    values = manifest[list(TARGETS)].to_numpy(dtype=np.float32, na_value=np.nan)
    return {
        uid: row for uid, row in zip(manifest["study_uid"], values) if np.isfinite(row).all()
    }


def shard_slice_table(store: ShardStore, uid: str) -> np.ndarray | None:
    """The study's ground-truth (z, 11) slice table from its shard; None if not segmented."""
    shard = store.get(uid)
    if shard.ratio is None or shard.box is None:
        return None
    return np.concatenate([shard.ratio, shard.box], axis=1).astype(np.float32)


def shard_slice_tables(shards_dir: str | Path, uids: Iterable[str]) -> dict[str, np.ndarray]:
    """Ground-truth slice tables of the segmented studies among `uids` (others are left out)."""
    store = ShardStore(shards_dir)
    tables = {uid: shard_slice_table(store, uid) for uid in uids}
    return {uid: t for uid, t in tables.items() if t is not None}


def check_slice_table(uid: str, table: np.ndarray, n_slices: int) -> np.ndarray:
    """Return `table` as float32 if it is (n_slices, 11), else raise StudyError."""
    table = np.asarray(table, dtype=np.float32)
    if table.shape != (n_slices, SLICE_TABLE_WIDTH):
        raise StudyError(uid, f"slice table has shape {table.shape}, "
                              f"expected ({n_slices}, {SLICE_TABLE_WIDTH})")
    return table
