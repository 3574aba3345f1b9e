"""Fold-parallel training on Ray Train for every family, on the tiny generated dataset."""

from __future__ import annotations

import math

import json
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
from cspine_ray.datasets import ShardStore
from cspine_ray.predict.ensemble import load_fold_models
from cspine_ray.train.config import TrainConfig, build_config
from cspine_ray.train.job import ensure_stage1, train
from cspine_ray.train.result import evaluate_result, load_result, oof_figures, torch_load
from cspine_ray.train.tasks import JobData, make_task
from cspine_ray.train.tasks.base import to_targets

pytestmark = pytest.mark.slow


def tiny(family: str, **changes) -> TrainConfig:
    return build_config({**TINY_TRAIN, "family": family}, changes)


@pytest.fixture(scope="module")
def storage(tiny_runs) -> Path:
    return tiny_runs


@pytest.mark.parametrize("family", ["two_stage", "cnn3d", "single_head", "multi_head"])
def test_family_trains_on_fold_workers_and_exports(family, tiny_shards, storage, ray_local):
    cfg = tiny(family)
    result = train(cfg, tiny_shards, storage)
    assert result.family == family and result.n_folds == 2
    history = result.info.history
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:  # every epoch: each fold's figures and their CV mean
        for k in ("cv_metric", "fold_0_metric", "fold_1_metric", "cv_auc_mean", "cv_val_loss",
                  "fold_0_train_loss", "cv_data_wait_fraction"):
            assert k in h and np.isfinite(h[k]), k
        assert h["cv_metric"] == pytest.approx((h["fold_0_metric"] + h["fold_1_metric"]) / 2)
    # the epoch is chosen on an N-independent figure where there is a patient rule: the first
    # epoch with the lowest CV vertebra loss (cnn3d: the metric; it has no N)
    selected = "metric" if family == "cnn3d" else "val_loss"
    assert result.info.selected_on == selected
    best = min(range(len(history)), key=lambda i: (history[i][f"cv_{selected}"], i))
    assert result.info.best_epoch == best + 1
    assert result.info.cv_metric == history[best]["cv_metric"] == history[-1]["best_cv_metric"]

    data = JobData.load(tiny_shards, result.info.stage1_dir)
    oof = result.oof()
    assert sorted(oof["study_uid"]) == sorted(data.uids)          # each study exactly once
    assert (oof.set_index("study_uid")["fold"] == pd.Series(data.folds)).all()
    assert oof[list(VERTEBRAE)].apply(lambda c: c.between(0, 1)).all().all()

    # fold checkpoints reload with weights_only=True and reproduce the out-of-fold predictions
    task = make_task(family, cfg, data)
    models = load_fold_models(result, torch.device("cpu"))
    for fold, model in enumerate(models):
        uids = data.fold_uids(fold)
        again = task.predict([model], uids, torch.device("cpu"))
        expected = oof.set_index("study_uid").loc[uids, list(again.columns)]
        np.testing.assert_allclose(again.loc[uids].to_numpy(), expected.to_numpy(), atol=1e-6)

    figures = evaluate_result(result, tiny_shards, cfg.effective_top_n)
    assert np.isfinite(figures["oof_metric"]) and np.isfinite(figures["cv_metric"])
    # the last epoch's predictions are kept too: scored offline they give the CV metric the
    # workers reported for that epoch (the figure nothing chose)
    last = result.oof_last().set_index("study_uid")
    assert sorted(last.index) == sorted(data.uids) and (last["fold"] == pd.Series(data.folds)).all()
    offline = oof_figures(to_targets(last, cfg.effective_top_n), last["fold"], data)
    assert offline["cv_metric"] == pytest.approx(history[-1]["cv_metric"], rel=1e-6)
    assert result.info.last == history[-1]
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
    assert len(result.info.history) == 1 and result.n_folds == 2


def test_a_killed_worker_is_replaced_and_training_resumes(tiny_shards, tmp_path, ray_local):
    from ray.util.state import list_actors

    address = ray_local.get_runtime_context().gcs_address  # not any other Ray on the machine

    def train_workers(**filters) -> set[str]:
        found = list_actors(address=address, limit=10_000, filters=[
            ("class_name", "=", "RayTrainWorker"), *[(k, "=", v) for k, v in filters.items()]])
        return {a.actor_id for a in found}

    earlier = train_workers()  # the shared Ray session holds the workers of earlier tests
    cfg = tiny("cnn3d", **{"optim.epochs": 8})
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(cfg, tiny_shards, tmp_path)))
    thread.start()
    killed, before = None, None
    deadline = time.time() + 240
    while thread.is_alive() and time.time() < deadline and killed is None:
        time.sleep(0.1)
        snapshots = list((tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json"))
        alive = train_workers(state="ALIVE") - earlier
        if snapshots and alive:
            try:  # the checkpoint Ray has registered (what a restart resumes from, or later)
                registered = json.loads(snapshots[0].read_text())["checkpoint_results"][-1]
                folder = snapshots[0].parent / registered["checkpoint_dir_name"]
                before = torch_load(folder / "fold_0.state.pt")["history"]  # with its timings
            except Exception:  # caught mid-write: try again
                continue
            killed = list_actors(address=address, filters=[("actor_id", "=", sorted(alive)[0])])[0].pid
            os.kill(killed, signal.SIGKILL)
    thread.join(timeout=300)
    assert killed is not None, "training ended before a worker could be killed"
    history = outcome["result"].info.history
    assert [h["epoch"] for h in history] == list(range(1, 9))
    # resumed, not restarted: the epochs done before the kill are those of the checkpoint
    # (a restart from scratch would have measured them anew: other timings, other losses)
    same = json.dumps(history[:len(before)], sort_keys=True) == json.dumps(before, sort_keys=True)
    assert 1 <= len(before) < 8 and same                  # (json: NaN figures compare equal)
    assert len(train_workers() - earlier) > 2             # the worker group was replaced


def test_no_reuse_trains_again_and_checkpoints_are_staged_locally(tiny_shards, tmp_path,
                                                                   ray_local):
    import yaml

    from cspine_ray.cli import main

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
    assert [h["epoch"] for h in again.history] == [1]
    assert again.history != first.history
    assert new_checkpoints != checkpoints and len(new_checkpoints) == 1


def test_fold_models_never_train_on_their_own_folds_studies(tiny_shards, storage, ray_local):
    from cspine_ray.train.loop import FoldRun

    data = JobData.load(tiny_shards)
    cpu = torch.device("cpu")
    for name in ("locator", "two_stage", "cnn3d"):
        task = make_task(name, tiny("two_stage" if name == "locator" else name), data)
        for fold in range(data.n_folds):
            trained_on = set(FoldRun(task, fold, cpu).train_uids)
            assert trained_on and not trained_on & set(data.fold_uids(fold)), (name, fold)


def test_stage1_tables_of_training_studies_are_out_of_fold(tiny_shards, storage, ray_local):
    """Each training study's slice table is the one its own fold's locator predicts, and a
    leak (the other fold's model, which trained on it) would give another table."""
    cfg = tiny("two_stage")
    stage1 = ensure_stage1(cfg, tiny_shards, storage)
    data = JobData.load(tiny_shards, stage1.path)
    task = make_task("locator", cfg, data)
    models = load_fold_models(stage1, torch.device("cpu"))
    for uid in data.uids:
        own, other = (task.predict_tables([models[f]], [uid], torch.device("cpu"))[uid]
                      for f in (data.folds[uid], 1 - data.folds[uid]))
        np.testing.assert_allclose(data.slice_tables[uid], own, atol=1e-5)
        assert not np.allclose(data.slice_tables[uid], other, atol=1e-5), uid


def test_init_from_stage1_starts_each_fold_from_its_own_folds_stage1_backbone(tiny_shards, storage,
                                                                             ray_local):
    from cspine_ray.train.loop import FoldRun

    stage1 = ensure_stage1(tiny("two_stage"), tiny_shards, storage)
    data = JobData.load(tiny_shards, stage1.path)
    cpu = torch.device("cpu")
    on = make_task("two_stage", tiny("two_stage", **{"sequence.init_from_stage1": True}), data)
    off = make_task("two_stage", tiny("two_stage"), data)
    for fold in range(data.n_folds):
        # the stage-1 fold model's backbone, read straight from its file
        saved = torch_load(stage1.path / f"fold_{fold}.pt")["model"]
        expected = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
        other = torch_load(stage1.path / f"fold_{1 - fold}.pt")["model"]
        started = FoldRun(on, fold, cpu).model.backbone.state_dict()
        assert expected and sorted(started) == sorted(expected)
        for name, value in expected.items():
            torch.testing.assert_close(started[name], value)
        weight = "conv_stem.weight"
        assert not torch.equal(started[weight], other[f"backbone.{weight}"])  # not the other fold's
        assert not torch.equal(FoldRun(off, fold, cpu).model.backbone.state_dict()[weight],
                               started[weight])                           # off: fresh weights
    # a stage 2 whose input differs from stage 1's is refused with the config, before training
    for wider in ({"sequence.ratio_channel": True}, {"sequence.per_step": 5}):
        with pytest.raises(ValueError, match="input channels in both stages: stage 1 has 3"):
            tiny("two_stage", **{"sequence.init_from_stage1": True, **wider})
    with pytest.raises(ValueError, match="one backbone for both stages"):
        tiny("two_stage", **{"sequence.init_from_stage1": True, "stage1.backbone": "test_convnext"})


def test_vertebra_boxes_run_from_stage_1_to_a_stage_2_that_crops_and_marks_the_vertebra(
        tiny_shards, storage, ray_local):
    """stage1.vertebra_boxes: the locator exports wide tables and their box IoU on the
    segmented validation studies; stage 2 with the vertebra crop and the box plane trains and
    predicts from them."""
    from cspine_ray.train.loop import FoldRun

    boxes = {"stage1.vertebra_boxes": True, "stage1.epochs": 2}
    stage1 = ensure_stage1(tiny("two_stage", **boxes), tiny_shards, storage)
    plain = tiny("two_stage", **{"stage1.epochs": 2})
    assert tiny("two_stage", **boxes).stage1_key("m") != plain.stage1_key("m")  # its own result
    iou = stage1.info.best["cv_vertebra_box_iou"]
    assert 0.0 < iou <= 1.0, iou
    data = JobData.load(tiny_shards, stage1.path)
    assert {t.shape[1] for t in data.slice_tables.values()} == {39}
    cfg = tiny("two_stage", **boxes, **{"sequence.crop": "vertebra", "sequence.box_channel": True})
    run = FoldRun(make_task("two_stage", cfg, data), 0, torch.device("cpu"))
    assert run.model.backbone.conv_stem.in_channels == 4   # three slices and the box plane
    assert math.isfinite(run.train_epoch(0)["train_loss"])
    preds = run.task.predict([run.model], run.val_uids, torch.device("cpu"))
    assert preds.shape == (len(run.val_uids), 7) and np.isfinite(preds.to_numpy()).all()


def test_a_patient_term_trains_an_epoch_of_whole_study_batches(tiny_shards, storage, ray_local):
    from cspine_ray.train.loop import FoldRun

    stage1 = ensure_stage1(tiny("two_stage"), tiny_shards, storage)
    data = JobData.load(tiny_shards, stage1.path)
    cfg = tiny("two_stage", **{"sequence.patient_loss": 1.0, "optim.batch_size": 14})
    run = FoldRun(make_task("two_stage", cfg, data), 0, torch.device("cpu"))
    seen = []
    loss = run.task.loss
    run.task.loss = lambda model, batch, g: seen.append(list(batch["uid"])) or loss(model, batch, g)
    figures = run.train_epoch(0)
    assert math.isfinite(figures["train_loss"]) and seen
    for uids in seen:  # every batch: whole studies, two of them (or the last one alone)
        assert all(uids.count(u) == 7 for u in set(uids)) and len(set(uids)) in (1, 2)
    assert sorted({u for uids in seen for u in uids}) == sorted(run.train_uids)


def test_ema_weights_are_the_warmed_up_average_of_every_step_and_what_validation_keeps(
        tiny_shards, tmp_path):
    from cspine_ray.train.loop import FoldRun

    data = JobData.load(tiny_shards)
    cpu = torch.device("cpu")
    task = make_task("cnn3d", tiny("cnn3d", **{"optim.ema": 0.6, "optim.batch_size": 2}), data)
    run = FoldRun(task, 0, cpu)
    name = next(n for n, p in run.model.named_parameters() if p.ndim > 1)
    trajectory = []
    step = run.optimizer.step

    def step_and_record(*args, **kwargs):
        out = step(*args, **kwargs)
        trajectory.append(dict(run.model.named_parameters())[name].detach().clone())
        return out

    run.optimizer.step = step_and_record
    run.train_epoch(0)
    assert len(trajectory) >= 3
    # by hand: step t averages with decay min(1 - t^(-2/3), 0.6) after t - 1 = 0 copies
    expected = trajectory[0]
    for t, w in enumerate(trajectory[1:], start=1):
        decay = min(1 - (1 + t) ** (-2 / 3), 0.6)
        expected = decay * expected + (1 - decay) * w
    ema = dict(run.ema.module.named_parameters())[name]
    torch.testing.assert_close(ema, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ema, trajectory[-1])                    # not the live weights
    run.validate()
    run.keep_if_best(True)
    torch.testing.assert_close(run.best_state[name], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dict(run.best_model().named_parameters())[name], ema)
    # a resumed fold carries on from the same average
    run.save(tmp_path, {"epoch": 0, "best_epoch": 0, "best_cv": 0.5, "history": []}, None)
    resumed = FoldRun(task, 0, cpu)
    resumed.restore(tmp_path)
    torch.testing.assert_close(dict(resumed.ema.module.named_parameters())[name], ema)
    assert FoldRun(make_task("cnn3d", tiny("cnn3d"), data), 0, cpu).ema is None  # off by default


def test_two_stage_validation_falls_back_to_the_prior_of_the_other_studies(tiny_shards, ray_local):
    cfg = tiny("two_stage")
    data = JobData.load(tiny_shards)
    # stage 1 found nothing anywhere: every vertebra must get the prior, never a guess
    nothing = {u: np.zeros((n, 11), np.float32) for u, n in zip(
        data.uids, [ShardStore(tiny_shards).get(u).volume.shape[0] for u in data.uids])}
    data.slice_tables = nothing
    task = make_task("two_stage", cfg, data)
    held_out = data.fold_uids(0)
    preds = task.predict([task.build_model()], held_out, torch.device("cpu"))
    others = [u for u in data.uids if u not in held_out]
    # by hand: the prevalence of each vertebra among the OTHER studies, clipped to [0.01, 0.99]
    expected = np.clip(np.mean([data.labels[u][:7] for u in others], axis=0), 0.01, 0.99)
    with_held_out = np.clip(np.mean([data.labels[u][:7] for u in data.uids], axis=0), 0.01, 0.99)
    assert not np.allclose(expected, with_held_out)       # a leak would change the answer
    for uid in held_out:
        np.testing.assert_allclose(preds.loc[uid, list(VERTEBRAE)].to_numpy(float), expected,
                                   rtol=1e-6)


@pytest.mark.parametrize("family", ["cnn3d", "single_head", "multi_head", "two_stage"])
def test_the_one_pass_ensemble_is_the_mean_of_its_fold_models(family, tiny_shards, storage,
                                                              ray_local):
    """Ensemble.predict runs each batch through every fold model; the same figures must come
    out of the plain loop: each fold model alone over the data, then the mean by hand."""
    from cspine_ray.predict.ensemble import Ensemble
    from cspine_ray.train.tasks.base import Studies

    cfg = tiny(family)
    result = train(cfg, tiny_shards, storage)  # reused from the export test when it ran
    ensemble = Ensemble.load(result.path, device="cpu")
    uids = JobData.load(tiny_shards).uids[:4]
    cpu = torch.device("cpu")
    tables = {}
    if ensemble.stage1_models:  # stage 1 fold by fold, averaged by hand
        locator = make_task("locator", ensemble.stage1.config, Studies(str(tiny_shards)))
        runs = [locator.predict_tables([m], uids, cpu) for m in ensemble.stage1_models]
        tables = {u: (runs[0][u] + runs[1][u]) / 2 for u in uids}
    task = make_task(family, cfg, Studies(str(tiny_shards), tables))
    extra = {"prior": ensemble.prior} if family == "two_stage" else {}
    per_fold = [task.predict([m], uids, cpu, **extra).loc[uids] for m in ensemble.models]
    if family != "two_stage":  # (two_stage: see below)
        assert not np.allclose(per_fold[0].to_numpy(float), per_fold[1].to_numpy(float))
    expected = to_targets((per_fold[0] + per_fold[1]) / 2, ensemble.top_n)

    targets, got_tables = ensemble.predict(tiny_shards, uids)
    np.testing.assert_allclose(targets.loc[uids].to_numpy(float), expected.to_numpy(float),
                               rtol=1e-5, atol=1e-6)
    for uid in tables:
        np.testing.assert_allclose(got_tables[uid], tables[uid], rtol=1e-5, atol=1e-6)
    if family == "two_stage":
        # the tiny stage 1 may find no vertebra (then every fold answers the prior): check the
        # stage-2 pass again on the segmented studies' true slice tables, where all are found
        from cspine_ray.datasets import shard_slice_tables

        data = JobData.load(tiny_shards)
        segmented = sorted(data.segmented)[:4]
        truth = Studies(str(tiny_shards), shard_slice_tables(tiny_shards, segmented))
        task = make_task(family, cfg, truth)
        alone = [task.predict([m], segmented, cpu, prior=ensemble.prior) for m in ensemble.models]
        assert not np.allclose(alone[0].to_numpy(float), alone[1].to_numpy(float))
        together = task.predict(ensemble.models, segmented, cpu, prior=ensemble.prior)
        np.testing.assert_allclose(together.loc[segmented].to_numpy(float),
                                   ((alone[0] + alone[1]) / 2).loc[segmented].to_numpy(float),
                                   rtol=1e-5, atol=1e-6)


def test_two_concurrent_jobs_for_one_result_train_it_once(tiny_shards, tmp_path, ray_local):
    cfg = tiny("cnn3d", **{"optim.epochs": 1})
    results, errors = [], []

    def job():
        try:
            results.append(train(cfg, tiny_shards, tmp_path))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 2
    assert sorted(r.reused for r in results) == [False, True]  # the second waited, then reused
    assert results[0].path == results[1].path
    assert len(list((tmp_path / "ray").iterdir())) == 1      # one Ray Train run


@pytest.mark.parametrize("family", ["two_stage", "cnn3d"])
def test_the_calibrator_is_cross_fitted_out_of_fold_and_applied_by_the_ensemble(
        family, tiny_shards, storage, ray_local):
    """calibrate=True scores each fold with a calibrator fitted on the other fold's out-of-fold
    predictions (rebuilt here by hand from the parts); the ensemble with the calibrator fitted
    on all of them gives calibrator(ensemble scores, found flags)."""
    from cspine_ray.datasets.sequences import found_vertebrae
    from cspine_ray.metric import evaluate
    from cspine_ray.models.calibrator import fit_calibrator
    from cspine_ray.predict.ensemble import Ensemble
    from cspine_ray.train.result import fit_result_calibrator
    from cspine_ray.train.tasks.base import SLICE_TABLES, load_slice_tables

    cfg = tiny(family)
    result = train(cfg, tiny_shards, storage)
    data = JobData.load(tiny_shards)
    oof = result.oof().set_index("study_uid")
    uids = list(oof.index)
    scores = oof[list(VERTEBRAE)].to_numpy(float)
    if family == "two_stage":  # found: stage 2's rule on the out-of-fold stage-1 tables
        tables = load_slice_tables(Path(result.info.stage1_dir) / SLICE_TABLES)
        seq = cfg.sequence
        found = np.stack([found_vertebrae(tables[u][:, :7], seq.threshold, seq.smooth) for u in uids])
    else:  # no stage 1: every vertebra counts as found
        found = np.ones((len(uids), 7), bool)
    labels = data.label_frame(uids).to_numpy()
    folds = oof["fold"].to_numpy()
    by_hand = np.empty((len(uids), 8))
    for k in (0, 1):
        c = fit_calibrator(scores[folds != k], found[folds != k], labels[folds != k])
        by_hand[folds == k] = c.predict(scores[folds == k], found[folds == k])
    expected = evaluate(data.label_frame(uids), pd.DataFrame(by_hand, index=uids,
                                                             columns=data.label_frame(uids).columns))
    figures = evaluate_result(result, tiny_shards, cfg.effective_top_n, calibrate=True)
    assert figures["oof_metric"] == pytest.approx(expected["metric"], rel=1e-9)
    plain = evaluate_result(result, tiny_shards, cfg.effective_top_n)
    assert figures["oof_metric"] != pytest.approx(plain["oof_metric"])

    calibrator = fit_result_calibrator(result, tiny_shards)
    assert calibrator == fit_calibrator(scores, found, labels)
    plain_ensemble = Ensemble.load(result.path, device="cpu")
    calibrated = Ensemble.load(result.path, device="cpu", calibrator=calibrator)
    few = uids[:4]
    raw, tables = plain_ensemble.predict(tiny_shards, few)
    got, _ = calibrated.predict(tiny_shards, few)
    flags = (np.stack([plain_ensemble.found(tables)[u] for u in few]) if tables
             else np.ones((4, 7), bool))
    np.testing.assert_allclose(got.loc[few].to_numpy(float),
                               calibrator.predict(raw.loc[few, list(VERTEBRAE)].to_numpy(float), flags),
                               rtol=1e-6)


def test_a_seed_ensemble_is_the_mean_of_the_plain_runs_of_its_seeds(tiny_shards, storage,
                                                                    ray_local, tmp_path):
    """ensemble: 2 trains seed 43 as a plain run would (both stages), keeps seed 42's, and
    predicts, out of fold and on new studies, the mean of the two."""
    from cspine_ray.datasets import shard_slice_tables
    from cspine_ray.predict.ensemble import Ensemble
    from cspine_ray.predict.pyfunc import make_bundle
    from cspine_ray.train.tasks.base import SLICE_TABLES, Studies, load_slice_tables

    ens = train(tiny("two_stage", ensemble=2), tiny_shards, storage)
    single = train(tiny("two_stage"), tiny_shards, storage)       # the export test's
    other = train(tiny("two_stage", seed=43), tiny_shards, storage)
    assert other.reused and ens.info.members == [single.path.name, other.path.name]
    assert ens.info.member_epochs == [single.info.best_epoch, other.info.best_epoch]
    # its unselected figure is its own: the last-epoch predictions of both seeds averaged, each
    # fold scored alone by the competition metric
    from cspine_ray.metric import evaluate

    data = JobData.load(tiny_shards)
    la, lb = (r.oof_last().set_index("study_uid").sort_index() for r in (single, other))
    mean_last = to_targets((la + lb)[list(VERTEBRAE)] / 2, ens.config.effective_top_n)
    per_fold = [evaluate(data.label_frame(list(part.index)), mean_last.loc[part.index])["metric"]
                for _, part in la.groupby("fold")]
    assert ens.info.last["cv_metric"] == pytest.approx(np.mean(per_fold), rel=1e-9)
    assert ens.info.last["epoch"] == single.info.history[-1]["epoch"]
    a, b = (r.oof().set_index("study_uid").sort_index() for r in (single, other))
    got = ens.oof().set_index("study_uid").sort_index()
    np.testing.assert_allclose(got[list(VERTEBRAE)].to_numpy(),
                               ((a + b) / 2)[list(VERTEBRAE)].to_numpy(), rtol=1e-12)
    assert (got["fold"] == a["fold"]).all()
    # its stage 1: both seeds' stage-1 fold models, their out-of-fold tables averaged
    stage1 = load_result(ens.info.stage1_dir)
    assert stage1.n_members == 2 and Path(ens.info.stage1_dir).parent == ens.path
    tables = [load_slice_tables(Path(r.info.stage1_dir) / SLICE_TABLES) for r in (single, other)]
    mine = load_slice_tables(stage1.path / SLICE_TABLES)
    assert sorted(mine) == sorted(tables[0])
    for uid in list(mine)[:3]:
        np.testing.assert_allclose(mine[uid], (tables[0][uid] + tables[1][uid]) / 2, rtol=1e-6)
    assert train(tiny("two_stage", ensemble=2), tiny_shards, storage).reused

    # the predictor (and the promoted bundle) holds all 4 + 4 fold models; stage 2 of both
    # seeds averaged, checked on true slice tables so every vertebra is found
    bundle = make_bundle(ens.path, ens.info.stage1_dir, tiny_shards, tmp_path / "bundle", {})
    loaded = Ensemble.load(bundle / "result", bundle / "stage1", device="cpu")
    assert len(loaded.models) == 4 and len(loaded.stage1_models) == 4
    cpu = torch.device("cpu")
    segmented = sorted(JobData.load(tiny_shards).segmented)[:4]
    task = make_task("two_stage", ens.config,
                     Studies(str(tiny_shards), shard_slice_tables(tiny_shards, segmented)))
    prior = loaded.prior
    alone = [task.predict(Ensemble.load(r.path, device="cpu").models, segmented, cpu, prior=prior)
             for r in (single, other)]
    assert not np.allclose(alone[0].to_numpy(float), alone[1].to_numpy(float))
    np.testing.assert_allclose(
        task.predict(loaded.models, segmented, cpu, prior=prior).loc[segmented].to_numpy(float),
        ((alone[0] + alone[1]) / 2).loc[segmented].to_numpy(float), rtol=1e-5, atol=1e-6)
