"""One synthetic study: its spec (what the dataset says about it) and its ground truth volumes.

`synth_study(spec)` is a pure function of the spec: the same spec gives the same HU volume,
labels and fracture boxes on every call, so tests and downstream stages can regenerate any
study's truth instead of storing it. Volumes are canonical (z, y, x), slices head -> feet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from cspine_ray import VERTEBRAE
from cspine_ray.synth.fractures import Distractor, Fracture, plan_lesions
from cspine_ray.synth.phantom import LABEL, plan_anatomy, render_phantom
from cspine_ray.synth.shapes import Canvas, PaintResult

HU_MIN, HU_MAX = -1024, 3071     # what a 12-bit CT stores; clipping here keeps every storage exact
BLUR_PX = 0.6                    # in-plane point spread (pixels), a sharp bone kernel
BLUR_SLICES = 0.35               # along z (slices)


@dataclass(frozen=True)
class StudySpec:
    """Everything that decides a study; pixels follow from it deterministically."""

    uid: str
    index: int                      # position in the dataset (1-based); also the fake patient number
    seed: int                       # dataset seed
    split: str = "train"            # "train" | "test"
    size: int = 256                 # rows = columns (pixels)
    slice_spacing: float = 1.0      # mm between slices
    severity: str = "subtle"        # "subtle" | "obvious"
    fractured: tuple[str, ...] = ()  # fractured vertebrae, e.g. ("C2", "C6")
    transfer_syntax: str = ExplicitVRLittleEndian
    z_increases_with_instance: bool = False   # True: instance 1 is the feet end
    signed: bool = False            # PixelRepresentation 1 (stored = HU) or 0 (stored = HU + 1024)
    bits_stored: int = 12
    has_segmentation: bool = False
    has_boxes: bool = False
    # crack widths (lo, hi) in pixels of a `crack_side`-pixel image of the field of view (the
    # working resolution; 0 = this study's size) instead of the severity's millimetres
    crack_px: tuple[float, float] | None = None
    crack_side: int = 0

    def __post_init__(self):
        unknown = set(self.fractured) - set(VERTEBRAE)
        if unknown:
            raise ValueError(f"fractured levels must be among {VERTEBRAE}, got {sorted(unknown)}")
        if self.signed and self.bits_stored != 16:
            raise ValueError("signed storage needs bits_stored 16 (HU up to 3071)")
        if self.crack_px is not None and not 0 < self.crack_px[0] <= self.crack_px[1]:
            raise ValueError(f"crack widths must be 0 < lo <= hi pixels, got {self.crack_px}")

    @property
    def targets(self) -> dict[str, int]:
        """The train.csv row: C1..C7 and patient_overall as 0/1."""
        row = {v: int(v in self.fractured) for v in VERTEBRAE}
        row["patient_overall"] = int(bool(self.fractured))
        return row


@dataclass(frozen=True)
class FractureBox:
    """One train_bounding_boxes.csv row (pixels; slice_number = InstanceNumber) plus its origin."""

    level: str
    x: float
    y: float
    width: float
    height: float
    slice_number: int
    z: int                          # canonical slice index


@dataclass(frozen=True)
class SynthStudy:
    spec: StudySpec
    hu: np.ndarray                  # int16 (z, y, x), canonical head -> feet
    labels: np.ndarray              # uint8 (z, y, x): 1..7 C1..C7, 8.. T1..
    spacing: tuple[float, float, float]   # (dz, dy, dx) mm
    z_positions: np.ndarray         # patient z (mm, DICOM LPS) of each canonical slice
    corner_xy: tuple[float, float]  # patient (x, y) of the centre of pixel (row 0, col 0)
    instance_numbers: np.ndarray    # InstanceNumber of each canonical slice
    fractures: tuple[Fracture, ...]
    distractors: tuple[Distractor, ...]
    boxes: tuple[FractureBox, ...]
    noise_hu: float = 0.0

    @property
    def slice_thickness(self) -> float:
        """Contiguous slices: as thick as they are apart."""
        return self.spacing[0]


def _rngs(spec: StudySpec) -> list[np.random.Generator]:
    """Independent streams (scanner, anatomy, lesions, texture, noise) so a change in one
    part of the generator does not reshuffle the others."""
    seq = np.random.SeedSequence([spec.seed, spec.index, 20220])
    return [np.random.default_rng(s) for s in seq.spawn(5)]


def _noise_gain(sigmas: tuple[float, float, float]) -> float:
    """Standard deviation left of unit white noise after the separable Gaussian blur."""
    gain = 1.0
    for s in sigmas:
        if s <= 0:
            continue
        r = int(4.0 * s + 0.5)
        x = np.arange(-r, r + 1)
        k = np.exp(-0.5 * (x / s) ** 2)
        k /= k.sum()
        gain *= float(np.sqrt((k * k).sum()))
    return gain


def synth_study(spec: StudySpec) -> SynthStudy:
    """Generate the study's ground truth: HU volume, labels, fractures and their boxes."""
    scanner, anat_rng, lesion_rng, texture_rng, noise_rng = _rngs(spec)
    fov = float(scanner.uniform(200.0, 250.0))
    px = round(fov / spec.size, 4)
    dz = float(spec.slice_spacing)
    anatomy = plan_anatomy(anat_rng)
    nz = int(anatomy.length_mm / dz) + 1

    canvas = Canvas(np.zeros((nz, spec.size, spec.size), dtype=np.float32),
                    np.zeros((nz, spec.size, spec.size), dtype=np.uint8), (dz, px, px), texture_rng)
    gap_mm = None
    if spec.crack_px is not None:
        working_px = fov / (spec.crack_side or spec.size)
        gap_mm = (spec.crack_px[0] * working_px, spec.crack_px[1] * working_px)
    mods, fractures, distractors = plan_lesions(lesion_rng, anatomy.dims, spec.fractured,
                                                spec.severity, px, gap_mm)
    result = PaintResult()
    render_phantom(canvas, anatomy, mods, result)

    # scanner blur and quantum noise: white noise blurred with the image gets the grain of CT
    sigmas = (BLUR_SLICES, BLUR_PX, BLUR_PX)
    noise = float(noise_rng.uniform(10.0, 20.0))
    hu = canvas.hu
    hu += (noise / _noise_gain(sigmas)) * noise_rng.standard_normal(hu.shape, dtype=np.float32)
    hu = ndimage.gaussian_filter(hu, sigmas, mode="nearest")
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu = hu.astype(np.int16)

    # patient coordinates: table position and where the first slice sits
    z_top = round(float(scanner.uniform(-90.0, 40.0)), 2)
    z_positions = np.round(z_top - np.arange(nz) * dz, 4)
    corner = (round(float(scanner.uniform(-15.0, 15.0)) - (spec.size - 1) / 2 * px, 4),
              round(float(scanner.uniform(-10.0, 40.0)) - (spec.size - 1) / 2 * px, 4))
    k = np.arange(nz)
    instances = (nz - k) if spec.z_increases_with_instance else (k + 1)
    boxes = _fracture_boxes(result, canvas.labels, fractures, instances)
    return SynthStudy(spec, hu, canvas.labels, (dz, px, px), z_positions, corner, instances,
                      tuple(fractures), tuple(distractors), boxes, noise)


def _fracture_boxes(result: PaintResult, labels: np.ndarray, fractures: list[Fracture],
                    instances: np.ndarray, pad: int = 1) -> tuple[FractureBox, ...]:
    """One box per slice through each fracture, where the fractured vertebra is labelled."""
    boxes = []
    ny, nx = labels.shape[1:]
    for frac in fractures:
        if frac.id not in result.masks:
            continue
        block, mask = result.masks[frac.id]
        mask = mask & (labels[block] == LABEL[frac.level])
        for dz_ in np.nonzero(mask.any(axis=(1, 2)))[0]:
            rows = np.nonzero(mask[dz_].any(axis=1))[0] + block[1].start
            cols = np.nonzero(mask[dz_].any(axis=0))[0] + block[2].start
            r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad, ny - 1)
            c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad, nx - 1)
            z = int(dz_ + block[0].start)
            boxes.append(FractureBox(frac.level, float(c0), float(r0), float(c1 - c0 + 1), float(r1 - r0 + 1),
                                     int(instances[z]), z))
    return tuple(sorted(boxes, key=lambda b: (b.slice_number, b.level, b.x, b.y)))
