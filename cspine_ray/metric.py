"""The RSNA 2022 competition metric, ROC AUCs, submission files and the `cspine-ray score` step.

The metric (docs/ARCHITECTURE.md, "The metric") is a weighted binary log loss over 8 rows per study
(C1..C7, patient_overall). A positive row weighs twice its negative; patient_overall weighs
7x a vertebra. Each study's loss is sum(w*bce)/sum(w) over its own 8 rows and the score is the
mean over studies (lower is better). `global_metric` pools all rows instead, which weighs
studies with positives more heavily; it is reported beside the score, never optimised.

Arrays are (n_studies, 8) in TARGETS order; DataFrames are "wide": index StudyInstanceUID,
columns TARGETS. Submission files are "long": one `row_id,fractured` row per study and target.
This module needs only numpy, pandas and scipy, so scoring never imports torch or Ray.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from cspine_ray import N_VERTEBRAE, TARGETS, VERTEBRAE
from cspine_ray.io.rsna import check_uid, parse_binary, read_csv_strings

WEIGHTS = {**{v: (1.0, 2.0) for v in VERTEBRAE}, "patient_overall": (7.0, 14.0)}  # (neg, pos)
EPS = 1e-15
_NEG = np.array([WEIGHTS[t][0] for t in TARGETS])
_POS = np.array([WEIGHTS[t][1] for t in TARGETS])
_ROW_ID = re.compile(r"(?P<uid>.*)_(?P<target>C[1-7]|patient_overall)")
_SHOW = 5  # how many offending rows/studies an error message quotes


# --- the metric on arrays ------------------------------------------------------------------

def _check_truth(y_true) -> np.ndarray:
    y = np.asarray(y_true, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(TARGETS):
        raise ValueError(f"labels must have shape (n, {len(TARGETS)}), got {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y


def _check_pairs(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y = _check_truth(y_true)
    p = np.asarray(y_pred, dtype=float)
    if p.shape != y.shape:
        raise ValueError(f"predictions have shape {p.shape}, labels {y.shape}")
    if len(y) == 0:
        raise ValueError("no studies to score")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("predictions must be probabilities in [0, 1] (no NaN)")
    return y, p


def weights_for(y_true) -> np.ndarray:
    """(n, 8) row weights: vertebra 1 / 2, patient_overall 7 / 14 (negative / positive)."""
    y = _check_truth(y_true)
    return np.where(y == 1, _POS, _NEG)


def _weighted_bce(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Clipping keeps a confident wrong answer finite (-log 1e-15 ~ 34.5) instead of inf.
    p = np.clip(p, EPS, 1 - EPS)
    bce = np.where(y == 1, -np.log(p), -np.log1p(-p))
    w = np.where(y == 1, _POS, _NEG)
    return w * bce, w


def per_study_loss(y_true, y_pred) -> np.ndarray:
    """(n,) loss of each study: sum(w*bce)/sum(w) over its 8 rows."""
    y, p = _check_pairs(y_true, y_pred)
    wbce, w = _weighted_bce(y, p)
    return wbce.sum(axis=1) / w.sum(axis=1)


def competition_metric(y_true, y_pred) -> float:
    """The score: mean of `per_study_loss` over studies. Lower is better."""
    return float(per_study_loss(y_true, y_pred).mean())


def global_metric(y_true, y_pred) -> float:
    """The pooled variant: sum(w*bce)/sum(w) over all rows of all studies."""
    y, p = _check_pairs(y_true, y_pred)
    wbce, w = _weighted_bce(y, p)
    return float(wbce.sum() / w.sum())


def vertebra_loss(y_true, y_pred) -> float:
    """The pooled weighted log loss of the seven vertebra rows only (training's validation loss:
    it does not depend on the patient rule)."""
    y, p = _check_pairs(y_true, y_pred)
    wbce, w = _weighted_bce(y, p)
    return float(wbce[:, :N_VERTEBRAE].sum() / w[:, :N_VERTEBRAE].sum())


def roc_auc(y_true_1d, y_score_1d) -> float:
    """ROC AUC via the rank-sum (Mann-Whitney) form; tied scores count half. nan with one class."""
    y = np.asarray(y_true_1d, dtype=float)
    s = np.asarray(y_score_1d, dtype=float)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"roc_auc needs two 1-d arrays of one length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("roc_auc labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc scores must be finite")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- the metric on wide DataFrames ---------------------------------------------------------

def _check_wide(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    missing = [t for t in TARGETS if t not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {', '.join(missing)}")
    duplicated = frame.index[frame.index.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{what} lists studies more than once: {_quote(duplicated)}")
    return frame[list(TARGETS)]


def evaluate(labels: pd.DataFrame, preds: pd.DataFrame) -> dict[str, float]:
    """Score `preds` against `labels` (both wide), aligned on study; extra predictions are ignored.

    Returns metric, global_metric, auc_<target> for every target, and auc_mean over the finite
    AUCs (a target with one class in `labels` has AUC nan).
    """
    labels = _check_wide(labels, "labels")
    preds = _check_wide(preds, "predictions")
    missing = labels.index.difference(preds.index, sort=False)
    if len(missing):
        raise ValueError(f"{len(missing)} labelled studies have no predictions: {_quote(missing)}")
    y = labels.to_numpy(dtype=float)
    p = preds.loc[labels.index].to_numpy(dtype=float)
    result = {"metric": competition_metric(y, p), "global_metric": global_metric(y, p)}
    aucs = {f"auc_{t}": roc_auc(y[:, i], p[:, i]) for i, t in enumerate(TARGETS)}
    finite = [a for a in aucs.values() if math.isfinite(a)]
    result.update(aucs)
    result["auc_mean"] = float(np.mean(finite)) if finite else math.nan
    return result


def prior_predictions(labels_wide: pd.DataFrame) -> dict[str, float]:
    """The constant baseline: each target's prevalence in `labels_wide` (~0.56 on RSNA labels)."""
    labels = _check_wide(labels_wide, "labels")
    if labels.empty:
        raise ValueError("no labelled studies to take prevalences from")
    y = _check_truth(labels.to_numpy(dtype=float))
    return {t: float(y[:, i].mean()) for i, t in enumerate(TARGETS)}


# --- files ---------------------------------------------------------------------------------

def read_labels(path: str | Path) -> pd.DataFrame:
    """train.csv (StudyInstanceUID, patient_overall, C1..C7) -> wide int DataFrame, in file order."""
    path = Path(path)
    table = read_csv_strings(path, ("StudyInstanceUID",) + TARGETS)
    faults = []
    for index, row in enumerate(table[["StudyInstanceUID", *TARGETS]].itertuples(index=False)):
        try:
            check_uid(row[0])
        except ValueError as e:
            faults.append(f"line {index + 2}: {e}")
        for target, text in zip(TARGETS, row[1:]):
            try:
                parse_binary(text)
            except ValueError as e:
                faults.append(f"line {index + 2}: {target}={e}")
    if faults:
        raise ValueError(f"{path}: {len(faults)} bad values: {_quote(faults)}")
    duplicated = table.loc[table["StudyInstanceUID"].duplicated(), "StudyInstanceUID"].unique()
    if len(duplicated):
        raise ValueError(f"{path}: studies listed more than once: {_quote(duplicated)}")
    if table.empty:
        raise ValueError(f"{path}: no studies")
    wide = table.set_index("StudyInstanceUID")[list(TARGETS)].astype(np.int64)
    return wide


def read_submission(path: str | Path, studies: Iterable[str] | None = None) -> pd.DataFrame:
    """Long `row_id,fractured` CSV -> wide float DataFrame, refusing anything doubtful.

    Every study present must have all 8 rows exactly once, with a probability in [0, 1].
    With `studies`, the file must cover exactly those studies (rows are returned in that
    order); without, studies are sorted.
    """
    path = Path(path)
    table = read_csv_strings(path, ("row_id", "fractured"))
    extra_columns = [c for c in table.columns if c not in ("row_id", "fractured")]
    if extra_columns:
        raise ValueError(f"{path}: unexpected columns {', '.join(map(str, extra_columns))} "
                         "(a submission has exactly row_id, fractured)")

    bad_ids, bad_values, cells = [], [], {}
    for index, (row_id, text) in enumerate(zip(table["row_id"], table["fractured"])):
        line = index + 2
        match = _ROW_ID.fullmatch(row_id)
        try:
            if match is None:
                raise ValueError("not <UID>_C1..C7 or <UID>_patient_overall")
            check_uid(match["uid"])
        except ValueError as e:
            bad_ids.append(f"line {line} {row_id!r}: {e}")
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 <= value <= 1.0):  # also catches NaN and inf
            bad_values.append(f"line {line} {row_id}: fractured={text!r}")
            continue
        cells.setdefault(row_id, []).append((match["uid"], match["target"], value))
    if bad_ids:
        raise ValueError(f"{path}: {len(bad_ids)} unparseable row_id(s): {_quote(bad_ids)}")
    if bad_values:
        raise ValueError(f"{path}: {len(bad_values)} value(s) not a probability in [0, 1]: "
                         f"{_quote(bad_values)}")
    duplicated = [row_id for row_id, found in cells.items() if len(found) > 1]
    if duplicated:
        raise ValueError(f"{path}: {len(duplicated)} duplicated row(s): {_quote(duplicated)}")

    present = sorted({uid for found in cells.values() for uid, _, _ in found})
    if studies is not None:
        expected = [check_uid(s) for s in studies]
        if len(set(expected)) != len(expected):
            raise ValueError("the expected studies contain duplicates")
        extra = sorted(set(present) - set(expected))
        if extra:
            raise ValueError(f"{path}: rows for {len(extra)} unexpected studies: {_quote(extra)}")
        order = expected
    else:
        if not present:
            raise ValueError(f"{path}: no rows")
        order = present
    missing = [(uid, t) for uid in order for t in TARGETS if f"{uid}_{t}" not in cells]
    if missing:
        lacking = sorted({uid for uid, _ in missing})
        raise ValueError(f"{path}: {len(missing)} missing row(s) in {len(lacking)} studies "
                         f"({_quote(lacking)}): {_quote(f'{uid}_{t}' for uid, t in missing)}")
    wide = pd.DataFrame([[cells[f"{uid}_{t}"][0][2] for t in TARGETS] for uid in order],
                        index=pd.Index(order, name="StudyInstanceUID", dtype=object),
                        columns=list(TARGETS), dtype=float)
    return wide


def write_submission(wide: pd.DataFrame, path: str | Path) -> None:
    """Write wide predictions as a long submission, atomically (temp file + os.replace).

    Rows are ordered by study, then TARGETS order; values use repr so they read back exactly.
    """
    path = Path(path)
    frame = _check_wide(wide, "predictions")
    uids = [check_uid(uid) for uid in frame.index]
    values = frame.to_numpy(dtype=float)
    if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
        raise ValueError("predictions must be probabilities in [0, 1] (no NaN)")
    lines = ["row_id,fractured\n"]
    for i in sorted(range(len(uids)), key=lambda k: uids[k]):
        lines += [f"{uids[i]}_{t},{float(values[i, j])!r}\n" for j, t in enumerate(TARGETS)]
    # A reader never sees a half-written file: the temp file lives beside the target (same
    # filesystem) so os.replace is an atomic rename.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as out:
            out.writelines(lines)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _quote(items) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


# --- CLI: cspine-ray score SUBMISSION.csv LABELS.csv ---------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", type=Path, help="submission CSV (row_id,fractured)")
    parser.add_argument("labels", type=Path, help="labels CSV in train.csv format")
    parser.add_argument("--subset", action="store_true",
                        help="score only the labelled studies the submission contains "
                             "(default: the submission must cover every labelled study)")


def run(args: argparse.Namespace) -> int:
    try:
        labels = read_labels(args.labels)
        if args.subset:
            preds = read_submission(args.submission)
            unknown = preds.index.difference(labels.index)
            if len(unknown):
                raise ValueError(f"{args.submission}: {len(unknown)} studies are not in "
                                 f"{args.labels}: {_quote(unknown)}")
            labels = labels.loc[labels.index.isin(preds.index)]
        else:
            preds = read_submission(args.submission, studies=labels.index)
        scores = evaluate(labels, preds)
    except ValueError as e:
        print(f"cspine-ray score: error: {e}", file=sys.stderr)
        return 1
    print(format_scores(scores, n_studies=len(labels)))
    return 0


def format_scores(scores: dict[str, float], n_studies: int) -> str:
    """A small table: the metric, its global variant, then one AUC per target."""
    def auc(value: float) -> str:
        return f"{value:.4f}" if math.isfinite(value) else "n/a (one class)"

    rows = [("studies", str(n_studies)),
            ("metric (mean per study)", f"{scores['metric']:.4f}"),
            ("global metric (pooled)", f"{scores['global_metric']:.4f}")]
    rows += [(f"AUC {t}", auc(scores[f"auc_{t}"])) for t in TARGETS]
    rows.append(("AUC mean", auc(scores["auc_mean"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    from cspine_ray.cli import step_main

    sys.exit(step_main("cspine_ray.metric", "score a submission CSV against labels"))
