"""The RSNA 2022 layout, written from study specs.

`dataset_specs` decides every study of a dataset from one seed (labels at the real challenge
prevalences, storage variants, which studies get segmentations and boxes); `write_dataset`
renders and writes them:

    train_images/<UID>/<InstanceNumber>.dcm    test_images/<UID>/<InstanceNumber>.dcm
    segmentations/<UID>.nii                    (a quarter of the train studies by default)
    train.csv                 StudyInstanceUID, patient_overall, C1..C7
    train_bounding_boxes.csv  StudyInstanceUID, x, y, width, height, slice_number
    test.csv                  row_id, StudyInstanceUID, prediction_type
    sample_submission.csv     row_id, fractured
    synth_truth.csv           StudyInstanceUID, level, kind, fracture: what the generator drew
                              on each level (fracture kinds and look-alikes), no real data has it;
                              benchmarks break their figures down by it

Like the public data, test.csv lists one study more than test_images holds.
Each study is independent (`write_study`), so callers may write studies in parallel and then
call `write_tables`.
"""

from __future__ import annotations

import csv
import itertools
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cspine_ray import TARGETS, VERTEBRAE
from cspine_ray.synth.dicom_writer import TRANSFER_SYNTAXES, write_dicom_series, write_segmentation
from cspine_ray.synth.fractures import SEVERITIES
from cspine_ray.synth.study import FractureBox, StudySpec, synth_study

log = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043.10"
TRUTH_COLUMNS = ("StudyInstanceUID", "level", "kind", "fracture")
# RSNA 2022 training labels (docs/ARCHITECTURE.md, "Field facts")
PATIENT_PREVALENCE = 0.476
VERTEBRA_PREVALENCE = {"C1": 0.072, "C2": 0.141, "C3": 0.036, "C4": 0.053, "C5": 0.080,
                       "C6": 0.137, "C7": 0.195}
FRACTURE_COUNT_P = {1: 0.65, 2: 0.25, 3: 0.07, 4: 0.03}   # fractured vertebrae per positive study
SEGMENTED_FRACTION = 0.25   # train studies with a segmentation (the real data: 87 of 2019, 4%)
MIN_SEGMENTED = 2           # ... but at least this many in a set of TRAINABLE_STUDIES or more,
TRAINABLE_STUDIES = 8       # so stage 1 has one in each of two folds (folds deal them first)
BOXED_FRACTION = 0.8        # positive train studies that get fracture boxes
REVERSED_FRACTION = 0.15    # studies numbered feet -> head
SIGNED_FRACTION = 0.3
LARGE_FRACTION = 0.1        # 1.5x images, like the real 768 px studies


def study_uid(seed: int, index: int) -> str:
    return f"{UID_ROOT}.{seed}.{index}"


@lru_cache(maxsize=1)
def level_weights() -> np.ndarray:
    """Sampling weights for the fractured levels of a positive study.

    Drawing k levels without replacement flattens the weights, so they are fitted (exactly, by
    enumerating the ordered draws) until each vertebra's marginal rate matches the real one.
    """
    target = np.array([VERTEBRA_PREVALENCE[v] for v in VERTEBRAE]) / PATIENT_PREVALENCE
    target *= sum(k * p for k, p in FRACTURE_COUNT_P.items()) / target.sum()
    w = target / target.sum()
    for _ in range(15):
        marginal = np.zeros(len(w))
        for k, pk in FRACTURE_COUNT_P.items():
            for order in itertools.permutations(range(len(w)), k):
                p, left = 1.0, 1.0
                for i in order:
                    p *= w[i] / left
                    left -= w[i]
                marginal[list(order)] += pk * p
        w = w * target / marginal
        w /= w.sum()
    return w


def _draw_fractured(rng: np.random.Generator) -> tuple[str, ...]:
    if rng.random() >= PATIENT_PREVALENCE:
        return ()
    counts = list(FRACTURE_COUNT_P)
    k = counts[int(rng.choice(len(counts), p=list(FRACTURE_COUNT_P.values())))]
    picked = rng.choice(len(VERTEBRAE), size=k, replace=False, p=level_weights())
    return tuple(VERTEBRAE[i] for i in sorted(picked))


def dataset_specs(n_train: int, seed: int = 0, n_test: int | None = None, size: int = 256,
                  slice_spacing: float = 1.0, severity: str = "subtle",
                  segmented_fraction: float = SEGMENTED_FRACTION,
                  crack_px: tuple[float, float] | None = None) -> list[StudySpec]:
    """Specs of every study with images (train first, then test); deterministic in the arguments.

    Each train study is segmented with probability `segmented_fraction`; with 2 or more train
    studies at least one is, and with TRAINABLE_STUDIES or more at least MIN_SEGMENTED (the
    first unsegmented ones are topped up). Only which studies are segmented depends on the
    fraction: the images, labels and the other draws are the same for every fraction, and a
    lower fraction's segmented studies are among a higher one's (before the top-up).
    `crack_px` (lo, hi): crack widths in pixels at `size` (StudySpec.crack_px), also for the
    studies drawn larger than `size`."""
    if n_train < 1:
        raise ValueError("need at least one train study")
    if seed < 0:
        raise ValueError("seed must be >= 0 (it is part of the UIDs)")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}")
    if not 16 <= size <= 1024:
        raise ValueError("size must be in 16..1024 pixels")
    if not 0.3 <= slice_spacing <= 10:
        raise ValueError("slice spacing must be in 0.3..10 mm")
    if not 0 <= segmented_fraction <= 1:
        raise ValueError("segmented fraction must be in 0..1")
    n_test = max(2, n_train // 8) if n_test is None else n_test
    specs = []
    for index in range(1, n_train + n_test + 1):
        rng = np.random.default_rng([seed, index, 1])
        split = "train" if index <= n_train else "test"
        fractured = _draw_fractured(rng)
        signed = bool(rng.random() < SIGNED_FRACTION)
        bits = 16 if signed or rng.random() < 0.3 else 12
        large = bool(rng.random() < LARGE_FRACTION)
        specs.append(StudySpec(
            uid=study_uid(seed, index), index=index, seed=seed, split=split,
            size=int(round(size * 1.5 / 2)) * 2 if large else size,
            slice_spacing=float(slice_spacing), severity=severity, fractured=fractured,
            # cycle the syntaxes so that any four consecutive studies use all of them
            transfer_syntax=TRANSFER_SYNTAXES[(index + seed) % len(TRANSFER_SYNTAXES)],
            z_increases_with_instance=bool(rng.random() < REVERSED_FRACTION),
            signed=signed, bits_stored=bits,
            has_segmentation=split == "train" and bool(rng.random() < segmented_fraction),
            has_boxes=split == "train" and bool(fractured) and bool(rng.random() < BOXED_FRACTION),
            crack_px=None if crack_px is None else (float(crack_px[0]), float(crack_px[1])),
            crack_side=size if crack_px is not None else 0,
        ))
    wanted = MIN_SEGMENTED if n_train >= TRAINABLE_STUDIES else 1 if n_train >= 2 else 0
    missing = wanted - sum(s.has_segmentation for s in specs if s.split == "train")
    for i in range(n_train):  # train studies come first
        if missing <= 0:
            break
        if not specs[i].has_segmentation:
            specs[i] = replace(specs[i], has_segmentation=True)
            missing -= 1
    return specs


def missing_test_uid(specs: Sequence[StudySpec]) -> str:
    """The study listed in test.csv without images (mimics the public data's disagreement)."""
    return study_uid(specs[0].seed, max(s.index for s in specs) + 1)


@dataclass(frozen=True)
class WrittenStudy:
    spec: StudySpec
    boxes: tuple[FractureBox, ...]
    slices: int
    lesions: tuple[tuple[str, str, bool], ...] = ()  # (level, kind, is a fracture) as drawn


def write_study(spec: StudySpec, root: str | Path) -> WrittenStudy:
    """Render one study and write its DICOM series (and segmentation if the spec has one)."""
    root = Path(root)
    study = synth_study(spec)
    write_dicom_series(study, root / f"{spec.split}_images" / spec.uid)
    if spec.has_segmentation:
        write_segmentation(study, root / "segmentations" / f"{spec.uid}.nii")
    boxes = study.boxes if spec.has_boxes else ()
    lesions = tuple((f.level, f.kind, True) for f in study.fractures) + \
        tuple((d.level, d.kind, False) for d in study.distractors)
    return WrittenStudy(spec, boxes, study.hu.shape[0], lesions)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def write_tables(root: str | Path, written: Sequence[WrittenStudy]) -> None:
    """train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv, synth_truth.csv."""
    from cspine_ray.io.rsna import BOX_COLUMNS, TEST_COLUMNS  # the reader's columns (imports pandas)

    root = Path(root)
    written = sorted(written, key=lambda w: w.spec.index)
    train = [w for w in written if w.spec.split == "train"]
    _write_csv(root / "train.csv", ("StudyInstanceUID", "patient_overall") + VERTEBRAE,
               ([w.spec.uid, w.spec.targets["patient_overall"]] + [w.spec.targets[v] for v in VERTEBRAE]
                for w in train))
    _write_csv(root / "train_bounding_boxes.csv", BOX_COLUMNS,
               ([w.spec.uid, f"{b.x:.1f}", f"{b.y:.1f}", f"{b.width:.1f}", f"{b.height:.1f}", b.slice_number]
                for w in train for b in w.boxes))
    listed = [w.spec.uid for w in written if w.spec.split == "test"]
    listed.append(missing_test_uid([w.spec for w in written]))
    rows = [(f"{uid}_{t}", uid, t) for uid in listed for t in TARGETS]
    _write_csv(root / "test.csv", TEST_COLUMNS, rows)
    _write_csv(root / "sample_submission.csv", ("row_id", "fractured"), ((r[0], "0.5") for r in rows))
    _write_csv(root / "synth_truth.csv", TRUTH_COLUMNS,
               ((w.spec.uid, level, kind, int(fracture)) for w in written
                for level, kind, fracture in w.lesions))


def write_dataset(root: str | Path, specs: Sequence[StudySpec], preview: bool = False,
                  processes: int = 1) -> list[WrittenStudy]:
    """Write the whole layout and, optionally, OUT/preview.png; studies are independent, so
    `processes` > 1 writes them in that many processes (same files)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        from tqdm import tqdm

        with ProcessPoolExecutor(processes) as pool:
            jobs = [pool.submit(write_study, spec, root) for spec in specs]
            written = [j.result() for j in tqdm(jobs, desc="writing studies", unit="study")]
    else:
        written = []
        for i, spec in enumerate(specs, start=1):
            written.append(write_study(spec, root))
            log.info("study %d/%d written (%s, %d slices)", i, len(specs), spec.split, written[-1].slices)
    write_tables(root, written)
    if preview:
        from cspine_ray.synth.preview import save_preview
        save_preview(root / "preview.png", specs)
    return written
