"""Family `cnn3d`: a small 3D CNN on the whole (resized) volume, 8 logits per study.

Thesis section 4.3: three blocks of conv3d -> activation -> pooling -> normalisation, then
fully connected layers to 8 outputs (C1..C7, patient_overall), trained on the metric's
weighted loss. Global average pooling after the blocks makes the head independent of the
cube size, so the same model runs on 64^3 demo data and 224^3 real volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cspine_ray.models.heads import PriorLogit, linear_head
from cspine_ray.models.registry import register_model

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":  # batch-size independent: 3D batches are often 1-2 volumes per device
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


def _activation(kind: str) -> nn.Module:
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {kind!r}")
    return ACTIVATIONS[kind]()


def conv_block(in_channels: int, out_channels: int, kernel_size: int, activation: str,
               norm: str) -> nn.Sequential:
    """conv3d -> activation -> max-pool (halves D, H, W) -> normalisation, in the thesis's order."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        _activation(activation),
        nn.MaxPool3d(2),
        _norm(norm, out_channels),
    )


@register_model("cnn3d")
class Cnn3d(nn.Module):
    """Volume (B, in_chans, D, H, W) -> logits (B, num_outputs), default C1..C7 + patient_overall.

    Each block halves every spatial size, so D, H, W must be at least 2**len(channels).
    prior_logit: one bias for all outputs or one per output; the default starts vertebrae at
    p ~ 0.12 and patient_overall at 0.5 (about half the real studies are positive).
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (16, 32, 64),
                 kernel_size: int = 3, activation: str = "relu", norm: str = "batch",
                 hidden: int = 128, dropout: float = 0.3, num_outputs: int = 8,
                 prior_logit: PriorLogit = (-2.0,) * 7 + (0.0,)):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive sizes, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        widths = (in_chans,) + channels
        self.blocks = nn.Sequential(*(conv_block(a, b, kernel_size, activation, norm)
                                      for a, b in zip(widths[:-1], widths[1:])))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Sequential(nn.Linear(channels[-1], hidden), _activation(activation),
                                nn.Dropout(dropout))
        self.head = linear_head(hidden, num_outputs, prior_logit)
        self.min_size = 2 ** len(channels)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim != 5:
            raise ValueError(f"cnn3d expects (B, C, D, H, W), got shape {tuple(volume.shape)}")
        if min(volume.shape[2:]) < self.min_size:
            raise ValueError(f"cnn3d with {len(self.blocks)} blocks needs D, H, W >= "
                             f"{self.min_size}, got {tuple(volume.shape[2:])}")
        features = self.pool(self.blocks(volume)).flatten(1)
        return self.head(self.fc(features))
