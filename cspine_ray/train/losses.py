"""Losses weighted the way the competition metric weights its rows (`metric.WEIGHTS`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cspine_ray import TARGETS
from cspine_ray.metric import WEIGHTS

VERTEBRA_NEG, VERTEBRA_POS = WEIGHTS["C1"]          # 1, 2


def _weighted_terms(logits: torch.Tensor, targets: torch.Tensor, neg, pos):
    """(w * bce, w) elementwise, in float32: the weight is `pos` on a positive target, `neg` on a
    negative one, and in between on a soft (mixed) target: neg + (pos - neg) * target."""
    targets = targets.float()
    w = neg + (pos - neg) * targets
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return w * bce, w


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, neg: float = VERTEBRA_NEG,
                 pos: float = VERTEBRA_POS) -> torch.Tensor:
    """Mean BCE with weight `pos` on positive and `neg` on negative targets (normalised)."""
    wbce, w = _weighted_terms(logits, targets, neg, pos)
    return wbce.sum() / w.sum()


def study_metric_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, 8) logits for C1..C7 + patient_overall: the metric itself, per study then averaged."""
    neg = torch.tensor([WEIGHTS[t][0] for t in TARGETS], device=logits.device)
    pos = torch.tensor([WEIGHTS[t][1] for t in TARGETS], device=logits.device)
    wbce, w = _weighted_terms(logits, targets, neg, pos)
    return (wbce.sum(1) / w.sum(1)).mean()
