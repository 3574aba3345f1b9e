"""Family `multi_head`: one 2.5D encoder, two heads (thesis section 4.4.2).

The encoder (EfficientNetV2-S in the thesis) feeds two linear heads side by side: vertebra
presence (which of C1..C7 the slice shows; pseudo-labels from a slice_classifier) and
fracture (which of them are fractured). Both are trained at once with BCE-with-logits.
"""

from __future__ import annotations

import torch
from torch import nn

from cspine_ray.models.backbone import create_backbone
from cspine_ray.models.heads import PriorLogit, linear_head
from cspine_ray.models.registry import register_model


@register_model("multi_head")
class MultiHead(nn.Module):
    """Slice (B, in_chans, H, W) -> {"presence": (B, 7) logits, "fracture": (B, 7) logits}.

    A dict (not a tuple) so the loss code names what it uses. presence_prior_logit and
    prior_logit start each head's bias (one number or one per vertebra).
    """

    def __init__(self, backbone: str = "tf_efficientnetv2_s", pretrained: bool = False,
                 weights: str | None = None, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_vertebrae: int = 7,
                 prior_logit: PriorLogit = -2.0, presence_prior_logit: PriorLogit = -2.0):
        super().__init__()
        self.backbone, num_features = create_backbone(backbone, pretrained, in_chans, drop_rate,
                                                      drop_path_rate, weights=weights)
        self.presence = linear_head(num_features, num_vertebrae, presence_prior_logit)
        self.fracture = linear_head(num_features, num_vertebrae, prior_logit)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(image)
        return {"presence": self.presence(features), "fracture": self.fracture(features)}
