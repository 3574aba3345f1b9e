"""Whole-study samples for the `cnn3d` family: the windowed volume resized to a cube.

A study much longer than the cube is read at a z stride first (at least 2 x cube slices are
kept), in chunks that are windowed and shrunk in-plane straight away, so a sample never holds
the full-resolution float volume; the last step resizes along z. In-plane bilinear then
linear along z is trilinear interpolation done separably.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cspine_ray.datasets.images import resize_2d
from cspine_ray.datasets.store import ShardStore
from cspine_ray.datasets.windowing import apply_windows, resolve_windows
from cspine_ray.io.errors import StudyError

CHUNK_SLICES = 32  # slices windowed and resized at a time: bounds the float32 working set


def read_cube(volume: np.ndarray, cube: int, windows: Sequence[str | Sequence[float]]) -> torch.Tensor:
    """int16 (z, H, W) volume -> float32 (n_windows, cube, cube, cube) in [0, 1]."""
    n = volume.shape[0]
    stride = max(1, n // (2 * cube))
    zs = np.arange(0, n, stride)
    parts = []
    for start in range(0, len(zs), CHUNK_SLICES):
        hu = np.asarray(volume[zs[start:start + CHUNK_SLICES]])
        windowed = apply_windows(torch.from_numpy(hu), windows)  # (W, c, H, W)
        parts.append(resize_2d(windowed, (cube, cube)).clamp_(0.0, 1.0))
    stack = torch.cat(parts, dim=1)  # (W, z', cube, cube)
    if stack.shape[1] == cube:
        return stack.contiguous()
    return F.interpolate(stack[None], size=(cube, cube, cube), mode="trilinear",
                         align_corners=False)[0].clamp_(0.0, 1.0)


class VolumeDataset(Dataset):
    """uids -> dict(image float32 (n_windows, cube, cube, cube), label float32 (8) when labels
    are given, study int (index into `uids`), uid str)."""

    def __init__(self, shards_dir: str | Path, uids: Sequence[str],
                 labels: Mapping[str, np.ndarray] | None = None, cube: int = 128,
                 windows: Sequence[str | Sequence[float]] = ("bone",), max_open: int = 8):
        if cube < 1:
            raise ValueError(f"cube must be positive, got {cube}")
        self.store = ShardStore(shards_dir, max_open=max_open)
        self.uids = list(uids)
        self.labels = None
        if labels is not None:
            missing = [uid for uid in self.uids if uid not in labels]
            if missing:
                raise StudyError(missing[0], "no labels for this study")
            self.labels = {u: np.asarray(labels[u], np.float32) for u in self.uids}
        self.cube = cube
        self.windows = resolve_windows(windows)

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int) -> dict:
        uid = self.uids[i]
        sample = {
            "image": read_cube(self.store.get(uid).volume, self.cube, self.windows),
            "study": i,
            "uid": uid,
        }
        if self.labels is not None:
            sample["label"] = torch.from_numpy(self.labels[uid].copy())
        return sample
