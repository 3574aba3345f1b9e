"""Shared parts of the tasks that look at single 2.5D slices (locator, single_head, multi_head)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cspine_ray import VERTEBRAE
from cspine_ray.datasets import ShardStore, SliceDataset, slice_items
from cspine_ray.train.tasks.base import Task, autocast, sample_cervical_slices, to_device


class SliceTask(Task):
    """A task whose samples are single slices and whose study prediction pools over slices."""

    @property
    def image_size(self) -> int:
        return self.cfg.input.image_size

    def slices_per_study(self) -> int:
        return self.cfg.input.slices_per_study

    def slice_table(self) -> dict | None:
        """Per-slice targets: stage-1 predictions for every study (None: the shards' own)."""
        return self.data.slice_tables

    def dataset(self, items, labels=True, slice_table: dict | None = None) -> SliceDataset:
        """Slice samples; per-slice targets from `slice_table` (default: the task's own)."""
        return SliceDataset(
            self.data.shards_dir, items,
            labels=self.data.labels if labels else None,
            image_size=self.image_size,
            neighbour_offset=self.cfg.input.neighbour_offset,
            windows=self.cfg.input.windows,
            slice_table=self.slice_table() if slice_table is None else slice_table,
            visibility_threshold=self.visibility_threshold(),
            native=self.native(),
            vertebra_boxes=self.vertebra_boxes(),
        )

    def visibility_threshold(self) -> float:
        return self.cfg.input.visibility_threshold

    def vertebra_boxes(self) -> bool:
        """Samples carry each vertebra's own box (stage 1 with stage1.vertebra_boxes)."""
        return False

    def native(self) -> bool:
        """Read the shards' native-resolution level (the 2D families: input.native)."""
        return self.cfg.input.native

    def train_dataset(self, uids: list[str], epoch: int, fold: int) -> SliceDataset:
        return self.dataset(self.train_items(uids, np.random.default_rng([self.cfg.seed, fold, epoch])))

    def train_items(self, uids: list[str], rng: np.random.Generator) -> list[tuple[str, int]]:
        """(uid, z) of one epoch: slices_per_study per study, mostly cervical ones."""
        store = ShardStore(self.data.shards_dir, max_open=4)
        table = self.slice_table() or {}
        items = []
        for uid in uids:
            n = store.get(uid).volume.shape[0]
            picks = sample_cervical_slices(table.get(uid), n, self.slices_per_study(), rng)
            items += [(uid, int(z)) for z in picks]
        return items

    @torch.no_grad()
    def slice_outputs(self, models: Sequence[nn.Module], uids: list[str], device: torch.device,
                      stride: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """uid -> (slice indices (n,), raw outputs (models, n, k)): each batch of slices, across
        studies, is read once and run through every model."""
        for model in models:
            model.eval()
        ds = self.dataset(slice_items(self.data.shards_dir, uids, stride=stride), labels=False)
        out = defaultdict(lambda: ([], []))
        for batch in self.loader(ds, train=False, device=device):
            batch = to_device(batch, device)
            with autocast(device, self.optim().amp):
                raw = torch.stack([self.forward_for_prediction(m, batch["image"]).float()
                                   for m in models], dim=1)  # (B, models, k)
            for uid, z, r in zip(batch["uid"], batch["z"].tolist(), raw.cpu().numpy()):
                out[uid][0].append(z)
                out[uid][1].append(r)
        return {u: (np.asarray(zs), np.stack(rs, axis=1)) for u, (zs, rs) in out.items()}

    def forward_for_prediction(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return model(image)


class FractureSliceTask(SliceTask):
    """single_head and multi_head: a per-slice fracture score, max-pooled over a study's slices."""

    def predict(self, models: Sequence[nn.Module], uids: list[str], device: torch.device) -> pd.DataFrame:
        """Per model the max over a study's slices, then the mean over models."""
        outputs = self.slice_outputs(models, uids, device, self.cfg.input.eval_stride)
        rows = {u: torch.sigmoid(torch.from_numpy(outputs[u][1])).amax(1).mean(0).numpy()
                for u in uids}
        return pd.DataFrame.from_dict(rows, orient="index", columns=list(VERTEBRAE))
