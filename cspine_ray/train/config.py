"""Training settings as plain data: one `TrainConfig` per job, loadable from YAML.

Defaults follow the thesis (docs/ARCHITECTURE.md, "The families"): AdamW lr 1e-4, wd 1e-5,
CosineAnnealingWarmRestarts(T_0=5, eta_min=1e-6), ConvNeXt-Tiny, stage 1 at 384 px for 15
epochs, stage 2 with L=8 steps at 320 px for 20 epochs, threshold 0.3, top-N with N=7.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from cspine_ray import N_VERTEBRAE
from cspine_ray.config import digest, drop, from_dict, get_dotted, select, set_dotted, to_dict
from cspine_ray.datasets.augment import AugmentConfig
from cspine_ray.datasets.sequences import CROPS, SLICE_CHOICES, STEP_LAYOUTS, STEP_TARGETS
from cspine_ray.models.sequence import SEQUENCE_HEADS
from cspine_ray.train.families import LATER_SETTINGS, LOCATOR_SECTIONS, UNKEYED, Family, family

# Part of every result key: bump it when training the same settings on the same data starts
# to produce something else (2: the best epoch is chosen on an N-independent figure).
KEY_VERSION = 2


@dataclass
class OptimConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-5
    t0: int = 5                 # CosineAnnealingWarmRestarts period, in epochs
    eta_min: float = 1e-6
    amp: bool = True            # mixed precision; only ever used on a GPU
    # decay of an exponential moving average of the weights that validation and the result
    # use (timm ModelEmaV3 with warm-up; e.g. 0.99); 0 = off. The family's model only, not stage 1
    ema: float = 0.0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.t0 < 1:
            raise ValueError("epochs, batch_size and t0 must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"optim.ema must be in [0, 1) (0 = off), got {self.ema}")


@dataclass
class InputConfig:
    windows: list[Any] = field(default_factory=lambda: ["bone"])  # names or [centre, width]
    neighbour_offset: int = 1   # 2.5D: slices z-k, z, z+k become the channels
    image_size: int = 384       # slice size of the 2D families
    slices_per_study: int = 24  # 2D families: slices drawn per study and epoch
    eval_stride: int = 2        # 2D families: every k-th slice when predicting a study
    cube: int = 128             # cnn3d: the volume is resized to cube^3
    loader_workers: int = 2     # DataLoader processes per training worker
    # 2D families: a slice shows a vertebra (and carries its fracture label) when its stage-1
    # ratio exceeds this. The thesis: any pixel of it (ratio > 0 on a ground-truth mask); stage-1
    # ratios are sigmoids, never exactly 0, so "any visible part" is 0.05 here.
    visibility_threshold: float = 0.05
    # stage-2 crops and the 2D families' slices come from the shards' native-resolution level
    # (512 px for real CT; preprocess native_size) where they have one: hairline fractures keep
    # their detail. Stage 1 and cnn3d always read the shard-size volume.
    native: bool = True

    def __post_init__(self):
        if self.neighbour_offset < 0:
            raise ValueError(f"input.neighbour_offset must be >= 0 (slices between a 2.5D image's "
                             f"channels), got {self.neighbour_offset}")
        if not 0.0 <= self.visibility_threshold < 1.0:
            raise ValueError("input.visibility_threshold must be in [0, 1), got "
                             f"{self.visibility_threshold}")

    @property
    def channels(self) -> int:
        return 3 * len(self.windows)


@dataclass
class Stage1Config:
    """The vertebra locator (two-stage stage 1; the visibility model of the 2D families)."""

    backbone: str = "convnext_tiny"
    image_size: int = 384
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-4
    slices_per_study: int = 64
    ratio_loss: str = "bce"     # the thesis used "l1"; BCE on the soft ratio trains much faster
    model: dict[str, Any] = field(default_factory=dict)
    # predicted tables (validation, the out-of-fold tables, inference, pseudo labels) are made
    # anatomical: C1..C7 ordered along z, contiguous, plausible lengths (datasets/anatomy.py);
    # it lowered the CV error and z_error at 25% and at 5% segmented (benchmarks/stage1.py),
    # but the two-stage detector trained on such tables did worse on both generated sets of
    # benchmarks/quality.py: off until it is shown to help the detector
    anatomy: bool = False
    # pseudo-label rounds: after every `epochs` epochs the fold's best model labels the
    # unsegmented studies of its own training folds, and `epochs` more follow on the segmented
    # studies plus those (0 = off; training then takes epochs * (1 + pseudo_rounds) epochs).
    # Off by default: on synthetic data it did not beat as many epochs without pseudo labels
    pseudo_rounds: int = 0
    pseudo_weight: float = 1.0      # pseudo-labelled slices per epoch / ground-truth slices
    pseudo_min_peak: float = 0.5    # a study is pseudo-labelled when every vertebra peaks above
    # a box per vertebra per slice beside the C1-C7 one (its slice tables are (z, 39)): where
    # stage 2's vertebra crop and box channel come from. Trained on the segmented studies' masks
    vertebra_boxes: bool = False

    def __post_init__(self):
        if self.ratio_loss not in ("bce", "l1"):
            raise ValueError(f"stage1.ratio_loss must be 'bce' or 'l1', got {self.ratio_loss!r}")
        if self.pseudo_rounds < 0 or not self.pseudo_weight > 0:
            raise ValueError("stage1.pseudo_rounds must be >= 0 and stage1.pseudo_weight > 0")
        if not 0 <= self.pseudo_min_peak <= 1:
            raise ValueError(f"stage1.pseudo_min_peak must be in [0, 1], got {self.pseudo_min_peak}")


@dataclass
class SequenceConfig:
    """Two-stage stage 2: how a vertebra becomes a sequence, and the sequence model."""

    length: int = 8             # L: 3L slices per vertebra -> L 2.5D steps
    threshold: float = 0.3      # smoothed stage-1 ratio above which a slice shows the vertebra
    smooth: int = 5
    crop_size: int = 320
    head: str = "lstm"
    hidden: int = 256
    layers: int = 2
    vertebra_embedding: bool = True
    # the top teams' techniques, each measured on and off in benchmarks/quality.py
    slice_choice: str = "spread"  # "run": only the passing run around the ratio peak
    per_step: int = 3             # slices per 2.5D step (1st place: 5)
    # "neighbours": each step a centre slice and its neighbours input.neighbour_offset apart,
    # the centres spread over the vertebra, a short vertebra fewer (masked) steps (1st place);
    # "spread": the thesis's consecutive groups of the 3L evenly spread slices
    steps: str = "spread"
    ratio_channel: bool = False   # the step's stage-1 ratio as an extra input plane
    mask_not_found: bool = False  # leave vertebrae stage 1 did not find out of the loss
    flip_tta: bool = False        # predict = mean over the crops and their mirror image
    # each fold's backbone starts from its own fold's stage-1 backbone (trained on the same
    # training studies, never the fold's): in-domain weights when no ImageNet ones are at hand
    init_from_stage1: bool = False
    # weight of a per-step fracture loss on the slices of train_bounding_boxes.csv (a step head
    # beside the vertebra's logit; studies without boxes teach only their negative vertebrae);
    # 0 = off
    step_loss: float = 0.0
    # what the step loss learns: "boxes" (the fracture boxes' slices) or "label" (the vertebra's
    # label on every step, the 1st place's; every fractured vertebra teaches, boxed or not)
    step_target: str = "boxes"
    # fractured vertebrae repeated in each training epoch until they are about this fraction of
    # its samples (about 5-10% otherwise); 0 = off
    balance: float = 0.0
    # mixup: each training sample blended with another of its batch by lambda ~ Beta(a, a)
    # (crops, ratio plane and labels alike); a = this value, 0 = off
    mixup: float = 0.0
    # weight of a patient term in the loss: training batches hold whole studies (all seven
    # vertebrae), and the top-N rule applied to their vertebra logits learns patient_overall
    # (with its metric weight); 0 = off
    patient_loss: float = 0.0
    # what a vertebra's crop frames (CROPS): "study", the thesis's union of the C1-C7 boxes on
    # its slices; "vertebra", the union of its own boxes (needs stage1.vertebra_boxes): tight,
    # and no neighbour's fracture in a negative's view
    crop: str = "study"
    # a plane marking the judged vertebra's own box on each step's middle slice (the 1st and 4th
    # places gave stage 2 the vertebra's mask); needs stage1.vertebra_boxes
    box_channel: bool = False

    def in_chans(self, windows: int) -> int:
        """Channels of one 2.5D step: per_step slices per window, the box plane and the ratio
        plane."""
        return self.per_step * windows + int(self.box_channel) + int(self.ratio_channel)

    def __post_init__(self):
        if self.head not in SEQUENCE_HEADS:
            raise ValueError(f"sequence.head must be one of {SEQUENCE_HEADS}, got {self.head!r}")
        if self.length < 1 or not 0 <= self.threshold < 1:
            raise ValueError("sequence.length must be >= 1 and threshold in [0, 1)")
        if self.slice_choice not in SLICE_CHOICES:
            raise ValueError(f"sequence.slice_choice must be one of {SLICE_CHOICES}, "
                             f"got {self.slice_choice!r}")
        if self.steps not in STEP_LAYOUTS:
            raise ValueError(f"sequence.steps must be one of {STEP_LAYOUTS}, got {self.steps!r}")
        if self.per_step < 1:
            raise ValueError(f"sequence.per_step must be >= 1, got {self.per_step}")
        if not self.step_loss >= 0:
            raise ValueError(f"sequence.step_loss must be >= 0, got {self.step_loss}")
        if self.step_target not in STEP_TARGETS:
            raise ValueError(f"sequence.step_target must be one of {STEP_TARGETS}, "
                             f"got {self.step_target!r}")
        if not 0 <= self.balance < 1:
            raise ValueError(f"sequence.balance must be in [0, 1) (0 = off), got {self.balance}")
        if not self.mixup >= 0:
            raise ValueError(f"sequence.mixup must be >= 0 (0 = off), got {self.mixup}")
        if not self.patient_loss >= 0:
            raise ValueError(f"sequence.patient_loss must be >= 0 (0 = off), got {self.patient_loss}")
        if self.crop not in CROPS:
            raise ValueError(f"sequence.crop must be one of {CROPS}, got {self.crop!r}")
        if self.patient_loss and (self.balance or self.mixup):
            raise ValueError("sequence.patient_loss trains on whole studies; sequence.balance "
                             "(repeated vertebrae) and sequence.mixup (blends across studies) "
                             "break them up: use one or the other")


@dataclass
class ResourcesConfig:
    """What a job runs on; train/placement.py fits the fold workers to the cluster."""

    num_workers: int | None = None  # Ray Train workers; default: as many folds at once as fit;
    #                                 0 = every fold in-process
    cpus_per_worker: float = 1.0
    gpus: float = 0.0               # GPUs for the whole job: >= 1 whole GPUs, < 1 a share of one
    max_failures: int = 2           # worker losses survived (resume from the last checkpoint)
    start_attempts: int = 30        # worker-group starts (Ray waits up to 60 s each) before failing


@dataclass
class TrainConfig:
    family: str = "two_stage"
    backbone: str = "convnext_tiny"
    pretrained: bool = False
    weights: str | None = None      # local file or folder of pretrained backbone weights;
    #                                 implies pretrained
    model: dict[str, Any] = field(default_factory=dict)  # extra create_model keyword arguments
    top_n: int | None = None        # patient_overall = top-N rule; None = the family's default
    # a second-level model fitted on the out-of-fold predictions gives all 8 probabilities
    # instead (models/calibrator.py); like N it is applied after training, costing none
    calibrate: bool = False
    seed: int = 42
    # a seed ensemble: the family (both stages) trained this many times on the same folds, with
    # seeds seed, seed + 1, ...; its out-of-fold predictions and fold models are averaged
    # (train/seeds.py). Averaging seeds is the one measured way to turn more CPU time into a
    # better metric on small data (BENCHMARKS.md, "Seed ensembles")
    ensemble: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    input: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self):
        family(self.family)  # refuses an unknown name, listing the families
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be a whole number >= 1 (members of a seed ensemble), "
                             f"got {self.ensemble!r}")
        if self.top_n is not None and not 1 <= self.top_n <= N_VERTEBRAE:
            raise ValueError(f"top_n must be in 1..{N_VERTEBRAE}, got {self.top_n}")
        if self.family == "two_stage" and self.sequence.init_from_stage1:
            self._check_stage1_init()
        s = self.sequence
        if (self.family == "two_stage" and (s.crop == "vertebra" or s.box_channel)
                and not self.stage1.vertebra_boxes):
            raise ValueError("sequence.crop 'vertebra' and sequence.box_channel need stage 1's "
                             "per-vertebra boxes: set stage1.vertebra_boxes: true")
        if (self.family == "two_stage" and self.sequence.steps == "neighbours"
                and self.input.neighbour_offset < 1):
            raise ValueError("sequence.steps 'neighbours' needs input.neighbour_offset >= 1 (a step "
                             "never shows one slice in two channels)")

    def _check_stage1_init(self) -> None:
        """Stage 2 can start from stage 1's backbone only if it is the same network: refused
        here, before any worker starts, not in a training worker that Ray would restart."""
        if self.stage1.backbone != self.backbone:
            raise ValueError(f"sequence.init_from_stage1 needs one backbone for both stages, got "
                             f"backbone {self.backbone!r} and stage1.backbone {self.stage1.backbone!r}")
        stage2 = self.sequence.in_chans(len(self.input.windows))
        if stage2 != self.input.channels:
            raise ValueError(f"sequence.init_from_stage1 needs as many input channels in both stages: "
                             f"stage 1 has {self.input.channels}, stage 2 {stage2} (per_step "
                             f"{self.sequence.per_step}, box_channel {self.sequence.box_channel}, "
                             f"ratio_channel {self.sequence.ratio_channel})")

    @property
    def spec(self) -> Family:
        return family(self.family)

    @property
    def needs_stage1(self) -> bool:
        return self.spec.needs_stage1

    @property
    def effective_top_n(self) -> int | None:
        """N of the patient rule; None for a family whose model predicts patient_overall
        (a top_n set for it, e.g. by a search space shared with other families, is ignored)."""
        if self.spec.top_n is None:
            return None
        return self.top_n or self.spec.top_n

    def read_settings(self) -> dict[str, Any]:
        """The settings this family's training reads (plus its patient rule N): what a trial
        logs as parameters. The sections it does not read are left out."""
        d = select(to_dict(self), self.spec.sections)
        if self.effective_top_n is not None:
            d["top_n"] = self.effective_top_n
        d["calibrate"] = self.calibrate
        return d

    def training_key(self, manifest_hash: str) -> str:
        """Identity of what training produces: the settings it reads and its stage 1's key.

        N, the calibrator and the resources are not part of it: two trials that differ only in
        top_n or calibrate (or in how many GPUs they ran on) share one key, so the second
        reuses the first one's fold models and out-of-fold predictions.
        """
        d = self._keyed(self.spec.sections)
        d.pop("stage1", None)  # stands in the stage-1 key, with all the locator reads
        if d.get("ensemble") == 1:  # a single model keeps its key (an ensemble's first member)
            del d["ensemble"]
        if self.needs_stage1:
            d["stage1_key"] = self.stage1_key(manifest_hash)
        d["manifest"], d["version"] = manifest_hash, KEY_VERSION
        return digest(d)

    def stage1_key(self, manifest_hash: str) -> str:
        """Identity of the stage-1 result: what the locator reads and the data only."""
        d = self._keyed(LOCATOR_SECTIONS)
        d["manifest"], d["version"] = manifest_hash, KEY_VERSION
        return digest(d)

    def _keyed(self, sections: tuple[str, ...]) -> dict[str, Any]:
        """The settings of `sections` that a key holds: not UNKEYED ones, nor LATER_SETTINGS at
        their defaults."""
        settings = to_dict(self)
        at_default = [k for k in LATER_SETTINGS if get_dotted(settings, k) == LATER_DEFAULTS[k]]
        return drop(select(settings, sections), (*UNKEYED, *at_default))


# what the settings added later hold by default (read once, not at every key)
LATER_DEFAULTS = {k: get_dotted(to_dict(TrainConfig()), k) for k in LATER_SETTINGS}


def build_config(base: dict, values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from plain `base` settings with dotted-key overrides ("optim.lr": 1e-3)."""
    config = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(config, key, value)
    return from_dict(TrainConfig, config)
