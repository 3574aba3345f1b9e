"""One shard per study: a folder of memory-mappable .npy arrays plus meta.json; the shard set.

    studies/<uid>/volume.npy  int16 (z, S, S) HU, canonical order (head -> feet)
    studies/<uid>/native.npy  int16 (z, N, N) the same slices at native resolution (N =
                              native_size > S), for studies at least N px large
    studies/<uid>/mask.npy    uint8 (z, S, S) vertebra labels      } only for studies
    studies/<uid>/ratio.npy   float32 (z, 7) C1..C7 ratio targets  } with a segmentation
    studies/<uid>/box.npy     float32 (z, 4) C1-C7 box, NaN rows   }
    studies/<uid>/meta.json   spacing, instance numbers, fracture boxes, warnings, checksum, ...

A shard is built in a hidden temporary folder and renamed into place only when complete, so a
reader (or a resumed run) never sees a half-written one, even after SIGKILL. meta.json carries a
checksum of the arrays, the settings hash and a fingerprint of the source files: a resumed run
reuses a shard only when all three still match.

A `ShardSet` is a finished shard folder as later steps see it: its manifest (read once), the
manifest's hash (the data's identity in every result key) and `path(uid)`, the only way from a
UID to a study's folder (the UID is checked so it cannot escape the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cspine_ray.io.rsna import check_uid
from cspine_ray.preprocess.manifest import manifest_hash, read_manifest, usable

STUDIES = "studies"  # the folder of the shards inside a shard set
# 2: Pillow resampling (values may differ from format 1 by 1 HU); 3: 5/3 halvings first;
# 4: the segmentation and box checks of issue 12 (pixels as in 3; masks that fail are dropped)
# 5: the native-resolution level (volume.npy and the targets as in 4)
SHARD_FORMAT = 5
SAME_PIXELS_SINCE = 3  # new studies shard to the same pixels for models trained on formats >= 3
ARRAYS = ("volume", "native", "mask", "ratio", "box")
META = "meta.json"
TMP_PREFIX = ".tmp-"


@dataclass
class Shard:
    """A study's arrays (memory-mapped by default) and its metadata."""

    path: Path
    meta: dict
    volume: np.ndarray
    native: np.ndarray | None = None
    mask: np.ndarray | None = None
    ratio: np.ndarray | None = None
    box: np.ndarray | None = None

    @property
    def uid(self) -> str:
        return self.meta["study_uid"]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])

    def slices(self, native: bool) -> np.ndarray:
        """The volume a model reads: the native level when asked for and the shard has one,
        else the shard-size volume (same slices; crops and boxes are in [0, 1] of either)."""
        return self.native if native and self.native is not None else self.volume

    @property
    def fracture_boxes(self) -> list[list[float]]:
        """[z, x0, y0, x1, y1] per box, coordinates normalised to [0, 1]."""
        return self.meta.get("fracture_boxes", [])


def study_path(root: str | Path, uid: str) -> Path:
    """ROOT/studies/<uid>; the uid is checked so it cannot escape the folder."""
    return Path(root) / STUDIES / check_uid(uid)


@dataclass(frozen=True, eq=False)
class ShardSet:
    """A preprocessed shard folder: read once by a driver, passed down to what it starts."""

    root: Path
    manifest: pd.DataFrame
    hash: str

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        root = Path(root).resolve()
        manifest = read_manifest(root)
        return cls(root=root, manifest=manifest, hash=manifest_hash(manifest))

    @classmethod
    def of(cls, shards: ShardSet | str | Path) -> ShardSet:
        """`shards` itself, or the shard set at that path."""
        return shards if isinstance(shards, ShardSet) else cls.open(shards)

    def path(self, uid: str) -> Path:
        return study_path(self.root, uid)

    def usable(self, split: str = "train") -> pd.DataFrame:
        """The successfully sharded studies of one split."""
        return usable(self.manifest, split)

    def open_shard(self, uid: str, mmap: bool = True) -> Shard:
        return open_shard(self.path(uid), mmap=mmap)


def open_shard(path: str | Path, mmap: bool = True) -> Shard:
    path = Path(path)
    meta = json.loads((path / META).read_text())
    mode = "r" if mmap else None
    arrays = {
        name: np.load(path / f"{name}.npy", mmap_mode=mode) if name in meta["arrays"] else None
        for name in ARRAYS
    }
    return Shard(path=path, meta=meta, **arrays)


def checksum(path: Path, names: list[str]) -> str:
    """sha256 over the named arrays' files, in order."""
    h = hashlib.sha256()
    for name in names:
        with open(path / f"{name}.npy", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_tmp_dir(studies_dir: Path, uid: str) -> Path:
    tmp = studies_dir / f"{TMP_PREFIX}{uid}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, meta: dict) -> None:
    """Seal a finished temporary shard (checksum, meta, fsync) and rename it into place."""
    names = [n for n in ARRAYS if (tmp / f"{n}.npy").exists()]
    for name in names:
        with open(tmp / f"{name}.npy", "rb+") as f:
            os.fsync(f.fileno())
    nbytes = {n: (tmp / f"{n}.npy").stat().st_size for n in names}
    meta = dict(meta, format=SHARD_FORMAT, arrays=names, nbytes=nbytes, checksum=checksum(tmp, names))
    write_json_atomic(tmp / META, meta)
    _fsync_dir(tmp)
    if final.exists():  # a stale or invalid shard: move aside first so the rename stays atomic
        trash = final.with_name(f"{TMP_PREFIX}old-{final.name}.{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def reusable_meta(path: Path, shard_hash: str, fingerprint: str, verify: bool = False) -> dict | None:
    """meta.json of a complete, valid shard built from the same sources and settings, else None.

    A shard folder only exists once complete (atomic rename), so file sizes suffice by default;
    `verify` re-reads every array and compares the checksum (catches later corruption).
    """
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if (
        meta.get("format") != SHARD_FORMAT
        or meta.get("shard_hash") != shard_hash
        or meta.get("source_fingerprint") != fingerprint
    ):
        return None
    try:
        if any((path / f"{n}.npy").stat().st_size != meta["nbytes"][n] for n in meta["arrays"]):
            return None
        if verify and checksum(path, meta["arrays"]) != meta["checksum"]:
            return None
    except (OSError, KeyError):
        return None
    return meta


def remove_stale_tmp(studies_dir: Path) -> int:
    """Delete temporary folders/files left by an interrupted run; returns how many."""
    if not studies_dir.exists():
        return 0
    stale = [p for p in studies_dir.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(stale)
