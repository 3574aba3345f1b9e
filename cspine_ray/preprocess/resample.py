"""In-plane resampling of slices (HU, bilinear with anti-aliasing) and labels (nearest)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_slices(slices: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) int16 HU -> (n, size, size) int16; anti-aliased so downsampling does not alias."""
    n, h, w = slices.shape
    if (h, w) == (size, size):
        return slices.astype(np.int16, copy=False)
    out = np.empty((n, size, size), dtype=np.int16)
    for i, image in enumerate(slices):
        small = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
            (size, size), Image.Resampling.BILINEAR)  # Pillow's bilinear widens its kernel: anti-aliased
        np.clip(np.rint(np.asarray(small)), -32768, 32767, out=out[i], casting="unsafe")
    return out


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resampling (pixel centres aligned)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) label volume -> (n, size, size) by nearest neighbour (labels never blend)."""
    n, h, w = labels.shape
    if (h, w) == (size, size):
        return labels
    return labels[:, nearest_indices(h, size)][:, :, nearest_indices(w, size)]
