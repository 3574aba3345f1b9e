"""multi_head (thesis 4.4.2): one encoder, a vertebra-presence head and a fracture head.

Presence is trained on the stage-1 visibility pseudo-labels, fracture on visible x label; a
study's vertebra probability is the maximum of the fracture head over its slices and
patient_overall = 1 - prod(1 - p_Ck) (top-N with N=7 by default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cspine_ray.datasets import augment_batch
from cspine_ray.train.losses import weighted_bce
from cspine_ray.train.tasks.slices import FractureSliceTask


class MultiHeadTask(FractureSliceTask):
    name = "multi_head"

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        return "multi_head", {"backbone": self.cfg.backbone, "pretrained": self.cfg.pretrained,
                              "weights": self.cfg.weights,
                              "in_chans": self.cfg.input.channels, **self.cfg.model}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        out = model(augment_batch(batch["image"], self.cfg.augment, generator))
        presence = F.binary_cross_entropy_with_logits(out["presence"].float(), batch["visible"])
        return weighted_bce(out["fracture"], batch["fracture"]) + presence

    def forward_for_prediction(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return model(image)["fracture"]
