"""Stage 1's per-vertebra boxes and what stage 2 makes of them (issue 29, items 1-2): the boxes
from a mask, the wide slice table, the locator's outputs, loss and box IoU, the vertebra crop
and the box channel. Expected values by hand from hand-built masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_TRAIN
from cspine_ray.datasets import ShardStore, SliceDataset, VertebraSequenceDataset, augment_batch
from cspine_ray.datasets.augment import AugmentConfig
from cspine_ray.datasets.sequences import box_plane, box_to_pixels
from cspine_ray.datasets.tables import shard_slice_table, split_table
from cspine_ray.io.errors import StudyError
from cspine_ray.preprocess.targets import vertebra_boxes
from cspine_ray.train.config import build_config
from cspine_ray.train.tasks import JobData, make_task
from cspine_ray.train.tasks.locator import mean_box_iou
from test_datasets import coded_volume, write_shard

UID = "1.2.826.0.1.3680043.8.498.77"
EDGE = "1.2.826.0.1.3680043.8.498.78"  # C3 only grazes slice 7: 10 of its 70 pixels


def side_by_side_mask(n: int = 20, size: int = 64) -> np.ndarray:
    """Vertebra k (0 = C1) on slices 2k .. 2k+3 (two shared with the next), a 10 x 7 px block at
    rows 20:30, columns 5 + 7k : 12 + 7k: neighbours side by side, so the C1-C7 union of a
    vertebra's slices is wider than the vertebra."""
    mask = np.zeros((n, size, size), np.uint8)
    for k in range(7):
        mask[2 * k:2 * k + 4, 20:30, 5 + 7 * k:12 + 7 * k] = k + 1
    return mask


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shard(root / "studies", UID, coded_volume(20, 64), side_by_side_mask())
    grazed = side_by_side_mask()
    grazed[7, 20:30, 19:26] = 0
    grazed[7, 20:22, 19:24] = 3
    write_shard(root / "studies", EDGE, coded_volume(20, 64), grazed)
    return root


def test_each_vertebras_box_comes_from_its_own_regions():
    mask = side_by_side_mask()
    mask[4, 60:62, 60:62] = 3  # a stray 4-pixel C3 region: below the 8 pixels a region needs
    boxes = vertebra_boxes(mask)
    assert boxes.shape == (20, 7, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[4, 2], np.array([19, 20, 26, 30]) / 64)  # C3, stray ignored
    np.testing.assert_allclose(boxes[4, 1], np.array([12, 20, 19, 30]) / 64)  # C2 beside it
    assert np.isnan(boxes[4, [0, 3, 4, 5, 6]]).all()       # not on slice 4
    assert np.isnan(boxes[19]).all()                        # no vertebra on the last slice


def test_a_wide_slice_table_holds_the_vertebrae_boxes_after_the_thesis_columns(shards):
    store = ShardStore(shards)
    plain = shard_slice_table(store, UID)
    wide = shard_slice_table(store, UID, vertebra_boxes=True)
    assert plain.shape == (20, 11) and wide.shape == (20, 39)
    np.testing.assert_array_equal(wide[:, :11], plain)
    ratio, box, own = split_table(wide)
    np.testing.assert_allclose(own[6, 3], np.array([26, 20, 33, 30]) / 64)    # C4 on slice 6
    np.testing.assert_allclose(box[6], np.array([19, 20, 33, 30]) / 64)       # C3 + C4 there
    assert split_table(plain)[2] is None


def test_mean_box_iou_by_hand():
    predicted = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]], float)
    truth = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [np.nan] * 4])
    # 1 / 7 (overlap 1 of 4 + 4 - 1) and 1; the third has no true box
    assert mean_box_iou(predicted, truth, np.array([True, True, True])) == pytest.approx((1 / 7 + 1) / 2)
    assert mean_box_iou(predicted, truth, np.array([True, False, True])) == pytest.approx(1 / 7)
    assert math.isnan(mean_box_iou(predicted, truth, np.array([False, False, True])))


def test_slice_samples_carry_the_vertebrae_boxes_where_they_are_shown(shards):
    ds = SliceDataset(shards, [(UID, 5)], image_size=16, vertebra_boxes=True)
    s = ds[0]
    # slice 5 shows C2 (slices 2-5) and C3 (4-7), each wholly: ratio 1
    np.testing.assert_array_equal(s["vertebra_box_valid"].numpy(), [0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(s["vertebra_box"][1].numpy(), np.array([12, 20, 19, 30]) / 64)
    assert float(s["vertebra_box"][0].abs().sum()) == 0.0   # unknown: zeros, never NaN
    assert "vertebra_box" not in SliceDataset(shards, [(UID, 5)], image_size=16)[0]
    # a vertebra barely shown (ratio 10 / 70) has a box, but the box loss skips it as the
    # C1-C7 box's does
    grazed = SliceDataset(shards, [(EDGE, 7)], image_size=16, vertebra_boxes=True)[0]
    np.testing.assert_allclose(grazed["vertebra_box"][2].numpy(), np.array([19, 20, 24, 22]) / 64)
    np.testing.assert_array_equal(grazed["vertebra_box_valid"].numpy(), [0, 0, 0, 1, 0, 0, 0])


def test_the_locator_learns_each_shown_vertebras_box(shards):
    cfg = build_config({**TINY_TRAIN, "family": "two_stage"},
                       {"stage1.vertebra_boxes": True, "augment.enabled": False})
    task = make_task("locator", cfg, JobData(str(shards), [UID], {UID: 0}, {}, {UID}))
    batch = next(iter(torch.utils.data.DataLoader(
        SliceDataset(shards, [(UID, 5), (UID, 19)], image_size=16, vertebra_boxes=True), batch_size=2)))

    class Zeros(nn.Module):  # every logit 0: every box coordinate 0.5
        def forward(self, image):
            return torch.zeros(len(image), 39, requires_grad=True)

    loss = task.loss(Zeros(), batch, torch.Generator())
    ratio_term = F.binary_cross_entropy_with_logits(torch.zeros(2, 7), batch["ratio"])
    union = np.abs(0.5 - np.array([12, 20, 26, 30]) / 64).mean()          # slice 5: C2 and C3
    own = np.abs(0.5 - np.array([12, 20, 19, 30, 19, 20, 26, 30]) / 64).mean()  # C2 and C3
    assert loss.item() == pytest.approx(float(ratio_term) + union + own, rel=1e-5)


def test_the_vertebra_crop_frames_the_judged_vertebra_and_the_plane_marks_its_box(shards):
    tables = {UID: shard_slice_table(ShardStore(shards), UID, vertebra_boxes=True)}

    def sample(**options):
        return VertebraSequenceDataset(shards, [(UID, 2)], tables, length=2, crop_size=22,
                                       smooth=1, margin=0.0, **options)[0]

    # C3: columns 19:26, rows 20:30 on slices 4-7; the square crop grows the 7 columns to 10
    # about their middle (22.5): 17.5 .. 27.5
    tight = sample(crop="vertebra")
    torch.testing.assert_close(tight["box"], torch.tensor([17.5, 20, 27.5, 30]) / 64)
    study = sample()  # the C1-C7 union of those slices: C2's and C4's columns too, 12:33
    torch.testing.assert_close(study["box"], torch.tensor([12, 14.5, 33, 35.5]) / 64)
    marked = sample(crop="vertebra", box_channel=True)
    assert marked["image"].shape == (2, 4, 22, 22)   # 3 slices and the box plane per step
    torch.testing.assert_close(marked["image"][:, :3], tight["image"])
    # the crop's pixels 17:28 x 20:30 resized to 22: column j's centre 17 + (j + 0.5) / 2 lies
    # in C3's columns [19, 26) for j = 4 .. 17; every row's centre lies in its rows
    expected = torch.zeros(22, 22)
    expected[:, 4:18] = 1.0
    for step in range(2):
        torch.testing.assert_close(marked["image"][step, 3], expected)


def test_box_plane_by_hand():
    crop = box_to_pixels((0.25, 0.25, 0.75, 0.75), 8, 8)   # pixels 2:6 both ways
    plane = box_plane(np.array([0.375, 0.5, 0.75, 0.625]), 8, 8, crop, 4)  # pixels x 3:6, y 4:5
    expected = np.zeros((4, 4), np.float32)
    expected[2, 1:4] = 1.0
    np.testing.assert_array_equal(plane, expected)
    assert not box_plane(np.array([np.nan, 0, 1, 1]), 8, 8, crop, 4).any()


def test_a_vertebra_crop_without_vertebra_boxes_is_refused(shards):
    narrow = {UID: shard_slice_table(ShardStore(shards), UID)}
    with pytest.raises(StudyError, match="per-vertebra boxes"):
        VertebraSequenceDataset(shards, [(UID, 2)], narrow, length=2, crop_size=8, box_channel=True)[0]
    with pytest.raises(ValueError, match="stage1.vertebra_boxes"):
        build_config({"family": "two_stage"}, {"sequence.crop": "vertebra"})
    with pytest.raises(ValueError, match="sequence.crop must be one of"):
        build_config({"family": "two_stage"}, {"sequence.crop": "tight", "stage1.vertebra_boxes": True})
    cfg = build_config({"family": "two_stage"}, {"sequence.box_channel": True,
                                                 "stage1.vertebra_boxes": True})
    assert cfg.sequence.in_chans(1) == 4


def test_augmentation_moves_a_fixed_plane_with_the_crop_and_keeps_its_values():
    cfg = AugmentConfig(hflip_p=1.0, brightness_contrast_p=1.0, affine_p=0.0, cutout_p=1.0,
                        cutout_size=0.5, noise=0.2, noise_p=1.0)
    image = torch.rand(2, 3, 3, 8, 8) * 0.5 + 0.25     # (B, L, C, H, W): channel 2 the plane
    image[:, :, 2] = 0.0
    image[:, :, 2, 2:5, 1:3] = 1.0
    out = augment_batch(image, cfg, torch.Generator().manual_seed(0), fixed_channels=1)
    torch.testing.assert_close(out[:, :, 2], image[:, :, 2].flip(-1))  # flipped, values kept
    assert not torch.allclose(out[:, :, :2], image[:, :, :2].flip(-1))  # the slices do change
    # several boxes a sample move together: x0, x1 -> 1 - x1, 1 - x0
    boxes = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]] * 2)
    _, moved = augment_batch(image, AugmentConfig(hflip_p=1.0, brightness_contrast_p=0.0,
                                                  affine_p=0.0, cutout_p=0.0), boxes=boxes)
    torch.testing.assert_close(moved[0], torch.tensor([[0.7, 0.2, 0.9, 0.4], [0.3, 0.6, 0.5, 0.8]]))
