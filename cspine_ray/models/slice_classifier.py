"""Family `single_head`'s building block: one 2.5D slice -> N logits through a timm backbone.

It is model B of the thesis's single_head (section 4.4.1): which vertebrae in the slice are
fractured (7 outputs, label = visible x study label). Model A, which vertebrae a slice shows, is
the stage-1 locator ("slice_locator") here. A study's score per vertebra is the max over its
slices (`train/tasks/slices.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from cspine_ray.models.backbone import create_backbone
from cspine_ray.models.heads import PriorLogit, linear_head
from cspine_ray.models.registry import register_model


@register_model("slice_classifier")
class SliceClassifier(nn.Module):
    """Slice (B, in_chans, H, W) -> logits (B, num_outputs)."""

    def __init__(self, backbone: str = "convnext_tiny", num_outputs: int = 7,
                 pretrained: bool = False, weights: str | None = None, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 prior_logit: PriorLogit = -2.0):
        super().__init__()
        self.backbone, num_features = create_backbone(backbone, pretrained, in_chans, drop_rate,
                                                      drop_path_rate, weights=weights)
        self.head = linear_head(num_features, num_outputs, prior_logit)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image))
