"""Seed ensembles (train/seeds.py): the members' out-of-fold predictions and histories
combined by hand-checked means, and refused when the members did not predict the same folds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cspine_ray import VERTEBRAE
from cspine_ray.train.config import TrainConfig
from cspine_ray.train.result import (LAST_OOF, ModelSpec, ResultInfo, TrainResult, load_result,
                                     weights_file, write_info, writing_result)
from cspine_ray.train.seeds import mean_history, mean_oof, write_seed_ensemble
from cspine_ray.train.tasks.base import JobData

UIDS = ["1.2.3", "1.2.4", "1.2.5", "1.2.6"]
FOLDS = [0, 1, 0, 1]


def member(tmp_path, name: str, seed: int, scores: list[float], history: list[dict],
           folds=FOLDS) -> TrainResult:
    """A finished single-model result: study i scores scores[i] on every vertebra."""
    path = tmp_path / name
    path.mkdir()
    oof = pd.DataFrame({"study_uid": UIDS, **{v: scores for v in VERTEBRAE}, "fold": folds})
    oof.sample(frac=1.0, random_state=seed).to_parquet(path / "oof.parquet", index=False)
    for fold in range(2):
        torch.save({"model": {"w": torch.full((2,), float(seed * 10 + fold))}, "epoch": 1},
                   path / weights_file(fold))
    cfg = TrainConfig(family="cnn3d", seed=seed)
    best = min(history, key=lambda h: h["cv_val_loss"])["epoch"]
    info = ResultInfo(task="cnn3d", key=name, config=cfg, n_folds=2, manifest_hash="m",
                      shards_dir="s", stage1_dir=None, model=ModelSpec("cnn3d"),
                      prior=[0.1] * 8, history=history, best_epoch=best, cv_metric=0.5,
                      created="", selected_on="val_loss")
    write_info(info, path / "result.json")
    return load_result(path)


def epochs(*losses):
    return [{"epoch": i + 1, "cv_metric": loss, "cv_val_loss": loss, "best_epoch": 1,
             "best_cv_metric": losses[0]} for i, loss in enumerate(losses)]


def test_members_are_averaged_per_study_whatever_order_they_stored_it_in(tmp_path):
    a = member(tmp_path, "a", 42, [0.1, 0.2, 0.3, 0.4], epochs(0.6, 0.5))
    b = member(tmp_path, "b", 43, [0.3, 0.0, 0.5, 0.8], epochs(0.4, 0.7))
    out = mean_oof([a, b]).set_index("study_uid")
    assert list(out.index) == sorted(UIDS)
    for v in VERTEBRAE:
        assert out[v].tolist() == pytest.approx([0.2, 0.1, 0.4, 0.6])
    assert out["fold"].tolist() == FOLDS
    history = mean_history([a, b])
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["cv_metric"] for h in history] == pytest.approx([0.5, 0.6])
    assert "best_epoch" not in history[0] and "best_cv_metric" not in history[0]


def test_members_that_predicted_other_folds_are_refused(tmp_path):
    a = member(tmp_path, "a", 42, [0.1] * 4, epochs(0.6))
    b = member(tmp_path, "b", 43, [0.1] * 4, epochs(0.6), folds=[1, 0, 0, 1])
    with pytest.raises(ValueError, match="other studies or folds"):
        mean_oof([a, b])


def test_a_result_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="fails half-way"):
        with writing_result(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise ValueError("fails half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["result"]  # no temporary folder left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with writing_result(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]  # the old result is gone, not merged


def test_the_ensemble_folder_holds_every_members_fold_models_linked(tmp_path):
    a = member(tmp_path, "a", 42, [0.1, 0.2, 0.3, 0.4], epochs(0.6, 0.5, 0.55))
    b = member(tmp_path, "b", 43, [0.3, 0.0, 0.5, 0.8], epochs(0.4, 0.7, 0.65))
    labels = pd.DataFrame({v: [1, 0, 0, 1] for v in [*VERTEBRAE, "patient_overall"]},
                          index=UIDS)
    data = JobData(shards_dir="s", uids=UIDS, folds=dict(zip(UIDS, FOLDS)), segmented=set(),
                   labels={u: labels.loc[u].to_numpy(np.float32) for u in UIDS})
    cfg = TrainConfig(family="cnn3d", seed=42, ensemble=2)
    # the ensemble's patient_overall comes from the members' mean patient_model
    for m in (a, b):
        oof = m.oof()
        oof["patient_model"] = oof["C1"]
        oof.to_parquet(m.path / "oof.parquet", index=False)
    write_seed_ensemble(cfg, "ens", [a, b], data, tmp_path / "ens")
    ens = load_result(tmp_path / "ens")
    assert ens.n_members == 2 and ens.info.members == ["a", "b"]
    assert ens.info.member_epochs == [2, 1] and ens.info.best_epoch == 1  # median of 2 and 1
    # members that kept no last-epoch predictions: the members' mean report of the last epoch
    assert ens.info.last["cv_metric"] == pytest.approx(0.6) and not (ens.path / LAST_OOF).exists()
    assert ens.fold_weights(1, 0)["w"].tolist() == [421.0, 421.0]
    assert ens.fold_weights(0, 1)["w"].tolist() == [430.0, 430.0]
    assert (ens.path / "fold_1.m1.pt").stat().st_ino == (b.path / "fold_1.pt").stat().st_ino
    # the CV metric of the averaged predictions, each fold scored alone
    from cspine_ray.metric import evaluate

    mean = pd.DataFrame({v: [0.2, 0.1, 0.4, 0.6] for v in [*VERTEBRAE, "patient_overall"]},
                        index=sorted(UIDS))
    per_fold = [evaluate(labels.loc[[u for u, f in zip(UIDS, FOLDS) if f == k]],
                         mean.loc[[u for u, f in zip(UIDS, FOLDS) if f == k]])["metric"]
                for k in (0, 1)]
    assert ens.info.cv_metric == pytest.approx(sum(per_fold) / 2)
    assert "seed ensemble of 2 (seeds 42..43)" in ens.info.how_chosen()
    assert math.isfinite(ens.info.cv_metric)


def test_the_ensembles_unselected_figure_is_that_of_its_averaged_last_epoch(tmp_path):
    a = member(tmp_path, "a", 42, [0.1, 0.2, 0.3, 0.4], epochs(0.6, 0.5))
    b = member(tmp_path, "b", 43, [0.3, 0.0, 0.5, 0.8], epochs(0.4, 0.7))
    # last epoch: a scores 0.9 / 0.1 and b 0.7 / 0.3 on the true / false labels; the mean, 0.8 /
    # 0.2, puts probability 0.8 on every true answer, so any weighting of the log loss gives
    # -ln(0.8) in each fold (the members alone: -ln(0.9) and -ln(0.7), mean 0.231)
    labels = pd.DataFrame({v: [1, 0, 0, 1] for v in [*VERTEBRAE, "patient_overall"]}, index=UIDS)
    for m, hit in ((a, 0.9), (b, 0.7)):
        scores = [hit, 1 - hit, 1 - hit, hit]
        last = pd.DataFrame({"study_uid": UIDS, **{v: scores for v in VERTEBRAE},
                             "patient_model": scores, "fold": FOLDS})
        last.iloc[::-1].to_parquet(m.path / LAST_OOF, index=False)
        oof = m.oof()
        oof["patient_model"] = oof["C1"]
        oof.to_parquet(m.path / "oof.parquet", index=False)
    data = JobData(shards_dir="s", uids=UIDS, folds=dict(zip(UIDS, FOLDS)), segmented=set(),
                   labels={u: labels.loc[u].to_numpy(np.float32) for u in UIDS})
    write_seed_ensemble(TrainConfig(family="cnn3d", seed=42, ensemble=2), "ens", [a, b], data,
                        tmp_path / "ens")
    ens = load_result(tmp_path / "ens")
    assert ens.info.last["epoch"] == 2
    assert ens.info.last["cv_metric"] == pytest.approx(-math.log(0.8), rel=1e-6)
    assert ens.info.history[-1]["cv_metric"] == pytest.approx(0.6)  # the members' own reports
    assert ens.oof_last().set_index("study_uid").loc["1.2.3", "C4"] == pytest.approx(0.8)
    assert "the ensemble's last-epoch CV metric: 0.2231" in ens.info.how_chosen()


def test_the_train_cli_takes_an_ensemble_size():
    import argparse

    from cspine_ray.config import ConfigError
    from cspine_ray.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.config_from_args(parser.parse_args(["--shards", "s", "--ensemble", "3"])).ensemble == 3
    assert cli.config_from_args(parser.parse_args(["--shards", "s"])).ensemble == 1
    with pytest.raises((ConfigError, ValueError), match="ensemble must be"):
        cli.config_from_args(parser.parse_args(["--shards", "s", "--ensemble", "0"]))
