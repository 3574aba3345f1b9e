"""The constant-prior baseline: each study is predicted from the OTHER folds' labels only."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cspine_ray import TARGETS
from cspine_ray.preprocess.manifest import COLUMNS, write_manifest

from cspine_ray.train.result import evaluate_prior


def test_prior_uses_only_the_other_folds_labels(tmp_path):
    # fold 0: C1 fractured in 1 of 2 studies; fold 1: C1 fractured in both, C2 in one
    rows = {"a": (0, [1, 0]), "b": (0, [0, 0]), "c": (1, [1, 1]), "d": (1, [1, 0])}
    df = pd.DataFrame({c: [0] * 4 for c in COLUMNS})
    df["study_uid"] = list(rows)
    df["split"], df["status"] = "train", "ok"
    df["reason"] = df["shard"] = df["checksum"] = df["warnings"] = ""
    df["has_segmentation"] = False
    df["fold"] = [rows[u][0] for u in rows]
    for t in TARGETS:
        df[t] = 0
    df["C1"] = [rows[u][1][0] for u in rows]
    df["C2"] = [rows[u][1][1] for u in rows]
    df["patient_overall"] = df[list(TARGETS[:7])].max(axis=1)
    write_manifest(df, tmp_path)

    # Hand-worked prior (the prevalence among the OTHER fold, clipped to [0.01, 0.99]):
    #   studies a, b (fold 0) from c, d: C1 2/2 = 1 -> 0.99, C2 1/2 = 0.5, C3..C7 0 -> 0.01,
    #                                     patient_overall 2/2 -> 0.99
    #   studies c, d (fold 1) from a, b: C1 1/2 = 0.5, C2 0/2 (all negative) -> 0.01,
    #                                     C3..C7 -> 0.01, patient_overall 1/2 = 0.5
    # Study losses, sum(w * bce) / sum(w), weights vertebra 1 / 2, patient 7 / 14 (neg / pos):
    ln = math.log
    loss_a = (2 * -ln(0.99) + 1 * ln(2) + 5 * -ln(0.99) + 14 * -ln(0.99)) / (2 + 1 + 5 + 14)
    loss_b = (1 * -ln(0.01) + 1 * ln(2) + 5 * -ln(0.99) + 7 * -ln(0.01)) / (1 + 1 + 5 + 7)
    loss_c = (2 * ln(2) + 2 * -ln(0.01) + 5 * -ln(0.99) + 14 * ln(2)) / (2 + 2 + 5 + 14)
    loss_d = (2 * ln(2) + 1 * -ln(0.99) + 5 * -ln(0.99) + 14 * ln(2)) / (2 + 1 + 5 + 14)
    assert loss_b == pytest.approx(2.684625737, abs=1e-8)  # the confident wrong C1 and patient rows
    pooled = ((22 * loss_a + 14 * loss_b + 23 * loss_c + 22 * loss_d) / (22 + 14 + 23 + 22))
    # AUCs: C1 and patient_overall, labels a 1, b 0, c 1, d 1 against 0.99, 0.99, 0.5, 0.5: of the
    # three (positive, negative) pairs only a-b counts, as a tie (1/2): 1/6. C2, positive only c
    # (0.01) against a, b (0.5) and d (0.01, a tie): 1/6. C3..C7 have one class: nan.
    want = {"metric": (loss_a + loss_b + loss_c + loss_d) / 4, "global_metric": pooled,
            "auc_C1": 1 / 6, "auc_C2": 1 / 6, "auc_patient_overall": 1 / 6, "auc_mean": 1 / 6,
            **{f"auc_C{i}": math.nan for i in range(3, 8)}}

    figures = evaluate_prior(tmp_path)
    assert figures.keys() == {f"oof_{k}" for k in want}
    for k, v in want.items():
        assert figures[f"oof_{k}"] == pytest.approx(v, rel=1e-6, nan_ok=True), k
    # 1.0293494382 by hand; the prior is float32 (0.99 -> 0.9900000095), hence 1e-6
    assert figures["oof_metric"] == pytest.approx(1.029349438, abs=1e-6)
