"""Anatomy on a stage-1 slice table: C1..C7 in order along z, contiguous, each of a plausible length.

Stage 1 predicts every slice on its own (a 2.5D image), so nothing stops it from seeing "C3"
forty slices below C7 or C5 above C4. The spine forbids both: along the study's z axis the
vertebrae follow each other C1, C2, ..., C7 without gaps, each over a bounded number of mm.

`label_vertebrae` finds the labelling of the slices that agrees best with the predicted ratios
under those rules, by dynamic programming over monotone labellings

    above C1 ... above C1, C1 ... C1, C2 ... C2, ..., C7 ... C7, below C7 ... below C7

where each vertebra takes no slices (not in the scan, or not predicted anywhere it may be) or
between MIN_MM and MAX_MM of them. A slice labelled vertebra v gains ratio_v - `threshold`; a
slice above C1 or below C7 gains 0. So a vertebra takes the slices where its predicted ratio
passes the threshold, and a run of passing slices that would break the order (a C3 below C7)
is worth less than the ordered runs it would displace, and is left out.

Direction: shards hold slices in canonical order, head to feet (docs/ARCHITECTURE.md, "Slice
order"): sorted by position, whatever the instance numbers. Only a series without
ImagePositionPatient is ordered by InstanceNumber on the assumption that instance 1 is the
head, which may be wrong. So both directions are tried and the better labelling is kept (head
to feet on a tie): a prediction that agrees with the canonical order keeps it, and a study
that really runs feet to head is not wiped out.

`constrain_table` then keeps each vertebra's predicted ratio inside its interval widened by
half of each neighbour's interval (a vertebra's slices overlap the next one's: facets overlap,
the lordosis tilts the bodies; C2 by all of C1's, as the dens rises through the atlas) and sets
it to 0 elsewhere, so a false-positive run far from where the vertebra can be disappears, and
so does a vertebra predicted in its neighbour's place (two swapped peaks: the weaker one),
while the ratio profile around the vertebra is kept as predicted. A vertebra the labelling
could not place (predicted only faintly: a weak model's usual failure) is kept wherever it lies
between the middles of the placed ones around it, so a faint but right trace survives. The box
columns are left as they are. On the synthetic ground truth (23 segmented studies) the
constraint removes 0.09% of the ratio mass on average, 1.1% at most (tails below 0.25).

Per-vertebra lengths are in mm (the shard's z spacing); without a spacing they are taken as
fractions of the predicted cervical span (CERVICAL_SPAN_MM).

`localisation_errors` is stage 1's quality figure in slices: per vertebra, the distance of the
predicted centre (ratio-weighted mean z) from the true one, and whether the predicted slices
overlap the true ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cspine_ray import N_VERTEBRAE

# Length along z of the interval in which each vertebra dominates the slice (its body, disc and
# share of the overlap with its neighbours), C1..C7. Adult cervical vertebrae: bodies 13-16 mm
# with 4-6 mm discs, C2 with the dens 35-45 mm, the atlas' lateral masses about 15 mm. The upper
# bounds are generous (children are smaller, not larger; a partial scan only shortens); C1 and
# C7 may be cut short by the scan's ends, so only their upper bound is set.
MIN_MM = (0.0, 6.0, 6.0, 6.0, 6.0, 6.0, 0.0)
MAX_MM = (30.0, 60.0, 35.0, 35.0, 35.0, 35.0, 35.0)
CERVICAL_SPAN_MM = 120.0   # C1 top to C7 bottom, adult: the scale when the spacing is unknown
THRESHOLD = 0.3            # a slice "shows" a vertebra above this ratio (stage 2's default)
MIN_MARGIN_MM = 4.0        # each vertebra is kept at least this far beyond its own interval
NEIGHBOUR_MARGIN = 0.5     # ... and this share of each neighbour's interval into it,
DENS_MARGIN = 1.0          # but C2 all of C1's: the dens rises through the atlas ring


@dataclass(frozen=True)
class Labelling:
    """The best ordered labelling of a study's slices.

    bounds (8,): vertebra v (0 = C1) holds slices [bounds[v], bounds[v + 1]) in the labelling's
    direction; above C1 is [0, bounds[0]), below C7 [bounds[7], z). reversed: the labelling runs
    from the last slice to the first (the study is feet to head). score: its total gain.
    """

    bounds: np.ndarray
    reversed: bool
    score: float

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)


def mm_per_slice(n_slices: int, spacing_mm: float | None, ratio: np.ndarray | None = None,
                 threshold: float = THRESHOLD) -> float:
    """The z spacing; without one (None or not positive), CERVICAL_SPAN_MM over the predicted
    cervical span: the slices from the first to the last where any ratio passes `threshold`
    (the whole study when none does)."""
    if spacing_mm is not None and spacing_mm > 0:
        return float(spacing_mm)
    span = n_slices
    if ratio is not None and len(ratio):
        shown = np.flatnonzero(np.nan_to_num(ratio).max(1) > threshold)
        if len(shown):
            span = int(shown[-1] - shown[0] + 1)
    return CERVICAL_SPAN_MM / max(span, 1)


def length_bounds(mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) slice counts per vertebra from MIN_MM / MAX_MM at `mm` per slice."""
    lo = np.array([math.ceil(m / mm - 1e-9) for m in MIN_MM], dtype=np.int64)
    hi = np.array([max(1, math.floor(m / mm + 1e-9)) for m in MAX_MM], dtype=np.int64)
    return np.minimum(lo, hi), hi


def _best_bounds(gain: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, np.ndarray]:
    """The monotone labelling of maximal total gain. gain (z, 7): of labelling slice z as
    vertebra v (above C1 and below C7 gain 0). Vertebra v takes 0 slices or lo[v]..hi[v]."""
    n = len(gain)
    prefix = np.vstack([np.zeros((1, N_VERTEBRAE)), np.cumsum(gain, axis=0)])  # (n + 1, 7)
    best = np.zeros(n + 1)  # best[e]: slices [0, e) labelled with what comes up to here
    taken = np.zeros((N_VERTEBRAE, n + 1), dtype=np.int64)  # v's run length ending at e
    for v in range(N_VERTEBRAE):
        here, run = best.copy(), np.zeros(n + 1, dtype=np.int64)  # v takes no slices
        for length in range(max(1, int(lo[v])), min(int(hi[v]), n) + 1):
            candidate = best[:-length] + prefix[length:, v] - prefix[:-length, v]
            better = candidate > here[length:] + 1e-12
            here[length:][better] = candidate[better]
            run[length:][better] = length
        best, taken[v] = here, run
    end = int(np.argmax(best))  # below C7 from here on (gain 0); the first of equal ends
    bounds = np.zeros(N_VERTEBRAE + 1, dtype=np.int64)
    bounds[N_VERTEBRAE] = end
    for v in range(N_VERTEBRAE - 1, -1, -1):
        end -= int(taken[v, end])
        bounds[v] = end
    return float(best.max()), bounds


def label_vertebrae(ratio: np.ndarray, spacing_mm: float | None = None,
                    threshold: float = THRESHOLD, either_direction: bool = True) -> Labelling:
    """The ordered labelling of the slices that best fits a predicted (z, 7) ratio table."""
    ratio = np.nan_to_num(np.asarray(ratio, dtype=np.float64), nan=0.0)
    if ratio.ndim != 2 or ratio.shape[1] != N_VERTEBRAE:
        raise ValueError(f"ratio table must be (z, {N_VERTEBRAE}), got {ratio.shape}")
    lo, hi = length_bounds(mm_per_slice(len(ratio), spacing_mm, ratio, threshold))
    score, bounds = _best_bounds(ratio - threshold, lo, hi)
    found = Labelling(bounds, False, score)
    if either_direction:
        score_up, bounds_up = _best_bounds(ratio[::-1] - threshold, lo, hi)
        if score_up > score + 1e-9:
            found = Labelling(bounds_up, True, score_up)
    return found


def vertebra_windows(labelling: Labelling, n_slices: int, spacing_mm: float | None = None,
                     ratio: np.ndarray | None = None, threshold: float = THRESHOLD) -> np.ndarray:
    """bool (z, 7): where each vertebra's ratio is kept.

    A placed vertebra (one that took slices) keeps its own interval widened by NEIGHBOUR_MARGIN
    of the previous vertebra's length above (C2: DENS_MARGIN of C1's) and of the next one's
    below (of its own at C1 and C7), by at least MIN_MARGIN_MM each side. A vertebra that took
    no slices (predicted too faintly, or only out of order) keeps what lies between the middles
    of the nearest placed vertebrae above and below it (the study's end where there is none):
    it can only be there."""
    bounds, lengths = labelling.bounds, labelling.lengths
    minimum = math.ceil(MIN_MARGIN_MM / mm_per_slice(n_slices, spacing_mm, ratio, threshold) - 1e-9)
    placed = np.flatnonzero(lengths > 0)

    def margin(share: float, length: int) -> int:
        return max(math.ceil(share * length), minimum)

    keep = np.zeros((n_slices, N_VERTEBRAE), dtype=bool)
    for v in range(N_VERTEBRAE):
        if lengths[v] > 0:
            before = lengths[v - 1] if v > 0 else lengths[v]
            after = lengths[v + 1] if v < N_VERTEBRAE - 1 else lengths[v]
            start = int(bounds[v]) - margin(DENS_MARGIN if v == 1 else NEIGHBOUR_MARGIN, before)
            stop = int(bounds[v + 1]) + margin(NEIGHBOUR_MARGIN, after)
        else:
            # from the middle of the placed vertebra above to the middle of the one below: the
            # slices between them went to either, whichever gained more
            above, below = placed[placed < v], placed[placed > v]
            start = int(bounds[above[-1]]) + int(lengths[above[-1]]) // 2 if len(above) else 0
            stop = (int(bounds[below[0]]) + math.ceil(lengths[below[0]] / 2)
                    if len(below) else n_slices)
        keep[max(0, start):max(0, min(n_slices, stop)), v] = True
    return keep[::-1] if labelling.reversed else keep


def constrain_table(table: np.ndarray, spacing_mm: float | None = None,
                    threshold: float = THRESHOLD) -> np.ndarray:
    """A (z, 7 + k) slice table (ratio C1..C7, then the box) with each vertebra's ratio kept
    only where the ordered labelling puts it (`vertebra_windows`) and 0 elsewhere; unchanged
    when no vertebra passes the threshold anywhere (none placed: each may be anywhere)."""
    table = np.asarray(table)
    ratio = table[:, :N_VERTEBRAE]
    if len(table) == 0:
        return table.copy()
    labelling = label_vertebrae(ratio, spacing_mm, threshold)
    keep = vertebra_windows(labelling, len(table), spacing_mm, ratio, threshold)
    out = table.copy()
    out[:, :N_VERTEBRAE] = np.where(keep, ratio, 0.0)
    return out


def centres(ratio: np.ndarray) -> np.ndarray:
    """(7,) ratio-weighted mean slice index per vertebra; NaN where the column has no mass."""
    ratio = np.clip(np.nan_to_num(np.asarray(ratio, dtype=np.float64)), 0.0, None)
    mass = ratio.sum(0)
    z = np.arange(len(ratio), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, (z @ ratio) / np.where(mass > 0, mass, 1.0), np.nan)


def localisation_errors(predicted: np.ndarray, truth: np.ndarray,
                        threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(z_error, found), each (7,), for one study's predicted and true (z, 7) ratios.

    z_error: |predicted centre - true centre| in slices (centre = ratio-weighted mean z); a
    vertebra predicted nowhere counts as predicted at the study's middle slice, the guess of a
    model that knows nothing. found: 1.0 when some slice has both ratios above `threshold`
    (the predicted slices overlap the true ones), else 0.0. Both NaN for a vertebra that is
    not in the study (no true ratio anywhere)."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or predicted.shape[1:] != (N_VERTEBRAE,):
        raise ValueError(f"predicted {predicted.shape} and true {truth.shape} ratios must be "
                         f"the same (z, {N_VERTEBRAE})")
    middle = (len(truth) - 1) / 2
    true_c = centres(truth)
    pred_c = np.where(np.isnan(centres(predicted)), middle, centres(predicted))
    present = ~np.isnan(true_c)
    z_error = np.where(present, np.abs(pred_c - true_c), np.nan)
    both = (np.nan_to_num(predicted) > threshold) & (np.nan_to_num(truth) > threshold)
    found = np.where(present, both.any(0).astype(np.float64), np.nan)
    return z_error, found
