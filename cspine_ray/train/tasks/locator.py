"""Stage 1: the vertebra locator (2.5D slice -> ratio C1..C7 + C1-C7 box), on segmented studies.

It is the two-stage model's first stage and the visibility model of the 2D families: its
out-of-fold slice tables (ratio + box per slice, for every training study) feed them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cspine_ray import N_VERTEBRAE
from cspine_ray.datasets import augment_batch
from cspine_ray.datasets.tables import SLICE_TABLE_WIDTH
from cspine_ray.models import decode_locator, split_locator_outputs
from cspine_ray.train.config import OptimConfig
from cspine_ray.train.tasks.slices import SliceTask


class LocatorTask(SliceTask):
    name = "locator"

    @property
    def image_size(self) -> int:
        return self.cfg.stage1.image_size

    def slices_per_study(self) -> int:
        return self.cfg.stage1.slices_per_study

    def slice_table(self) -> dict | None:
        return None  # ground truth from the shards' segmentations

    def optim(self) -> OptimConfig:
        s1, o = self.cfg.stage1, self.cfg.optim
        return OptimConfig(epochs=s1.epochs, batch_size=s1.batch_size, lr=s1.lr,
                           weight_decay=o.weight_decay, t0=o.t0, eta_min=o.eta_min, amp=o.amp)

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        return "slice_locator", {"backbone": self.cfg.stage1.backbone,
                                 "pretrained": self.cfg.pretrained,
                                 "in_chans": self.cfg.input.channels, **self.cfg.stage1.model}

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        return self.data.split(fold, segmented_only=True)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        image, box = augment_batch(batch["image"], self.cfg.augment, generator, boxes=batch["box"])
        ratio_logits, box_logits = split_locator_outputs(model(image))
        # thesis: L1 on the ratio; L1 on the box where the slice shows a vertebra. With mostly
        # zero ratio targets L1's optimum is "predict 0", so BCE on the soft ratio is the default.
        if self.cfg.stage1.ratio_loss == "bce":
            loss = F.binary_cross_entropy_with_logits(ratio_logits.float(), batch["ratio"])
        else:
            loss = F.l1_loss(torch.sigmoid(ratio_logits.float()), batch["ratio"])
        valid = batch["box_valid"]
        if valid.any():
            loss = loss + F.l1_loss(torch.sigmoid(box_logits.float())[valid], box[valid])
        return loss

    def predict_tables(self, models: Sequence[nn.Module], uids: list[str],
                       device: torch.device) -> dict[str, np.ndarray]:
        """uid -> float32 (z, 11) predicted ratio C1..C7 + box for every slice of the study,
        the mean of the models' decoded outputs."""
        outputs = self.slice_outputs(models, uids, device, stride=1)
        tables = {}
        for uid in uids:
            zs, raw = outputs[uid]
            ratio, box = decode_locator(torch.from_numpy(raw))  # (models, n, 7), (models, n, 4)
            table = np.zeros((len(zs), SLICE_TABLE_WIDTH), np.float32)
            table[zs] = torch.cat([ratio, box], dim=-1).mean(0).numpy()
            tables[uid] = table
        return tables

    def predict(self, models: Sequence[nn.Module], uids: list[str], device: torch.device) -> pd.DataFrame:
        """Validation error per study: mean |ratio error| and box L1 on the vertebra slices."""
        from cspine_ray.datasets import ShardStore

        tables = self.predict_tables(models, uids, device)
        store = ShardStore(self.data.shards_dir, max_open=4)
        rows = {}
        for uid in uids:
            shard = store.get(uid)
            ratio, box = np.asarray(shard.ratio), np.asarray(shard.box)
            ratio_err = np.abs(tables[uid][:, :N_VERTEBRAE] - ratio).mean()
            shown = np.isfinite(box).all(1) & (ratio.max(1) > 0.5)
            box_err = (np.abs(tables[uid][shown, N_VERTEBRAE:] - box[shown]).mean()
                       if shown.any() else 0.0)
            rows[uid] = {"ratio_mae": float(ratio_err), "box_mae": float(box_err)}
        return pd.DataFrame.from_dict(rows, orient="index")

    def score(self, preds: pd.DataFrame, uids: list[str]) -> dict[str, float]:
        if preds.empty:  # a fold without segmented studies has nothing to validate on
            return {"metric": float("nan"), "ratio_mae": float("nan"), "box_mae": float("nan"),
                    "val_loss": float("nan")}
        ratio, box = float(preds["ratio_mae"].mean()), float(preds["box_mae"].mean())
        return {"metric": ratio + box, "ratio_mae": ratio, "box_mae": box, "val_loss": ratio + box}

    def final_outputs(self, model: nn.Module, fold: int, device: torch.device) -> dict[str, np.ndarray]:
        """Out-of-fold slice tables for every training study of this fold, segmented or not."""
        return self.predict_tables([model], self.data.fold_uids(fold), device)
