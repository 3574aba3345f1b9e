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

Orientations that put the checked labels out of their anatomical order along z (C2 above C1:
a mirrored mask) are not candidates. The chosen orientation must then show that the mask
belongs to this study, because a mask shifted along z by a few slices, or another study's mask
of the same shape, still has a mean HU well above the bone threshold (half of a vertebra is
still bone):

- every checked label present (each of C1..C7 by default) must sit on bone by itself;
- the labels' edges must fit the bone's edges best where they are. The fit is the edge
  contrast, mean HU inside the labels minus just outside them; moved by up to 10 slices along
  z and 2 pixels in-plane (the whole mask), or 2 pixels in-plane (each vertebra on its own),
  no offset beyond one slice / one pixel may raise it by more than ALIGN_MARGIN_HU. A correct
  mask peaks at no offset; a shifted one peaks where it belongs, another study's elsewhere.

Labels above `max_label` (RSNA: 19, the last thoracic vertebra) are refused: such a file is
not an RSNA mask.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from cspine_ray import VERTEBRAE
from cspine_ray.io.dicom import SeriesInfo
from cspine_ray.io.errors import StudyError

log = logging.getLogger(__name__)

MIN_BONE_HU = 150.0  # mean HU inside vertebra labels below this: labels are not on bone
RSNA_MAX_LABEL = 19  # RSNA masks: 1-7 = C1-C7, 8-19 = T1-T12
_MAX_SAMPLES = 200_000  # label voxels sampled per candidate; plenty for a mean
_MIN_LABEL_SAMPLES = 20  # a label sampled fewer times is too small to judge on its own

# The offset search (see the module docstring). On generated studies (1-4 mm slices, 48-512
# px, shards of 32-256 px; benchmarks/hostile.py) and the real CT, every correct mask peaks at
# no offset, every mask shifted by 3-10 slices is refused (its contrast peaks at the shift),
# and about 9 in 10 other studies' masks are refused: the rest fit this patient's bone within
# a pixel in some orientation. A search on the mean HU inside alone refused correct masks:
# moved up one vertebra, a mask's top sits on the dense skull base.
MAX_SHIFT_SLICES = 10
MAX_LABEL_SHIFT_SLICES = 0  # each vertebra alone: in-plane only (3 slices of 4 mm reach the next)
MAX_SHIFT_PIXELS = 2  # pixels of the HU volume given (the shard size in preprocessing)
ALIGN_MARGIN_HU = 10.0  # an offset beyond one slice / pixel must beat the mask as given by this
_SEARCH_SAMPLES = 50_000
_MIN_OFFSET_SAMPLES = 50  # a vertebra sampled fewer times is not searched on its own


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


def _load_labels(path: Path, study: str, max_label: int) -> np.ndarray:
    """The NIfTI array in its on-disk integer dtype (no float copy), labels in 0..max_label."""
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
    if high > max_label:
        raise StudyError(study, f"segmentation {path.name} holds label {int(high)}, above the highest "
                                f"allowed {max_label} (RSNA masks: 1-7 = C1-C7, 8-19 = T1-T12)")
    return data


_DIRECTIONS = {"head_to_feet": 1, "feet_to_head": -1}


def _in_order(z: np.ndarray, values: np.ndarray, direction: str) -> bool:
    """Whether the mean canonical z (0 = head) of each label present moves the way the labels
    are numbered: in the RSNA map C1's centre lies above C2's, ..., above T1's."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=z) / counts
    means = means[counts >= _MIN_LABEL_SAMPLES]
    return bool(np.all(_DIRECTIONS[direction] * np.diff(means) > 0))


def _label_name(label: int) -> str:
    return f"label {label} ({VERTEBRAE[label - 1]})" if 1 <= label <= len(VERTEBRAE) else f"label {label}"


def _hu_indices(coords: list[np.ndarray], label_shape: tuple[int, int, int],
                hu_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label voxel indices -> indices into the (possibly in-plane resized) HU volume."""
    z, r, c = coords
    return z, (r * hu_shape[1]) // label_shape[1], (c * hu_shape[2]) // label_shape[2]


def _label_off_bone(coords: list[np.ndarray], values: np.ndarray, label_shape: tuple[int, int, int],
                    hu: np.ndarray, min_bone_hu: float) -> str | None:
    """The first checked label present (values: the label of each sampled voxel) whose own mean
    HU is below the bone threshold."""
    z, r, c = _hu_indices(coords, label_shape, hu.shape)
    sampled = hu[z, r, c].astype(np.float64)
    for label in np.unique(values):
        inside = sampled[values == label]
        if len(inside) >= _MIN_LABEL_SAMPLES and inside.mean() < min_bone_hu:
            return (f"has {_label_name(int(label))} off bone: mean HU {inside.mean():.0f} inside "
                    f"it, below {min_bone_hu:.0f} (all checked labels together: {sampled.mean():.0f})")
    return None


def _shell(view: np.ndarray, coords: list[np.ndarray], hu_shape: tuple[int, ...]) -> list[np.ndarray]:
    """Unlabelled voxels next to the sampled label voxels of `view` (the labels in canonical
    order): one HU pixel away along a row or a column, one slice along z."""
    z, r, c = coords
    rows, cols = -(-view.shape[1] // hu_shape[1]), -(-view.shape[2] // hu_shape[2])
    found = []
    for dz, dr, dc in ((1, 0, 0), (-1, 0, 0), (0, rows, 0), (0, -rows, 0), (0, 0, cols), (0, 0, -cols)):
        zz, rr, cc = z + dz, r + dr, c + dc
        inside = ((zz >= 0) & (zz < view.shape[0]) & (rr >= 0) & (rr < view.shape[1])
                  & (cc >= 0) & (cc < view.shape[2]))
        zz, rr, cc = zz[inside], rr[inside], cc[inside]
        empty = view[zz, rr, cc] == 0
        found.append((zz[empty], rr[empty], cc[empty]))
    return [np.concatenate(axis) for axis in zip(*found)]


def _thinned(coords: list[np.ndarray]) -> list[np.ndarray]:
    step = max(1, len(coords[0]) // _SEARCH_SAMPLES)
    return [a[::step] for a in coords]


def _offset_means(points: tuple[np.ndarray, ...], hu: np.ndarray, dz: int, dy: np.ndarray,
                  dx: np.ndarray) -> np.ndarray | None:
    """Mean HU at the points moved by dz slices and each (dy, dx) pixel pair; None when the
    move takes more than half of them out of the volume."""
    z, r, c = points
    zz = z + dz
    valid = (zz >= 0) & (zz < hu.shape[0])
    if 2 * valid.sum() < len(z) or not valid.any():
        return None
    rr = np.clip(r[valid][None, :] + dy[:, None], 0, hu.shape[1] - 1)
    cc = np.clip(c[valid][None, :] + dx[:, None], 0, hu.shape[2] - 1)
    return hu[zz[valid][None, :], rr, cc].astype(np.float64).mean(axis=1)


def _best_offset(view: np.ndarray, coords: list[np.ndarray], hu: np.ndarray,
                 max_dz: int) -> tuple[tuple[int, int, int], float, float]:
    """(dz, dy, dx) at which the labels' edges match the bone's edges best, that edge contrast
    and the contrast with no offset. The contrast is mean HU inside the labels minus mean HU
    just outside them: a mean HU inside alone also rises when a mask moves up onto the skull
    base, the contrast does not. dz in slices (up to max_dz), dy/dx in pixels of `hu`."""
    coords = _thinned(coords)
    inside = _hu_indices(coords, view.shape, hu.shape)
    outside = _hu_indices(_thinned(_shell(view, coords, hu.shape)), view.shape, hu.shape)
    plane = np.arange(-MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(plane, plane, indexing="ij"))
    best, best_score, as_given = (0, 0, 0), -np.inf, np.nan
    for dz in range(-max_dz, max_dz + 1):
        within, around = _offset_means(inside, hu, dz, dy, dx), _offset_means(outside, hu, dz, dy, dx)
        if within is None or around is None:
            continue
        scores = within - around
        if dz == 0:
            as_given = float(scores[(dy == 0) & (dx == 0)][0])
        i = int(np.argmax(scores))
        if scores[i] > best_score:
            best, best_score = (dz, int(dy[i]), int(dx[i])), float(scores[i])
    return best, best_score, as_given


def _offset_problem(view: np.ndarray, coords: list[np.ndarray], hu: np.ndarray,
                    max_dz: int) -> str | None:
    """How far, and how much better, the labels' edges fit moved; None when no offset beyond
    one slice / one pixel fits clearly better (by ALIGN_MARGIN_HU) than where they are."""
    (dz, dy, dx), best, as_given = _best_offset(view, coords, hu, max_dz)
    if max(abs(dz), abs(dy), abs(dx)) <= 1 or not best - as_given > ALIGN_MARGIN_HU:
        return None
    return (f"fit the bone's better moved by {dz} slice(s) along z and ({dy}, {dx}) px in-plane "
            f"(HU inside minus just outside the labels {best:.0f} there, {as_given:.0f} as given; "
            f"more than {ALIGN_MARGIN_HU:.0f} HU better)")


def _misalignment(view: np.ndarray, coords: list[np.ndarray], values: np.ndarray,
                  hu: np.ndarray) -> str | None:
    """Why the labels do not sit where they belong (a shifted or foreign mask), or None: the
    whole mask, then each vertebra on its own (another patient's spine curves differently)."""
    if problem := _offset_problem(view, coords, hu, MAX_SHIFT_SLICES):
        return f"is misaligned (shifted, or another study's mask): its edges {problem}"
    for label in np.unique(values):
        own = values == label
        if own.sum() >= _MIN_OFFSET_SAMPLES:
            if problem := _offset_problem(view, [a[own] for a in coords], hu, MAX_LABEL_SHIFT_SLICES):
                return (f"is misaligned (another study's mask?): the edges of "
                        f"{_label_name(int(label))} {problem}")
    return None


def load_segmentation(
    path: str | Path,
    info: SeriesInfo,
    hu: np.ndarray | None = None,
    check_labels: Iterable[int] = range(1, 8),
    study: str | None = None,
    *,
    min_bone_hu: float = MIN_BONE_HU,
    max_label: int = RSNA_MAX_LABEL,
    label_direction: str = "head_to_feet",
) -> AlignedSegmentation:
    """Labels aligned to `info`'s canonical volume; with hu given, the orientation is chosen and
    the alignment checked against bone (see the module docstring). StudyError says why not.

    label_direction: how the checked labels are numbered along the spine, "head_to_feet" (RSNA:
    C1 = 1 ... T12 = 19) or "feet_to_head" (TotalSegmentator); an orientation that puts them in
    the other order along z (a mirrored mask) is never chosen.
    """
    if label_direction not in _DIRECTIONS:
        raise ValueError(f"label_direction must be one of {sorted(_DIRECTIONS)}, got {label_direction!r}")
    path = Path(path)
    study = study or info.study
    data = _load_labels(path, study, max_label)
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
        values = data[coords]  # the label of each sampled voxel
        scores = []  # mean HU per candidate; nan where the candidate puts the labels out of order
        for c in candidates:
            mapped = c.map_coords(coords, data.shape)
            in_order = _in_order(mapped[0], values, label_direction)
            scores.append(_sample_hu(mapped, target, hu) if in_order else float("nan"))
        if all(np.isnan(scores)):
            raise StudyError(study, f"segmentation {path.name} has its labels {ids} out of order "
                                    f"along z in every orientation (they must be numbered "
                                    f"{label_direction.replace('_', ' ')})")
        best = int(np.nanargmax(scores))  # first maximum: ties keep the preferred candidate
        chosen, bone_hu = candidates[best], scores[best]
        if bone_hu < min_bone_hu:
            ranked = sorted(((s, i) for i, s in enumerate(scores) if not np.isnan(s)), reverse=True)
            tried = ", ".join(f"{candidates[i].name} {s:.0f}" for s, i in ranked[:3])
            raise StudyError(study, f"segmentation {path.name} does not sit on bone in any orientation: "
                                    f"mean HU inside labels {ids} below {min_bone_hu:.0f} in all "
                                    f"{len(ranked)} that keep the labels in order, of "
                                    f"{len(candidates)} tried (best: {tried})")
        mapped = chosen.map_coords(coords, data.shape)
        problem = (_label_off_bone(mapped, values, target, hu, min_bone_hu)
                   or _misalignment(chosen.apply(data), mapped, values, hu))
        if problem:
            raise StudyError(study, f"segmentation {path.name} {problem}")
        if best != 0:
            given = ("labels out of order" if np.isnan(scores[0]) else f"{scores[0]:.0f}")
            notes.append(f"segmentation {path.name}: orientation {chosen.name} chosen (mean HU inside "
                         f"labels {bone_hu:.0f}) over {candidates[0].name} ({given})")

    labels = chosen.apply(data).astype(np.uint8, copy=False)  # a view: no second full-size copy
    messages = tuple(f"study {study}: {n}" for n in notes)
    for message in messages:
        log.warning(message)
    return AlignedSegmentation(labels=labels, orientation=chosen.name, bone_hu=bone_hu, warnings=messages)
