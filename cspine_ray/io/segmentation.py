"""Load a label NIfTI (RSNA segmentations) aligned to the canonical volume of a DICOM series.

The RSNA files are stored sagittally: the array matching the DICOM stack sorted by file number
(slice, row, col) is `nii[:, ::-1, ::-1].transpose(2, 1, 0)`, and studies whose z runs the other
way need the slice axis flipped again. Other tools write NIfTI differently, so the recipe is not
trusted blindly: when the HU volume is given, every plausible reorientation is tried and the one
whose checked labels (vertebrae) sit on bone wins.

Candidates, in order of preference (ties go to the earlier one):

- `rsna`: the recipe above, put into canonical order with the series' instance direction;
- `rsna+flip_z`, `rsna+flip_rows`, `rsna+flip_cols` and their combinations: every axis flip of
  the same (x, y, z) layout, which also covers NIfTI written as plain (x, y, z) without flips;
- `yxz...`: the in-plane axes swapped, `zyx...`: the array already stored as (slice, row, col).

Only candidates whose shape matches the series are considered. The check samples the HU volume
at the label voxels (nearest neighbour when the volume was resized in-plane), so it never needs
a float copy of the labels.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from cspine_ray.io.dicom import SeriesInfo
from cspine_ray.io.errors import StudyError

log = logging.getLogger(__name__)

MIN_BONE_HU = 150.0  # mean HU inside vertebra labels below this: labels are not on bone
_MAX_SAMPLES = 200_000  # label voxels sampled per candidate; plenty for a mean


@dataclass(frozen=True)
class AlignedSegmentation:
    labels: np.ndarray  # uint8 (z, rows, cols), aligned to the canonical volume of `info`
    orientation: str  # which reorientation was chosen, e.g. "rsna" / "rsna+flip_z" / ...
    bone_hu: float | None  # mean HU inside the checked labels for the chosen orientation
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Candidate:
    name: str
    axes: tuple[int, int, int]  # transpose of the NIfTI array into (z, rows, cols)
    flips: tuple[bool, bool, bool]  # then reverse these axes

    def apply(self, data: np.ndarray) -> np.ndarray:
        view = data.transpose(self.axes)
        return view[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def map_coords(self, coords: tuple[np.ndarray, ...], shape: tuple[int, ...]) -> list[np.ndarray]:
        """NIfTI voxel indices -> (z, row, col) indices in this candidate's array."""
        out = []
        for axis, flip in zip(self.axes, self.flips):
            index = coords[axis]
            out.append(shape[axis] - 1 - index if flip else index)
        return out


def _candidates(nii_shape: tuple[int, ...], target: tuple[int, int, int], z_increases: bool) -> list[_Candidate]:
    """Every orientation worth trying whose shape matches the series, preferred first."""
    # The RSNA recipe flips NIfTI axes 1 and 2 before the transpose, i.e. rows and slices after it;
    # canonical order (head first) undoes the slice flip again for studies numbered feet -> head.
    rsna = (not z_increases, True, False)
    flip_sets = sorted(itertools.product((False, True), repeat=3),
                       key=lambda f: sum(a != b for a, b in zip(f, rsna)))
    found: list[_Candidate] = []
    for axes, family in (((2, 1, 0), "rsna"), ((2, 0, 1), "yxz"), ((0, 1, 2), "zyx")):
        if tuple(nii_shape[a] for a in axes) != target:
            continue
        reference = rsna if family == "rsna" else (False, False, False)
        for flips in (flip_sets if family == "rsna" else sorted(itertools.product((False, True), repeat=3), key=sum)):
            parts = [f"flip_{axis}" for axis, f, r in zip(("z", "rows", "cols"), flips, reference) if f != r]
            found.append(_Candidate("+".join([family, *parts]), axes, flips))
    return found


def _sample_hu(coords: list[np.ndarray], label_shape: tuple[int, int, int], hu: np.ndarray) -> float:
    """Mean HU at label voxel indices; in-plane indices rescaled (nearest) if hu was resized."""
    if len(coords[0]) == 0:
        return float("nan")
    z, r, c = coords
    r = (r * hu.shape[1]) // label_shape[1]
    c = (c * hu.shape[2]) // label_shape[2]
    return float(hu[z, r, c].astype(np.float64).mean())


def _subsample(coords: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    step = max(1, len(coords[0]) // _MAX_SAMPLES)
    return tuple(c[::step] for c in coords)


def _label_coords(data: np.ndarray, ids: list[int]) -> tuple[np.ndarray, ...]:
    """Subsampled indices of the voxels holding one of `ids` (data holds whole numbers 0..255).

    A 256-entry lookup table instead of np.isin: one bool array, no sort (np.isin on a
    768x768x600 volume takes ~1.3 GB and seconds)."""
    lut = np.zeros(256, dtype=bool)
    lut[[i for i in ids if 0 <= i < 256]] = True
    hit = lut[data if data.dtype == np.uint8 else data.astype(np.uint8)]
    # walk the array in memory order (NIfTI data are Fortran-ordered): ~100x faster than C order
    order = "F" if hit.flags.f_contiguous and not hit.flags.c_contiguous else "C"
    flat = np.flatnonzero(hit.ravel(order=order))
    flat = flat[:: max(1, len(flat) // _MAX_SAMPLES)]
    return np.unravel_index(flat, data.shape, order=order)


def mean_hu_inside(labels: np.ndarray, hu: np.ndarray, label_ids: Iterable[int]) -> float:
    """Mean HU of `hu` inside the given labels (nan if none present).

    labels is (z, rows, cols); hu is (z, R, C) with the same z and any in-plane size (sampled with
    nearest-neighbour indices when it differs).
    """
    if labels.shape[0] != hu.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} slices, HU volume {hu.shape[0]}")
    coords = _subsample(np.nonzero(np.isin(labels, list(label_ids))))
    return _sample_hu(list(coords), labels.shape, hu)


def _load_labels(path: Path, study: str) -> np.ndarray:
    """The NIfTI array in its on-disk integer dtype (no float copy), checked to fit uint8."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises assorted types for missing/corrupt files
        raise StudyError(study, f"cannot read segmentation {path.name}: {type(exc).__name__}: {exc}") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError(study, f"segmentation {path.name} is not a 3-D label volume (shape {data.shape})")
    if data.dtype.kind == "f":  # scaled or float-stored labels: accept whole numbers only
        if not np.array_equal(data, np.round(data)):
            raise StudyError(study, f"segmentation {path.name} holds non-integer labels")
    low, high = data.min(), data.max()
    if low < 0 or high > 255:
        raise StudyError(study, f"segmentation {path.name} holds labels outside 0..255 ({low}..{high})")
    return data


def load_segmentation(
    path: str | Path,
    info: SeriesInfo,
    hu: np.ndarray | None = None,
    check_labels: Iterable[int] = range(1, 8),
    study: str | None = None,
    *,
    min_bone_hu: float = MIN_BONE_HU,
) -> AlignedSegmentation:
    """Labels aligned to `info`'s canonical volume, orientation checked against bone when hu is given."""
    path = Path(path)
    study = study or info.study
    data = _load_labels(path, study)
    target = (len(info.files), *info.shape)
    candidates = _candidates(data.shape, target, info.z_increases_with_instance)
    if not candidates:
        raise StudyError(study, f"segmentation {path.name} shape {data.shape} does not match the series "
                                f"({target[0]} slices of {target[1]}x{target[2]})")
    notes: list[str] = []

    if hu is None:
        chosen = candidates[0]
        if not chosen.name.startswith("rsna"):
            raise StudyError(study, f"segmentation {path.name} shape {data.shape} does not fit the RSNA "
                                    "layout; pass the HU volume so the orientation can be checked")
        bone_hu = None  # not checked: the RSNA recipe and the instance direction decide
    else:
        if hu.ndim != 3 or hu.shape[0] != target[0]:
            raise StudyError(study, f"HU volume shape {hu.shape} does not match the series ({target[0]} slices)")
        ids = sorted(set(int(i) for i in check_labels))
        coords = _label_coords(data, ids)
        if len(coords[0]) == 0:
            raise StudyError(study, f"segmentation {path.name} holds none of the checked labels {ids}")
        scores = [_sample_hu(c.map_coords(coords, data.shape), target, hu) for c in candidates]
        best = int(np.argmax(scores))  # first maximum: ties keep the preferred candidate
        chosen, bone_hu = candidates[best], scores[best]
        if bone_hu < min_bone_hu:
            ranked = sorted(zip(scores, range(len(scores))), reverse=True)[:3]
            tried = ", ".join(f"{candidates[i].name} {s:.0f}" for s, i in ranked)
            raise StudyError(study, f"segmentation {path.name} does not sit on bone in any orientation: "
                                    f"mean HU inside labels {ids} below {min_bone_hu:.0f} in all "
                                    f"{len(candidates)} tried (best: {tried})")
        if best != 0:
            notes.append(f"segmentation {path.name}: orientation {chosen.name} chosen (mean HU inside "
                         f"labels {bone_hu:.0f}) over {candidates[0].name} ({scores[0]:.0f})")

    labels = chosen.apply(data).astype(np.uint8, copy=False)  # a view: no second full-size copy
    messages = tuple(f"study {study}: {n}" for n in notes)
    for message in messages:
        log.warning(message)
    return AlignedSegmentation(labels=labels, orientation=chosen.name, bone_hu=bone_hu, warnings=messages)
