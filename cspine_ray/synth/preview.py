"""A one-page picture of a generated dataset, to check by eye that it looks like neck CT.

Top row: a fractured study (sagittal through the fracture with the vertebra levels, and axial
slices through its fractures with the RSNA-style boxes). Bottom row: a study without fractures
(mid-sagittal, an axial slice through the atlas and one through C5 in a soft-tissue window).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from cspine_ray.synth.phantom import LABEL
from cspine_ray.synth.study import StudySpec, SynthStudy, synth_study

BONE = (-500, 1500)      # window level 500 / width 2000
SOFT = (-160, 240)       # window level 40 / width 400
NAMES = {v: k for k, v in LABEL.items()}


def _pick(specs: Sequence[StudySpec]) -> tuple[StudySpec, StudySpec, str]:
    fractured = next((s for s in specs if s.fractured), None)
    normal = next((s for s in specs if not s.fractured), None)
    note = ""
    if fractured is None:
        fractured, note = replace(specs[0], fractured=("C2", "C6")), " (example, not in the dataset)"
    if normal is None:
        normal = replace(specs[0], fractured=())
    return fractured, normal, note


def _sagittal(ax, study: SynthStudy, col: int, title: str) -> None:
    dz, dy, _ = study.spacing
    ax.imshow(study.hu[:, :, col], cmap="gray", vmin=BONE[0], vmax=BONE[1], aspect=dz / dy,
              interpolation="bilinear")
    plane = study.labels[:, :, col]
    for label in np.unique(plane):
        if label == 0:
            continue
        zs, ys = np.nonzero(plane == label)
        ax.text(max(ys.min() - 12.0 / dy, 2), np.median(zs), NAMES[int(label)], color="yellow",
                fontsize=8, ha="right", va="center")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _axial(ax, study: SynthStudy, z: int, title: str, window=BONE, boxes=()) -> None:
    import matplotlib.patches as patches

    ax.imshow(study.hu[z], cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
    for b in boxes:
        ax.add_patch(patches.Rectangle((b.x - 0.5, b.y - 0.5), b.width, b.height, fill=False,
                                       edgecolor="red", linewidth=0.8))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def save_preview(path: str | Path, specs: Sequence[StudySpec]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractured_spec, normal_spec, note = _pick(specs)
    frac = synth_study(fractured_spec)
    normal = synth_study(normal_spec)
    fig, axes = plt.subplots(2, 3, figsize=(15, 10.5), facecolor="black")

    # fractured study: sagittal through the first fracture, axial through up to two fractures
    by_level: dict[str, list] = {}
    for b in frac.boxes:
        by_level.setdefault(b.level, []).append(b)
    levels = list(by_level)
    kinds = {f.level: f.kind for f in frac.fractures}
    if levels:
        mid = by_level[levels[0]][len(by_level[levels[0]]) // 2]
        col = int(mid.x + mid.width / 2)
    else:
        col = frac.hu.shape[2] // 2
    labels_txt = ", ".join(f"{f.level} {f.kind}" for f in frac.fractures)
    _sagittal(axes[0, 0], frac, col, f"fractured{note}: {labels_txt}\nsagittal, column {col}")
    for i in range(2):
        ax = axes[0, 1 + i]
        if i < len(levels):
            boxes = by_level[levels[i]]
            b = boxes[len(boxes) // 2]
            _axial(ax, frac, b.z, f"{levels[i]} {kinds[levels[i]]}: slice {b.slice_number} "
                                  f"({len(boxes)} boxed slices)",
                   boxes=[bb for bb in boxes if bb.z == b.z])
        else:
            z = int(np.median(np.nonzero(frac.labels == LABEL["C2"])[0]))
            _axial(ax, frac, z, "C2 (no second fracture)")

    # a study without fractures
    col = int(np.median(np.nonzero(normal.labels == LABEL["C4"])[2]))
    found = sorted({f"{d.level} {d.kind}" for d in normal.distractors})
    distractors = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "") if found else "none"
    _sagittal(axes[1, 0], normal, col, f"no fracture; look-alikes: {distractors}\nmid-sagittal")
    z1 = int(np.median(np.nonzero(normal.labels == LABEL["C1"])[0]))
    _axial(axes[1, 1], normal, z1, "no fracture: atlas (C1) and dens")
    z5 = int(np.median(np.nonzero(normal.labels == LABEL["C5"])[0]))
    _axial(axes[1, 2], normal, z5, "no fracture: C5, soft-tissue window", window=SOFT)
    for ax in axes.ravel():
        ax.title.set_color("white")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path
