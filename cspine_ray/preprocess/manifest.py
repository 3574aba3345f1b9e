"""The Parquet manifest: one row per study (ok or failed), the index every later step reads."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pandas as pd

from cspine_ray import TARGETS

MANIFEST = "manifest.parquet"

COLUMNS = [
    "study_uid", "split", "status", "reason", "shard", "n_slices", "height", "width",
    "spacing_z", "spacing_y", "spacing_x", *TARGETS, "has_segmentation", "n_fracture_boxes",
    "fold", "checksum", "warnings",
]  # fmt: skip


def write_manifest(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write atomically (temp file + rename), rows sorted by (split, study_uid)."""
    out = Path(out_dir) / MANIFEST
    df = df[COLUMNS].sort_values(["split", "study_uid"]).reset_index(drop=True)
    tmp = out.with_name(f".tmp-{MANIFEST}.{uuid.uuid4().hex[:8]}")
    df.to_parquet(tmp, index=False)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def read_manifest(shards_dir: str | Path) -> pd.DataFrame:
    path = Path(shards_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: run `python -m cspine_ray.preprocess` first")
    df = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a cspine-ray manifest (missing columns {missing})")
    return df


def manifest_hash(df: pd.DataFrame) -> str:
    """Identity of the data a model is trained on: studies, shard checksums, labels and folds."""
    cols = ["study_uid", "split", "status", "checksum", *TARGETS, "fold"]
    rows = df[cols].sort_values(["split", "study_uid"]).astype(str)
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]


def usable(df: pd.DataFrame, split: str = "train") -> pd.DataFrame:
    """The successfully sharded studies of one split."""
    return df[(df["status"] == "ok") & (df["split"] == split)].reset_index(drop=True)
