"""Search spaces: the shipped ones load, bad ones are refused naming the key, define-by-run."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from cspine_ray.config import ConfigError
from cspine_ray.tune.search import max_epochs
from cspine_ray.train.config import build_config
from cspine_ray.tune.space import DefineByRun, load_space, trial_values

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("name", ["demo", "laptop", "laptop_families", "two_stage", "families"])
def test_shipped_spaces_load(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.budget.trials >= 1 and space.description
    assert max_epochs(space) >= 1


def test_the_real_data_spaces_fine_tune_and_the_cpu_spaces_need_no_download():
    from cspine_ray.train.config import build_config

    for name, pretrained in (("two_stage", True), ("families", True), ("demo", False),
                             ("laptop", False), ("laptop_families", False)):
        assert build_config(load_space(SPACES / f"{name}.yaml").base, {}).pretrained is pretrained
    laptop = load_space(SPACES / "laptop.yaml")
    # the patient rule (N or the calibrator) is searched; it costs no retraining
    assert {"top_n", "calibrate"} <= set(laptop.params) and laptop.families() == ["two_stage"]
    # every laptop trial a seed ensemble of 3; the family comparison, which extends its base,
    # compares single models
    assert laptop.params["ensemble"] == 3 and "ensemble" not in laptop.base
    families = load_space(SPACES / "laptop_families.yaml")
    assert "ensemble" not in families.params and "ensemble" not in families.base


def _space(tmp_path, **sections) -> Path:
    body = {"description": "t", "params": {"top_n": {"type": "int", "low": 1, "high": 7}}}
    body.update(sections)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("sections,needle", [
    ({"parms": {}}, "unknown top-level key 'parms'"),
    ({"params": {"sequence.lenght": {"type": "int", "low": 2, "high": 4}}}, "sequence.lenght"),
    ({"params": {"optim.lr": {"type": "log_float", "low": 0, "high": 1}}}, "low > 0"),
    ({"params": {"top_n": {"type": "int", "low": 7, "high": 1}}}, "low must be < high"),
    ({"params": {"top_n": {"type": "int", "low": 1, "high": 9}}}, "top_n"),
    ({"params": {"backbone": {"type": "categorical", "choices": []}}}, "choices"),
    ({"params": {"backbone": {"type": "choice", "choices": ["a"]}}}, "type must be one of"),
    ({"params": {"top_n": {"type": "int", "low": 1, "high": 3, "stepp": 1}}}, "stepp"),
    ({"params": {"family": {"type": "categorical", "choices": ["cnn3d", "vit"]}}}, "vit"),
    ({"conditional": {"resnet": {"top_n": 3}}}, "conditional.resnet"),
    ({"conditional": {"two_stage": {"sequence.head": {"type": "categorical", "choices": ["rnn"]}}}},
     "conditional.two_stage.sequence.head"),
    ({"base": {"optim": {"epoch": 3}}}, "optim.epoch"),
    ({"budget": {"trials": 0}}, "budget.trials"),
    ({"budget": {"asha": {"grace": 1}}}, "budget.asha.grace"),
    ({"extends": "nowhere.yaml"}, "extends nowhere.yaml, which is not a file"),
    ({"extends": ["laptop.yaml"]}, "extends must be the file name"),
    ({"extends": "s.yaml"}, "makes a cycle (s.yaml -> s.yaml)"),
])
def test_bad_spaces_are_refused_naming_the_key(tmp_path, sections, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_space(_space(tmp_path, **sections))
    assert needle in str(err.value), str(err.value)


def test_the_laptop_families_space_is_the_laptop_base_with_a_budget_per_baseline():
    laptop = load_space(SPACES / "laptop.yaml")
    families = load_space(SPACES / "laptop_families.yaml")
    assert families.base == laptop.base       # extends it: the two-stage trials are laptop.yaml's
    assert sorted(families.families()) == ["cnn3d", "multi_head", "single_head", "two_stage"]
    for family in ("cnn3d", "single_head", "multi_head"):  # tuned by benchmarks/budgets.py
        fixed = {k for k, v in families.conditional[family].items() if not isinstance(v, dict)}
        assert fixed & {"optim.lr", "optim.epochs", "input.slices_per_study"}, family


def test_a_space_extends_another_s_base_section_by_section(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({
        "description": "a", "base": {"family": "cnn3d", "optim": {"epochs": 3, "lr": 0.01},
                                     "input": {"windows": ["bone", "soft"]}},
        "params": {"top_n": {"type": "int", "low": 1, "high": 7}}, "budget": {"trials": 5}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({
        "description": "b", "extends": "a.yaml", "base": {"optim": {"epochs": 4}}}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "description": "c", "extends": "b.yaml", "base": {"input": {"windows": ["bone"]}},
        "params": {"optim.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}}))
    space = load_space(tmp_path / "c.yaml")
    # by hand: a's base, b's epochs over it (a's lr kept), c's window list replacing a's whole
    assert space.base == {"family": "cnn3d", "optim": {"epochs": 4, "lr": 0.01},
                          "input": {"windows": ["bone"]}}
    # only the base is inherited: c's own params and default budget, not a's
    assert set(space.params) == {"optim.lr"} and space.budget.trials == 10
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"description": "a", "extends": "c.yaml"}))
    with pytest.raises(ConfigError, match=r"makes a cycle \(c.yaml -> b.yaml -> a.yaml -> c.yaml\)"):
        load_space(tmp_path / "c.yaml")


def test_define_by_run_samples_only_the_family_s_own_parameters():
    space = load_space(SPACES / "families.yaml")
    sampler = DefineByRun(space)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = sampler(trial) or {}
        family = trial.params["family"]
        seen.add(family)
        own = {k.split("/", 1)[0] for k in trial.params if "/" in k}
        assert own <= {family}
        values = trial_values({**trial.params, **constants})
        cfg = build_config(space.base, values)
        assert cfg.family == family
        if family == "single_head":
            assert cfg.top_n == 1                     # a fixed conditional value
        study.tell(trial, 0.5)
    assert len(seen) >= 3


def test_trial_values_accept_ray_s_nested_form():
    nested = {"family": "two_stage", "two_stage": {"sequence.length": 8}, "top_n": 3}
    assert trial_values(nested) == {"family": "two_stage", "sequence.length": 8, "top_n": 3}
    assert trial_values({"two_stage/sequence.length": 8}) == {"sequence.length": 8}


def test_conditional_spaces_sample_without_warnings():
    # Optuna 5's TPE as the search builds it: multivariate with group=True over the family-
    # conditional space, list-valued choices (input.windows) encoded; any warning fails
    import warnings

    from cspine_ray.tune.search import sampler

    for name in ("families", "two_stage"):
        space = load_space(SPACES / f"{name}.yaml")
        define = DefineByRun(space)
        windows = set()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            study = optuna.create_study(sampler=sampler(seed=0))
            for i in range(14):  # past TPE's 10 start-up trials, so the model samples too
                trial = study.ask()
                constants = define(trial) or {}
                cfg = build_config(space.base, trial_values({**trial.params, **constants}))
                windows.add(tuple(cfg.input.windows))
                study.tell(trial, float(i % 3))
        if name == "two_stage":
            assert windows == {("bone",), ("bone", "soft")}  # decoded back to lists
    # each family's conditional parameters form their own group (no public getter in Optuna 5)
    assert sampler(seed=0)._group is True


def test_list_choices_round_trip_through_their_encoding():
    from cspine_ray.tune.space import decode_choice, encode_choice

    for value in (["bone", "soft"], [[400, 1800]], {"a": 1}):
        encoded = encode_choice(value)
        assert isinstance(encoded, str) and decode_choice(encoded) == value
    for value in ("bone", 3, 0.5, None, True):
        assert encode_choice(value) is value and decode_choice(value) is value
