"""Stage 1 from few segmentations: the anatomy constraint on predicted tables, the pseudo-label
round, the localisation figure (z_error) and synthetic data at a chosen segmented share."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_TRAIN
from cspine_ray import VERTEBRAE
from cspine_ray.datasets.anatomy import (constrain_table, label_vertebrae, length_bounds,
                                         localisation_errors)
from cspine_ray.train.config import Stage1Config, build_config
from cspine_ray.train.tasks import JobData, make_task

SPACING = 2.0  # mm: C3..C6 take 3..17 slices, C2 up to 30 (MIN_MM / MAX_MM over 2)


def clean_ratios(n: int = 90, start: int = 10, length: int = 8) -> np.ndarray:
    """C1..C7 one after the other, `length` slices each, with a half-ratio slice of overlap
    into each neighbour (a vertebra's slices overlap the next one's)."""
    ratio = np.zeros((n, 7))
    for v in range(7):
        a = start + v * length
        ratio[a:a + length, v] = 1.0
        ratio[a - 1, v] = ratio[a + length, v] = 0.5
    return ratio


def with_box(ratio: np.ndarray) -> np.ndarray:
    box = np.tile([0.2, 0.3, 0.6, 0.7], (len(ratio), 1))
    return np.concatenate([ratio, box], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- anatomy

def test_length_bounds_in_slices_follow_the_spacing():
    lo, hi = length_bounds(SPACING)
    # MIN_MM (0, 6, 6, 6, 6, 6, 0) and MAX_MM (30, 60, 35, ...) over 2 mm, by hand
    assert lo.tolist() == [0, 3, 3, 3, 3, 3, 0]
    assert hi.tolist() == [15, 30, 17, 17, 17, 17, 17]


def test_a_clean_table_keeps_its_order_and_values():
    table = with_box(clean_ratios())
    labelling = label_vertebrae(table[:, :7], SPACING)
    assert not labelling.reversed
    # by hand: each vertebra where it passes 0.3 and beats its neighbour; C1 and C7 keep their
    # outer half-ratio slices (0.5 - 0.3 > 0), an inner one goes to the neighbour at 1.0
    assert labelling.bounds.tolist() == [9, 18, 26, 34, 42, 50, 58, 67]
    np.testing.assert_array_equal(constrain_table(table, SPACING), table)
    # a faint haze (0.05 everywhere, below the threshold) places nothing and changes little
    hazy = table.copy()
    hazy[:, :7] = np.maximum(hazy[:, :7], 0.05)
    assert label_vertebrae(hazy[:, :7], SPACING).bounds.tolist() == [9, 18, 26, 34, 42, 50, 58, 67]
    np.testing.assert_allclose(constrain_table(hazy, SPACING), table, atol=0.05)


def test_a_false_positive_run_far_below_c7_disappears():
    table = with_box(clean_ratios())
    table[78:83, 2] = 0.9                                   # "C3" 11 slices below C7's end
    out = constrain_table(table, SPACING)
    assert (out[75:, 2] == 0).all()                         # the run is gone
    np.testing.assert_array_equal(out[:75], table[:75])     # the real C3 and all else kept
    np.testing.assert_array_equal(out[:, 7:], table[:, 7:])  # boxes untouched


def test_swapped_c4_c5_peaks_keep_the_stronger_one_in_order():
    ratio = clean_ratios()
    ratio[:, [3, 4]] = 0.0
    ratio[34:42, 4] = 0.6    # "C5" where C4 belongs, weaker
    ratio[42:50, 3] = 1.0    # "C4" where C5 belongs
    out = constrain_table(with_box(ratio), SPACING)
    # by hand: C4 at 42-50 gains 8 x 0.7, C5 at 34-42 only 8 x 0.3, and they cannot both stay
    # (C5 above C4): C4 stays where it was predicted, C5 goes; the others are untouched
    np.testing.assert_array_equal(out[:, 3], ratio[:, 3])
    assert (out[:, 4] == 0).all()
    np.testing.assert_array_equal(out[:, [0, 1, 2, 5, 6]], ratio[:, [0, 1, 2, 5, 6]])


def test_faint_vertebrae_are_kept_below_the_last_placed_one_only():
    ratio = clean_ratios()
    ratio[:, 3:] = np.minimum(ratio[:, 3:], 0.2)  # C4..C7 below the threshold (a weak model)
    ratio[2:6, 3] = 0.25                          # and a faint "C4" above C1
    labelling = label_vertebrae(ratio, SPACING)
    # by hand: C4..C7 would gain 0.2 - 0.3 per slice, "below C7" 0: they take no slices
    # (C3 keeps its half-ratio slice 34)
    assert labelling.bounds.tolist() == [9, 18, 26, 35, 35, 35, 35, 35]
    table = with_box(ratio)
    out = constrain_table(table, SPACING)
    # unplaced, they are kept from the middle of C3 (slice 30) down: their traces, not 2-6
    np.testing.assert_array_equal(out[30:, 3:7], table[30:, 3:7])
    assert (out[:30, 3:7] == 0).all()
    np.testing.assert_array_equal(out[:, :3], table[:, :3])


def test_a_study_running_feet_to_head_is_kept_reversed():
    ratio = clean_ratios()[::-1].copy()
    ratio[5:9, 6] = 0.9                      # "C7" 14 slices past C7, towards the feet
    labelling = label_vertebrae(ratio, SPACING)
    assert labelling.reversed
    out = constrain_table(with_box(ratio), SPACING)[:, :7]
    expected = clean_ratios()[::-1]
    np.testing.assert_array_equal(out, expected)


def test_a_table_without_any_passing_slice_is_left_alone():
    table = with_box(np.full((40, 7), 0.2))  # an untrained model: no evidence to order by
    np.testing.assert_array_equal(constrain_table(table, SPACING), table)


def test_a_vertebra_cannot_stretch_beyond_its_longest_length():
    ratio = np.zeros((60, 7))
    ratio[10:50, 2] = 1.0                    # 40 slices (80 mm) of "C3"
    labelling = label_vertebrae(ratio, SPACING)
    assert labelling.lengths[2] == 17        # 35 mm at 2 mm
    assert labelling.lengths[[0, 1, 3, 4, 5, 6]].tolist() == [0] * 6


# ----------------------------------------------------------------------------- z_error

def test_z_error_and_found_by_hand():
    n = 41
    truth, pred = np.zeros((n, 7)), np.zeros((n, 7))
    truth[10:13, 0] = [0.5, 1.0, 0.5]        # C1 centre 11
    pred[14:17, 0] = [0.5, 1.0, 0.5]         # predicted at 15: 4 slices off, no overlap
    truth[19:22, 1] = 1.0                    # C2 centre 20, predicted nowhere: the middle (20)
    truth[30:34, 3] = 1.0                    # C4 centre 31.5
    pred[30:34, 3] = [1.0, 1.0, 0.2, 0.2]    # centre (30 + 31 + 0.2 * 32 + 0.2 * 33) / 2.4
    # C3, C5..C7 are not in the study
    z_error, found = localisation_errors(pred, truth)
    c4 = (30 + 31 + 0.2 * 32 + 0.2 * 33) / 2.4
    np.testing.assert_allclose(z_error[[0, 1, 3]], [4.0, 0.0, abs(c4 - 31.5)])
    assert np.isnan(z_error[[2, 4, 5, 6]]).all()
    assert found[[0, 1, 3]].tolist() == [0.0, 0.0, 1.0] and np.isnan(found[2])


def test_locator_score_reports_z_error_beside_the_ratio_error(tmp_path):
    cfg = build_config({**TINY_TRAIN, "family": "two_stage"}, {"stage1.anatomy": True})
    data = JobData(str(tmp_path), ["a", "b"], {"a": 0, "b": 0}, {}, {"a", "b"})
    task = make_task("locator", cfg, data)
    preds = pd.DataFrame({"ratio_mae": [0.1, 0.3], "box_mae": [0.02, 0.04],
                          "z_error": [1.0, 5.0], "found_rate": [1.0, 0.5],
                          **{f"z_error_{v}": [1.0, np.nan] for v in VERTEBRAE},
                          "raw_ratio_mae": [0.2, 0.4], "raw_box_mae": [0.02, 0.04],
                          "raw_z_error": [2.0, 6.0], "raw_found_rate": [1.0, 1.0]}, index=["a", "b"])
    assert cfg.stage1.anatomy                                # raw_* figures beside
    figures = task.score(preds, ["a", "b"])
    assert figures["metric"] == pytest.approx(0.2 + 0.03)
    assert figures["z_error"] == pytest.approx(3.0) and figures["found_rate"] == pytest.approx(0.75)
    assert figures["z_error_C3"] == pytest.approx(1.0)      # over the studies that have it
    # the unconstrained tables' figures beside them (the same models)
    assert figures["raw_metric"] == pytest.approx(0.3 + 0.03)
    assert figures["raw_z_error"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------- pseudo labels

def tiny_data(tmp_path) -> JobData:
    """8 studies in 2 folds, 2 segmented per fold."""
    uids = [f"1.{i}" for i in range(8)]
    return JobData(str(tmp_path), uids, {u: i % 2 for i, u in enumerate(uids)},
                   {u: np.zeros(8, np.float32) for u in uids}, {"1.0", "1.1", "1.2", "1.3"})


def pseudo_task(tmp_path, **stage1):
    cfg = build_config({**TINY_TRAIN, "family": "two_stage"},
                       {"stage1.epochs": 3, "stage1.pseudo_rounds": 1, **stage1})
    task = make_task("locator", cfg, tiny_data(tmp_path))
    calls = []

    def fake_tables(models, uids, device):  # a table per study that names the model
        calls.append((models, list(uids)))
        return {u: np.full((4, 11), models[0], np.float32) for u in uids}

    task.predict_tables = fake_tables
    return task, calls


def test_pseudo_labels_of_a_fold_cover_the_unsegmented_studies_of_the_other_folds(tmp_path):
    task, calls = pseudo_task(tmp_path)
    assert task.optim().epochs == 6                           # two rounds of 3
    assert task.pseudo_uids(0) == ["1.5", "1.7"] and task.pseudo_uids(1) == ["1.4", "1.6"]
    models = {0: 0.6, 1: 0.8}                                 # stand-ins: fold k's best model
    asked = []

    def best_model(k):
        return lambda: asked.append(k) or models[k]

    for epoch in range(3):                                    # round 1: no pseudo labels
        for k in (0, 1):
            assert task.refresh_targets(k, epoch, {}, best_model(k), torch.device("cpu")) == {}
    assert not calls and not asked
    for k in (0, 1):
        targets = task.refresh_targets(k, 3, {}, best_model(k), torch.device("cpu"))
        assert sorted(targets) == task.pseudo_uids(k)
        assert all((t == models[k]).all() for t in targets.values())  # from fold k's model only
        assert task.pseudo[k].keys() == targets.keys()      # what its epochs train on
    assert asked == [0, 1]
    assert calls == [([0.6], ["1.5", "1.7"]), ([0.8], ["1.4", "1.6"])]
    assert not set(task.pseudo[0]) & set(task.data.fold_uids(0))  # never its own fold's studies


def test_later_epochs_and_a_resume_keep_the_fold_targets(tmp_path):
    task, calls = pseudo_task(tmp_path)
    restored = {"1.5": np.ones((4, 11), np.float32)}
    assert task.refresh_targets(0, 4, restored, lambda: 1 / 0, torch.device("cpu")) is restored
    assert task.pseudo[0].keys() == restored.keys() and not calls


def test_unconfident_studies_are_not_pseudo_labelled(tmp_path):
    task, _ = pseudo_task(tmp_path, **{"stage1.pseudo_min_peak": 0.7})
    cpu = torch.device("cpu")
    assert task.refresh_targets(0, 3, {}, lambda: 0.6, cpu) == {}     # peaks 0.6 < 0.7
    assert sorted(task.refresh_targets(1, 3, {}, lambda: 0.8, cpu)) == ["1.4", "1.6"]


def test_fold_targets_survive_a_checkpoint(tmp_path):
    from cspine_ray.train.loop import FoldRun

    task, _ = pseudo_task(tmp_path)
    run = FoldRun(task, 0, torch.device("cpu"))
    run.keep_if_best(True)
    run.best_preds = pd.DataFrame({"ratio_mae": [0.1]}, index=["1.1"])
    run.targets = {"1.5": np.arange(44, dtype=np.float32).reshape(4, 11)}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    run.save(folder, {"epoch": 3, "best_epoch": 2, "best_cv": 0.1, "history": []}, None)
    again = FoldRun(task, 0, torch.device("cpu"))
    again.restore(folder)
    assert again.targets.keys() == run.targets.keys()
    np.testing.assert_array_equal(again.targets["1.5"], run.targets["1.5"])


def test_stage1_settings_are_checked():
    with pytest.raises(ValueError):
        Stage1Config(pseudo_rounds=-1)
    with pytest.raises(ValueError):
        Stage1Config(pseudo_weight=0.0)
    with pytest.raises(ValueError):
        Stage1Config(pseudo_min_peak=1.5)


# ----------------------------------------------------------------------------- synthetic share

def test_dataset_specs_segmented_fraction():
    from cspine_ray.synth import dataset_specs

    def segmented(specs):
        return {s.uid for s in specs if s.has_segmentation}

    kw = dict(seed=11, n_test=4, size=64, slice_spacing=3.0)
    default, few, none, every = (dataset_specs(400, **kw, **extra) for extra in (
        {}, {"segmented_fraction": 0.05}, {"segmented_fraction": 0.0}, {"segmented_fraction": 1.0}))
    assert default == dataset_specs(400, **kw, segmented_fraction=0.25)  # the default share
    assert 10 <= len(segmented(few)) <= 30                   # 5% of 400, binomial spread
    assert segmented(few) < segmented(default)               # a lower share: a subset
    assert len(segmented(every)) == 400                       # every train study, no test study
    assert len(segmented(none)) == 2                          # topped up: two folds get one
    assert segmented(none) == {s.uid for s in none[:2]}
    # only the segmentations differ between shares
    strip = [(s.uid, s.fractured, s.size, s.transfer_syntax) for s in default]
    assert [(s.uid, s.fractured, s.size, s.transfer_syntax) for s in few] == strip
    assert len(segmented(dataset_specs(5, **kw, segmented_fraction=0.0))) == 1  # a tiny set: 1
    with pytest.raises(ValueError):
        dataset_specs(10, segmented_fraction=1.5)


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_a_pseudo_round_trains_exports_and_stays_out_of_fold(tiny_shards, tmp_path, ray_local):
    from cspine_ray.predict.ensemble import load_fold_models
    from cspine_ray.train.job import ensure_stage1
    from cspine_ray.train.loop import fold_file

    cfg = build_config({**TINY_TRAIN, "family": "two_stage"}, {
        "stage1.epochs": 2, "stage1.pseudo_rounds": 1, "stage1.anatomy": True,
        "stage1.pseudo_min_peak": 0.0, "stage1.slices_per_study": 12})
    stage1 = ensure_stage1(cfg, tiny_shards, tmp_path)
    history = stage1.info.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for h in history:
        for key in ("cv_metric", "cv_z_error", "cv_found_rate", "cv_raw_metric", "cv_z_error_C4"):
            assert np.isfinite(h[key]), key
    data = JobData.load(tiny_shards, stage1.path)
    task = make_task("locator", cfg, data)
    # the latest checkpoint holds each fold's pseudo labels: the other fold's unsegmented studies
    (checkpoint,) = [p for p in (tmp_path / "ray").glob("locator-*/checkpoint_*") if p.is_dir()]
    for fold in (0, 1):
        with np.load(checkpoint / fold_file(fold, "targets.npz")) as z:
            assert sorted(z.files) == sorted(task.pseudo_uids(fold))
            assert not set(z.files) & set(data.fold_uids(fold))
    # out-of-fold tables: each study's is its own fold model's (anatomy applied), not the other's
    models = load_fold_models(stage1, torch.device("cpu"))
    for uid in data.uids[:6]:
        own, other = (task.predict_tables([models[f]], [uid], torch.device("cpu"))[uid]
                      for f in (data.folds[uid], 1 - data.folds[uid]))
        np.testing.assert_allclose(data.slice_tables[uid], own, atol=1e-5)
        assert not np.allclose(data.slice_tables[uid], other, atol=1e-5), uid
    # a pseudo epoch's samples: the segmented training studies plus as many pseudo slices
    with np.load(checkpoint / fold_file(0, "targets.npz")) as z:
        task.pseudo[0] = {k: z[k] for k in z.files}
    train_uids = task.split(0)[0]
    items = task.train_dataset(train_uids, 3, 0)
    studies = [items.uids[s] for s in items.study]
    assert sum(u in train_uids for u in studies) == len(train_uids) * 12
    assert sum(u in task.pseudo[0] for u in studies) == len(train_uids) * 12
    sample = items[int(np.flatnonzero([u in task.pseudo[0] for u in studies])[0])]
    np.testing.assert_allclose(sample["ratio"], task.pseudo[0][sample["uid"]][sample["z"], :7])
