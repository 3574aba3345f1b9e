"""The training losses against the competition metric and against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from cspine_ray.metric import per_study_loss
from cspine_ray.train.losses import study_metric_loss, weighted_bce


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_study_metric_loss_is_the_metrics_per_study_loss():
    rng = np.random.default_rng(11)
    logits = rng.normal(0.0, 2.5, size=(12, 8))  # p within about [1e-5, 1 - 1e-5]: no clipping
    targets = (rng.random((12, 8)) < 0.3).astype(np.float64)
    targets[:, 7] = targets[:, :7].max(axis=1)
    targets[0] = 0.0  # an all-negative study
    targets[1] = 1.0  # an all-positive study
    targets[2, :] = 0.0
    targets[2, [3, 7]] = 1.0  # one fractured vertebra
    assert targets.sum(axis=1).min() == 0 and targets.sum(axis=1).max() == 8

    # the metric works on probabilities, in float64; the loss on logits
    want = per_study_loss(targets, _sigmoid(logits))
    t_logits, t_targets = torch.tensor(logits, dtype=torch.float32), torch.tensor(targets)
    got = study_metric_loss(t_logits, t_targets)
    assert got.ndim == 0 and got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want.mean()), abs=1e-6)
    # study by study (a batch of one is that study's loss), the all-negative and all-positive too
    for i in range(len(targets)):
        assert float(study_metric_loss(t_logits[i:i + 1], t_targets[i:i + 1])) \
            == pytest.approx(float(want[i]), abs=1e-6), i
    # per study, then averaged: not pooled over all rows (studies with positives weigh more there)
    rows = np.where(targets == 1, -np.log(_sigmoid(logits)), -np.log(1 - _sigmoid(logits)))
    weights = np.where(targets == 1, [2] * 7 + [14], [1] * 7 + [7])
    pooled = (weights * rows).sum() / weights.sum()
    assert abs(pooled - float(got)) > 1e-3
    # gradients reach the logits
    t_logits.requires_grad_(True)
    study_metric_loss(t_logits, t_targets).backward()
    assert t_logits.grad is not None and torch.isfinite(t_logits.grad).all()
    assert (t_logits.grad.abs() > 0).all()


def test_study_metric_loss_at_zero_logits_is_ln2_whatever_the_labels():
    targets = torch.tensor([[0.0] * 8, [1.0] * 8, [1, 0, 0, 0, 0, 0, 0, 1]])
    assert float(study_metric_loss(torch.zeros(3, 8), targets)) == pytest.approx(math.log(2), abs=1e-6)


def test_weighted_bce_one_positive_one_negative_by_hand():
    # positive at logit 1:    bce = -ln(sigmoid(1))      = ln(1 + e^-1)   = 0.3132616875, weight 2
    # negative at logit -0.5: bce = -ln(1 - sigmoid(-0.5)) = ln(1 + e^-0.5) = 0.4740769842, weight 1
    # weighted mean = (2 * 0.3132616875 + 1 * 0.4740769842) / (2 + 1) = 0.3668667864
    pos_bce, neg_bce = math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(-0.5))
    logits, targets = torch.tensor([1.0, -0.5]), torch.tensor([1.0, 0.0])
    want = (2 * pos_bce + 1 * neg_bce) / 3
    assert want == pytest.approx(0.3668667864, abs=1e-9)
    assert float(weighted_bce(logits, targets)) == pytest.approx(want, abs=1e-6)
    # other weights: positive 3, negative 1 -> (3 * 0.3132616875 + 0.4740769842) / 4
    assert float(weighted_bce(logits, targets, neg=1.0, pos=3.0)) \
        == pytest.approx((3 * pos_bce + neg_bce) / 4, abs=1e-6)
    # the same two rows in a (1, 2) batch, and integer targets, give the same value
    assert float(weighted_bce(logits[None], targets[None].long())) == pytest.approx(want, abs=1e-6)
    # an unweighted mean would differ: (0.3132616875 + 0.4740769842) / 2 = 0.3936693359
    assert abs(float(weighted_bce(logits, targets)) - (pos_bce + neg_bce) / 2) > 0.02
