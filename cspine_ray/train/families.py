"""The four model families of the thesis, and the stage-1 locator, as one table of facts.

Everything that differs between families and is not code lives here: the task that trains it,
the registered models it builds, its default patient rule, whether it needs stage 1 and which
sections of the training settings it reads. Training keys, the MLflow parameters of a trial
and the CLI choices are all derived from this table (docs/ARCHITECTURE.md, "Keys").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    models: tuple[str, ...]       # registered model names (cspine_ray.models), stage 1 first
    top_n: int | None             # default N of the patient rule; None: the model predicts it
    needs_stage1: bool            # trains on the locator's out-of-fold slice tables
    sections: tuple[str, ...]     # TrainConfig fields / sections ("a" or "a.b") its training reads

    @property
    def uses_backbone(self) -> bool:
        return "backbone" in self.sections


# read by every family's training (besides its own sections)
_COMMON = ("family", "model", "seed", "ensemble", "optim", "input", "augment")
_TIMM = ("backbone", "pretrained", "weights")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    # the 3D CNN reads the whole volume at cube^3: of the input section only these two
    Family("cnn3d", ("cnn3d",), top_n=None, needs_stage1=False,
           sections=("family", "model", "seed", "ensemble", "optim", "input.windows", "input.cube",
                     "augment")),
    # thesis eq. 4.2: patient = max over vertebrae
    Family("single_head", ("slice_classifier",), top_n=1, needs_stage1=True,
           sections=_COMMON + _TIMM + ("stage1",)),
    # thesis eq. 4.3 and 4.4: 1 - prod(1 - p) over all seven
    Family("multi_head", ("multi_head",), top_n=7, needs_stage1=True,
           sections=_COMMON + _TIMM + ("stage1",)),
    Family("two_stage", ("slice_locator", "sequence_classifier"), top_n=7, needs_stage1=True,
           sections=_COMMON + _TIMM + ("stage1", "sequence")),
)}
FAMILY_NAMES = tuple(FAMILIES)  # ("cnn3d", "single_head", "multi_head", "two_stage")

# What the stage-1 locator's training reads: its own section, the slice input and the parts of
# the optimiser it shares with the family (its epochs, batch size and lr are in stage1).
LOCATOR_SECTIONS = ("stage1", "pretrained", "weights", "seed", "augment", "input.windows",
                    "input.neighbour_offset", "optim.weight_decay", "optim.t0", "optim.eta_min",
                    "optim.amp")
# Settings that change how fast a job runs, never what it learns: left out of result keys.
UNKEYED = ("input.loader_workers",)
# Settings added after results were trained with their default behaviour: left out of a key
# while they hold their default, so a result trained before they existed keeps its key.
LATER_SETTINGS = ("augment.vflip_p", "augment.transpose_p", "augment.whole_pixel_shift",
                  "augment.noise", "augment.noise_p", "sequence.steps", "optim.ema",
                  "sequence.step_target", "sequence.balance", "sequence.mixup",
                  "sequence.patient_loss", "stage1.vertebra_boxes", "sequence.crop",
                  "sequence.box_channel")


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family must be one of {FAMILY_NAMES}, got {name!r}") from None
