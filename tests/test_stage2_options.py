"""The two-stage model's optional techniques (SequenceConfig): each changes what the model sees
or learns from, and only that. Stub models record their input; expected values by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cspine_ray.train.config import build_config
from cspine_ray.train.tasks import JobData, make_task


def task(**sequence):
    cfg = build_config({"family": "two_stage", "input": {"windows": ["bone", "soft"]},
                        "sequence": sequence}, {})
    return make_task("two_stage", cfg, JobData(shards_dir="", uids=[], folds={}, labels={},
                                               segmented=set()))


class Recorder(nn.Module):
    """Returns the given logits (one per sample) and keeps the last input it saw."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.seen = None

    def forward(self, image, vertebra=None):
        self.seen = image
        return self.logits + 0 * image.mean(dim=(1, 2, 3, 4))


def batch(n=3, length=2, channels=6, size=4, found=(True, True, True)):
    return {"image": torch.rand(n, length, channels, size, size),
            "ratio": torch.tensor([[0.2, 0.9], [0.5, 0.5], [1.0, 0.0]])[:n],
            "vertebra": torch.tensor([0, 3, 6])[:n], "label": torch.tensor([1.0, 0.0, 1.0])[:n],
            "found": torch.tensor(found)}


def test_ratio_channel_is_a_plane_of_each_steps_ratio_after_the_crops():
    t = task(ratio_channel=True, per_step=3)
    assert t.in_chans == 3 * 2 + 1 and t.model_spec()[1]["in_chans"] == 7
    b, model = batch(), Recorder([0.0, 0.0, 0.0])
    t._forward(model, b["image"], b)
    seen = model.seen
    assert seen.shape == (3, 2, 7, 4, 4)
    torch.testing.assert_close(seen[:, :, :6], b["image"])          # the crops unchanged
    for i in range(3):
        for step in range(2):
            assert (seen[i, step, 6] == b["ratio"][i, step]).all()
    off = task(per_step=5)
    assert off.in_chans == 5 * 2 and off.model_spec()[1]["in_chans"] == 10
    model = Recorder([0.0, 0.0, 0.0])
    off._forward(model, b["image"], b)
    assert model.seen.shape == b["image"].shape                       # nothing added


def bce(logit, label, weight):
    p = 1 / (1 + math.exp(-logit))
    return -weight * (label * math.log(p) + (1 - label) * math.log(1 - p))


def test_not_found_vertebrae_can_be_left_out_of_the_loss():
    logits = [2.0, -1.0, 0.5]
    b = batch(found=(True, False, True))
    # weights: positive 2, negative 1 (the metric's vertebra rows)
    everyone = (bce(2.0, 1, 2) + bce(-1.0, 0, 1) + bce(0.5, 1, 2)) / (2 + 1 + 2)
    found_only = (bce(2.0, 1, 2) + bce(0.5, 1, 2)) / (2 + 2)
    g = torch.Generator().manual_seed(0)
    plain = task(mask_not_found=False).loss(Recorder(logits), b, g)
    masked = task(mask_not_found=True).loss(Recorder(logits), b, g)
    assert plain.item() == pytest.approx(everyone, rel=1e-5)
    assert masked.item() == pytest.approx(found_only, rel=1e-5)
    # a batch with nothing found: zero loss that still back-propagates
    model = Recorder(logits)
    none = task(mask_not_found=True).loss(model, batch(found=(False, False, False)), g)
    none.backward()
    assert none.item() == 0.0 and model.logits.grad is not None


class StepRecorder(nn.Module):
    """Given vertebra logits (B,) and step logits (B, L), returned when return_steps is asked."""

    def __init__(self, logits, steps):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.steps = nn.Parameter(torch.tensor(steps, dtype=torch.float32))
        self.asked = None

    def forward(self, image, vertebra=None, return_steps=False):
        self.asked = return_steps
        zero = 0 * image.mean(dim=(2, 3, 4))
        return (self.logits + zero.mean(1), self.steps + zero) if return_steps else self.logits


def test_step_loss_adds_the_weighted_step_targets_of_the_known_samples():
    logits, steps = [2.0, -1.0, 0.5], [[1.0, -2.0], [0.0, 3.0], [-1.0, 1.0]]
    b = batch(found=(True, True, False))
    b["step_label"] = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    b["step_known"] = torch.tensor([True, False, True])  # sample 1: a fractured vertebra, no boxes
    g = torch.Generator().manual_seed(0)
    vertebra = (bce(2.0, 1, 2) + bce(-1.0, 0, 1) + bce(0.5, 1, 2)) / 5
    # the known samples' steps: 0 (targets 1, 0) and 2 (0, 1), positive steps weighted 2
    step = (bce(1.0, 1, 2) + bce(-2.0, 0, 1) + bce(-1.0, 0, 1) + bce(1.0, 1, 2)) / 6
    model = StepRecorder(logits, steps)
    on = task(step_loss=0.5).loss(model, b, g)
    assert model.asked and on.item() == pytest.approx(vertebra + 0.5 * step, rel=1e-5)
    model = StepRecorder(logits, steps)
    off = task().loss(model, b, g)  # the default: no step head, the step targets unread
    assert not model.asked and off.item() == pytest.approx(vertebra, rel=1e-5)
    assert task(step_loss=0.5).model_spec()[1]["step_head"] and not task().model_spec()[1]["step_head"]
    # with not-found masking the step loss keeps only found samples: sample 2 drops out of both
    masked = task(step_loss=0.5, mask_not_found=True).loss(StepRecorder(logits, steps), b, g)
    vertebra_found = (bce(2.0, 1, 2) + bce(-1.0, 0, 1)) / 3
    step_found = (bce(1.0, 1, 2) + bce(-2.0, 0, 1)) / 3
    assert masked.item() == pytest.approx(vertebra_found + 0.5 * step_found, rel=1e-5)


class LeftMinusRight(nn.Module):
    """Logit = mean of the left half minus the right half: flips to minus itself in a mirror."""

    def forward(self, image, vertebra=None):
        half = image.shape[-1] // 2
        return 4 * (image[..., :half].mean(dim=(1, 2, 3, 4)) - image[..., half:].mean(dim=(1, 2, 3, 4)))


def test_flip_tta_averages_over_the_mirror_image():
    b = batch()
    b["image"][..., :2] = 1.0
    b["image"][..., 2:] = 0.0  # left bright, right dark: logit 4 for every sample
    plain = task(flip_tta=False)._probabilities(LeftMinusRight(), b)
    tta = task(flip_tta=True)._probabilities(LeftMinusRight(), b)
    torch.testing.assert_close(plain, torch.full((3,), 1 / (1 + math.exp(-4.0))))
    # (sigmoid(4) + sigmoid(-4)) / 2 = 0.5
    torch.testing.assert_close(tta, torch.full((3,), 0.5))


def test_option_values_are_checked():
    with pytest.raises(ValueError, match="slice_choice"):
        task(slice_choice="peak")
    with pytest.raises(ValueError, match="per_step"):
        task(per_step=0)
    with pytest.raises(ValueError, match="step_loss"):
        task(step_loss=-1.0)


class MaskRecorder(nn.Module):
    """Like StepRecorder, and keeps the step mask it was given (None when none was)."""

    def __init__(self, logits, steps):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.steps = nn.Parameter(torch.tensor(steps, dtype=torch.float32))
        self.mask = "never called"

    def forward(self, image, vertebra=None, mask=None, return_steps=False):
        self.mask = mask
        zero = 0 * image.mean(dim=(2, 3, 4))
        return (self.logits + zero.mean(1), self.steps + zero) if return_steps else self.logits


def test_neighbour_steps_mask_the_padding_out_of_the_model_and_the_step_loss():
    logits, steps = [2.0, -1.0, 0.5], [[1.0, -2.0], [0.0, 3.0], [-1.0, 1.0]]
    b = batch()
    b["step_mask"] = torch.tensor([[True, True], [True, False], [True, False]])
    b["step_label"] = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    b["step_known"] = torch.tensor([True, True, True])
    g = torch.Generator().manual_seed(0)
    model = MaskRecorder(logits, steps)
    loss = task(steps="neighbours", step_loss=0.5).loss(model, b, g)
    assert torch.equal(model.mask, b["step_mask"])
    vertebra = (bce(2.0, 1, 2) + bce(-1.0, 0, 1) + bce(0.5, 1, 2)) / 5
    # the real steps only: sample 0 both (targets 1, 0), samples 1 and 2 their first (0, 0)
    step = (bce(1.0, 1, 2) + bce(-2.0, 0, 1) + bce(0.0, 0, 1) + bce(-1.0, 0, 1)) / 5
    assert loss.item() == pytest.approx(vertebra + 0.5 * step, rel=1e-5)
    task(steps="neighbours")._probabilities(model, b)
    assert torch.equal(model.mask, b["step_mask"])  # prediction masks them too
    model = MaskRecorder(logits, steps)
    task()._probabilities(model, b)
    assert model.mask is None  # the thesis layout: every step is real, no mask


def test_padding_steps_do_not_change_a_real_models_prediction():
    cfg = build_config({"family": "two_stage", "backbone": "test_efficientnet",
                        "sequence": {"steps": "neighbours", "length": 4, "hidden": 8,
                                     "layers": 1}}, {})
    t = make_task("two_stage", cfg, JobData(shards_dir="", uids=[], folds={}, labels={},
                                             segmented=set()))
    torch.manual_seed(0)
    model = t.build_model().eval()
    b = {"image": torch.rand(2, 4, 3, 32, 32), "vertebra": torch.tensor([1, 5]),
         "step_mask": torch.tensor([[True, True, False, False], [True, True, True, True]]),
         "ratio": torch.ones(2, 4), "found": torch.tensor([True, True])}
    with torch.no_grad():
        before = t._probabilities(model, b)
        b["image"][0, 2:] = torch.rand(2, 3, 32, 32)  # other pixels on sample 0's padding steps
        after = t._probabilities(model, b)
        torch.testing.assert_close(after, before)
        b["image"][1, 3] = torch.rand(3, 32, 32)  # sample 1's last step is real: it counts
        assert not torch.allclose(t._probabilities(model, b)[1], after[1])


def test_the_tasks_dataset_lays_out_the_steps_as_configured():
    cfg = build_config({"family": "two_stage", "sequence": {"steps": "neighbours"},
                        "input": {"neighbour_offset": 2}}, {})
    t = make_task("two_stage", cfg, JobData(shards_dir="", uids=[], folds={}, labels={},
                                             segmented=set(), slice_tables={}))
    ds = t.dataset([])
    assert (ds.layout, ds.offset) == ("neighbours", 2)
    assert task().dataset([]).layout == "spread"


def test_balance_repeats_the_fractured_vertebrae_of_a_training_epoch_only():
    labels = {"1.1": np.array([0, 1, 0, 0, 0, 0, 0, 1], np.float32),
              "1.2": np.zeros(8, np.float32)}
    tables = {u: np.zeros((20, 11), np.float32) for u in labels}
    data = JobData(shards_dir="", uids=list(labels), folds={"1.1": 0, "1.2": 1}, labels=labels,
                   segmented=set(), slice_tables=tables)
    cfg = build_config({"family": "two_stage", "sequence": {"balance": 0.4, "step_target": "label"}}, {})
    t = make_task("two_stage", cfg, data)
    # 1 fractured of 14: k = round(0.4 * 13 / (0.6 * 1)) = 9 -> 9 of 22
    train = t.train_dataset(list(labels), epoch=0, fold=0).samples
    assert len(train) == 22 and train.count(("1.1", 1)) == 9
    assert t.dataset(list(labels)).samples == [(u, v) for u in labels for v in range(7)]
    assert t.dataset([]).step_target == "label" and task().dataset([]).step_target == "boxes"
    plain = make_task("two_stage", build_config({"family": "two_stage"}, {}), data)
    assert len(plain.train_dataset(list(labels), epoch=0, fold=0).samples) == 14


def test_neighbour_steps_need_a_neighbour_offset_and_a_known_layout():
    from cspine_ray.config import ConfigError

    with pytest.raises(ConfigError, match="neighbour_offset"):
        build_config({"family": "two_stage", "sequence": {"steps": "neighbours"},
                      "input": {"neighbour_offset": 0}}, {})
    with pytest.raises(ConfigError, match="sequence.steps"):
        build_config({"family": "two_stage", "sequence": {"steps": "neighbors"}}, {})
    assert build_config({"family": "two_stage", "sequence": {"steps": "neighbours"}},
                        {}).sequence.steps == "neighbours"


def test_mix_batch_blends_crops_ratios_and_labels_and_keeps_only_shared_steps():
    from cspine_ray.train.tasks.two_stage import mix_batch

    b = batch()
    b["image"] = torch.arange(1.0, 4.0)[:, None, None, None, None].expand(3, 2, 6, 4, 4).clone()
    b["step_label"] = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b["step_known"] = torch.tensor([True, True, False])
    b["step_mask"] = torch.tensor([[True, True], [True, False], [True, True]])
    b["found"] = torch.tensor([True, False, True])
    image, mixed = mix_batch(b["image"], b, 0.75, torch.tensor([2, 0, 1]))
    # sample 0 with 2, 1 with 0, 2 with 1; images 1, 2, 3
    assert image[:, 0, 0, 0, 0].tolist() == [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 1, 0.75 * 3 + 0.25 * 2]
    assert mixed["label"].tolist() == [1.0, 0.25, 0.75]
    torch.testing.assert_close(mixed["ratio"], torch.tensor([[0.4, 0.675], [0.425, 0.6], [0.875, 0.125]]))
    assert mixed["step_label"].tolist() == [[1.0, 0.25], [0.25, 0.0], [0.75, 0.75]]
    assert mixed["found"].tolist() == [True, False, False]
    assert mixed["step_known"].tolist() == [False, True, False]
    assert mixed["step_mask"].tolist() == [[True, True], [True, False], [True, False]]
    assert torch.equal(mixed["vertebra"], b["vertebra"])  # each sample keeps its own vertebra
    assert b["label"].tolist() == [1.0, 0.0, 1.0]         # the loader's batch untouched


def test_mixup_draws_a_major_part_and_a_partner_from_the_generator():
    from cspine_ray.train.tasks.two_stage import draw_mix

    draws = [draw_mix(5, 0.4, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(0.5 <= lam <= 1.0 for lam, _ in draws)
    assert all(sorted(p.tolist()) == [0, 1, 2, 3, 4] for _, p in draws)
    assert len({round(lam, 6) for lam, _ in draws}) == 20       # a new blend each batch
    again = draw_mix(5, 0.4, torch.Generator().manual_seed(3))
    assert again[0] == draws[3][0] and torch.equal(again[1], draws[3][1])


def test_mixup_trains_on_the_blend_with_soft_weighted_labels():
    from cspine_ray.train.tasks.two_stage import draw_mix

    logits = [2.0, -1.0, 0.5]
    b = batch()
    lam, partner = draw_mix(3, 0.4, torch.Generator().manual_seed(3))  # partners 1, 2, 0
    model = Recorder(logits)
    # augment off, so the blend is all that happens to the crops
    cfg = build_config({"family": "two_stage", "input": {"windows": ["bone", "soft"]},
                        "sequence": {"mixup": 0.4},
                        "augment": {"enabled": False}}, {})
    t = make_task("two_stage", cfg, JobData(shards_dir="", uids=[], folds={}, labels={},
                                             segmented=set()))
    loss = t.loss(model, b, torch.Generator().manual_seed(3))
    y = [1.0, 0.0, 1.0]
    soft = [lam * y[i] + (1 - lam) * y[int(partner[i])] for i in range(3)]
    assert sum(0 < s < 1 for s in soft) == 2  # two blends of a fracture and an intact vertebra
    weights = [1 + s for s in soft]  # negative 1, positive 2, in between on a blend
    expected = sum(bce(z, s, w) for z, s, w in zip(logits, soft, weights)) / sum(weights)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(model.seen, lam * b["image"] + (1 - lam) * b["image"][partner])
    assert t.model_spec() == task().model_spec()  # the model itself is unchanged
    with pytest.raises(Exception, match="sequence.mixup"):
        build_config({"family": "two_stage", "sequence": {"mixup": -1}}, {})


def test_study_batches_hold_whole_studies_in_a_seeded_order():
    from cspine_ray.datasets.sequences import study_batches

    samples = [(u, v) for u in ("1.1", "1.2", "1.3") for v in range(7)]
    batches = study_batches(samples, 16, seed=4)  # 16 // 7 = 2 studies a batch
    assert [len(b) for b in batches] == [14, 7]
    assert sorted(i for b in batches for i in b) == list(range(21))
    for b in batches:
        studies = {samples[i][0] for i in b}
        assert all(sum(samples[i][0] == u for i in b) == 7 for u in studies)
    orders = {tuple(samples[b[0]][0] for b in study_batches(samples, 7, seed=s)) for s in range(20)}
    assert len(orders) > 1 and study_batches(samples, 7, 4) == study_batches(samples, 7, 4)
    assert [len(b) for b in study_batches(samples, 3, 0)] == [7, 7, 7]  # at least one study


def test_patient_loss_trains_the_top_n_rule_on_patient_overall():
    from cspine_ray.train.tasks.two_stage import patient_log_probs

    # two studies, their vertebrae in mixed order: study 1.1 fractured (patient 1), 1.2 not
    labels = {"1.1": np.array([0, 1, 0, 0, 0, 0, 0, 1], np.float32),
              "1.2": np.zeros(8, np.float32)}
    uids = ["1.2"] * 7 + ["1.1"] * 7
    vertebrae = [6, 5, 4, 3, 2, 1, 0] + list(range(7))
    logits = [-2.0, -1.0, 0.0, 1.0, -3.0, -0.5, 0.5, 2.0, -1.5, -2.5, 0.3, -0.2, -4.0, 1.2]
    data = JobData(shards_dir="", uids=list(labels), folds={"1.1": 0, "1.2": 1}, labels=labels,
                   segmented=set())
    b = {"image": torch.rand(14, 2, 3, 4, 4), "uid": uids, "vertebra": torch.tensor(vertebrae),
         "label": torch.tensor([float(labels[u][v]) for u, v in zip(uids, vertebrae)]),
         "found": torch.ones(14, dtype=torch.bool), "ratio": torch.ones(14, 2)}

    def top_n_patient(zs, n):  # by hand: 1 - prod over the n highest of (1 - sigmoid)
        ps = sorted((1 / (1 + math.exp(-z)) for z in zs), reverse=True)[:n]
        return 1 - math.prod(1 - p for p in ps)

    for n in (7, 2):
        cfg = build_config({"family": "two_stage", "top_n": n,
                            "sequence": {"patient_loss": 0.5}}, {})
        on = make_task("two_stage", cfg, data).loss(Recorder(logits), b, torch.Generator())
        off = make_task("two_stage", build_config({"family": "two_stage", "top_n": n}, {}),
                        data).loss(Recorder(logits), b, torch.Generator())
        p_fractured, p_intact = top_n_patient(logits[7:], n), top_n_patient(logits[:7], n)
        patient = (14 * -math.log(p_fractured) + 7 * -math.log(1 - p_intact)) / (14 + 7)
        assert on.item() == pytest.approx(off.item() + 0.5 * patient, rel=1e-5), n
    # confident logits stay finite, in value and gradient
    z = torch.tensor([[-40.0] * 7, [40.0] * 7], requires_grad=True)
    log_p, log_q = patient_log_probs(z, 7)
    (log_p[0] + log_q[1] + log_p[1] + log_q[0]).backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(log_q).all() and torch.isfinite(z.grad).all()
    assert log_p[1].item() == pytest.approx(0.0, abs=1e-6) and log_q[0].item() == pytest.approx(0.0, abs=1e-6)


def test_patient_loss_batches_whole_studies_and_refuses_what_splits_them():
    from cspine_ray.config import ConfigError

    labels = {f"1.{i}": np.zeros(8, np.float32) for i in range(4)}
    tables = {u: np.zeros((20, 11), np.float32) for u in labels}
    data = JobData(shards_dir="", uids=list(labels), folds={u: 0 for u in labels}, labels=labels,
                   segmented=set(), slice_tables=tables)
    cfg = build_config({"family": "two_stage", "optim": {"batch_size": 14},
                        "input": {"loader_workers": 0}, "sequence": {"patient_loss": 1.0}}, {})
    t = make_task("two_stage", cfg, data)
    ds = t.train_dataset(list(labels), epoch=0, fold=0)
    sampler = t.loader(ds, train=True, device=torch.device("cpu"), seed=1).batch_sampler
    assert [len(b) for b in sampler] == [14, 14]
    assert all(len({ds.samples[i][0] for i in b}) == 2 for b in sampler)
    plain = task().loader(ds, train=True, device=torch.device("cpu"), seed=1)
    assert plain.batch_size == 8  # the default loader otherwise
    assert t.loader(ds, train=False, device=torch.device("cpu")).batch_size == 14
    for other in ({"balance": 0.3}, {"mixup": 0.4}):
        with pytest.raises(ConfigError, match="patient_loss"):
            build_config({"family": "two_stage", "sequence": {"patient_loss": 1.0, **other}}, {})
