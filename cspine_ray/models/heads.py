"""Output heads: a linear layer whose bias starts at a chosen prior.

Fracture targets are rare (a few percent of slices, 4-20% of vertebrae), so a head that
starts at p = 0.5 spends its first steps only learning the base rate, with large gradients
flowing into a freshly attached backbone. Starting the bias at the log-odds of a small prior
(`prior_logit`, e.g. -2.0 ~ p 0.12) makes the first losses sane.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

PriorLogit = float | Sequence[float] | None


def logit(p: float) -> float:
    """The log-odds of a rate, e.g. a training prevalence -> `prior_logit`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a prior rate must lie strictly between 0 and 1, got {p}")
    return math.log(p / (1.0 - p))


def init_prior_bias(layer: nn.Linear, prior_logit: PriorLogit) -> None:
    """Set `layer`'s bias to `prior_logit`: one number for every output, or one per output.

    None keeps PyTorch's default initialisation.
    """
    if prior_logit is None:
        return
    values = torch.as_tensor(prior_logit, dtype=torch.float32).flatten()
    if values.numel() == 1:
        values = values.expand(layer.out_features)
    elif values.numel() != layer.out_features:
        raise ValueError(f"prior_logit has {values.numel()} values for {layer.out_features} outputs "
                         "(give one number, or one per output)")
    if not torch.isfinite(values).all():
        raise ValueError(f"prior_logit must be finite, got {prior_logit}")
    with torch.no_grad():
        layer.bias.copy_(values)


def linear_head(in_features: int, out_features: int, prior_logit: PriorLogit) -> nn.Linear:
    """A linear output layer with its bias at `prior_logit`."""
    layer = nn.Linear(in_features, out_features)
    init_prior_bias(layer, prior_logit)
    return layer
