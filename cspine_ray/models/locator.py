"""Two-stage family, stage 1: where the cervical spine is in each slice (thesis section 4.5.1).

A 2.5D slice -> 11 raw outputs, in this order:

    [0:7]   ratio logits for C1..C7; sigmoid -> ratio = the vertebra's pixel count in this
            slice / its maximum over the study's slices (in [0, 1])
    [7:11]  box logits (x0, y0, x1, y1) of the C1-C7 region; sigmoid -> coordinates
            normalised to [0, 1] by the slice width (x) and height (y)

Training puts L1 on the sigmoid of both parts (the box only where some ratio > 0.5);
`split_locator_outputs` gives the parts, `decode_locator` the probabilities and boxes.
"""

from __future__ import annotations

import torch
from torch import nn

from cspine_ray import N_VERTEBRAE
from cspine_ray.datasets.tables import SLICE_TABLE_WIDTH
from cspine_ray.models.backbone import create_backbone
from cspine_ray.models.heads import PriorLogit, linear_head
from cspine_ray.models.registry import register_model

NUM_LOCATOR_OUTPUTS = SLICE_TABLE_WIDTH  # one slice-table row: a ratio per vertebra, the box
NUM_BOX = SLICE_TABLE_WIDTH - N_VERTEBRAE


@register_model("slice_locator")
class SliceLocator(nn.Module):
    """Slice (B, in_chans, H, W) -> raw outputs (B, 11): 7 ratio logits, then 4 box logits.

    prior_logit starts the ratio biases (most slices show little of any one vertebra); the
    box biases start at 0, i.e. every corner at the image centre.
    """

    def __init__(self, backbone: str = "convnext_tiny", pretrained: bool = False,
                 weights: str | None = None, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, prior_logit: PriorLogit = -2.0):
        super().__init__()
        self.backbone, num_features = create_backbone(backbone, pretrained, in_chans, drop_rate,
                                                      drop_path_rate, weights=weights)
        self.ratio = linear_head(num_features, N_VERTEBRAE, prior_logit)
        self.box = linear_head(num_features, NUM_BOX, 0.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        return torch.cat([self.ratio(features), self.box(features)], dim=-1)


def split_locator_outputs(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (..., 11) -> (ratio logits (..., 7), box logits (..., 4))."""
    if outputs.shape[-1] != NUM_LOCATOR_OUTPUTS:
        raise ValueError(f"locator outputs must end in {NUM_LOCATOR_OUTPUTS} values, "
                         f"got shape {tuple(outputs.shape)}")
    return outputs[..., :N_VERTEBRAE], outputs[..., N_VERTEBRAE:]


def decode_locator(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (..., 11) -> (ratios (..., 7) in [0, 1], boxes (..., 4) as x0, y0, x1, y1 in [0, 1]).

    Corners are sorted so x0 <= x1 and y0 <= y1: an early model may swap them, and a crop
    needs a proper box.
    """
    ratio_logits, box_logits = split_locator_outputs(outputs)
    box = box_logits.sigmoid()
    x = torch.sort(box[..., 0::2], dim=-1).values
    y = torch.sort(box[..., 1::2], dim=-1).values
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
    return ratio_logits.sigmoid(), boxes
