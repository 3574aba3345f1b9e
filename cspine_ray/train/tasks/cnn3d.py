"""cnn3d (thesis 4.3): the whole volume resized to a cube -> 8 outputs, trained on the metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cspine_ray import VERTEBRAE
from cspine_ray.datasets import VolumeDataset, augment_batch, resolve_windows
from cspine_ray.train.losses import study_metric_loss
from cspine_ray.train.tasks.base import Task, autocast, to_device


class Cnn3dTask(Task):
    name = "cnn3d"

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        return "cnn3d", {"in_chans": len(resolve_windows(self.cfg.input.windows)), **self.cfg.model}

    def dataset(self, uids: list[str], labels: bool = True) -> VolumeDataset:
        return VolumeDataset(self.data.shards_dir, uids, self.data.labels if labels else None,
                             cube=self.cfg.input.cube, windows=self.cfg.input.windows)

    def train_dataset(self, uids: list[str], epoch: int, fold: int) -> VolumeDataset:
        return self.dataset(uids)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # (B, C, D, H, W) -> (B, D, C, H, W): one in-plane transform for all slices of a volume
        image = augment_batch(batch["image"].transpose(1, 2), self.cfg.augment, generator)
        return study_metric_loss(model(image.transpose(1, 2)), batch["label"])

    @torch.no_grad()
    def predict(self, models: Sequence[nn.Module], uids: list[str], device: torch.device) -> pd.DataFrame:
        for model in models:
            model.eval()
        rows = {}
        for batch in self.loader(self.dataset(uids, labels=False), train=False, device=device):
            batch = to_device(batch, device)
            with autocast(device, self.optim().amp):  # each volume read once for every model
                probs = torch.stack([torch.sigmoid(m(batch["image"]).float()) for m in models])
            rows.update(zip(batch["uid"], probs.mean(0).cpu().numpy()))
        return pd.DataFrame.from_dict(rows, orient="index",
                                      columns=[*VERTEBRAE, "patient_model"]).astype(np.float64)
