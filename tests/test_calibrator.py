"""The second-level calibrator against generating parameters, hand-computed optima, an
independent optimiser of the competition metric, and its fold discipline."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit

from cspine_ray.metric import competition_metric, weights_for
from cspine_ray.models.aggregate import patient_overall
from cspine_ray.models.calibrator import Calibrator, cross_fit, fit_calibrator

SLOPE, INTERCEPT, NOT_FOUND_RATE = 2.0, -1.0, 0.6  # the generator's truth


def oof_table(n, seed=0, not_found_rate=NOT_FOUND_RATE):
    """A made-up out-of-fold table: a found vertebra is fractured with probability
    sigmoid(2 logit(s) - 1), a vertebra not found with `not_found_rate` whatever its score
    (the prior 0.3 the pipeline writes there); patient_overall = any vertebra."""
    rng = np.random.default_rng(seed)
    found = rng.random((n, 7)) > 0.2
    scores = np.where(found, rng.uniform(0.02, 0.98, (n, 7)), 0.3)
    p = np.where(found, expit(SLOPE * logit(scores) + INTERCEPT), not_found_rate)
    vertebrae = (rng.random((n, 7)) < p).astype(float)
    labels = np.column_stack([vertebrae, vertebrae.max(axis=1)])
    return scores, found, labels


# --- the fit finds the truth and improves the metric ---------------------------------------

def test_recovers_generating_slope_intercepts_and_not_found_rate():
    scores, found, labels = oof_table(600)
    # Unit weights: then the maximum-likelihood fit estimates the generator's parameters
    # themselves (the metric's label-dependent weights would shift the intercepts).
    c = fit_calibrator(scores, found, labels, l2=1e-3, weights=np.ones_like(labels))
    assert c.slope == pytest.approx(SLOPE, abs=0.25)
    assert np.mean(c.intercepts) == pytest.approx(INTERCEPT, abs=0.15)
    assert np.allclose(c.intercepts, INTERCEPT, atol=0.4)
    # not found: logit p = not_found + intercept_v, the score plays no part
    assert np.mean(c.intercepts) + c.not_found == pytest.approx(logit(NOT_FOUND_RATE), abs=0.2)


def test_cross_fit_beats_the_top7_rule_on_the_metric():
    scores, found, labels = oof_table(300, seed=1)
    raw = np.column_stack([scores, patient_overall(scores, 7)])
    oof = cross_fit(scores, found, labels, folds=np.arange(300) % 5)
    assert oof.shape == (300, 8) and oof.dtype == np.float64
    assert competition_metric(labels, oof) < competition_metric(labels, raw) - 0.02


# --- exact optima -------------------------------------------------------------------------

def test_constant_scores_give_the_metric_weighted_prevalence():
    # Every score 0.5 (logit 0) and found: each vertebra's only live parameter is its intercept,
    # so at l2 = 0 it predicts the weighted prevalence sum(w y) / sum(w), w = metric weight /
    # the study's total weight. Studies: A none fractured (total 7 + 7 = 14), B all seven
    # (14 + 14 = 28), C only C1 (2 + 6 + 14 = 22).
    #   C1:      positives B 2/28, C 2/22; negative A 1/14   -> (25/154) / (36/154) = 25/36
    #   C2..C7:  positive B 2/28; negatives A 1/14, C 1/22   -> (11/154) / (29/154) = 11/29
    #   patient: positives B 14/28, C 14/22; negative A 7/14 -> (25/22) / (36/22)   = 25/36
    labels = np.array([[0] * 8, [1] * 8, [1, 0, 0, 0, 0, 0, 0, 1]], dtype=float)
    scores, found = np.full((3, 7), 0.5), np.ones((3, 7), bool)
    p = fit_calibrator(scores, found, labels, l2=0.0).predict(scores, found)
    expected = [25 / 36] + [11 / 29] * 6 + [25 / 36]
    assert np.allclose(p, expected, rtol=0, atol=1e-9)


def _independent_objective(theta, scores, found, labels, l2):
    """The documented objective written out again: n * competition metric + l2/2 |theta - c|^2."""
    a, b, c, wp, dp = theta[0], theta[1], theta[2:9], theta[9:13], theta[13]
    s = np.clip(scores, 1e-6, 1 - 1e-6)
    x = np.log(s / (1 - s))
    vertebrae = expit(a * np.where(found, x, 0.0) + b * (~found) + c)
    any_fracture = np.clip(1 - np.prod(1 - s, axis=1), 1e-6, 1 - 1e-6)
    features = np.column_stack([x.max(1), np.log(any_fracture / (1 - any_fracture)),
                                x.mean(1), found.mean(1)])
    p = np.column_stack([vertebrae, expit(features @ wp + dp)])
    w = weights_for(labels) / weights_for(labels).sum(1, keepdims=True)
    prior_v = (w[:, :7] * labels[:, :7]).sum() / w[:, :7].sum()
    prior_p = (w[:, 7] * labels[:, 7]).sum() / w[:, 7].sum()
    centre = np.r_[0, 0, [logit(prior_v)] * 7, 0, 0, 0, 0, logit(prior_p)]
    return len(labels) * competition_metric(labels, p) + l2 / 2 * np.sum((theta - centre) ** 2)


def test_fit_minimises_the_competition_metric_like_an_independent_optimiser():
    scores = np.array([[0.9, 0.2, 0.1, 0.1, 0.3, 0.2, 0.1],
                       [0.3, 0.8, 0.2, 0.1, 0.1, 0.6, 0.2],
                       [0.1, 0.1, 0.7, 0.1, 0.2, 0.1, 0.1],
                       [0.2, 0.3, 0.1, 0.1, 0.1, 0.2, 0.4],
                       [0.6, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1],
                       [0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1]])
    found = np.ones((6, 7), bool)
    found[[1, 3, 5], [6, 0, 2]] = False
    labels = np.array([[1, 0, 0, 0, 1, 0, 0, 1],
                       [0, 1, 0, 0, 0, 0, 1, 1],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [1, 0, 0, 0, 0, 0, 0, 1],
                       [0, 0, 0, 1, 0, 0, 0, 1],
                       [0, 0, 1, 0, 0, 0, 0, 0]], dtype=float)
    c = fit_calibrator(scores, found, labels, l2=1.0)
    ours = np.array([c.slope, c.not_found, *c.intercepts, *c.patient_weights, c.patient_intercept])
    result = minimize(_independent_objective, np.zeros(14), args=(scores, found, labels, 1.0),
                      method="BFGS", options={"gtol": 1e-9})
    assert np.allclose(ours, result.x, atol=1e-4)
    assert _independent_objective(ours, scores, found, labels, 1.0) <= result.fun + 1e-10


# --- fold discipline, the found flag, degenerate folds ----------------------------------------

def test_cross_fit_never_uses_a_rows_own_fold():
    scores, found, labels = oof_table(120, seed=2)
    folds = np.arange(120) % 3
    before = cross_fit(scores, found, labels, folds)
    flipped = labels.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    after = cross_fit(scores, found, flipped, folds)
    assert np.array_equal(before[folds == 0], after[folds == 0])
    assert not np.allclose(before[folds == 1], after[folds == 1], atol=1e-3)


@pytest.mark.parametrize("rate, not_found_higher", [(0.9, True), (0.02, False)])
def test_the_found_flag_moves_the_vertebra_probability(rate, not_found_higher):
    scores, found, labels = oof_table(300, seed=3, not_found_rate=rate)
    c = fit_calibrator(scores, found, labels)
    p = c.predict(np.full((2, 7), 0.5), np.array([[True] * 7, [False] * 7]))
    gap = p[1, :7] - p[0, :7]  # not found minus found, same score
    assert (gap > 0.1).all() if not_found_higher else (gap < -0.1).all()


def test_a_fold_without_positives_or_negatives_stays_finite():
    scores, found, labels = oof_table(40, seed=4)
    labels[:20] = 0  # fold 1 trains on these only: no positive at all
    labels[20:, 7] = 1  # fold 0 trains on these: no patient negative
    oof = cross_fit(scores, found, labels, folds=np.repeat([1, 0], 20))
    # the penalty holds the intercepts near the prior: far from the output clip (1e-6), where
    # an unregularised fit drives them
    assert np.isfinite(oof).all() and (oof > 1e-3).all() and (oof < 1 - 1e-3).all()


# --- serialisation and inputs ---------------------------------------------------------------

def test_json_round_trip_predicts_identically_and_the_fit_is_deterministic():
    scores, found, labels = oof_table(80, seed=5)
    c = fit_calibrator(scores, found, labels)
    assert fit_calibrator(scores, found, labels) == c
    back = Calibrator.from_dict(json.loads(json.dumps(asdict(c))))
    assert back == c
    assert np.array_equal(back.predict(scores, found), c.predict(scores, found))
    with pytest.raises(ValueError, match="keys"):
        Calibrator.from_dict({**asdict(c), "extra": 1})
    with pytest.raises(ValueError, match="intercepts"):
        Calibrator.from_dict({**asdict(c), "intercepts": [0.0] * 6})
    with pytest.raises(ValueError, match="finite"):
        Calibrator.from_dict({**asdict(c), "slope": math.nan})
    with pytest.raises(ValueError, match="lists"):
        Calibrator.from_dict({**asdict(c), "intercepts": 0.0})


def test_scores_of_0_and_1_give_clipped_probabilities_the_metric_accepts():
    c = Calibrator(slope=50.0, not_found=0.0, intercepts=(0.0,) * 7,
                   patient_weights=(50.0, 0.0, 0.0, 0.0), patient_intercept=0.0)
    scores = np.array([[0.0] * 7, [1.0] * 7, [0.0, 1.0] * 3 + [0.0]])
    p = c.predict(scores, np.array([[True] * 7, [True] * 7, [False] * 7]))
    # logit(clip(s, 1e-6)) = -13.8, times 50: sigmoid underflows to 0 (and 1) without the clip;
    # not found, the score is masked (0 * logit(0) would be nan): sigmoid(0 + 0) = 0.5
    assert np.array_equal(p, [[1e-6] * 8, [1 - 1e-6] * 8, [0.5] * 7 + [1 - 1e-6]])


def _bad(**change):
    scores, found, labels = oof_table(10, seed=6)
    args = {"scores": scores, "found": found, "labels": labels, "folds": np.arange(10) % 2}
    return {**args, **change}


@pytest.mark.parametrize("change, message", [
    ({"scores": np.full((10, 6), 0.5)}, "scores must have shape"),
    ({"scores": np.full((10, 7), math.nan)}, "NaN"),
    ({"scores": np.full((10, 7), 1.5)}, r"\[0, 1\]"),
    ({"found": np.ones((10, 6), bool)}, "found has shape"),
    ({"found": np.full((10, 7), 2)}, "found must be booleans"),
    ({"labels": np.zeros((10, 7))}, "labels must have shape"),
    ({"labels": np.full((10, 8), 0.5)}, "labels must be 0 or 1"),
    ({"labels": np.full((10, 8), math.nan)}, "labels must be 0 or 1"),
    ({"folds": np.zeros(9)}, "folds must have shape"),
    ({"folds": np.zeros(10)}, "at least 2 distinct folds"),
    ({"folds": np.r_[np.arange(9) % 2, math.nan]}, "folds contain NaN"),
])
def test_bad_inputs_raise_value_errors_naming_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        cross_fit(**_bad(**change))


def test_bad_l2_and_weights_raise():
    args = _bad()
    del args["folds"]
    with pytest.raises(ValueError, match="l2"):
        fit_calibrator(**args, l2=-1.0)
    with pytest.raises(ValueError, match="weights must be finite"):
        fit_calibrator(**args, weights=-np.ones((10, 8)))
    with pytest.raises(ValueError, match="weights must have shape"):
        fit_calibrator(**args, weights=np.ones((10, 7)))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):  # checked with own weights too
        fit_calibrator(**{**args, "labels": np.full((10, 8), 0.5)}, weights=np.ones((10, 8)))
