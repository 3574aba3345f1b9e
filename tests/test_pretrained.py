"""Pretrained backbones: weights from a local file or folder, and the backbone's own normalisation.

A tiny timm model with a fixed seed stands in for downloaded weights: its state dict, saved with
safetensors (what the hub serves), is the "pretrained" file. No network is used.
"""

from __future__ import annotations

import os

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from cspine_ray.models import PretrainedWeightsError, create_backbone, create_model
from cspine_ray.train.config import build_config
from cspine_ray.train.tasks import JobData, make_task

NAME = "test_efficientnet"
OTHER = "test_convnext"
SIZE = 32


def _donor(name: str, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of timm model `name` (with its classifier, as on the hub), seeded."""
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    """A folder holding `<name>.safetensors` for NAME and OTHER, and their state dicts."""
    folder = tmp_path_factory.mktemp("weights")
    states = {NAME: _donor(NAME, seed=1), OTHER: _donor(OTHER, seed=2)}
    for name, state in states.items():
        save_file(state, str(folder / f"{name}.safetensors"))
    return folder, states


def _plain(name: str, in_chans: int, state: dict) -> torch.nn.Module:
    """The bare timm model with `state` loaded: no normalisation, nothing of ours."""
    model = timm.create_model(name, num_classes=0, in_chans=in_chans)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("where", ["file", "folder", "folder, tagged name"])
def test_weights_come_from_the_file(donors, where):
    folder, states = donors
    name, weights = {"file": (NAME, folder / f"{NAME}.safetensors"),
                     "folder": (NAME, folder),
                     "folder, tagged name": (f"{NAME}.r160_in1k", folder)}[where]
    model, _ = create_backbone(name, weights=weights)
    loaded = model.state_dict()
    assert loaded and set(loaded) < set(states[NAME])  # all but the dropped classifier
    assert all(torch.equal(v, states[NAME][k]) for k, v in loaded.items())


def test_a_pth_file_loads_without_unpickling_code(donors, tmp_path):
    _, states = donors
    good = tmp_path / "good.pth"
    torch.save(states[NAME], good)
    model, _ = create_backbone(NAME, weights=good)
    assert torch.equal(model.conv_stem.weight, states[NAME]["conv_stem.weight"])

    class Evil:  # unpickling it would create `ran`
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    evil = tmp_path / "evil.pth"
    torch.save({**states[NAME], "extra": Evil()}, evil)
    with pytest.raises(PretrainedWeightsError, match="weights_only"):
        create_backbone(NAME, weights=evil)
    assert not (tmp_path / "ran").exists()


def test_six_channels_adapt_the_first_conv_as_timm_does(donors):
    folder, states = donors
    model, _ = create_backbone(NAME, in_chans=6, weights=folder)
    kernel = states[NAME]["conv_stem.weight"]  # (out, 3, k, k)
    # timm's adapt_input_conv: repeat the RGB kernel over the channels, scale by 3 / in_chans
    expected = torch.cat([kernel, kernel], dim=1) * (3 / 6)
    assert model.conv_stem.weight.shape == (kernel.shape[0], 6, *kernel.shape[2:])
    assert torch.allclose(model.conv_stem.weight, expected)
    assert torch.equal(model.bn1.weight, states[NAME]["bn1.weight"])  # the rest as saved


@pytest.mark.parametrize("name, in_chans, pretrained", [
    (NAME, 3, True), (NAME, 6, True), (NAME, 5, False), (OTHER, 3, False)])
def test_the_model_normalises_with_its_pretrained_statistics(donors, name, in_chans, pretrained):
    folder, _ = donors
    model, _ = create_backbone(name, in_chans=in_chans, weights=folder if pretrained else None)
    model.eval()
    cfg = timm.models.get_pretrained_cfg(name)
    if in_chans % 3 == 0:  # window-major channels: the RGB statistics once per window
        mean, std = list(cfg.mean) * (in_chans // 3), list(cfg.std) * (in_chans // 3)
    else:
        mean, std = [sum(cfg.mean) / 3] * in_chans, [sum(cfg.std) / 3] * in_chans
    mean, std = (torch.tensor(v).view(1, in_chans, 1, 1) for v in (mean, std))
    plain = _plain(name, in_chans, model.state_dict())
    x = torch.rand(2, in_chans, SIZE, SIZE)  # CT windows scaled to [0, 1]
    with torch.no_grad():
        got, expected, raw = model(x), plain((x - mean) / std), plain(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, raw, atol=1e-3)  # normalisation matters for this input


def test_state_dict_keys_are_those_of_the_bare_timm_model():
    model = create_model("sequence_classifier", backbone=NAME, in_chans=3, sequence_head="gru",
                         hidden=8, num_layers=1)
    bare = timm.create_model(NAME, num_classes=0).state_dict()
    keys = {k for k in model.state_dict() if k.startswith("backbone.")}
    assert keys == {f"backbone.{k}" for k in bare}  # old fold checkpoints still load strictly


def test_weights_that_do_not_fit_are_refused_naming_backbone_and_file(donors, tmp_path):
    folder, _ = donors
    wrong = tmp_path / "convnext.safetensors"
    wrong.write_bytes((folder / f"{OTHER}.safetensors").read_bytes())
    with pytest.raises(PretrainedWeightsError) as refused:
        create_backbone(NAME, weights=wrong)
    assert f"'{NAME}'" in str(refused.value) and str(wrong) in str(refused.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PretrainedWeightsError, match=rf"'{NAME}'.*{empty}.*{NAME}.safetensors"):
        create_backbone(NAME, weights=empty)


def test_offline_without_weights_says_where_to_put_them(monkeypatch, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import: set both ways
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsError,
                       match=rf"'{NAME}'.*--weights FILE_OR_FOLDER.*`weights:`.*HF_HUB_CACHE"):
        create_backbone(NAME, pretrained=True)


def test_config_weights_reach_both_stages_and_their_keys(donors):
    folder, states = donors
    base = {"family": "two_stage", "backbone": NAME, "stage1": {"backbone": OTHER},
            "sequence": {"hidden": 8, "layers": 1, "length": 2}}
    plain, local = build_config(base, {}), build_config(base, {"weights": str(folder)})
    assert plain.training_key("m") != local.training_key("m")
    assert plain.stage1_key("m") != local.stage1_key("m")
    assert local.read_settings()["weights"] == str(folder)  # logged with the trial's parameters

    data = JobData(shards_dir="", uids=[], folds={}, labels={}, segmented=set())
    # one folder serves stage 1 (OTHER) and stage 2 (NAME)
    for task, name in (("two_stage", NAME), ("locator", OTHER)):
        backbone = make_task(task, local, data).build_model().backbone
        state = backbone.state_dict()
        assert all(torch.equal(v, states[name][k]) for k, v in state.items()), task


def test_a_promoted_model_loads_without_the_pretrained_file(donors, tmp_path):
    from types import SimpleNamespace

    from cspine_ray.predict.ensemble import load_fold_models

    folder, _ = donors
    kwargs = {"backbone": NAME, "pretrained": True, "weights": str(tmp_path / "gone")}
    trained = create_model("slice_classifier", **{**kwargs, "weights": folder})
    spec = SimpleNamespace(name="slice_classifier", kwargs=kwargs)  # the file has gone since
    result = SimpleNamespace(info=SimpleNamespace(model=spec), n_folds=1, n_members=1,
                             fold_weights=lambda fold, member=0: trained.state_dict())
    (model,) = load_fold_models(result, torch.device("cpu"))
    assert torch.equal(model.backbone.conv_stem.weight, trained.backbone.conv_stem.weight)


def test_cli_weights_reach_the_config_as_an_absolute_path(tmp_path, monkeypatch):
    import argparse

    from cspine_ray.train import cli
    from cspine_ray.tune.cli import add_arguments as tune_arguments
    from cspine_ray.tune.trial import TrialSetup, trial_config

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.config_from_args(parser.parse_args(["--shards", "s", "--weights", "w"]))
    assert cfg.weights == str((tmp_path / "w").resolve())  # Ray workers may run in another directory
    tune = argparse.ArgumentParser()
    tune_arguments(tune)
    assert tune.parse_args(["--weights", "w"]).weights == "w"
    setup = TrialSetup(base={"family": "two_stage"}, shards=None, storage="", weights="/w")
    assert trial_config({}, setup).weights == "/w"
