"""Fold-parallel training on Ray Train for every family, on the tiny generated dataset."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_TRAIN
from cspine_ray import VERTEBRAE
from cspine_ray.predict.ensemble import load_fold_models
from cspine_ray.train.config import TrainConfig
from cspine_ray.train.job import ensure_stage1, evaluate_result, train
from cspine_ray.train.tasks import JobData, make_task
from cspine_ray.train.config import build_config

pytestmark = pytest.mark.slow


def tiny(family: str, **changes) -> TrainConfig:
    return build_config({**TINY_TRAIN, "family": family}, changes)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("family", ["two_stage", "cnn3d", "single_head", "multi_head"])
def test_family_trains_on_fold_workers_and_exports(family, tiny_shards, storage, ray_local):
    cfg = tiny(family)
    result = train(cfg, tiny_shards, storage)
    assert result.family == family and result.n_folds == 2
    history = result.info["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:  # every epoch: each fold's figures and their CV mean
        for k in ("cv_metric", "fold_0_metric", "fold_1_metric", "cv_auc_mean", "cv_val_loss",
                  "fold_0_train_loss", "cv_data_wait_fraction"):
            assert k in h and np.isfinite(h[k]), k
        assert h["cv_metric"] == pytest.approx((h["fold_0_metric"] + h["fold_1_metric"]) / 2)

    data = JobData.load(tiny_shards, result.info["stage1_dir"])
    oof = result.oof()
    assert sorted(oof["study_uid"]) == sorted(data.uids)          # each study exactly once
    assert (oof.set_index("study_uid")["fold"] == pd.Series(data.folds)).all()
    assert oof[list(VERTEBRAE)].apply(lambda c: c.between(0, 1)).all().all()

    # fold checkpoints reload with weights_only=True and reproduce the out-of-fold predictions
    task = make_task(family, cfg, data)
    models = load_fold_models(result, torch.device("cpu"))
    for fold, model in enumerate(models):
        uids = data.fold_uids(fold)
        again = task.predict(model, uids, torch.device("cpu"))
        expected = oof.set_index("study_uid").loc[uids, list(again.columns)]
        np.testing.assert_allclose(again.loc[uids].to_numpy(), expected.to_numpy(), atol=1e-6)

    figures = evaluate_result(result, tiny_shards, cfg.effective_top_n)
    assert np.isfinite(figures["oof_metric"]) and np.isfinite(figures["cv_metric"])
    if family == "cnn3d":
        assert "patient_model" in oof.columns and cfg.effective_top_n is None


def test_stage1_is_trained_once_and_reused(tiny_shards, storage, ray_local):
    first = ensure_stage1(tiny("two_stage"), tiny_shards, storage)
    runs_before = sorted((storage / "ray").iterdir())
    again = ensure_stage1(tiny("multi_head", backbone="test_convnext"), tiny_shards, storage)
    assert again.reused and again.path == first.path
    assert sorted((storage / "ray").iterdir()) == runs_before    # no new Ray Train run
    tables = np.load(first.path / "slice_tables.npz")
    data = JobData.load(tiny_shards)
    assert sorted(tables.files) == sorted(data.uids)              # out-of-fold, every study


def test_in_process_training_with_zero_workers(tiny_shards, tmp_path, ray_local):
    cfg = tiny("cnn3d", **{"resources.num_workers": 0, "optim.epochs": 1})
    result = train(cfg, tiny_shards, tmp_path)
    assert len(result.info["history"]) == 1 and result.n_folds == 2


def test_a_killed_worker_is_replaced_and_training_resumes(tiny_shards, tmp_path, ray_local):
    from ray.util.state import list_actors

    cfg = tiny("cnn3d", **{"optim.epochs": 8})
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(cfg, tiny_shards, tmp_path)))
    thread.start()
    killed = None
    deadline = time.time() + 240
    while thread.is_alive() and time.time() < deadline and killed is None:
        checkpoints = list((tmp_path / "ray").glob("*/checkpoint_*"))
        if checkpoints:
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(timeout=300)
    assert killed is not None, "training ended before a worker could be killed"
    result = outcome["result"]
    epochs = [h["epoch"] for h in result.info["history"]]
    assert epochs == list(range(1, 9))                   # resumed, not restarted from scratch
    started = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    assert len(started) > 2                              # the worker group was replaced


def test_no_reuse_trains_again_and_checkpoints_are_staged_locally(tiny_shards, tmp_path,
                                                                   ray_local):
    import yaml

    from cspine_ray.cli import main
    from cspine_ray.train.job import load_result

    config = tmp_path / "cnn3d.yaml"
    config.write_text(yaml.safe_dump({**TINY_TRAIN, "family": "cnn3d",
                                      "optim": {**TINY_TRAIN["optim"], "epochs": 1}}))
    storage = tmp_path / "runs"
    args = ["train", "--config", str(config), "--shards", str(tiny_shards),
            "--storage", str(storage)]

    def state():
        (folder,) = (storage / "results").glob("cnn3d-*")
        return load_result(folder).info, sorted(p for p in (storage / "ray").glob("*/checkpoint_*")
                                                if p.is_dir())

    assert main(args) == 0
    first, checkpoints = state()
    assert len(checkpoints) == 1  # Ray's one uploaded copy; workers staged theirs on local disk
    assert not (storage / "scratch").exists()
    assert main(args) == 0
    assert state() == (first, checkpoints)  # reused: nothing trained
    assert main(args + ["--no-reuse"]) == 0
    again, new_checkpoints = state()
    # trained again from scratch, not restored from the finished run: a fresh Ray Train run
    # with its own checkpoint, and epoch figures measured anew (the timings differ)
    assert [h["epoch"] for h in again["history"]] == [1]
    assert again["history"] != first["history"]
    assert new_checkpoints != checkpoints and len(new_checkpoints) == 1
