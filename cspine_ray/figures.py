"""Pictures people look at: ROC curves, calibration, and sagittal views with predicted levels.

Every function returns a matplotlib Figure (Agg backend, no display needed); callers save it
to MLflow or a PNG and close it.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cspine_ray import TARGETS, VERTEBRAE  # noqa: E402
from cspine_ray.datasets.windowing import apply_windows  # noqa: E402
from cspine_ray.datasets.tables import split_table  # noqa: E402
from cspine_ray.metric import roc_auc  # noqa: E402


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over all thresholds (ties handled as one step)."""
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    distinct = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    pos, neg = max(y.sum(), 1), max(len(y) - y.sum(), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def roc_figure(labels: np.ndarray, probs: np.ndarray, title: str = "ROC (out-of-fold)"):
    """One ROC curve per target (C1..C7, patient_overall), AUC in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(VERTEBRAE)))
    for i, target in enumerate(TARGETS):
        y, p = labels[:, i].astype(float), probs[:, i].astype(float)
        if y.min() == y.max():
            continue  # one class: no curve
        fpr, tpr = roc_points(y, p)
        style = {"color": "crimson", "lw": 2.5} if target == "patient_overall" else \
            {"color": colours[i], "lw": 1.3}
        ax.plot(fpr, tpr, label=f"{target}  AUC {roc_auc(y, p):.3f}", **style)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def calibration_figure(labels: np.ndarray, probs: np.ndarray, bins: int = 10):
    """Reliability diagram: vertebra rows pooled, and patient_overall on its own."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    edges = np.linspace(0, 1, bins + 1)
    for name, y, p, colour in (
        ("vertebrae C1-C7", labels[:, :7].ravel(), probs[:, :7].ravel(), "tab:blue"),
        ("patient_overall", labels[:, 7], probs[:, 7], "crimson"),
    ):
        idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        mean_p = [p[idx == b].mean() for b in range(bins) if (idx == b).any()]
        frac = [y[idx == b].mean() for b in range(bins) if (idx == b).any()]
        count = [(idx == b).sum() for b in range(bins) if (idx == b).any()]
        ax.plot(mean_p, frac, "o-", color=colour, label=name)
        for x, f, c in zip(mean_p, frac, count):
            ax.annotate(str(c), (x, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction fractured",
           title="Calibration (out-of-fold; numbers = rows per bin)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def sagittal_figure(volume: np.ndarray, spacing: tuple[float, float, float],
                    probs: np.ndarray, slice_table: np.ndarray | None = None,
                    labels: np.ndarray | None = None, title: str = ""):
    """Mid-sagittal bone-window view with each vertebra's level and predicted probability.

    The sagittal plane goes through the centre of the predicted C1-C7 boxes (or the image
    centre); a vertebra's level is where its ratio peaks in the slice table. Red = p >= 0.5;
    a true fracture (when labels are given) is marked with an asterisk.
    """
    z, h, w = volume.shape
    x, front, back = w // 2, 0.3 * h, 0.7 * h
    if slice_table is not None:
        ratio, box, _ = split_table(slice_table)
        shown = (ratio.max(1) > 0.5) & np.isfinite(box).all(1)
        if shown.any():
            boxes = box[shown]
            x = int(np.clip((boxes[:, 0] + boxes[:, 2]).mean() / 2 * w, 0, w - 1))
            front, back = boxes[:, 1].mean() * h, boxes[:, 3].mean() * h
    image = apply_windows(volume[:, :, x], ["bone"])[0]
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(8, 7), gridspec_kw={"width_ratios": [3, 1]})
    ax.imshow(image, cmap="gray", aspect=spacing[0] / spacing[1], interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(title or "sagittal view, predicted levels", fontsize=10)
    if slice_table is not None:
        # labels in front of the vertebral bodies (behind them if there is no room)
        room = front > 0.2 * h
        anchor = front - 0.02 * h if room else back + 0.02 * h
        for k, name in enumerate(VERTEBRAE):
            column = slice_table[:, k]
            if not np.nanmax(column) > 0.3:
                continue
            level = int(np.nanargmax(column))
            p = float(probs[k])
            colour = "red" if p >= 0.5 else "lime"
            mark = "*" if labels is not None and labels[k] > 0.5 else ""
            ax.plot([anchor, front if room else back], [level, level], color=colour, lw=1)
            ax.annotate(f"{name}{mark} {p:.2f} ", (anchor, level), color=colour, fontsize=8,
                        fontweight="bold", va="center", ha="right" if room else "left")
    colours = ["red" if p >= 0.5 else "tab:green" for p in probs]
    bar.barh(list(TARGETS)[::-1], list(probs)[::-1], color=colours[::-1])
    if labels is not None:
        for i, t in enumerate(list(TARGETS)[::-1]):
            if labels[TARGETS.index(t)] > 0.5:
                bar.annotate("fractured", (0.02, i), va="center", fontsize=7, color="black")
    bar.set(xlim=(0, 1), xlabel="predicted probability")
    bar.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)
