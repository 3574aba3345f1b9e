"""two_stage stage 2 (thesis 4.5.2): per vertebra, L 2.5D crops -> CNN -> BiLSTM -> attention.

Samples are (study, vertebra) pairs; the slices and the crop come from the stage-1 slice table
(out-of-fold for training studies). patient_overall follows the top-N rule (N=7 by default). A
vertebra the slice table never shows above the threshold gets the training prior, not a guess.

The top teams' options (`SequenceConfig`): the robust slice choice and the slices per step are
the dataset's; the ratio channel is appended after augmentation (a plane of the step's stage-1
ratio, which brightness and contrast must not change); not-found vertebrae can be left out of
the loss (prediction gives them the prior anyway); flip TTA averages over the mirror image.
With `init_from_stage1` each fold's CNN starts from its fold's stage-1 backbone: weights that
learnt this CT's bone on the same training studies (never the fold's own), for the case with
no ImageNet weights to start from. With `step_loss` > 0 a step head learns which steps show the
fracture from the fracture boxes' slices (weighted into the loss; prediction ignores it).
`step_target: label` trains the step head on the vertebra's label instead (every step). With
`balance` the fractured vertebrae are repeated in each training epoch. With `mixup` > 0 each
training sample is blended with another of its batch (`draw_mix`, `mix_batch`). With
`patient_loss` > 0 training batches hold whole studies and the top-N rule over each study's
seven vertebra logits is trained on patient_overall (`patient_log_probs`).
With `steps: neighbours` each step is a centre slice and its true neighbours, and the padding
steps of a short vertebra are masked out of the sequence head, the attention and the step loss.
With stage 1's per-vertebra boxes (`stage1.vertebra_boxes`), `crop: vertebra` frames the judged
vertebra alone and `box_channel` marks its box on every step (datasets/sequences.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cspine_ray import N_VERTEBRAE, VERTEBRAE
from cspine_ray.datasets import VertebraSequenceDataset, augment_batch
from cspine_ray.datasets.sequences import balance_samples, study_batches
from cspine_ray.metric import WEIGHTS
from cspine_ray.train.losses import weighted_bce
from cspine_ray.train.tasks.base import Task, autocast, to_device


class TwoStageTask(Task):
    name = "two_stage"

    def model_spec(self) -> tuple[str, dict[str, Any]]:
        s = self.cfg.sequence
        return "sequence_classifier", {
            "backbone": self.cfg.backbone, "pretrained": self.cfg.pretrained,
            "weights": self.cfg.weights,
            "in_chans": self.in_chans, "sequence_head": s.head, "hidden": s.hidden,
            "num_layers": s.layers, "vertebra_embedding": s.vertebra_embedding,
            "step_head": s.step_loss > 0, **self.cfg.model,
        }

    def initial_model(self, fold: int) -> nn.Module:
        model = self.build_model()
        if self.cfg.sequence.init_from_stage1:
            load_stage1_backbone(model.backbone, self.data.stage1_dir, fold)
        return model

    def dataset(self, uids: list[str], labels: bool = True,
                slice_tables: dict | None = None) -> VertebraSequenceDataset:
        s = self.cfg.sequence
        return VertebraSequenceDataset(
            self.data.shards_dir, [(u, v) for u in uids for v in range(len(VERTEBRAE))],
            slice_tables if slice_tables is not None else self.data.slice_tables,
            labels=self.data.labels if labels else None, length=s.length, threshold=s.threshold,
            crop_size=s.crop_size, windows=self.cfg.input.windows, smooth=s.smooth,
            per_step=s.per_step, choice=s.slice_choice, native=self.cfg.input.native,
            layout=s.steps, offset=self.cfg.input.neighbour_offset, step_target=s.step_target,
            crop=s.crop, box_channel=s.box_channel,
        )

    @property
    def in_chans(self) -> int:
        return self.cfg.sequence.in_chans(len(self.cfg.input.windows))

    def train_dataset(self, uids: list[str], epoch: int, fold: int) -> VertebraSequenceDataset:
        dataset = self.dataset(uids)
        if self.cfg.sequence.balance:  # the same vertebrae, fractured ones repeated
            dataset.samples = balance_samples(dataset.samples, self.data.labels,
                                              self.cfg.sequence.balance)
        return dataset

    def loader(self, dataset, train: bool, device: torch.device, seed: int = 0) -> DataLoader:
        """With a patient term, training batches of whole studies (`study_batches`)."""
        if not (train and self.cfg.sequence.patient_loss):
            return super().loader(dataset, train, device, seed)
        return DataLoader(dataset, batch_sampler=study_batches(dataset.samples,
                                                               self.optim().batch_size, seed),
                          num_workers=self.cfg.input.loader_workers,
                          pin_memory=device.type == "cuda")

    def _forward(self, model: nn.Module, image: torch.Tensor, batch: dict,
                 return_steps: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B,) of (B, L, C, S, S) crops (and the step logits (B, L)); the ratio plane
        is added here, after any augmentation of the crops."""
        if self.cfg.sequence.ratio_channel:
            ratio = batch["ratio"].to(image.dtype)[:, :, None, None, None]  # (B, L, 1, 1, 1)
            image = torch.cat([image, ratio.expand(*image.shape[:2], 1, *image.shape[3:])], dim=2)
        vertebra = batch["vertebra"] if self.cfg.sequence.vertebra_embedding else None
        mask = self._step_mask(batch)
        kwargs = {} if mask is None else {"mask": mask}
        if return_steps:
            return model(image, vertebra, return_steps=True, **kwargs)
        return model(image, vertebra, **kwargs)

    def _step_mask(self, batch: dict) -> torch.Tensor | None:
        """(B, L) real steps where a layout pads (the neighbour layout's short vertebrae); None
        where every step is real (the thesis layout)."""
        return batch["step_mask"] if self.cfg.sequence.steps == "neighbours" else None

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        s = self.cfg.sequence
        # the box plane (the last channel of a step) moves with the crop, its values kept
        image = augment_batch(batch["image"], self.cfg.augment, generator,
                              fixed_channels=int(s.box_channel))
        if s.mixup > 0:
            image, batch = mix_batch(image, batch, *draw_mix(len(image), s.mixup, generator))
        if s.step_loss > 0:
            logits, steps = self._forward(model, image, batch, return_steps=True)
        else:
            logits, steps = self._forward(model, image, batch), None
        keep = batch["found"] if s.mask_not_found else torch.ones_like(batch["found"])
        if not keep.any():  # nothing to learn from here; keep the graph for backward
            return logits.sum() * 0.0
        loss = weighted_bce(logits[keep], batch["label"][keep])
        if steps is not None and (known := keep & batch["step_known"]).any():
            steps, targets = steps[known], batch["step_label"][known]
            if (mask := self._step_mask(batch)) is not None:  # padding steps teach nothing
                steps, targets = steps[mask[known]], targets[mask[known]]
            loss = loss + s.step_loss * weighted_bce(steps, targets)
        if s.patient_loss:
            loss = loss + s.patient_loss * self._patient_loss(logits, batch)
        return loss

    def _patient_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """patient_overall's weighted BCE (the metric's 7 / 14) of the top-N rule over each
        study's seven vertebra logits; the batch holds whole studies (`study_batches`)."""
        rows = {u: i for i, u in enumerate(dict.fromkeys(batch["uid"]))}  # study -> table row
        uids = list(rows)
        row = torch.tensor([rows[u] for u in batch["uid"]], device=logits.device)
        table = logits.float().new_zeros(len(uids), N_VERTEBRAE)
        table[row, batch["vertebra"].to(logits.device)] = logits.float()
        if torch.bincount(row, minlength=len(uids)).ne(N_VERTEBRAE).any():
            raise ValueError("the patient loss needs all seven vertebrae of each study in a batch")
        log_p, log_q = patient_log_probs(table, self.cfg.effective_top_n)
        y = torch.tensor([float(self.data.labels[u][N_VERTEBRAE]) for u in uids],
                         device=logits.device)
        neg, pos = WEIGHTS["patient_overall"]
        w = neg + (pos - neg) * y
        return (w * -torch.where(y > 0.5, log_p, log_q)).sum() / w.sum()

    def _probabilities(self, model: nn.Module, batch: dict) -> torch.Tensor:
        p = torch.sigmoid(self._forward(model, batch["image"], batch).float())
        if self.cfg.sequence.flip_tta:  # mirror left-right: the anatomy's own symmetry
            p = (p + torch.sigmoid(self._forward(model, batch["image"].flip(-1), batch).float())) / 2
        return p

    @torch.no_grad()
    def predict(self, models: Sequence[nn.Module], uids: list[str], device: torch.device,
                slice_tables: dict | None = None, prior: np.ndarray | None = None) -> pd.DataFrame:
        """The mean over `models` of each found vertebra's probability: each vertebra's crops
        are built once for all models. A vertebra stage 1 did not find gets `prior` (in
        validation: the prevalence among the other studies, so no label leaks in)."""
        for model in models:
            model.eval()
        if prior is None:  # validation: the prior of the other studies, so no label leaks in
            held_out = set(uids)
            prior = self.data.prior([u for u in self.data.uids if u not in held_out])
        probs = {u: np.array(prior[: len(VERTEBRAE)], np.float64) for u in uids}
        ds = self.dataset(uids, labels=False, slice_tables=slice_tables)
        for batch in self.loader(ds, train=False, device=device):
            found = batch["found"].numpy()
            batch = to_device(batch, device)
            with autocast(device, self.optim().amp):
                p = torch.stack([self._probabilities(m, batch) for m in models]).mean(0)
            for uid, v, pi, f in zip(batch["uid"], batch["vertebra"].tolist(), p.cpu().numpy(), found):
                if f:  # not found: keep the prior
                    probs[uid][v] = pi
        return pd.DataFrame.from_dict(probs, orient="index", columns=list(VERTEBRAE))


def patient_log_probs(logits: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 7) vertebra logits -> (log p, log(1 - p)) of the top-N rule's patient probability
    p = 1 - prod over the N highest of (1 - sigmoid(z)), stable for confident logits."""
    log_q = F.logsigmoid(-logits.topk(top_n, dim=-1).values).sum(-1)  # log prod (1 - p_v)
    x = log_q.clamp(max=-1e-7)  # p >= 1e-7: both branches finite, so no NaN gradient either
    log_p = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return log_p, log_q


def draw_mix(n: int, alpha: float, generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """One batch's mixup draw: lambda ~ Beta(alpha, alpha) folded to [0.5, 1] (each sample stays
    the larger part of its blend, so its vertebra embedding still names it) and the partner of
    each sample (a permutation of the n), both from the training generator."""
    device = generator.device  # the loop's generator lives on the training device
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam), torch.randperm(n, generator=generator, device=device)


def mix_batch(image: torch.Tensor, batch: dict, lam: float,
              partner: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Sample i blended with sample partner[i]: crops, ratio plane and the vertebra and step
    labels by lam (soft labels); a sample counts as found, and its steps as known and real, only
    where both parts are (padding comes last, so step 0 stays real)."""
    partner = partner.to(image.device)
    mixed = dict(batch)
    for key in ("ratio", "label", "step_label"):
        if key in batch:
            mixed[key] = lam * batch[key] + (1 - lam) * batch[key][partner]
    for key in ("found", "step_known", "step_mask"):
        if key in batch:
            mixed[key] = batch[key] & batch[key][partner]
    return lam * image + (1 - lam) * image[partner], mixed


def load_stage1_backbone(backbone: nn.Module, stage1_dir: str | None, fold: int) -> None:
    """Copy fold `fold`'s best stage-1 backbone weights into `backbone` (the same timm model
    with as many input channels, which TrainConfig checks; loaded strictly)."""
    from cspine_ray.train.result import load_result  # result.py imports the tasks package

    if stage1_dir is None:
        raise ValueError("sequence.init_from_stage1 needs the stage-1 result (train() passes it)")
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in load_result(stage1_dir).fold_weights(fold).items()
               if k.startswith(prefix)}
    backbone.load_state_dict(weights)
