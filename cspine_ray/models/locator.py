"""Two-stage family, stage 1: where the cervical spine is in each slice (thesis section 4.5.1).

A 2.5D slice -> 11 raw outputs (one slice-table row, datasets/tables.py), in this order:

    [0:7]   ratio logits for C1..C7; sigmoid -> ratio = the vertebra's pixel count in this
            slice / its maximum over the study's slices (in [0, 1])
    [7:11]  box logits (x0, y0, x1, y1) of the C1-C7 region; sigmoid -> coordinates
            normalised to [0, 1] by the slice width (x) and height (y)
    [11:39] with vertebra_boxes: each vertebra's own box logits, C1 first (4 each)

Training puts L1 on the sigmoid of the boxes where they are shown (the C1-C7 box where some
ratio > 0.5, a vertebra's box where its ratio is); `split_locator_outputs` gives the parts,
`decode_locator` the probabilities and boxes.
"""

from __future__ import annotations

import torch
from torch import nn

from cspine_ray import N_VERTEBRAE
from cspine_ray.datasets.tables import SLICE_TABLE_WIDTH, WIDE_TABLE_WIDTH, table_width
from cspine_ray.models.backbone import create_backbone
from cspine_ray.models.heads import PriorLogit, linear_head
from cspine_ray.models.registry import register_model

NUM_BOX = SLICE_TABLE_WIDTH - N_VERTEBRAE


@register_model("slice_locator")
class SliceLocator(nn.Module):
    """Slice (B, in_chans, H, W) -> raw outputs (B, 11): 7 ratio logits, then 4 box logits
    (B, 39 with vertebra_boxes: then 4 box logits for each of C1..C7).

    prior_logit starts the ratio biases (most slices show little of any one vertebra); the
    box biases start at 0, i.e. every corner at the image centre.
    """

    def __init__(self, backbone: str = "convnext_tiny", pretrained: bool = False,
                 weights: str | None = None, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, prior_logit: PriorLogit = -2.0,
                 vertebra_boxes: bool = False):
        super().__init__()
        self.backbone, num_features = create_backbone(backbone, pretrained, in_chans, drop_rate,
                                                      drop_path_rate, weights=weights)
        self.ratio = linear_head(num_features, N_VERTEBRAE, prior_logit)
        self.box = linear_head(num_features, NUM_BOX, 0.0)
        self.vertebra_box = (linear_head(num_features, table_width(True) - SLICE_TABLE_WIDTH, 0.0)
                             if vertebra_boxes else None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        parts = [self.ratio(features), self.box(features)]
        if self.vertebra_box is not None:
            parts.append(self.vertebra_box(features))
        return torch.cat(parts, dim=-1)


def split_locator_outputs(outputs: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Raw (..., 11 or 39) -> (ratio logits (..., 7), box logits (..., 4), the vertebrae's box
    logits (..., 7, 4) or None)."""
    if outputs.shape[-1] not in (SLICE_TABLE_WIDTH, WIDE_TABLE_WIDTH):
        raise ValueError(f"locator outputs must end in {SLICE_TABLE_WIDTH} or {WIDE_TABLE_WIDTH} "
                         f"values, got shape {tuple(outputs.shape)}")
    own = None
    if outputs.shape[-1] == WIDE_TABLE_WIDTH:
        own = outputs[..., SLICE_TABLE_WIDTH:].unflatten(-1, (N_VERTEBRAE, 4))
    return outputs[..., :N_VERTEBRAE], outputs[..., N_VERTEBRAE:SLICE_TABLE_WIDTH], own


def decode_boxes(box_logits: torch.Tensor) -> torch.Tensor:
    """Box logits (..., 4) -> x0, y0, x1, y1 in [0, 1], corners sorted so x0 <= x1 and
    y0 <= y1: an early model may swap them, and a crop needs a proper box."""
    box = box_logits.sigmoid()
    x = torch.sort(box[..., 0::2], dim=-1).values
    y = torch.sort(box[..., 1::2], dim=-1).values
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def decode_locator(outputs: torch.Tensor) -> torch.Tensor:
    """Raw (..., 11 or 39) -> the slice-table rows (..., 11 or 39): ratios in [0, 1], then the
    boxes as x0, y0, x1, y1 in [0, 1] (`decode_boxes`)."""
    ratio_logits, box_logits, own = split_locator_outputs(outputs)
    parts = [ratio_logits.sigmoid(), decode_boxes(box_logits)]
    if own is not None:
        parts.append(decode_boxes(own).flatten(-2))
    return torch.cat(parts, dim=-1)
