"""HU windowing: map Hounsfield units to [0, 1] through one or more (centre, width) windows.

Which windows a model sees is a configuration choice: the bone window is the default; several
windows give several channels (e.g. bone + soft tissue shows haematoma next to a fracture).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Window = tuple[float, float]  # (centre, width) in HU

WINDOWS: dict[str, Window] = {
    "bone": (450.0, 1800.0),
    "soft": (40.0, 400.0),
    "wide": (500.0, 3000.0),  # air to dense cortical bone and metal, nothing clipped in between
}


def resolve_windows(windows: Sequence[str | Sequence[float]]) -> list[Window]:
    """Preset names and/or explicit (centre, width) pairs -> a list of (centre, width)."""
    if isinstance(windows, str) or not len(windows):
        raise ValueError(f"windows must be a non-empty list of names or (centre, width), got {windows!r}")
    out = []
    for w in windows:
        if isinstance(w, str):
            if w not in WINDOWS:
                raise ValueError(f"unknown window {w!r} (known: {', '.join(WINDOWS)})")
            out.append(WINDOWS[w])
            continue
        centre, width = (float(v) for v in w)
        if width <= 0:
            raise ValueError(f"window width must be positive, got {w!r}")
        out.append((centre, width))
    return out


def apply_windows(hu: np.ndarray | torch.Tensor,
                  windows: Sequence[str | Sequence[float]]) -> np.ndarray | torch.Tensor:
    """HU array (...) -> float32 (n_windows, ...) in [0, 1]; centre -> 0.5, centre +- width/2 -> 0/1.

    Returns the same kind (numpy or torch, same device) as `hu`.
    """
    resolved = resolve_windows(windows)
    if isinstance(hu, torch.Tensor):
        x = hu.float()
        return torch.stack([((x - (c - w / 2)) / w).clamp_(0.0, 1.0) for c, w in resolved])
    x = np.asarray(hu, dtype=np.float32)
    return np.stack([np.clip((x - np.float32(c - w / 2)) / np.float32(w), 0.0, 1.0) for c, w in resolved])
