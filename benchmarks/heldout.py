"""A held-out test set for benchmark results: studies no training, epoch choice, N or calibrator
ever saw, from a generator seed used nowhere else, scored with the generator's own truth.

    test = heldout_set(folder, studies=200, seed=HELDOUT_SEED, size=64, ...)   # cached
    preds = heldout_predictions(result, test, cache_dir)                        # cached
    figures = score_heldout(preds, test, result.info.prior)

A result predicts the set as it would be promoted (`predict.Ensemble`: every fold model
averaged, its stage 1 included, its own patient rule). Besides the metric, its ratio to the
constant prior (the training studies' prevalences, as a promoted model without skill would
answer) and the patient and pooled vertebra AUCs, the generator's `synth_truth.csv` breaks the
vertebra AUC down by fracture kind, within level (each fractured vertebra of that kind against
the intact vertebrae of its own level, the pairs pooled over levels: a model's scores differ by
level, and a kind that falls on levels scored low would otherwise look missed) and gives the
look-alike false-positive rate: the share of intact vertebrae carrying a look-alike
(vein channel, foramen, osteophyte, Schmorl node) that score above the threshold flagging 90% of
the fractured vertebrae.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

HELDOUT_SEED = 7301  # drawn for these test sets only: no training set uses it
SENSITIVITY = 0.9    # the look-alike false-positive rate is taken where 90% of fractures are flagged


@dataclasses.dataclass(frozen=True)
class HeldoutSet:
    shards: Path
    labels: pd.DataFrame   # index study_uid, TARGETS columns
    truth: pd.DataFrame    # synth_truth.csv rows of these studies


def heldout_set(folder: Path, studies: int, seed: int = HELDOUT_SEED, processes: int = 2,
                **generator) -> HeldoutSet:
    """`studies` generated with `generator` (dataset_specs' keywords) and `seed`, preprocessed
    once into folder/shards (as training studies, so their labels come along; never trained on)."""
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.synth import dataset_specs, write_dataset
    from cspine_ray.train.tasks import JobData

    shards, rsna = folder / "shards", folder / "rsna"
    if not (shards / "manifest.parquet").exists():
        specs = dataset_specs(studies, seed=seed, n_test=0, segmented_fraction=0.0, **generator)
        write_dataset(rsna, specs, processes=processes)
        run_preprocess(rsna, shards, PreprocessConfig(size=generator.get("size", 256), n_folds=2))
    data = JobData.load(shards)
    truth = pd.read_csv(rsna / "synth_truth.csv", dtype={"StudyInstanceUID": str})
    return HeldoutSet(shards, data.label_frame(data.uids).astype(float),
                      truth[truth["StudyInstanceUID"].isin(data.uids)])


def heldout_predictions(result, test: HeldoutSet, cache_dir: Path,
                        train_shards: Path | None = None) -> pd.DataFrame:
    """The result's probabilities (TARGETS) for every test study, cached by the result's key.
    With `train_shards`, through the calibrator a promoted model would apply: fitted on the
    result's out-of-fold predictions of those training studies (never on a test study)."""
    from cspine_ray.predict.ensemble import Ensemble
    from cspine_ray.train.result import fit_result_calibrator

    calibrated = train_shards is not None
    cache = cache_dir / f"{Path(result.path).name}{'.calibrated' if calibrated else ''}.parquet"
    if cache.exists():
        return pd.read_parquet(cache)
    calibrator = fit_result_calibrator(result, train_shards) if calibrated else None
    ensemble = Ensemble.load(result.path, device="cpu", calibrator=calibrator)
    preds, _ = ensemble.predict(test.shards, list(test.labels.index))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    preds.to_parquet(tmp)
    tmp.replace(cache)
    return preds


def score_heldout(preds: pd.DataFrame, test: HeldoutSet, prior: np.ndarray) -> dict[str, float]:
    """The figures of `preds` on the test set; `prior`: the constant answer (8 prevalences)."""
    from cspine_ray import TARGETS, VERTEBRAE
    from cspine_ray.metric import evaluate, roc_auc

    figures = evaluate(test.labels, preds)
    constant = pd.DataFrame([prior] * len(test.labels), index=test.labels.index, columns=list(TARGETS))
    figures["prior_metric"] = evaluate(test.labels, constant)["metric"]
    y = test.labels[list(VERTEBRAE)].to_numpy().ravel()
    p = preds.loc[test.labels.index, list(VERTEBRAE)].to_numpy().ravel()
    figures["auc_vertebra"] = roc_auc(y, p)
    levels = [(u, v) for u in test.labels.index for v in VERTEBRAE]  # the order of y and p
    score, label = dict(zip(levels, p)), dict(zip(levels, y))
    cervical = test.truth[test.truth["level"].isin(VERTEBRAE)]  # look-alikes reach T1-T2 too
    intact = {v: preds.loc[test.labels[v] < 0.5, v].to_numpy() for v in VERTEBRAE}
    for kind, rows in cervical[cervical["fracture"] == 1].groupby("kind"):
        figures[f"auc_kind_{kind}"] = _within_level_auc(
            [(score[k], intact[k[1]]) for k in _levels(rows)])
    looks = {k for k in _levels(cervical[cervical["fracture"] == 0]) if label[k] < 0.5}
    fooling = [score[k] for k in sorted(looks)]
    threshold = np.quantile(p[y > 0.5], 1 - SENSITIVITY) if (y > 0.5).any() else math.nan
    figures["lookalike_fpr"] = float(np.mean(np.asarray(fooling) >= threshold)) if fooling else math.nan
    figures["lookalike_auc"] = _auc(p[y > 0.5], fooling)
    return figures


def _levels(rows: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(rows["StudyInstanceUID"], rows["level"]))


def _within_level_auc(pairs: list[tuple[float, np.ndarray]]) -> float:
    """(positive's score, the intact scores of its level) for each positive -> the share of
    positive-intact pairs (ties half) that the positive wins; nan without pairs."""
    wins = sum(float((neg < s).sum() + 0.5 * (neg == s).sum()) for s, neg in pairs)
    total = sum(len(neg) for _, neg in pairs)
    return wins / total if total else math.nan


def _auc(positive, negative) -> float:
    """ROC AUC of two groups of scores; nan when one is empty."""
    from cspine_ray.metric import roc_auc

    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    if not len(positive) or not len(negative):
        return math.nan
    return roc_auc(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative])
