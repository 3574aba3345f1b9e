"""benchmarks/heldout.py's scoring: what the quality tables' held-out columns mean, on a
hand-built set of four studies (expected figures counted by hand)."""

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cspine_ray import TARGETS, VERTEBRAE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from heldout import HeldoutSet, score_heldout  # noqa: E402

U = ["1.1", "1.2", "1.3", "1.4"]


def test_heldout_figures_by_hand():
    labels = pd.DataFrame(0.0, index=U, columns=list(TARGETS))
    labels.loc["1.1", ["C2", "patient_overall"]] = 1.0
    labels.loc["1.2", ["C5", "patient_overall"]] = 1.0
    truth = pd.DataFrame([("1.1", "C2", "dens", 1), ("1.2", "C5", "wedge", 1),
                          ("1.3", "C4", "vein", 0), ("1.4", "C6", "osteophyte", 0),
                          ("1.4", "T1", "vein", 0), ("1.2", "C5", "vein", 0)],
                         columns=["StudyInstanceUID", "level", "kind", "fracture"])
    preds = pd.DataFrame(0.1, index=U, columns=list(TARGETS))
    preds.loc["1.1", "C2"], preds.loc["1.2", "C5"] = 0.9, 0.3
    preds.loc["1.3", "C4"], preds.loc["1.4", "C6"] = 0.5, 0.05
    f = score_heldout(preds, HeldoutSet(Path("unused"), labels, truth), np.full(8, 0.5))
    assert f["prior_metric"] == pytest.approx(math.log(2))
    # 2 fractured vertebrae against 26 intact: 0.9 above all 26, 0.3 above 25 (not C4's 0.5)
    assert f["auc_vertebra"] == pytest.approx(51 / 52)
    # by kind, within level: the C5 wedge (0.3) against the three intact C5s (0.1), not C4's 0.5
    assert f["auc_kind_dens"] == 1.0 and f["auc_kind_wedge"] == 1.0
    assert set(k for k in f if k.startswith("auc_kind_")) == {"auc_kind_dens", "auc_kind_wedge"}
    # look-alikes on intact cervical levels: 1.3 C4 (0.5) and 1.4 C6 (0.05); T1 is not scored and
    # the vein on the fractured 1.2 C5 is a fracture's level. 90% of fractures are flagged at the
    # 10% quantile of (0.3, 0.9): 0.36, which 0.5 passes
    assert f["lookalike_fpr"] == pytest.approx(0.5)
    assert f["lookalike_auc"] == pytest.approx(3 / 4)  # 0.9 > both, 0.3 > 0.05 only


def test_kind_auc_compares_each_fracture_with_its_own_levels_intact_vertebrae():
    labels = pd.DataFrame(0.0, index=U, columns=list(TARGETS))
    labels.loc["1.1", ["C2", "patient_overall"]] = 1.0
    labels.loc["1.2", ["C7", "patient_overall"]] = 1.0
    truth = pd.DataFrame([("1.1", "C2", "pedicle", 1), ("1.2", "C7", "pedicle", 1)],
                         columns=["StudyInstanceUID", "level", "kind", "fracture"])
    preds = pd.DataFrame(0.1, index=U, columns=list(TARGETS))
    preds["C2"] = [0.4, 0.5, 0.3, 0.4]   # 1.1's C2 (0.4): above 0.3, tied with 0.4, below 0.5
    preds["C7"] = [0.2, 0.2, 0.2, 0.2]   # 1.2's C7 ties all three intact C7s
    f = score_heldout(preds, HeldoutSet(Path("unused"), labels, truth), np.full(8, 0.5))
    assert f["auc_kind_pedicle"] == pytest.approx((1 + 0.5 + 0 + 3 * 0.5) / 6)
