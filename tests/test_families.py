"""The family table and the keys derived from it: a result is reused exactly when it would not change."""

from __future__ import annotations

import math

import pytest

from cspine_ray.config import ConfigError, drop, select
from cspine_ray.train.config import TrainConfig, build_config
from cspine_ray.train.families import FAMILIES

MANIFEST = "0123456789abcdef"


def cfg(family: str, **changes) -> TrainConfig:
    return build_config({"family": family}, changes)


def keys(c: TrainConfig) -> tuple[str, str]:
    return c.training_key(MANIFEST), c.stage1_key(MANIFEST)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("change", [
    {"top_n": 3},                          # re-scored from the out-of-fold predictions
    {"calibrate": True},                   # fitted on the out-of-fold predictions
    {"resources.gpus": 1.0, "resources.num_workers": 5, "resources.max_failures": 0},
    {"input.loader_workers": 7},           # how fast batches come, not what they hold
])
def test_what_cannot_change_a_result_keeps_both_keys(family, change):
    assert keys(cfg(family, **change)) == keys(cfg(family))


@pytest.mark.parametrize("change", [
    {"stage1.epochs": 3}, {"stage1.lr": 3e-4}, {"stage1.backbone": "resnet18"},
    {"optim.weight_decay": 1e-3}, {"optim.t0": 2}, {"optim.eta_min": 1e-5}, {"optim.amp": False},
    {"input.windows": ["bone", "soft"]}, {"input.neighbour_offset": 2}, {"seed": 7},
    {"pretrained": True}, {"augment.hflip_p": 0.0}, {"stage1.anatomy": True},
    {"stage1.pseudo_rounds": 1},
])
def test_what_the_locator_reads_changes_stage1_and_every_family_that_uses_it(change):
    base = {f: keys(cfg(f)) for f in FAMILIES}
    for family in FAMILIES:
        training, stage1 = keys(cfg(family, **change))
        assert stage1 != base[family][1], (family, change)
        if FAMILIES[family].needs_stage1:
            assert training != base[family][0], (family, change)


@pytest.mark.parametrize("change", [{"optim.lr": 3e-3}, {"optim.epochs": 3},
                                    {"optim.batch_size": 2}, {"backbone": "resnet18"},
                                    {"sequence.length": 4}, {"input.image_size": 64},
                                    {"input.visibility_threshold": 0.5},
                                    {"sequence.flip_tta": True}, {"input.native": False},
                                    {"sequence.init_from_stage1": True}])
def test_what_the_locator_does_not_read_leaves_its_key(change):
    for family in FAMILIES:
        assert cfg(family, **change).stage1_key(MANIFEST) == cfg(family).stage1_key(MANIFEST)


def test_a_family_key_moves_only_with_the_sections_that_family_reads():
    # sequence.* is read by two_stage only; backbone by every family but cnn3d
    for family, moves in (("two_stage", True), ("single_head", False), ("multi_head", False),
                          ("cnn3d", False)):
        assert (keys(cfg(family, **{"sequence.length": 4}))[0] != keys(cfg(family))[0]) is moves
    for family, moves in (("two_stage", True), ("single_head", True), ("cnn3d", False)):
        assert (keys(cfg(family, backbone="resnet18"))[0] != keys(cfg(family))[0]) is moves
    for family in FAMILIES:  # a different data set is always a different result
        assert cfg(family).training_key("fedcba9876543210") != cfg(family).training_key(MANIFEST)
    # every two-stage option retrains stage 2 (flip TTA too: it changes the validation
    # predictions the best epoch is chosen on); the visibility rule retrains the 2D families
    for change in ({"sequence.slice_choice": "run"}, {"sequence.per_step": 5},
                   {"sequence.ratio_channel": True}, {"sequence.mask_not_found": True},
                   {"sequence.flip_tta": True}, {"sequence.init_from_stage1": True},
                   {"sequence.step_loss": 0.5}, {"sequence.steps": "neighbours"}):
        assert keys(cfg("two_stage", **change))[0] != keys(cfg("two_stage"))[0], change
    for family in ("single_head", "multi_head"):
        assert (keys(cfg(family, **{"input.visibility_threshold": 0.5}))[0]
                != keys(cfg(family))[0])


def test_settings_added_later_key_a_result_only_when_they_are_set():
    # at their defaults they are not in the key (the pinned keys below stay); set, they move it
    # like any setting the result's training reads: augment is read by stage 1 too
    for change in ({"augment.vflip_p": 0.5}, {"augment.transpose_p": 0.5},
                   {"augment.whole_pixel_shift": True}, {"augment.noise": 0.02},
                   {"augment.noise_p": 1.0}):
        for family in ("two_stage", "cnn3d"):
            assert keys(cfg(family, **change))[0] != keys(cfg(family))[0], (family, change)
        assert keys(cfg("two_stage", **change))[1] != keys(cfg("two_stage"))[1], change
    for stage2_only in ({"sequence.steps": "neighbours"}, {"optim.ema": 0.99},
                        {"sequence.step_target": "label"}, {"sequence.balance": 0.3}):
        changed = cfg("two_stage", **stage2_only)
        assert keys(changed)[0] != keys(cfg("two_stage"))[0]
        assert keys(changed)[1] == keys(cfg("two_stage"))[1]  # stage 1 does not read it
    assert keys(cfg("two_stage", **{"sequence.steps": "spread"})) == keys(cfg("two_stage"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_seed_ensemble_has_its_own_key_and_its_members_are_the_plain_runs_of_their_seeds(family):
    from cspine_ray.train.seeds import member_configs

    single, three = cfg(family), cfg(family, ensemble=3)
    assert three.training_key(MANIFEST) != single.training_key(MANIFEST)
    assert three.training_key(MANIFEST) != cfg(family, ensemble=4).training_key(MANIFEST)
    members = member_configs(three)
    assert [(m.seed, m.ensemble) for m in members] == [(42, 1), (43, 1), (44, 1)]
    # each member is what a plain run of its seed trains (both stages), so either reuses the other
    for m, seed in zip(members, (42, 43, 44)):
        assert keys(m) == keys(cfg(family, seed=seed))
    assert len({m.training_key(MANIFEST) for m in members}) == 3


def test_a_single_model_keeps_the_key_it_had_before_seed_ensembles():
    # the default keys as the code before `ensemble` existed computed them (commit 741343f):
    # a user's finished results stay reusable
    assert cfg("two_stage").training_key(MANIFEST) == "6be0a7be27fa45d5"
    assert cfg("cnn3d").training_key(MANIFEST) == "73a689ed99078bd9"
    assert cfg("two_stage").stage1_key(MANIFEST) == "3239a486dd36a09e"
    with pytest.raises(ConfigError, match="ensemble must be"):
        cfg("two_stage", ensemble=0)


def test_read_settings_are_the_sections_the_family_reads_plus_its_rule():
    assert sorted(cfg("cnn3d", top_n=3).read_settings()) == [
        "augment", "calibrate", "ensemble", "family", "input", "model", "optim", "seed"]  # no N
    two = cfg("two_stage").read_settings()
    assert sorted(two) == ["augment", "backbone", "calibrate", "ensemble", "family", "input",
                           "model", "optim", "pretrained", "seed", "sequence", "stage1", "top_n",
                           "weights"]
    assert two["calibrate"] is False and cfg("cnn3d", calibrate=True).read_settings()["calibrate"]
    assert two["top_n"] == 7 and cfg("single_head").read_settings()["top_n"] == 1
    assert cfg("multi_head", top_n=4).read_settings()["top_n"] == 4
    assert "sequence" not in cfg("multi_head").read_settings()


def test_effective_rule_and_unknown_family():
    assert [cfg(f).effective_top_n for f in FAMILIES] == [None, 1, 7, 7]
    assert cfg("cnn3d", top_n=3).effective_top_n is None  # ignored for a model with its own
    with pytest.raises(ConfigError, match="family must be one of"):
        cfg("resnet")


def test_select_and_drop_dotted_keys():
    data = {"a": {"x": 1, "y": [2]}, "b": 3, "c": {"z": 4}}
    picked = select(data, ["a.y", "b"])
    assert picked == {"a": {"y": [2]}, "b": 3}
    picked["a"]["y"].append(9)
    assert data["a"]["y"] == [2]  # a copy, not a view
    assert drop(data, ["a.x", "c", "nope.q"]) == {"a": {"y": [2]}, "b": 3}
    assert data["c"] == {"z": 4}


def test_best_epoch_choice_skips_folds_and_epochs_without_a_figure():
    from cspine_ray.train.loop import cv_metric, improves

    nan = float("nan")
    # a fold with no figure is left out of the mean, not averaged in as 0 or NaN
    assert cv_metric({0: {"metric": 0.5}, 1: {"metric": nan}, 2: {"metric": 0.3}}) == pytest.approx(0.4)
    assert math.isnan(cv_metric({0: {"metric": nan}, 1: {"metric": nan}}))

    def best_of(cvs: list[float]) -> int:  # the loop's choice over a run's epochs (0-based)
        best_cv, best = float("inf"), -1
        for epoch, cv in enumerate(cvs):
            if improves(cv, best_cv, best):
                best_cv, best = cv, epoch
        return best

    assert best_of([0.6, 0.4, 0.5]) == 1
    assert best_of([0.6, nan, 0.7]) == 0        # a NaN epoch never wins
    assert best_of([nan, nan, nan]) == 0        # no figure at all: keep the first epoch
    assert best_of([nan, 0.6, 0.5]) == 2        # the first real figure replaces NaN
    assert best_of([0.5, 0.5]) == 0             # ties keep the earlier epoch


@pytest.mark.parametrize("task, selected", [
    ("two_stage", "val_loss"), ("single_head", "val_loss"), ("multi_head", "val_loss"),
    ("cnn3d", "metric"), ("locator", "metric"),
])
def test_the_best_epoch_is_chosen_on_a_figure_that_does_not_depend_on_n(task, selected):
    from cspine_ray.train.tasks import JobData, make_task

    data = JobData(shards_dir="", uids=[], folds={}, labels={}, segmented=set())
    for top_n in (1, 7):
        family = "two_stage" if task == "locator" else task
        assert make_task(task, cfg(family, top_n=top_n), data).selected_on == selected


def test_a_new_key_version_retrains_both_stages(monkeypatch):
    import cspine_ray.train.config as config

    before = keys(cfg("two_stage"))
    monkeypatch.setattr(config, "KEY_VERSION", config.KEY_VERSION + 1)
    after = keys(cfg("two_stage"))
    assert before[0] != after[0] and before[1] != after[1]
