"""Slices of a memory-mapped volume -> windowed, resized float32 tensors.

Only the requested slices (and, with a crop, only the requested rows) are read from the
map; a slice asked for twice is read and resized once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cspine_ray.datasets.windowing import apply_windows


def resize_2d(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, *size), bilinear; antialiased so shrinking does not alias."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def read_windowed(volume: np.ndarray, indices: Sequence[int] | np.ndarray,
                  windows: Sequence[str | Sequence[float]], size: int,
                  crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Slices `indices` of an int16 (z, H, W) volume -> float32 (n_windows, len(indices), size, size).

    crop: pixel rows/cols (y0, y1, x0, x1), end exclusive, applied before resizing.
    """
    unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
    if crop is None:
        hu = np.asarray(volume[unique])
    else:
        y0, y1, x0, x1 = crop
        hu = np.asarray(volume[unique, y0:y1, x0:x1])
    image = apply_windows(torch.from_numpy(hu), windows)  # (n_windows, u, h, w)
    image = resize_2d(image, (size, size)).clamp_(0.0, 1.0)  # rounding may step just past 1
    return image[:, torch.from_numpy(inverse.reshape(-1))].contiguous()
