"""One study -> one shard (or a recorded failure). Runs inside a Ray Data task.

The study's slices are streamed: each chunk is decoded (at half or quarter resolution when that
is still at least the shard size, see resample.py), converted to HU and resampled to the shard
size before the next is read, and written straight into a memory-mapped .npy file, so a
768x768x600 study needs the full-resolution label volume at most (when segmented), never the
full-resolution HU volume. With a native level (`native_size`), each file is decoded once and
written at both sizes: the shard size for stage 1 and native resolution for the crops.

The images and the labels decide whether a study is usable; its annotations are optional: a
segmentation that fails its checks, or fracture boxes that do not fit the images, are dropped
with a warning naming the study, and the study is kept with its labels (has_segmentation False
in the manifest when the segmentation went).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine_ray import VERTEBRAE
from cspine_ray.io.dicom import SeriesInfo, iter_hu_levels, scan_series
from cspine_ray.io.errors import StudyError
from cspine_ray.io.segmentation import AlignedSegmentation, load_segmentation
from cspine_ray.preprocess import shards
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.manifest import StudyRow
from cspine_ray.preprocess.resample import halvings, resize_labels, resize_slices, source_step
from cspine_ray.preprocess.targets import (
    cervical_boxes,
    fracture_boxes,
    vertebra_pixel_counts,
    vertebra_ratios,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyItem:
    """One study's work for a preprocessing (or prediction) task: its files and annotations."""

    study_uid: str
    split: str                                   # "train" | "test"
    image_dir: str
    data_root: str | None = None                 # symlinked files must resolve inside it
    segmentation: str | None = None
    fracture_boxes: tuple[tuple[float, ...], ...] = ()   # io/rsna.Box fields, by slice


def source_fingerprint(item: StudyItem) -> str:
    """Cheap identity of a study's inputs (file names, sizes, mtimes; segmentation; boxes)."""
    h = hashlib.sha256()
    image_dir = Path(item.image_dir)
    if image_dir.is_dir():
        for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
            h.update(f"{entry.name}\0{_stat_key(entry.path)}\n".encode())
    if item.segmentation:
        h.update(f"seg\0{_stat_key(item.segmentation)}\n".encode())
    h.update(json.dumps([list(b) for b in item.fracture_boxes]).encode())
    return h.hexdigest()[:32]


# The least a study must cover to show the cervical spine (C1-C7 span about 12-15 cm): below
# these it is a scout, a fragment or positions collapsed onto one plane, not a neck CT.
MIN_SLICES = 16
MIN_EXTENT_MM = 40.0


def check_usable(info) -> None:
    """Refuse a series too short to hold the cervical spine (StudyError with the reason)."""
    extent = abs(info.z_positions[-1] - info.z_positions[0]) if len(info.z_positions) > 1 else 0.0
    if len(info.files) < MIN_SLICES or extent < MIN_EXTENT_MM:
        raise StudyError(info.study, f"too short to hold the cervical spine: {len(info.files)} "
                                     f"slice(s) over {extent:.1f} mm (needs at least {MIN_SLICES} "
                                     f"slices and {MIN_EXTENT_MM:g} mm)")


def _stat_key(path: str) -> str:
    """Size and mtime of a file; for one that cannot be stat'ed (a dangling symlink, a link
    loop) the error, so the study goes on to be read, and reports the file, in its own task."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"error {e.errno}"
    return f"{st.st_size}\0{st.st_mtime_ns}"


def _chunks(iterable, n):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _aligned_segmentation(item: StudyItem, info: SeriesInfo, volume: np.ndarray, cfg: PreprocessConfig,
                          warnings: list[str]) -> AlignedSegmentation | None:
    """The study's segmentation aligned to its volume, or None (and a warning) when it fails
    its checks: it is an optional annotation, the study goes on without it."""
    uid = item.study_uid
    try:
        seg = load_segmentation(item.segmentation, info, hu=volume, study=uid,
                                min_bone_hu=cfg.min_bone_hu)
    except StudyError as e:
        message = f"study {uid}: segmentation dropped, the study is kept without it: {e.problem}"
        log.warning(message)
        warnings.append(message)
        return None
    warnings += seg.warnings
    return seg


def build_shard(item: StudyItem, cfg: PreprocessConfig, final: Path, fingerprint: str) -> dict:
    """Read, resample and write one study's shard atomically; returns its meta. Raises StudyError."""
    uid = item.study_uid
    # data_root: where symlinked files must lead (the symlink policy, io/rsna.resolves_inside)
    info = scan_series(item.image_dir, study=uid, root=item.data_root)
    check_usable(info)
    size, native = cfg.size, cfg.native_side(info.shape)
    tmp = shards.new_tmp_dir(final.parent, uid)
    try:
        # the shard-size volume, and the native level when the study has one: both from one
        # decode of each file, each read at its own halvings (512 px -> 256: a half-res read)
        sides = [size] + ([native] if native else [])
        arrays = [np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.int16,
                                            shape=(len(info.files), side, side))
                  for name, side in zip(("volume", "native"), sides)]
        reads = iter_hu_levels(info, tuple(halvings(info.shape, side) for side in sides))
        start = 0
        for chunk in _chunks(reads, cfg.chunk_slices):
            for i, (array, side) in enumerate(zip(arrays, sides)):
                array[start : start + len(chunk)] = resize_slices(np.stack([c[i] for c in chunk]), side)
            start += len(chunk)
        for array in arrays:
            array.flush()
        volume = arrays[0]
        if start != len(info.files):
            raise StudyError(uid, f"series delivered {start} slices, expected {len(info.files)}")

        warnings = list(info.warnings)
        seg_meta = None
        seg = _aligned_segmentation(item, info, volume, cfg, warnings) if item.segmentation else None
        if seg is not None:
            counts = vertebra_pixel_counts(seg.labels)  # at full resolution: exact ratios
            mask = resize_labels(seg.labels, size, halvings(info.shape, size))
            del seg
            np.save(tmp / "mask.npy", mask)
            np.save(tmp / "ratio.npy", vertebra_ratios(counts))
            np.save(tmp / "box.npy", cervical_boxes(mask, cfg.min_region_pixels))
            seg_meta = {"vertebrae_present": [v for v, c in zip(VERTEBRAE, counts.sum(0)) if c > 0]}

        boxes, box_warnings = fracture_boxes(
            item.fracture_boxes,
            info.instance_numbers,
            info.shape,
        )
        warnings += [f"study {uid}: {w}" for w in box_warnings]
        meta = {
            "study_uid": uid,
            "split": item.split,
            "shape": [len(info.files), size, size],
            "source_shape": list(info.shape),
            "spacing": _spacing(info, size),
            "native": {"side": native, "spacing": _spacing(info, native)} if native else None,
            "instance_numbers": list(info.instance_numbers),
            "z_positions": list(info.z_positions),
            "z_increases_with_instance": info.z_increases_with_instance,
            "has_segmentation": seg_meta is not None,
            "segmentation": seg_meta,
            "fracture_boxes": boxes,
            "warnings": warnings,
            "shard_hash": cfg.shard_hash(),
            "source_fingerprint": fingerprint,
        }
        shards.commit(tmp, final, meta)
        return json.loads((final / shards.META).read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _spacing(info: SeriesInfo, side: int) -> list[float]:
    """(z, row, col) mm of a level of `side` pixels, read at its halvings then resized."""
    levels = halvings(info.shape, side)
    return [info.spacing[0], info.spacing[1] * source_step(info.shape[0], side, levels),
            info.spacing[2] * source_step(info.shape[1], side, levels)]


def process_study(item: StudyItem, cfg: PreprocessConfig, out_dir: str,
                  verify: bool = False) -> StudyRow:
    """Shard one study, reusing a finished shard or recorded failure from an earlier run.

    Never raises for bad input: the failure is recorded (with its reason) and returned as a row.
    """
    uid = item.study_uid
    final = shards.study_path(out_dir, uid)
    studies_dir = final.parent
    shard = f"{shards.STUDIES}/{uid}"
    failure_path = studies_dir / f"{uid}.failed.json"
    fingerprint = source_fingerprint(item)
    meta = shards.reusable_meta(final, cfg.shard_hash(), fingerprint, verify=verify)
    if meta is not None:
        return StudyRow.from_meta(meta, shard, reused=True)
    try:
        failure = json.loads(failure_path.read_text())
        if failure.get("source_fingerprint") == fingerprint and failure.get("shard_hash") == cfg.shard_hash():
            return StudyRow.failed(uid, item.split, failure["reason"], reused=True)
    except (OSError, ValueError):
        pass

    try:
        meta = build_shard(item, cfg, final, fingerprint)
    except StudyError as e:
        reason = e.problem
    except MemoryError:
        reason = "out of memory while reading the series"
    except Exception as e:  # a reader bug must not kill the run; keep the reason, log the trace
        reason = f"unexpected {type(e).__name__}: {_without_paths(e)}"
        # the stack only: the message may quote a file name from outside (the reason above does not)
        log.error("study %s: %s\n%s", uid, reason, "".join(traceback.format_tb(e.__traceback__)))
    else:
        failure_path.unlink(missing_ok=True)
        return StudyRow.from_meta(meta, shard)

    log.warning("study %s: %s", uid, reason)
    shards.write_json_atomic(
        failure_path,
        {"study_uid": uid, "reason": reason, "source_fingerprint": fingerprint,
         "shard_hash": cfg.shard_hash()},
    )
    return StudyRow.failed(uid, item.split, reason)


def _without_paths(error: Exception) -> str:
    """An unexpected error's text without the file names it may quote (they come from outside
    and may hold a patient's name): for OSError its reason only."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)[:300]
