"""In-plane resampling to the shard size: slices (5/3 halvings, then bilinear) and labels (nearest).

A slice is first halved as often as it stays at least the shard size (`halvings`; the reader
delivers it so, decoding JPEG 2000 at that resolution), then resized with anti-aliased bilinear
for the rest. Labels are picked by nearest neighbour at the same pixel centres, so masks stay
on the anatomy: a halved band's sample n sits on source pixel 2**levels * n, not between pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cspine_ray.io.jpeg2000 import halved, halved_shape


def halvings(shape: tuple[int, int], size: int) -> int:
    """How many 5/3 halvings keep both sides of `shape` at least `size` (0: bilinear only)."""
    levels = 0
    while min(halved_shape(shape, levels + 1)) >= size:
        levels += 1
    return levels


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


def source_step(n_in: int, size: int, levels: int) -> float:
    """Source pixels per output pixel along one side (levels halvings, then bilinear to size)."""
    return (1 << levels) * halved(n_in, levels) / size


def nearest_indices(n_in: int, n_out: int, levels: int = 0) -> np.ndarray:
    """Source index under each output pixel's centre, for `levels` halvings then bilinear."""
    band = halved(n_in, levels)
    # centre in band pixels: (i + 0.5) * band / n_out - 0.5; band pixel m sits on source 2**levels * m
    rounded = (1 << levels) * (np.arange(n_out) + 0.5) * band / n_out - ((1 << levels) - 1) / 2  # centre + 0.5
    return np.clip(np.floor(rounded).astype(np.int64), 0, n_in - 1)


def resize_labels(labels: np.ndarray, size: int, levels: int = 0) -> np.ndarray:
    """(n, h, w) label volume -> (n, size, size) by nearest neighbour (labels never blend)."""
    n, h, w = labels.shape
    if (h, w) == (size, size):
        return labels
    return labels[:, nearest_indices(h, size, levels)][:, :, nearest_indices(w, size, levels)]
