"""From per-vertebra and per-slice probabilities to study predictions (numpy or torch).

    patient_overall(p, top_n) = 1 - prod over the top_n highest p_Ck of (1 - p_Ck)

top_n = 1 is the max over vertebrae (single_head, thesis eq. 4.2), top_n = 7 the product over
all seven (multi_head eq. 4.3; two_stage eq. 4.4, where N is searched and 7 was best).
The 2D families first take, per vertebra, the max over a study's slices.

Every function takes numpy arrays (or lists) and returns numpy; given a torch tensor it
computes in torch (keeping device and autograd). torch is never imported here.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

NUM_VERTEBRAE = 7
# the thesis's patient rule for each 2D family (two_stage searches its N)
FAMILY_TOP_N = {"single_head": 1, "multi_head": NUM_VERTEBRAE}


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported already
    return torch is not None and isinstance(x, torch.Tensor)


def _check_probabilities(p: Any, what: str) -> Any:
    """p as a float array or tensor whose last axis holds the 7 vertebrae, values in [0, 1]."""
    if not _is_tensor(p):
        p = np.asarray(p, dtype=np.float64)
    if p.ndim < 1 or p.shape[-1] != NUM_VERTEBRAE:
        raise ValueError(f"{what} must end in {NUM_VERTEBRAE} vertebrae (C1..C7), "
                         f"got shape {tuple(p.shape)}")
    if _is_tensor(p):
        p = p if p.is_floating_point() else p.float()
        bad = bool(((p < 0) | (p > 1) | p.isnan()).any())
    else:
        bad = bool(((p < 0) | (p > 1) | np.isnan(p)).any())
    if bad:
        raise ValueError(f"{what} must be probabilities in [0, 1]")
    return p


def patient_overall(p_vertebrae: Any, top_n: int = NUM_VERTEBRAE) -> Any:
    """(..., 7) vertebra probabilities -> (...) patient probability by the top-N rule."""
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) \
            or not 1 <= top_n <= NUM_VERTEBRAE:
        raise ValueError(f"top_n must be an integer in 1..{NUM_VERTEBRAE}, got {top_n!r}")
    p = _check_probabilities(p_vertebrae, "p_vertebrae")
    if _is_tensor(p):
        top = p.topk(int(top_n), dim=-1).values
        return 1 - (1 - top).prod(dim=-1)
    top = np.sort(p, axis=-1)[..., NUM_VERTEBRAE - top_n:]
    return 1.0 - np.prod(1.0 - top, axis=-1)


def max_over_slices(slice_probs: Any) -> Any:
    """(S, 7) per-slice vertebra probabilities of one study -> (7,) max over its slices."""
    p = _check_probabilities(slice_probs, "slice_probs")
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"slice_probs must be (slices >= 1, 7), got shape {tuple(p.shape)}")
    return p.amax(dim=0) if _is_tensor(p) else p.max(axis=0)


def study_from_slices(slice_probs: Any, top_n: int) -> Any:
    """(S, 7) per-slice probabilities -> (8,) C1..C7 (max over slices) and patient_overall.

    top_n: FAMILY_TOP_N["single_head"] (1, the max) or FAMILY_TOP_N["multi_head"] (7).
    """
    vertebrae = max_over_slices(slice_probs)
    patient = patient_overall(vertebrae, top_n)
    if _is_tensor(vertebrae):
        return sys.modules["torch"].cat([vertebrae, patient.reshape(1)])
    return np.append(vertebrae, patient)
