"""Per-study tables that datasets take as plain data: study labels and slice tables.

A slice table is a float32 (z, 11) array per study: ratio C1..C7, then the C1-C7 box
(x0, y0, x1, y1, normalised; NaN where no cervical vertebra is seen). Segmented studies have
one in their shard; stage 1 of the two-stage family predicts one for every study. A wide table
(z, 39) (`stage1.vertebra_boxes`) goes on with each vertebra's own box, C1 first (28 columns):
where stage 2 crops and what its box channel draws.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cspine_ray import N_VERTEBRAE, TARGETS
from cspine_ray.datasets.store import ShardStore
from cspine_ray.io.errors import StudyError
from cspine_ray.preprocess.targets import vertebra_boxes as per_vertebra_boxes

SLICE_TABLE_WIDTH = N_VERTEBRAE + 4  # ratio C1..C7, then the box x0, y0, x1, y1
WIDE_TABLE_WIDTH = SLICE_TABLE_WIDTH + 4 * N_VERTEBRAE  # then C1..C7's own boxes


def table_width(vertebra_boxes: bool) -> int:
    return WIDE_TABLE_WIDTH if vertebra_boxes else SLICE_TABLE_WIDTH


def split_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(z, 11 or 39) -> ratio (z, 7), C1-C7 box (z, 4), per-vertebra boxes (z, 7, 4) or None."""
    ratio, box = table[:, :N_VERTEBRAE], table[:, N_VERTEBRAE:SLICE_TABLE_WIDTH]
    if table.shape[1] == SLICE_TABLE_WIDTH:
        return ratio, box, None
    return ratio, box, table[:, SLICE_TABLE_WIDTH:].reshape(len(table), N_VERTEBRAE, 4)


def study_labels(manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    """uid -> float32 (8) labels in TARGETS order, for the manifest rows that have all 8 labels."""
    values = manifest[list(TARGETS)].to_numpy(dtype=np.float32, na_value=np.nan)
    return {
        uid: row for uid, row in zip(manifest["study_uid"], values) if np.isfinite(row).all()
    }


def shard_slice_table(store: ShardStore, uid: str, vertebra_boxes: bool = False) -> np.ndarray | None:
    """The study's ground-truth (z, 11) slice table from its shard, (z, 39) with the vertebrae's
    own boxes from its mask (NaN without one); None if not segmented."""
    shard = store.get(uid)
    if shard.ratio is None or shard.box is None:
        return None
    parts = [shard.ratio, shard.box]
    if vertebra_boxes:
        z = len(shard.ratio)
        own = (np.full((z, N_VERTEBRAE, 4), np.nan) if shard.mask is None
               else per_vertebra_boxes(np.asarray(shard.mask)))
        parts.append(own.reshape(z, 4 * N_VERTEBRAE))
    return np.concatenate(parts, axis=1).astype(np.float32)


def shard_slice_tables(shards_dir: str | Path, uids: Iterable[str],
                       vertebra_boxes: bool = False) -> dict[str, np.ndarray]:
    """Ground-truth slice tables of the segmented studies among `uids` (others are left out)."""
    store = ShardStore(shards_dir)
    tables = {uid: shard_slice_table(store, uid, vertebra_boxes) for uid in uids}
    return {uid: t for uid, t in tables.items() if t is not None}


def check_slice_table(uid: str, table: np.ndarray, n_slices: int) -> np.ndarray:
    """Return `table` as float32 if it is (n_slices, 11 or 39), else raise StudyError."""
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2 or table.shape[0] != n_slices or table.shape[1] not in (SLICE_TABLE_WIDTH,
                                                                                WIDE_TABLE_WIDTH):
        raise StudyError(uid, f"slice table has shape {table.shape}, expected ({n_slices}, "
                              f"{SLICE_TABLE_WIDTH}) or ({n_slices}, {WIDE_TABLE_WIDTH})")
    return table
