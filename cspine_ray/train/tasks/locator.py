"""Stage 1: the vertebra locator (2.5D slice -> ratio C1..C7 + C1-C7 box), on segmented studies.

It is the two-stage model's first stage and the visibility model of the 2D families: its
out-of-fold slice tables (ratio + box per slice, for every training study) feed them all.

With few segmented studies (the real data has 87 of 2019) two options help it:
  stage1.anatomy        every predicted table is made anatomical (datasets/anatomy.py: C1..C7
                        ordered and contiguous along z, plausible lengths), in predict_tables,
                        so validation, the out-of-fold tables, pseudo labels and inference
                        (predict/ensemble.py) all see the same tables;
  stage1.pseudo_rounds  after each `epochs` epochs, fold k's best model labels the unsegmented
                        studies of its own training folds (never fold k's), and training goes
                        on with those tables as targets beside the segmented studies' ground
                        truth (the loop's refresh_targets hook; checkpointed per fold).
The best epoch is always chosen on the segmented validation studies' ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cspine_ray import N_VERTEBRAE, VERTEBRAE
from cspine_ray.datasets import ShardStore, SliceDataset, augment_batch
from cspine_ray.datasets.anatomy import constrain_table, localisation_errors
from cspine_ray.datasets.tables import split_table, table_width
from cspine_ray.models import decode_locator, split_locator_outputs
from cspine_ray.preprocess.targets import vertebra_boxes as per_vertebra_boxes
from cspine_ray.train.config import OptimConfig, TrainConfig
from cspine_ray.train.tasks.base import JobData, Studies
from cspine_ray.train.tasks.slices import SliceTask


class LocatorTask(SliceTask):
    name = "locator"

    def __init__(self, cfg: TrainConfig, data: JobData | Studies):
        super().__init__(cfg, data)
        self.pseudo: dict[int, dict[str, np.ndarray]] = {}  # fold -> uid -> pseudo slice table

    @property
    def image_size(self) -> int:
        return self.cfg.stage1.image_size

    def slices_per_study(self) -> int:
        return self.cfg.stage1.slices_per_study

    def slice_table(self) -> dict | None:
        return None  # ground truth from the shards' segmentations (pseudo epochs add tables)

    def visibility_threshold(self) -> float:
        return 0.5  # the box loss applies where a vertebra is at least half shown

    def native(self) -> bool:
        return False  # stage 1 keeps its small view of whole slices: the shard-size volume

    def vertebra_boxes(self) -> bool:
        return self.cfg.stage1.vertebra_boxes

    def optim(self) -> OptimConfig:
        s1, o = self.cfg.stage1, self.cfg.optim
        return OptimConfig(epochs=s1.epochs * (1 + s1.pseudo_rounds), batch_size=s1.batch_size, lr=s1.lr,
                           weight_decay=o.weight_decay, t0=o.t0, eta_min=o.eta_min, amp=o.amp)

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        return "slice_locator", {"backbone": self.cfg.stage1.backbone,
                                 "pretrained": self.cfg.pretrained, "weights": self.cfg.weights,
                                 "in_chans": self.cfg.input.channels,
                                 "vertebra_boxes": self.cfg.stage1.vertebra_boxes,
                                 **self.cfg.stage1.model}

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        return self.data.split(fold, segmented_only=True)

    @property
    def selected_on(self) -> str:
        return "metric"  # the ratio + box error

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        boxes = batch["box"][:, None]  # (B, 1, 4), then the vertebrae's own: moved together
        if self.cfg.stage1.vertebra_boxes:
            boxes = torch.cat([boxes, batch["vertebra_box"]], dim=1)
        image, boxes = augment_batch(batch["image"], self.cfg.augment, generator, boxes=boxes)
        box, own = boxes[:, 0], boxes[:, 1:]
        ratio_logits, box_logits, own_logits = split_locator_outputs(model(image))
        # thesis: L1 on the ratio; L1 on the box where the slice shows a vertebra. With mostly
        # zero ratio targets L1's optimum is "predict 0", so BCE on the soft ratio is the default.
        if self.cfg.stage1.ratio_loss == "bce":
            loss = F.binary_cross_entropy_with_logits(ratio_logits.float(), batch["ratio"])
        else:
            loss = F.l1_loss(torch.sigmoid(ratio_logits.float()), batch["ratio"])
        valid = batch["box_valid"]
        if valid.any():
            loss = loss + F.l1_loss(torch.sigmoid(box_logits.float())[valid], box[valid])
        if own_logits is not None and (shown := batch["vertebra_box_valid"]).any():
            loss = loss + F.l1_loss(torch.sigmoid(own_logits.float())[shown], own[shown])
        return loss

    # --- pseudo labels ---------------------------------------------------------------------
    def pseudo_uids(self, fold: int) -> list[str]:
        """The studies fold `fold`'s model pseudo-labels: the unsegmented studies of the other
        folds (its own training folds), which round 1 never trained on."""
        return [u for u in self.data.uids if u not in self.data.segmented and self.data.folds[u] != fold]

    def pseudo_tables(self, model: nn.Module, fold: int, device: torch.device) -> dict[str, np.ndarray]:
        """Fold `fold`'s model's tables (anatomy-constrained when stage1.anatomy) for its
        pseudo_uids, keeping the studies where every vertebra peaks at pseudo_min_peak or more."""
        tables = self.predict_tables([model], self.pseudo_uids(fold), device)
        floor = self.cfg.stage1.pseudo_min_peak
        return {u: t for u, t in tables.items() if len(t) and t[:, :N_VERTEBRAE].max(0).min() >= floor}

    def refresh_targets(self, fold: int, epoch: int, targets: dict[str, np.ndarray],
                        best_model, device: torch.device) -> dict[str, np.ndarray]:
        """The loop's hook at the start of every epoch: the extra training targets of `fold`
        (uid -> slice table) for this epoch. At the start of each pseudo round (epoch a
        multiple of stage1.epochs) new pseudo labels from the fold's best model so far;
        otherwise the ones the fold already has (restored from its checkpoint after a resume)."""
        s1 = self.cfg.stage1
        if s1.pseudo_rounds and epoch > 0 and epoch % s1.epochs == 0:
            targets = self.pseudo_tables(best_model(), fold, device)
        self.pseudo[fold] = dict(targets)
        return targets

    def train_dataset(self, uids: list[str], epoch: int, fold: int) -> SliceDataset:
        """The segmented studies' slices (ground truth) and, in a pseudo round, as many again
        (x pseudo_weight) drawn at random from the pseudo-labelled studies (their tables)."""
        pseudo = self.pseudo.get(fold) or {}
        if not pseudo:
            return super().train_dataset(uids, epoch, fold)
        rng = np.random.default_rng([self.cfg.seed, fold, epoch])
        items = self.train_items(uids, rng)
        names = sorted(pseudo)
        count = int(round(self.cfg.stage1.pseudo_weight * len(items)))
        for i in np.sort(rng.choice(len(names), count)):
            items.append((names[i], int(rng.integers(len(pseudo[names[i]])))))
        return self.dataset(items, slice_table=pseudo)

    # --- prediction ------------------------------------------------------------------------
    def model_tables(self, models: Sequence[nn.Module], uids: list[str],
                     device: torch.device) -> dict[str, np.ndarray]:
        """uid -> float32 (models, z, 11 or 39): each model's decoded ratio C1..C7 + box per
        slice (+ the vertebrae's boxes)."""
        outputs = self.slice_outputs(models, uids, device, stride=1)
        width = table_width(self.cfg.stage1.vertebra_boxes)
        tables = {}
        for uid in uids:
            zs, raw = outputs[uid]
            table = np.zeros((len(models), len(zs), width), np.float32)
            table[:, zs] = decode_locator(torch.from_numpy(raw)).numpy()
            tables[uid] = table
        return tables

    def combine(self, per_model: dict[str, np.ndarray], anatomy: bool) -> dict[str, np.ndarray]:
        """Each model's table made anatomical (when `anatomy`: datasets/anatomy.py, with the
        shard's z spacing), then the mean over models: uid -> float32 (z, 11)."""
        if not anatomy:
            return {u: t.mean(0) for u, t in per_model.items()}
        store = ShardStore(self.data.shards_dir, max_open=4)
        out = {}
        for uid, tables in per_model.items():
            spacing = float(store.get(uid).spacing[0])
            out[uid] = np.mean([constrain_table(t, spacing) for t in tables], axis=0).astype(np.float32)
        return out

    def predict_tables(self, models: Sequence[nn.Module], uids: list[str],
                       device: torch.device) -> dict[str, np.ndarray]:
        """uid -> float32 (z, 11) predicted ratio C1..C7 + box for every slice of the study: the
        mean of the models' decoded outputs, each made anatomical first when stage1.anatomy
        (so validation, the out-of-fold tables, pseudo labels and inference all see it)."""
        return self.combine(self.model_tables(models, uids, device), self.cfg.stage1.anatomy)

    def predict(self, models: Sequence[nn.Module], uids: list[str], device: torch.device) -> pd.DataFrame:
        """Validation figures per study on its segmentation: mean |ratio error|, box L1 on the
        vertebra slices, and where the vertebrae are (z_error in slices, found; datasets/
        anatomy.localisation_errors), per vertebra too. With stage1.anatomy the same figures
        of the unconstrained tables come beside them as raw_*. With stage1.vertebra_boxes the
        mean IoU of each vertebra's box with its mask's where the vertebra is shown (ratio >
        0.5): vertebra_box_iou."""
        per_model = self.model_tables(models, uids, device)
        variants = {"": self.combine(per_model, self.cfg.stage1.anatomy)}
        if self.cfg.stage1.anatomy:
            variants["raw_"] = self.combine(per_model, False)
        store = ShardStore(self.data.shards_dir, max_open=4)
        rows = {}
        for uid in uids:
            shard = store.get(uid)
            ratio, box = np.asarray(shard.ratio), np.asarray(shard.box)
            shown = np.isfinite(box).all(1) & (ratio.max(1) > 0.5)
            row = {}
            for prefix, tables in variants.items():
                predicted_ratio, predicted_box, _ = split_table(tables[uid])
                z_error, found = localisation_errors(predicted_ratio, ratio)
                row[f"{prefix}ratio_mae"] = float(np.abs(predicted_ratio - ratio).mean())
                row[f"{prefix}box_mae"] = (float(np.abs(predicted_box[shown] - box[shown]).mean())
                                           if shown.any() else 0.0)
                row[f"{prefix}z_error"] = float(np.nanmean(z_error)) if np.isfinite(z_error).any() else np.nan
                row[f"{prefix}found_rate"] = float(np.nanmean(found)) if np.isfinite(found).any() else np.nan
                if not prefix:
                    row.update({f"z_error_{v}": float(e) for v, e in zip(VERTEBRAE, z_error)})
            own = split_table(variants[""][uid])[2]
            if own is not None:
                truth = (per_vertebra_boxes(np.asarray(shard.mask)) if shard.mask is not None
                         else np.full(own.shape, np.nan, np.float32))
                row["vertebra_box_iou"] = mean_box_iou(own, truth, ratio > 0.5)
            rows[uid] = row
        return pd.DataFrame.from_dict(rows, orient="index")

    def score(self, preds: pd.DataFrame, uids: list[str]) -> dict[str, float]:
        """metric = ratio_mae + box_mae (what the best epoch is chosen on); z_error (mean over
        studies of the mean over their vertebrae, in slices), found_rate, z_error_C1..C7 (and
        vertebra_box_iou with stage1.vertebra_boxes)."""
        names = ["ratio_mae", "box_mae", "z_error", "found_rate", *(f"z_error_{v}" for v in VERTEBRAE)]
        if self.cfg.stage1.vertebra_boxes:
            names.append("vertebra_box_iou")
        if self.cfg.stage1.anatomy:
            names += ["raw_ratio_mae", "raw_box_mae", "raw_z_error", "raw_found_rate"]
        if preds.empty:  # a fold without segmented studies has nothing to validate on
            return {"metric": float("nan"), "val_loss": float("nan"), **{k: float("nan") for k in names}}
        figures = {k: float(preds[k].mean()) if preds[k].notna().any() else float("nan") for k in names}
        metric = figures["ratio_mae"] + figures["box_mae"]
        if self.cfg.stage1.anatomy:
            figures["raw_metric"] = figures["raw_ratio_mae"] + figures["raw_box_mae"]
        if self.cfg.stage1.pseudo_rounds and isinstance(self.data, JobData):
            # how many studies this (validation) fold's model trains on with pseudo labels
            figures["pseudo_studies"] = float(len(self.pseudo.get(self.data.folds[uids[0]], {})))
        return {"metric": metric, **figures, "val_loss": metric}

    def final_outputs(self, model: nn.Module, fold: int, device: torch.device) -> dict[str, np.ndarray]:
        """Out-of-fold slice tables for every training study of this fold, segmented or not."""
        return self.predict_tables([model], self.data.fold_uids(fold), device)


def mean_box_iou(predicted: np.ndarray, truth: np.ndarray, shown: np.ndarray) -> float:
    """Mean IoU of predicted and true (..., 4) boxes x0, y0, x1, y1 over the places `shown`
    (...) where the true box is known; NaN where there are none."""
    keep = shown & np.isfinite(truth).all(-1)
    if not keep.any():
        return float("nan")
    p, t = predicted[keep].astype(np.float64), truth[keep].astype(np.float64)
    w = np.clip(np.minimum(p[:, 2], t[:, 2]) - np.maximum(p[:, 0], t[:, 0]), 0, None)
    h = np.clip(np.minimum(p[:, 3], t[:, 3]) - np.maximum(p[:, 1], t[:, 1]), 0, None)
    inter = w * h
    union = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) + (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]) - inter
    return float(np.mean(inter / np.maximum(union, 1e-12)))
