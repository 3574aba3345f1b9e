"""Tests for cspine_ray.models: every registered model, backbones, sequence heads, aggregation.

Real timm models with pretrained=False on tiny inputs (32 px, a few steps); the `test_*`
models in timm exist for exactly this. No network is used: the pretrained tests check the
offline behaviour and skip where the weight host is reachable.
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch

from cspine_ray.config import ConfigError
from cspine_ray.models import (SEQUENCE_HEADS, AttentionPooling, PretrainedWeightsError,
                               create_backbone, create_model, create_sequence_head, decode_locator,
                               list_models, patient_overall, split_locator_outputs)
from cspine_ray.train.families import FAMILIES
from cspine_ray.models.backbone import _reachable

TINY = "test_efficientnet"  # ~0.1 M parameters, a few ms per 64 px image on one core
SIZE = 32


def _slices(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE)


# name -> (constructor kwargs, inputs maker, expected output shapes)
CASES = {
    "cnn3d": (dict(channels=[4, 8, 8], hidden=16),
              lambda: (torch.randn(2, 1, 16, 16, 16),), {"": (2, 8)}),
    "slice_classifier": (dict(backbone=TINY), lambda: (_slices(),), {"": (2, 7)}),
    "multi_head": (dict(backbone=TINY), lambda: (_slices(),),
                   {"presence": (2, 7), "fracture": (2, 7)}),
    "slice_locator": (dict(backbone=TINY), lambda: (_slices(),), {"": (2, 11)}),
    "sequence_classifier": (dict(backbone=TINY, hidden=8, vertebra_embedding=True),
                            lambda: (torch.randn(2, 3, 3, SIZE, SIZE), torch.tensor([0, 6])),
                            {"": (2,)}),
}


def _outputs(out) -> dict[str, torch.Tensor]:
    return out if isinstance(out, dict) else {"": out}


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **CASES[name][0])


def test_every_registered_model_is_tested_and_every_family_has_models():
    assert set(list_models()) == set(CASES)
    assert tuple(FAMILIES) == ("cnn3d", "single_head", "multi_head", "two_stage")
    assert {m for f in FAMILIES.values() for m in f.models} == set(list_models())


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_and_backward(name):
    _, make_inputs, shapes = CASES[name]
    model = _build(name)
    outputs = _outputs(model(*make_inputs()))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == shapes
    sum(o.sum() for o in outputs.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_gives_identical_outputs(name):
    inputs = CASES[name][1]()
    model = _build(name, seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = _build(name, seed=1).eval()
    with torch.no_grad():
        before = _outputs(other(*inputs))
        other.load_state_dict(torch.load(buffer, weights_only=True))
        expected, got = _outputs(model(*inputs)), _outputs(other(*inputs))
    assert any(not torch.equal(before[k], expected[k]) for k in expected)  # seeds differ
    for key in expected:
        assert torch.equal(got[key], expected[key])


@pytest.mark.parametrize("name", sorted(CASES))
def test_pickle_and_deepcopy_keep_outputs(name):
    inputs = CASES[name][1]()
    model = _build(name).eval()
    with torch.no_grad():
        expected = _outputs(model(*inputs))
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            got = _outputs(clone(*inputs))
            assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_autocast(name):
    _, make_inputs, shapes = CASES[name]
    model = _build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = _outputs(model(*make_inputs()))
        loss = sum(o.float().sum() for o in outputs.values())
    loss.backward()
    assert {k: tuple(v.shape) for k, v in outputs.items()} == shapes
    assert all(torch.isfinite(o.float()).all() for o in outputs.values())


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_head_runs_in_float32_under_autocast(kind):
    # the recurrence ignores autocast: same numbers as a plain float32 run, float32 out,
    # whichever kernels the CPU has (oneDNN has no bf16 LSTM without AVX-512)
    torch.manual_seed(0)
    head = create_sequence_head(kind, in_features=6, hidden=5, num_layers=2).eval()
    steps = torch.randn(2, 4, 6).to(torch.bfloat16)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with torch.no_grad():
        expected = head(steps.float(), mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = head(steps, mask)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_sequence_classifier_autocast_on_a_cpu_without_avx512():
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN pick the kernels an AVX2-only machine has, so this
    # checks that path on any CPU (a bf16 LSTM raised there)
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from cspine_ray.models import create_model\n"
        f"model = create_model('sequence_classifier', backbone={TINY!r}, hidden=8,\n"
        "                     vertebra_embedding=True)\n"
        "steps = torch.randn(2, 3, 3, 32, 32)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    loss = model(steps, torch.tensor([0, 6])).float().sum()\n"
        "loss.backward()\n"
        "assert torch.isfinite(loss)\n"
        "print('ok')\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_prior_logit_sets_the_starting_bias():
    model = create_model("slice_classifier", backbone=TINY, prior_logit=-3.0)
    assert torch.equal(model.head.bias, torch.full((7,), -3.0))
    model = create_model("multi_head", backbone=TINY, prior_logit=[-1, -2, -3, -4, -5, -6, -7],
                         presence_prior_logit=None)
    assert model.fracture.bias.tolist() == [-1, -2, -3, -4, -5, -6, -7]
    assert model.presence.bias.abs().max() < 1.0  # PyTorch's default init, not a prior
    # cnn3d: vertebrae start rare, patient_overall at 0.5
    assert create_model("cnn3d").head.bias.tolist() == [-2.0] * 7 + [0.0]
    # the locator's box starts at the image centre whatever the ratio prior
    locator = create_model("slice_locator", backbone=TINY, prior_logit=-4.0)
    assert locator.ratio.bias.tolist() == [-4.0] * 7 and locator.box.bias.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="prior_logit has 3 values for 7 outputs"):
        create_model("slice_classifier", backbone=TINY, prior_logit=[0.0, 1.0, 2.0])


def test_cnn3d_refuses_bad_inputs_and_settings():
    model = create_model("cnn3d", channels=[2, 2, 2], hidden=4)
    with pytest.raises(ValueError, match=r"needs D, H, W >= 8"):
        model(torch.randn(1, 1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"expects \(B, C, D, H, W\)"):
        model(torch.randn(1, 16, 16, 16))
    with pytest.raises(ValueError, match="norm must be"):
        create_model("cnn3d", norm="layer")
    group = create_model("cnn3d", channels=[4, 8], norm="group", activation="gelu", hidden=4)
    assert group(torch.randn(1, 1, 8, 8, 8)).shape == (1, 8)


# ---- backbones and the factory's errors -----------------------------------------------------

@pytest.mark.parametrize("backbone", ["test_convnext", "test_efficientnet", "mobilenetv3_small_050"])
def test_any_timm_backbone_via_the_factory(backbone):
    features, num_features = create_backbone(backbone, in_chans=5, drop_rate=0.1)
    # mobilenetv3 keeps a projection after pooling: its width is not timm's num_features
    assert features.eval()(torch.randn(2, 5, SIZE, SIZE)).shape == (2, num_features)
    model = create_model("slice_locator", backbone=backbone, in_chans=5, drop_path_rate=0.05)
    assert model(torch.randn(2, 5, SIZE, SIZE)).shape == (2, 11)


def test_unknown_model_argument_and_backbone_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown model 'cnn2d'.*cnn3d.*slice_locator"):
        create_model("cnn2d")
    with pytest.raises(ConfigError, match=r"'cnn3d': unknown argument 'chanels' "
                                          r"\(did you mean 'channels'\?\)"):
        create_model("cnn3d", chanels=[4, 8, 16])
    with pytest.raises(ValueError, match=r"unknown timm backbone 'convnext_tinny'.*convnext_tiny"):
        create_model("slice_classifier", backbone="convnext_tinny")
    with pytest.raises(ValueError, match="unknown sequence head 'rnn'"):
        create_model("sequence_classifier", backbone=TINY, sequence_head="rnn")


def _hub_reachable() -> bool:
    import huggingface_hub
    return _reachable(huggingface_hub.constants.ENDPOINT)


def test_pretrained_without_network_fails_fast_and_clearly(monkeypatch):
    """Offline with nothing cached: ONE short probe of the weight host, a look in the cache, then
    a clear error; never a download (the hub client would retry for most of a minute)."""
    import socket
    import urllib.error
    import urllib.request

    import huggingface_hub
    import timm

    from cspine_ray.models import backbone

    if huggingface_hub.constants.is_offline_mode():
        pytest.skip("HF_HUB_OFFLINE is set: the probe is skipped by design")
    probes, connections, downloads, cache_lookups = [], [], [], []

    def unreachable(request, timeout=None, **kwargs):  # the network is down
        probes.append((request.get_method(), request.full_url, timeout))
        raise urllib.error.URLError("Network is unreachable")

    def no_connection(*args, **kwargs):  # any other way out (requests, httpx) would end here
        connections.append(args)
        raise OSError("Network is unreachable")

    real_create_model = timm.create_model

    def create_model_spy(*args, **kwargs):  # timm with pretrained=True downloads the weights
        if kwargs.get("pretrained"):
            downloads.append(args)
            raise OSError("a download was attempted")
        return real_create_model(*args, **kwargs)

    def empty_cache(repo_id, filename, **kwargs):
        cache_lookups.append((repo_id, filename))
        return None

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(timm, "create_model", create_model_spy)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", empty_cache)

    with pytest.raises(PretrainedWeightsError) as refused:
        create_model("slice_classifier", backbone="test_resnet", pretrained=True)
    assert downloads == [] and connections == []  # no download attempt, no other network use
    # exactly one probe: a HEAD request to the hub, with the module's short timeout
    assert probes == [("HEAD", huggingface_hub.constants.ENDPOINT, backbone.PROBE_TIMEOUT_S)]
    assert 0 < backbone.PROBE_TIMEOUT_S <= 5
    assert cache_lookups and {repo for repo, _ in cache_lookups} == {"timm/test_resnet.r160_in1k"}
    refused.match(r"'test_resnet'.*unreachable.*--weights FILE_OR_FOLDER.*`weights:`.*"
                  r"HF_HUB_CACHE.*pretrained=False")


def test_pretrained_offline_uses_weights_already_in_the_cache(tmp_path):
    if _hub_reachable():
        pytest.skip("the weight host is reachable: this test checks the offline behaviour")
    from safetensors.torch import save_file
    import timm

    # a Hugging Face cache holding "pretrained" weights for test_resnet, laid out as the hub does
    torch.manual_seed(3)
    donor = timm.create_model("test_resnet")
    repo = tmp_path / "models--timm--test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))

    features, _ = create_backbone("test_resnet", pretrained=True, cache_dir=tmp_path)
    donor_state = donor.state_dict()
    loaded = features.state_dict()
    assert loaded and all(torch.equal(v, donor_state[k]) for k, v in loaded.items())


# ---- sequence heads and attention pooling ---------------------------------------------------

@pytest.mark.parametrize("head", SEQUENCE_HEADS)
@pytest.mark.parametrize("length", [1, 3, 6])
def test_sequence_heads_take_any_length(head, length):
    module = create_sequence_head(head, in_features=12, hidden=8, num_layers=2, num_heads=2)
    out = module(torch.randn(2, length, 12))
    assert out.shape == (2, length, module.out_features)
    assert module.out_features == (8 if head == "transformer" else 16)


def test_attention_pooling_weights_sum_to_one_and_masked_steps_get_none():
    pool = AttentionPooling(6)
    steps = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    pooled, weights = pool(steps, mask)
    assert pooled.shape == (3, 6) and weights.shape == (3, 5)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert torch.all(weights[~mask] == 0) and torch.all(weights[mask] > 0)
    torch.testing.assert_close(pooled[2], steps[2, 3])  # one real step: it is the answer
    with pytest.raises(ValueError, match="at least one unmasked step"):
        pool(steps, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        pool(steps, torch.ones(3, 5))


@pytest.mark.parametrize("head", SEQUENCE_HEADS)
def test_padded_sample_scores_as_if_unpadded(head):
    torch.manual_seed(0)
    model = create_model("sequence_classifier", backbone=TINY, sequence_head=head, hidden=8,
                         num_heads=2).eval()
    steps = torch.randn(2, 4, 3, SIZE, SIZE)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        logits, weights = model(steps, mask=mask, return_attention=True)
        alone, alone_weights = model(steps[1:, :2], return_attention=True)
    assert logits.shape == (2,) and weights.shape == (2, 4)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert torch.all(weights[1, 2:] == 0)
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights[1:, :2], alone_weights, atol=1e-5, rtol=1e-5)


def test_step_head_scores_every_step_of_the_context():
    torch.manual_seed(0)
    model = create_model("sequence_classifier", backbone=TINY, hidden=8, step_head=True).eval()
    steps = torch.randn(2, 3, 3, SIZE, SIZE)
    with torch.no_grad():
        logits, step_logits = model(steps, return_steps=True)
        # independently: backbone per step, the sequence head, the step layer on each step
        context = model.sequence(model.backbone(steps.flatten(0, 1)).unflatten(0, (2, 3)))
        expected = context @ model.step_head.weight[0] + model.step_head.bias[0]
    assert step_logits.shape == (2, 3)
    torch.testing.assert_close(step_logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model(steps), atol=1e-6, rtol=1e-6)  # the same vertebra logit
    plain = create_model("sequence_classifier", backbone=TINY, hidden=8)
    assert not any(k.startswith("step_head") for k in plain.state_dict())  # old checkpoints load
    with pytest.raises(ValueError, match="step_head=True"):
        plain(steps, return_steps=True)
    with pytest.raises(ValueError, match="return_attention"):
        model(steps, return_steps=True, return_attention=True)


def test_sequence_head_limits():
    lstm = create_sequence_head("lstm", in_features=4, hidden=4)
    holes = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="real steps first"):
        lstm(torch.randn(1, 3, 4), holes)
    transformer = create_sequence_head("transformer", in_features=4, hidden=4, num_heads=2,
                                       max_len=3)
    with pytest.raises(ValueError, match="longer than max_len 3"):
        transformer(torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_sequence_head("transformer", in_features=4, hidden=6, num_heads=4)


def test_vertebra_embedding_is_required_checked_and_used():
    torch.manual_seed(0)
    model = create_model("sequence_classifier", backbone=TINY, hidden=8,
                         vertebra_embedding=True).eval()
    steps = torch.randn(1, 2, 3, SIZE, SIZE).expand(7, -1, -1, -1, -1)
    with torch.no_grad():
        logits = model(steps, torch.arange(7))
    assert len(set(logits.tolist())) == 7  # same images, seven vertebrae, seven answers
    with pytest.raises(ValueError, match="pass the vertebra index"):
        model(steps)
    with pytest.raises(ValueError, match=r"0\.\.6"):
        model(steps, torch.full((7,), 7))
    plain = create_model("sequence_classifier", backbone=TINY, hidden=8)
    with pytest.raises(ValueError, match="vertebra_embedding=False"):
        plain(steps, torch.arange(7))


# ---- locator outputs ------------------------------------------------------------------------

def test_locator_split_and_decode():
    raw = torch.tensor([[0.0, 100, -100, 0, 0, 0, 0, 2.0, -1.0, -2.0, 1.0]])
    ratio_logits, box_logits, own = split_locator_outputs(raw)
    assert ratio_logits.shape == (1, 7) and box_logits.shape == (1, 4) and own is None
    decoded = decode_locator(raw)
    ratios, boxes = decoded[:, :7], decoded[:, 7:]
    torch.testing.assert_close(ratios[0, :3], torch.tensor([0.5, 1.0, 0.0]))
    s = torch.sigmoid(torch.tensor([2.0, -1.0, -2.0, 1.0]))
    # x0 > x1 and y0 > y1 on the way in: the decoded box has its corners in order
    torch.testing.assert_close(boxes[0], torch.stack([s[2], s[1], s[0], s[3]]))
    with pytest.raises(ValueError, match="end in 11 or 39 values"):
        decode_locator(torch.zeros(2, 10))


def test_locator_with_vertebra_boxes_decodes_each_vertebra_box():
    # C3's own box logits (columns 11 + 2*4 ..) swapped corners; every other vertebra at 0
    raw = torch.zeros(1, 39)
    raw[0, 19:23] = torch.tensor([2.0, -1.0, -2.0, 1.0])
    _, _, own = split_locator_outputs(raw)
    assert own.shape == (1, 7, 4)
    torch.testing.assert_close(own[0, 2], torch.tensor([2.0, -1.0, -2.0, 1.0]))
    decoded = decode_locator(raw)
    assert decoded.shape == (1, 39)
    s = torch.sigmoid(torch.tensor([2.0, -1.0, -2.0, 1.0]))
    torch.testing.assert_close(decoded[0, 19:23], torch.stack([s[2], s[1], s[0], s[3]]))
    torch.testing.assert_close(decoded[0, 11:19], torch.full((8,), 0.5))
    model = create_model("slice_locator", backbone=TINY, vertebra_boxes=True)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 39)
    assert create_model("slice_locator", backbone=TINY)(torch.rand(2, 3, 32, 32)).shape == (2, 11)


# ---- aggregation ------------------------------------------------------------------------------

P = [0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.3]


@pytest.mark.parametrize("top_n, expected", [(1, 0.5), (2, 1 - 0.5 * 0.7), (3, 1 - 0.5 * 0.7 * 0.8),
                                             (7, 1 - 0.9 * 0.5 * 0.8 * 0.7)])
def test_top_n_rule_by_hand(top_n, expected):
    assert patient_overall(P, top_n) == pytest.approx(expected)
    assert patient_overall(torch.tensor(P, dtype=torch.float64), top_n).item() == \
        pytest.approx(expected)


@pytest.mark.parametrize("top_n", [0, 8, -1, 2.5, True, None])
def test_top_n_outside_1_to_7_is_refused(top_n):
    with pytest.raises(ValueError, match=r"top_n must be an integer in 1\.\.7"):
        patient_overall(P, top_n)


def test_patient_overall_batches_and_checks_its_input():
    batch = np.array([P, [0.0] * 7, [1.0] + [0.0] * 6])
    np.testing.assert_allclose(patient_overall(batch, 7), [0.748, 0.0, 1.0])
    np.testing.assert_allclose(patient_overall(batch, 1), [0.5, 0.0, 1.0])
    probs = torch.tensor(batch, requires_grad=True)
    patient_overall(probs, 7).sum().backward()  # usable inside a loss
    assert probs.grad is not None
    with pytest.raises(ValueError, match="must end in 7 vertebrae"):
        patient_overall(np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        patient_overall([1.5] + [0.0] * 6)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        patient_overall([float("nan")] * 7)


def test_each_familys_default_patient_rule():
    # P's patient figure by hand: N=1 -> max 0.5; N=7 -> 1 - 0.9*0.5*0.8*0.7 = 0.748
    assert patient_overall(np.array(P), FAMILIES["single_head"].top_n) == pytest.approx(0.5)
    assert patient_overall(np.array(P), FAMILIES["multi_head"].top_n) == pytest.approx(0.748)
    assert patient_overall(np.array(P), FAMILIES["two_stage"].top_n) == pytest.approx(0.748)
    assert FAMILIES["cnn3d"].top_n is None  # its model predicts patient_overall itself
