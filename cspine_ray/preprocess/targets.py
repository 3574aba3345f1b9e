"""Per-slice targets from a vertebra label volume: the thesis's stage-1 ratio and box targets.

ratio[z, k] = pixels of vertebra C(k+1) in slice z / its maximum over the study's slices.
box[z]      = (x0, y0, x1, y1) of the C1-C7 connected regions in slice z, normalised to [0, 1];
              NaN where the slice shows no cervical vertebra.
vertebra_boxes[z, k] = the same box of vertebra C(k+1) alone (stage 1's per-vertebra boxes).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cspine_ray import N_VERTEBRAE



def vertebra_pixel_counts(labels: np.ndarray) -> np.ndarray:
    """(z, 7) pixel count of each of C1..C7 in each slice of a (z, y, x) label volume."""
    z = labels.shape[0]
    counts = np.zeros((z, N_VERTEBRAE), dtype=np.int64)
    for i in range(z):  # one bincount per slice keeps memory at one slice
        c = np.bincount(labels[i].ravel(), minlength=N_VERTEBRAE + 1)
        counts[i] = c[1 : N_VERTEBRAE + 1]
    return counts


def vertebra_ratios(counts: np.ndarray) -> np.ndarray:
    """Normalise (z, 7) counts by each vertebra's maximum over the study (0 where absent)."""
    peak = counts.max(axis=0, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(peak > 0, counts / np.maximum(peak, 1), 0.0)
    return ratio.astype(np.float32)


def region_box(mask: np.ndarray, min_region_pixels: int = 8) -> tuple[float, ...] | None:
    """Normalised (x0, y0, x1, y1) of a 2-D bool mask's connected regions of at least
    `min_region_pixels` pixels (a stray labelled voxel does not stretch the box); None if none."""
    h, w = mask.shape
    regions, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1))
    if n == 0:
        return None
    sizes = np.bincount(regions.ravel(), minlength=n + 1)
    keep = [sl for rid, sl in enumerate(ndimage.find_objects(regions), start=1)
            if sl is not None and sizes[rid] >= min_region_pixels]
    if not keep:
        return None
    y0, y1 = min(sl[0].start for sl in keep), max(sl[0].stop for sl in keep)
    x0, x1 = min(sl[1].start for sl in keep), max(sl[1].stop for sl in keep)
    return (x0 / w, y0 / h, x1 / w, y1 / h)


def cervical_boxes(labels: np.ndarray, min_region_pixels: int = 8) -> np.ndarray:
    """(z, 4) normalised C1-C7 box per slice from the in-slice connected regions of the mask
    (`region_box`: the thesis keeps the boxes of the mask's connected regions)."""
    boxes = np.full((len(labels), 4), np.nan, dtype=np.float32)
    for zi in range(len(labels)):  # slice by slice: the region map stays one slice big
        box = region_box((labels[zi] >= 1) & (labels[zi] <= N_VERTEBRAE), min_region_pixels)
        if box is not None:
            boxes[zi] = box
    return boxes


def vertebra_boxes(labels: np.ndarray, min_region_pixels: int = 8) -> np.ndarray:
    """(z, 7, 4) normalised box of each of C1..C7 per slice (x0, y0, x1, y1; NaN where the slice
    shows none of it), from that vertebra's own regions as `cervical_boxes` keeps them."""
    boxes = np.full((len(labels), N_VERTEBRAE, 4), np.nan, dtype=np.float32)
    for zi in range(len(labels)):
        present = np.unique(labels[zi])
        for v in present[(present >= 1) & (present <= N_VERTEBRAE)]:
            box = region_box(labels[zi] == v, min_region_pixels)
            if box is not None:
                boxes[zi, v - 1] = box
    return boxes


BOX_SLACK_PX = 1.0  # CSV boxes are rounded to 0.1 px: a corner this far past the edge still counts as inside


def fracture_boxes(
    boxes: tuple[tuple[float, float, float, float, int], ...],
    instance_numbers: tuple[int, ...],
    shape: tuple[int, int],
) -> tuple[list[list[float]], list[str]]:
    """Map RSNA fracture boxes (x, y, width, height, slice_number) to [z, x0, y0, x1, y1] normalised.

    slice_number is an InstanceNumber; the canonical index comes from the series' own numbering.
    A box on a slice the series does not have is dropped with a warning (the slice may have been
    skipped). A box that does not lie inside the image (or has no area) says the boxes were
    made for other images: all of the study's boxes are dropped, with one warning.
    """
    index_of = {n: i for i, n in enumerate(instance_numbers)}
    rows, cols = shape
    outside = [b for b in boxes if not _inside_image(b, rows, cols)]
    if outside:
        x, y, width, height, slice_number = outside[0]
        return [], [f"fracture box on slice {slice_number} (x {x:g}, y {y:g}, width {width:g}, "
                    f"height {height:g}) does not lie inside the {rows}x{cols} image; all "
                    f"{len(boxes)} fracture box(es) of this study dropped"]
    out, warnings = [], []
    for x, y, width, height, slice_number in boxes:
        zi = index_of.get(int(slice_number))
        if zi is None:
            warnings.append(f"fracture box on slice {slice_number}, which the series does not have")
            continue
        x0, y0 = max(0.0, x / cols), max(0.0, y / rows)
        x1, y1 = min(1.0, (x + width) / cols), min(1.0, (y + height) / rows)
        out.append([float(zi), x0, y0, x1, y1])
    out.sort()
    return out, warnings


def _inside_image(box: tuple[float, float, float, float, int], rows: int, cols: int) -> bool:
    """Corners ordered (positive width and height) and within the image, give or take rounding."""
    x, y, width, height, _ = box
    return (width > 0 and height > 0 and x >= -BOX_SLACK_PX and y >= -BOX_SLACK_PX
            and x + width <= cols + BOX_SLACK_PX and y + height <= rows + BOX_SLACK_PX)
