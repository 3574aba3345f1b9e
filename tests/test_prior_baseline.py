"""The constant-prior baseline: each study is predicted from the OTHER folds' labels only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cspine_ray import TARGETS
from cspine_ray.metric import evaluate
from cspine_ray.preprocess.manifest import COLUMNS, write_manifest
from cspine_ray.train.job import evaluate_prior


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

    labels = df.set_index("study_uid")[list(TARGETS)].astype(float)
    expected = pd.DataFrame(index=labels.index, columns=list(TARGETS), dtype=float)
    # fold 0 gets fold 1's prevalence and back, clipped to [0.01, 0.99] like the training prior
    expected.loc[["a", "b"]] = np.clip(labels.loc[["c", "d"]].mean().to_numpy(), 0.01, 0.99)
    expected.loc[["c", "d"]] = np.clip(labels.loc[["a", "b"]].mean().to_numpy(), 0.01, 0.99)
    assert expected.loc["a", "C1"] == pytest.approx(0.99) and expected.loc["c", "C1"] == 0.5

    figures = evaluate_prior(tmp_path)
    want = evaluate(labels, expected)
    assert figures.keys() == {f"oof_{k}" for k in want}
    for k, v in want.items():
        assert figures[f"oof_{k}"] == pytest.approx(v, nan_ok=True), k
    assert np.isfinite(figures["oof_metric"])
