"""single_head (thesis 4.4.1): slice model B predicts fracture per vertebra = visible x label.

Model A of the thesis, "which vertebrae does this slice show", is the stage-1 locator (its
ratio > input.visibility_threshold is the visibility pseudo-label); a study's vertebra
probability is the maximum over its slices and patient_overall the maximum over vertebrae
(top-N with N=1 by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cspine_ray.datasets import augment_batch
from cspine_ray.train.losses import weighted_bce
from cspine_ray.train.tasks.slices import FractureSliceTask


class SingleHeadTask(FractureSliceTask):
    name = "single_head"

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        return "slice_classifier", {"backbone": self.cfg.backbone, "pretrained": self.cfg.pretrained,
                                    "weights": self.cfg.weights,
                                    "in_chans": self.cfg.input.channels, "num_outputs": 7,
                                    **self.cfg.model}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        image = augment_batch(batch["image"], self.cfg.augment, generator)
        return weighted_bce(model(image), batch["fracture"])
