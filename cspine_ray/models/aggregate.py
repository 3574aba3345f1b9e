"""From per-vertebra probabilities to the patient prediction (numpy or torch).

    patient_overall(p, top_n) = 1 - prod over the top_n highest p_Ck of (1 - p_Ck)

top_n = 1 is the max over vertebrae (single_head, thesis eq. 4.2), top_n = 7 the product over
all seven (multi_head eq. 4.3; two_stage eq. 4.4, where N is searched and 7 was best); each
family's default is in `cspine_ray.train.families`.

Every function takes numpy arrays (or lists) and returns numpy; given a torch tensor it
computes in torch (keeping device and autograd). torch is never imported here.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from cspine_ray import N_VERTEBRAE


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported already
    return torch is not None and isinstance(x, torch.Tensor)


def _check_probabilities(p: Any, what: str) -> Any:
    """p as a float array or tensor whose last axis holds the 7 vertebrae, values in [0, 1]."""
    if not _is_tensor(p):
        p = np.asarray(p, dtype=np.float64)
    if p.ndim < 1 or p.shape[-1] != N_VERTEBRAE:
        raise ValueError(f"{what} must end in {N_VERTEBRAE} vertebrae (C1..C7), "
                         f"got shape {tuple(p.shape)}")
    if _is_tensor(p):
        p = p if p.is_floating_point() else p.float()
        bad = bool(((p < 0) | (p > 1) | p.isnan()).any())
    else:
        bad = bool(((p < 0) | (p > 1) | np.isnan(p)).any())
    if bad:
        raise ValueError(f"{what} must be probabilities in [0, 1]")
    return p


def patient_overall(p_vertebrae: Any, top_n: int = N_VERTEBRAE) -> Any:
    """(..., 7) vertebra probabilities -> (...) patient probability by the top-N rule."""
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) \
            or not 1 <= top_n <= N_VERTEBRAE:
        raise ValueError(f"top_n must be an integer in 1..{N_VERTEBRAE}, got {top_n!r}")
    p = _check_probabilities(p_vertebrae, "p_vertebrae")
    if _is_tensor(p):
        top = p.topk(int(top_n), dim=-1).values
        return 1 - (1 - top).prod(dim=-1)
    top = np.sort(p, axis=-1)[..., N_VERTEBRAE - top_n:]
    return 1.0 - np.prod(1.0 - top, axis=-1)
