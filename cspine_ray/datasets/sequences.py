"""Two-stage family, stage 2: one sample = one vertebra of one study as a sequence of 2.5D crops.

From the study's slice table (ratio C1..C7 + box per slice, ground truth or predicted by
stage 1) `choose_slices` picks kL slices for the vertebra (k = 3 slices a step by default),
`study_crop_box` one crop box for all of them, and the dataset turns the kL cropped slices into
L 2.5D images: step i holds chosen slices ki ... ki + k - 1 (window-major channels when several
windows are used).

Slice choice (the thesis, section 4.5.2): smooth each vertebra's ratio with a centred rolling
mean, keep the slices above the threshold, take 3L evenly spaced among them (repeating evenly
when there are fewer). With choice="run" (the top teams' robust variant) only the contiguous run
of passing slices around the smoothed peak is kept, so a false-positive run elsewhere in the
study takes no picks and does not widen the crop. A step may hold k = `per_step` slices (1st
place: 5) instead of 3. A vertebra that passes nowhere is not an error; it gets a defined
fallback and found=False, which the model may answer with a prior:
  1. a trace of it (smoothed peak > MIN_PEAK): the contiguous run of slices around the peak
     whose smoothed ratio is at least half the peak;
  2. none: its expected anatomical place, part `vertebra` of 7 equal parts of the study's
     cervical z-range (slices where any vertebra passes the threshold; the whole study when
     none does).

Step layouts. "spread" (the thesis): the kL picks are consecutive groups of k, so at the usual
8-10 passing slices a step can be [z, z, z+1] on one vertebra and [z, z+3, z+6] on another: its
channels mean different things from sample to sample. "neighbours" (the 1st place's): L step
centres spread over the same passing slices, each step its centre and true neighbours
(centre + offset * (j - k // 2)), centres moved inward where a neighbour would leave the study;
a vertebra with fewer distinct centres than L gets fewer real steps, the rest padding at the end
(masked by the model, never shown as repeated slices).

Crops. "study" (the thesis): the union of the C1-C7 boxes on the chosen slices, so where two
vertebrae share slices a negative's crop may show its neighbour's fracture. "vertebra": the union
of the judged vertebra's own boxes (a wide slice table's, stage1.vertebra_boxes), tight around it
(the C1-C7 boxes where its own are unknown on every chosen slice). With box_channel each step
gains a plane that is 1 inside the judged vertebra's own box on the step's middle slice
(`box_plane`): the model is told which vertebra it judges (the 1st and 4th places gave stage 2
the vertebra's mask).

Per-step fracture targets (`step_targets`): a step shows the fracture of a fractured vertebra
when one of its slices carries a fracture box of the study (train_bounding_boxes.csv, one box
per slice); every step of a vertebra labelled not fractured shows none. A fractured vertebra of
a study without boxes has no step targets (known=False): its fracture may be on any step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cspine_ray import N_VERTEBRAE
from cspine_ray.datasets.images import read_windowed
from cspine_ray.datasets.store import ShardStore
from cspine_ray.datasets.tables import check_slice_table, split_table
from cspine_ray.datasets.windowing import resolve_windows
from cspine_ray.io.errors import StudyError

MIN_PEAK = 0.01  # below this a smoothed ratio is numerical noise, not a trace of the vertebra
MIN_CROP = 0.05  # smallest crop side (fraction of the image): a collapsed predicted box stays usable
SLICE_CHOICES = ("spread", "run")
STEP_LAYOUTS = ("spread", "neighbours")
STEP_TARGETS = ("boxes", "label")
CROPS = ("study", "vertebra")


def smooth_ratios(ratio_table: np.ndarray, smooth: int) -> np.ndarray:
    """Centred rolling mean of `smooth` slices along z (fewer at the ends), per column."""
    ratio = np.nan_to_num(np.asarray(ratio_table, dtype=np.float64), nan=0.0)
    if smooth <= 1:
        return ratio
    n = len(ratio)
    left = smooth // 2
    right = smooth - 1 - left
    csum = np.concatenate([np.zeros((1, ratio.shape[1])), np.cumsum(ratio, axis=0)])
    lo = np.clip(np.arange(n) - left, 0, n)
    hi = np.clip(np.arange(n) + right + 1, 0, n)
    return (csum[hi] - csum[lo]) / (hi - lo)[:, None]


def spread(candidates: np.ndarray, count: int) -> np.ndarray:
    """`count` evenly spaced entries of sorted `candidates` (first and last included); with
    fewer candidates than `count`, each is repeated count // n or count // n + 1 times."""
    n = len(candidates)
    if n >= count:
        positions = np.floor(np.linspace(0, n - 1, count) + 0.5).astype(np.int64)
    else:
        positions = np.arange(count) * n // count
    return candidates[positions]


def choose_slices(ratio_table: np.ndarray, vertebra: int, length: int, threshold: float = 0.3,
                  smooth: int = 5, per_step: int = 3,
                  choice: str = "spread") -> tuple[np.ndarray, bool]:
    """Slices for vertebra `vertebra` (0 = C1 ... 6 = C7) -> (int64 (per_step * length,)
    ascending, found)."""
    extent, found = vertebra_extent(ratio_table, vertebra, threshold, smooth, choice)
    if length < 1 or per_step < 1:
        raise ValueError(f"length and per_step must be at least 1, got {length}, {per_step}")
    return spread(extent, per_step * length), found


def choose_steps(ratio_table: np.ndarray, vertebra: int, length: int, threshold: float = 0.3,
                 smooth: int = 5, per_step: int = 3, choice: str = "spread",
                 layout: str = "spread", offset: int = 1) -> tuple[np.ndarray, np.ndarray, bool]:
    """Slices of the L steps of vertebra `vertebra` in step layout `layout` -> (int64
    (per_step * length,) step-major, bool (length,) real steps, found). A padding step (mask
    False, always after the real ones) repeats the last real step's slices."""
    if layout not in STEP_LAYOUTS:
        raise ValueError(f"step layout must be one of {STEP_LAYOUTS}, got {layout!r}")
    if layout == "spread":
        indices, found = choose_slices(ratio_table, vertebra, length, threshold, smooth, per_step,
                                       choice)
        return indices, np.ones(length, bool), found
    if length < 1 or per_step < 1 or offset < 1:
        raise ValueError(f"length, per_step and offset must be at least 1, got {length}, "
                         f"{per_step}, {offset}")
    extent, found = vertebra_extent(ratio_table, vertebra, threshold, smooth, choice)
    n = len(ratio_table)
    half = per_step // 2
    first, last = half * offset, n - 1 - (per_step - 1 - half) * offset
    if first <= last:  # else the study is shorter than one step: neighbours are clipped below
        extent = np.unique(np.clip(extent, first, last))
    centres = np.unique(spread(extent, length))
    real = len(centres)
    centres = np.concatenate([centres, np.full(length - real, centres[-1])])
    steps = centres[:, None] + offset * (np.arange(per_step) - half)[None, :]
    return np.clip(steps, 0, n - 1).reshape(-1), np.arange(length) < real, found


def vertebra_extent(ratio_table: np.ndarray, vertebra: int, threshold: float = 0.3,
                    smooth: int = 5, choice: str = "spread") -> tuple[np.ndarray, bool]:
    """The slices that show vertebra `vertebra`, ascending (its passing slices, or with
    choice="run" the passing run around its peak; the fallback where none pass) -> (int64, found)."""
    ratio_table = np.asarray(ratio_table)
    if ratio_table.ndim != 2 or ratio_table.shape[1] != N_VERTEBRAE or len(ratio_table) == 0:
        raise ValueError(f"ratio table must be (z > 0, {N_VERTEBRAE}), got {ratio_table.shape}")
    if not 0 <= vertebra < N_VERTEBRAE:
        raise ValueError(f"vertebra must be 0..{N_VERTEBRAE - 1}, got {vertebra}")
    if choice not in SLICE_CHOICES:
        raise ValueError(f"slice choice must be one of {SLICE_CHOICES}, got {choice!r}")
    smoothed = smooth_ratios(ratio_table, smooth)
    column = smoothed[:, vertebra]
    passing = np.flatnonzero(column > threshold)
    if len(passing) and choice == "run":
        passing = _run_around(column > threshold, int(passing[np.argmax(column[passing])]))
    if len(passing):
        return passing.astype(np.int64), True
    return _fallback_slices(smoothed, vertebra, threshold).astype(np.int64), False


def _run_around(keep: np.ndarray, z: int) -> np.ndarray:
    """The slices of the contiguous run of True in `keep` that contains slice z."""
    start, stop = z, z + 1
    while start > 0 and keep[start - 1]:
        start -= 1
    while stop < len(keep) and keep[stop]:
        stop += 1
    return np.arange(start, stop)


def found_vertebrae(ratio_table: np.ndarray, threshold: float = 0.3, smooth: int = 5) -> np.ndarray:
    """(7,) bool: for each vertebra, the `found` flag `choose_slices` gives it (its smoothed
    ratio passes the threshold on some slice), all at once."""
    return (smooth_ratios(np.asarray(ratio_table), smooth) > threshold).any(0)


def _fallback_slices(smoothed: np.ndarray, vertebra: int, threshold: float) -> np.ndarray:
    column = smoothed[:, vertebra]
    peak_z = int(np.argmax(column))
    peak = column[peak_z]
    if peak > MIN_PEAK:  # rule 1: the run around the peak at half its height
        return _run_around(column >= peak / 2, peak_z)
    # rule 2: expected anatomical position within the cervical range (or the whole study)
    cervical = np.flatnonzero(smoothed.max(axis=1) > threshold)
    first, last = (cervical[0], cervical[-1]) if len(cervical) else (0, len(smoothed) - 1)
    n = last - first + 1
    start = first + vertebra * n // N_VERTEBRAE
    stop = max(first + (vertebra + 1) * n // N_VERTEBRAE, start + 1)
    return np.arange(start, stop)


def study_crop_box(boxes: np.ndarray, indices: Sequence[int] | np.ndarray,
                   margin: float = 0.1) -> tuple[float, float, float, float]:
    """One crop (x0, y0, x1, y1) in [0, 1] for all chosen slices.

    The union of the chosen slices' boxes (NaN rows ignored), widened by `margin` x its width
    / height on each side, made square by growing the shorter side about its centre (the
    shards are square, so the crop keeps the aspect ratio), at least MIN_CROP wide, then
    shifted inside the image; a side longer than the image becomes the full side. All NaN:
    the full image.
    """
    chosen = np.asarray(boxes, dtype=np.float64)[np.asarray(indices, dtype=np.int64)]
    chosen = chosen[np.isfinite(chosen).all(axis=1)]
    if not len(chosen):
        return (0.0, 0.0, 1.0, 1.0)
    x0, y0 = chosen[:, 0].min(), chosen[:, 1].min()
    x1, y1 = chosen[:, 2].max(), chosen[:, 3].max()
    w, h = x1 - x0, y1 - y0
    x0, x1, y0, y1 = x0 - margin * w, x1 + margin * w, y0 - margin * h, y1 + margin * h
    side = min(max(x1 - x0, y1 - y0, MIN_CROP), 1.0)

    def place(lo: float, hi: float) -> tuple[float, float]:
        lo = (lo + hi) / 2 - side / 2
        lo = min(max(lo, 0.0), 1.0 - side)  # shift inside rather than clip: keeps it square
        return lo, lo + side

    x0, x1 = place(x0, x1)
    y0, y1 = place(y0, y1)
    return (float(x0), float(y0), float(x1), float(y1))


def step_targets(indices: np.ndarray, per_step: int, fracture_slices: set[int],
                 label: float, source: str = "boxes") -> tuple[np.ndarray, bool]:
    """(float32 (L,) per-step fracture target, known) for one vertebra's chosen slices.

    label 0: every step 0, known. source "label" (the 1st place's): every step carries the
    vertebra's label, known. source "boxes", label 1 and the study has fracture boxes: a step is 1
    when any of its `per_step` slices has a box, known; label 1 without boxes: unknown (all 0)."""
    if source not in STEP_TARGETS:
        raise ValueError(f"step targets come from one of {STEP_TARGETS}, got {source!r}")
    steps = np.asarray(indices, dtype=np.int64).reshape(-1, per_step)
    if label < 0.5:
        return np.zeros(len(steps), np.float32), True
    if source == "label":
        return np.ones(len(steps), np.float32), True
    if not fracture_slices:
        return np.zeros(len(steps), np.float32), False
    hit = np.isin(steps, list(fracture_slices)).any(axis=1)
    return hit.astype(np.float32), True


def balance_samples(samples: Sequence[tuple[str, int]], labels: Mapping[str, np.ndarray],
                    fraction: float) -> list[tuple[str, int]]:
    """`samples` with each fractured vertebra repeated k times, k the whole number that brings
    fractured vertebrae nearest `fraction` of the epoch (at least once each; none fractured:
    unchanged). Order kept, repeats next to their original (the loader shuffles)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"balanced fraction must be in [0, 1), got {fraction}")
    positive = [float(labels[u][v]) >= 0.5 for u, v in samples]
    n_pos = sum(positive)
    n_neg = len(samples) - n_pos
    if not n_pos or fraction <= n_pos / len(samples):
        return list(samples)
    k = max(1, round(fraction * n_neg / ((1 - fraction) * n_pos)))
    return [s for s, pos in zip(samples, positive) for _ in range(k if pos else 1)]


def study_batches(samples: Sequence[tuple[str, int]], batch_size: int,
                  seed: int) -> list[list[int]]:
    """Batches of whole studies for a patient-level loss: the sample indices grouped by study
    (first appearance), the studies shuffled by `seed`, max(1, batch_size // 7) studies a batch
    (the last batch may hold fewer)."""
    groups: dict[str, list[int]] = {}
    for i, (uid, _) in enumerate(samples):
        groups.setdefault(uid, []).append(i)
    studies = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(studies))
    per_batch = max(1, batch_size // N_VERTEBRAE)
    return [[i for k in order[start : start + per_batch] for i in studies[k]]
            for start in range(0, len(studies), per_batch)]


def box_plane(box: np.ndarray, height: int, width: int, crop: tuple[int, int, int, int],
              size: int) -> np.ndarray:
    """float32 (size, size): 1 where a pixel's centre lies inside `box` (x0, y0, x1, y1 in [0, 1]
    of a height x width image) once the pixel crop (y0, y1, x0, x1) is resized to size x size
    (as `read_windowed` resizes it); all 0 for a box with a NaN."""
    plane = np.zeros((size, size), np.float32)
    if not np.isfinite(box).all():
        return plane
    y0, y1, x0, x1 = crop
    centres = (np.arange(size) + 0.5) / size
    xs = (x0 + centres * (x1 - x0)) / width    # pixel centres in [0, 1] of the image
    ys = (y0 + centres * (y1 - y0)) / height
    inside_x = (xs >= box[0]) & (xs < box[2])
    inside_y = (ys >= box[1]) & (ys < box[3])
    plane[np.ix_(inside_y, inside_x)] = 1.0
    return plane


def box_to_pixels(box: tuple[float, float, float, float], height: int,
                  width: int) -> tuple[int, int, int, int]:
    """Normalised (x0, y0, x1, y1) -> pixel (y0, y1, x0, x1), end exclusive, at least 1 pixel."""
    x0, y0, x1, y1 = box
    px0 = min(int(np.floor(x0 * width)), width - 1)
    py0 = min(int(np.floor(y0 * height)), height - 1)
    px1 = max(min(int(np.ceil(x1 * width)), width), px0 + 1)
    py1 = max(min(int(np.ceil(y1 * height)), height), py0 + 1)
    return py0, py1, px0, px1


class VertebraSequenceDataset(Dataset):
    """(uid, vertebra) samples -> dict of one vertebra's sequence of L 2.5D crops.

    Sample keys:
        image     float32 (L, k * n_windows (+ 1), crop_size, crop_size), values in [0, 1];
                  k = per_step; with box_channel the last channel of a step is its box plane
        ratio     float32 (L,) the smoothed slice-table ratio of the vertebra at each step's
                  middle slice (how surely the step shows it; an optional input channel)
        vertebra  int (0 = C1 ... 6 = C7)
        label     float32 scalar, the study's label for this vertebra (only when labels are given)
        step_label float32 (L,) and step_known bool: `step_targets` from the shard's fracture
                  boxes (only when labels are given)
        found     bool, False when the fallback chose the slices
        step_mask bool (L,) the real steps (all True but in the "neighbours" layout, where a
                  short vertebra has fewer distinct steps; padding comes last)
        indices   int64 (kL,) the chosen slices, step-major
        box       float32 (4) the crop box x0, y0, x1, y1 in [0, 1]
        uid       str
    slice_tables: uid -> (z, 11) ratio C1..C7 + box; labels: uid -> (8) in TARGETS order.
    native: crop from the shards' native-resolution level where they have one (the box is in
    [0, 1] of the image, so the same crop at up to twice the pixels). layout / offset: the step
    layout (STEP_LAYOUTS) and, for "neighbours", the slice distance between a step's channels.
    step_target: where step_label comes from (STEP_TARGETS: the fracture boxes or the label).
    crop: what the crop frames (CROPS); box_channel: the judged vertebra's box plane per step.
    Both read the vertebrae's own boxes of a wide (z, 39) slice table.
    """

    def __init__(self, shards_dir: str | Path, samples: Sequence[tuple[str, int]],
                 slice_tables: Mapping[str, np.ndarray],
                 labels: Mapping[str, np.ndarray] | None = None, length: int = 8,
                 threshold: float = 0.3, crop_size: int = 320,
                 windows: Sequence[str | Sequence[float]] = ("bone",), smooth: int = 5,
                 margin: float = 0.1, per_step: int = 3, choice: str = "spread",
                 native: bool = False, layout: str = "spread", offset: int = 1,
                 step_target: str = "boxes", crop: str = "study", box_channel: bool = False,
                 max_open: int = 64):
        if length < 1 or crop_size < 1:
            raise ValueError(f"length and crop_size must be positive, got {length}, {crop_size}")
        if layout not in STEP_LAYOUTS:
            raise ValueError(f"step layout must be one of {STEP_LAYOUTS}, got {layout!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.store = ShardStore(shards_dir, max_open=max_open)
        self.samples = [(uid, int(v)) for uid, v in samples]
        for uid, v in self.samples:
            if not 0 <= v < N_VERTEBRAE:
                raise ValueError(f"vertebra must be 0..{N_VERTEBRAE - 1}, got {v} for study {uid}")
            if uid not in slice_tables:
                raise StudyError(uid, "no slice table for this study")
            if labels is not None and uid not in labels:
                raise StudyError(uid, "no labels for this study")
        uids = {uid for uid, _ in self.samples}
        self.slice_tables = {u: np.asarray(slice_tables[u], np.float32) for u in uids}
        self.labels = None if labels is None else {u: np.asarray(labels[u], np.float32) for u in uids}
        self.length = length
        self.threshold = threshold
        self.crop_size = crop_size
        self.windows = resolve_windows(windows)
        self.smooth = smooth
        self.margin = margin
        self.per_step = per_step
        self.choice = choice
        self.native = native
        self.layout = layout
        self.offset = offset
        self.step_target = step_target
        self.crop = crop
        self.box_channel = box_channel

    @property
    def channels(self) -> int:
        return self.per_step * len(self.windows) + int(self.box_channel)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        uid, vertebra = self.samples[i]
        shard = self.store.get(uid)
        volume = shard.slices(self.native)
        n, height, width = volume.shape
        ratios, boxes, own = split_table(check_slice_table(uid, self.slice_tables[uid], n))
        if own is None and (self.crop == "vertebra" or self.box_channel):
            raise StudyError(uid, "the slice table has no per-vertebra boxes, which the vertebra "
                                  "crop and the box channel need (stage1.vertebra_boxes)")
        indices, step_mask, found = choose_steps(
            ratios, vertebra, self.length, self.threshold, self.smooth,
            self.per_step, self.choice, self.layout, self.offset)
        framed = boxes
        if self.crop == "vertebra" and np.isfinite(own[indices, vertebra]).all(1).any():
            framed = own[:, vertebra]
        box = study_crop_box(framed, indices, self.margin)
        crop = box_to_pixels(box, height, width)
        image = read_windowed(volume, indices, self.windows, self.crop_size, crop)  # (W, kL, S, S)
        size, k = self.crop_size, self.per_step
        image = image.reshape(len(self.windows), self.length, k, size, size).transpose(0, 1)
        image = image.reshape(self.length, k * len(self.windows), size, size)
        middle = indices.reshape(self.length, k)[:, k // 2]
        if self.box_channel:
            planes = np.stack([box_plane(own[z, vertebra], height, width, crop, size) for z in middle])
            image = torch.cat([image, torch.from_numpy(planes)[:, None]], dim=1)
        ratio = smooth_ratios(ratios, self.smooth)[middle, vertebra]
        sample = {
            "image": image.contiguous(),
            "ratio": torch.from_numpy(np.clip(ratio, 0.0, 1.0).astype(np.float32)),
            "vertebra": vertebra,
            "found": found,
            "step_mask": torch.from_numpy(step_mask),
            "indices": torch.from_numpy(indices),
            "box": torch.tensor(box, dtype=torch.float32),
            "uid": uid,
        }
        if self.labels is not None:
            label = float(self.labels[uid][vertebra])
            fractures = {int(b[0]) for b in shard.fracture_boxes}
            steps, known = step_targets(indices, self.per_step, fractures, label, self.step_target)
            sample["label"] = torch.tensor(label, dtype=torch.float32)
            sample["step_label"], sample["step_known"] = torch.from_numpy(steps), known
        return sample
