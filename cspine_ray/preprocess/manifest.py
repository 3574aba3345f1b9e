"""The Parquet manifest: one row per study (ok or failed), the index every later step reads."""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from cspine_ray import TARGETS

MANIFEST = "manifest.parquet"

COLUMNS = [
    "study_uid", "split", "status", "reason", "shard", "n_slices", "height", "width",
    "spacing_z", "spacing_y", "spacing_x", *TARGETS, "has_segmentation", "n_fracture_boxes",
    "fold", "checksum", "warnings",
]  # fmt: skip


@dataclass(frozen=True)
class StudyRow:
    """What preprocessing records about one study: its shard (when ok) or why it failed.
    Labels and folds are joined by the pipeline; `reused` is dropped before writing."""

    study_uid: str
    split: str
    status: str                 # "ok" | "failed"
    reason: str = ""
    shard: str = ""             # relative to the shard set: studies/<uid>
    n_slices: int = 0
    height: int = 0
    width: int = 0
    spacing_z: float = math.nan
    spacing_y: float = math.nan
    spacing_x: float = math.nan
    has_segmentation: bool = False
    n_fracture_boxes: int = 0
    checksum: str = ""
    warnings: str = ""
    reused: bool = False        # served by an earlier run's shard or recorded failure

    @classmethod
    def failed(cls, uid: str, split: str, reason: str, reused: bool = False) -> StudyRow:
        return cls(study_uid=uid, split=split, status="failed", reason=reason, reused=reused)

    @classmethod
    def from_meta(cls, meta: dict, shard: str, reused: bool = False) -> StudyRow:
        """The row of a finished shard, from its meta.json."""
        (n, height, width), spacing = meta["shape"], meta["spacing"]
        return cls(study_uid=meta["study_uid"], split=meta["split"], status="ok", shard=shard,
                   n_slices=int(n), height=int(height), width=int(width),
                   spacing_z=float(spacing[0]), spacing_y=float(spacing[1]),
                   spacing_x=float(spacing[2]), has_segmentation=bool(meta["has_segmentation"]),
                   n_fracture_boxes=len(meta["fracture_boxes"]), checksum=meta["checksum"],
                   warnings="; ".join(meta["warnings"]), reused=reused)

    def to_dict(self) -> dict:
        """A flat, Arrow-friendly row (what a Ray Data task returns)."""
        return asdict(self)


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
