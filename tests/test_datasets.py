"""Datasets over real (tiny) shards written with the preprocess shard format, and batch augmentation."""

import multiprocessing
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from cspine_ray import TARGETS
from cspine_ray.config import ConfigError, from_dict
from cspine_ray.datasets import (
    WINDOWS,
    AugmentConfig,
    ShardStore,
    SliceDataset,
    VertebraSequenceDataset,
    VolumeDataset,
    apply_windows,
    augment_batch,
    choose_slices,
    shard_slice_tables,
    slice_items,
    study_crop_box,
    study_labels,
)
from cspine_ray.datasets.sequences import balance_samples, box_to_pixels, choose_steps, step_targets
from cspine_ray.datasets.volumes import read_cube
from cspine_ray.io.errors import StudyError
from cspine_ray.preprocess.shards import commit, new_tmp_dir
from cspine_ray.preprocess.targets import cervical_boxes, vertebra_pixel_counts, vertebra_ratios

A, B, C = "1.2.3.1", "1.2.3.2", "1.2.3.3"
BORDER = 4  # air frame around every slice: shows whether a crop kept the image border


def slice_hu(z):
    """Each slice's body is a constant that encodes its index: bone window -> z / 30."""
    return -450 + 60 * z


def bone(z):
    return z / 30


def coded_volume(n, size):
    vol = np.empty((n, size, size), np.int16)
    for z in range(n):
        vol[z] = slice_hu(z)
    vol[:, :BORDER] = vol[:, -BORDER:] = vol[:, :, :BORDER] = vol[:, :, -BORDER:] = -1000
    return vol


def stacked_mask(n, size):
    """C1..C7 stacked along z (5 slices each, 2 shared with the next), each a square that
    grows then shrinks, centred in-plane: meaningful ratios and boxes."""
    mask = np.zeros((n, size, size), np.uint8)
    c = size // 2
    for k in range(7):
        for j, half in enumerate((2, 3, 5, 3, 2)):
            z = 2 + 3 * k + j
            mask[z, c - half - k // 2:c + half, c - half:c + half + k // 2] = k + 1
    return mask


def write_shard(studies, uid, volume, mask=None, fracture_boxes=()):
    tmp = new_tmp_dir(studies, uid)
    np.save(tmp / "volume.npy", volume)
    if mask is not None:
        np.save(tmp / "mask.npy", mask)
        np.save(tmp / "ratio.npy", vertebra_ratios(vertebra_pixel_counts(mask)))
        np.save(tmp / "box.npy", cervical_boxes(mask))
    meta = {"study_uid": uid, "split": "train", "spacing": [1.0, 1.0, 1.0],
            "fracture_boxes": [list(b) for b in fracture_boxes]}
    commit(tmp, studies / uid, meta)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    studies = root / "studies"
    write_shard(studies, A, coded_volume(30, 64), stacked_mask(30, 64))
    write_shard(studies, B, coded_volume(20, 48))                      # not segmented
    write_shard(studies, C, coded_volume(26, 32), stacked_mask(26, 32))
    return root


LABELS = {
    A: np.array([0, 1, 0, 0, 0, 0, 1, 1], np.float32),
    B: np.array([0, 0, 0, 0, 0, 0, 0, 0], np.float32),
    C: np.array([1, 0, 0, 0, 0, 0, 0, 1], np.float32),
}


def centre(image):
    h, w = image.shape[-2:]
    return image[..., h // 2, w // 2]


# --- windowing -------------------------------------------------------------------------------

def test_windows_map_centre_to_half_and_edges_to_0_and_1():
    centre_hu, width = WINDOWS["bone"]
    hu = np.array([centre_hu, centre_hu - width / 2, centre_hu + width / 2, -3000, 3000,
                   centre_hu + width / 4])
    out = apply_windows(hu, ["bone"])
    assert out.shape == (1, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.5, 0.0, 1.0, 0.0, 1.0, 0.75], atol=1e-6)
    two = apply_windows(torch.tensor([40.0, 240.0]), ["soft", (0.0, 100.0)])
    assert two.shape == (2, 2) and two.dtype == torch.float32
    torch.testing.assert_close(two, torch.tensor([[0.5, 1.0], [0.9, 1.0]]))
    with pytest.raises(ValueError, match="unknown window"):
        apply_windows(hu, ["bnoe"])
    with pytest.raises(ValueError, match="width"):
        apply_windows(hu, [(0.0, 0.0)])


# --- slices ----------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1, 3])
def test_neighbour_channels_are_the_right_slices_clipped_at_the_ends(shards, offset):
    items = [(A, 0), (A, 10), (A, 29)]
    ds = SliceDataset(shards, items, image_size=64, neighbour_offset=offset, windows=["bone", "soft"])
    for i, (_, z) in enumerate(items):
        image = ds[i]["image"]
        assert image.shape == (6, 64, 64) and image.dtype == torch.float32
        expected_z = np.clip([z - offset, z, z + offset], 0, 29)
        expected = np.concatenate([apply_windows(np.array([slice_hu(e) for e in expected_z], float), [w])[0]
                                   for w in ("bone", "soft")])
        np.testing.assert_allclose(centre(image).numpy(), expected, atol=1e-6)
        assert (image[:, 0, 0] == 0).all()  # the air border in the bone and soft windows


def test_slice_images_are_resized(shards):
    ds = SliceDataset(shards, [(B, 5)], image_size=24)
    sample = ds[0]
    assert sample["image"].shape == (3, 24, 24)
    np.testing.assert_allclose(centre(sample["image"]).numpy(), [bone(4), bone(5), bone(6)], atol=1e-5)


def test_slice_targets_follow_shard_and_labels(shards):
    shard = ShardStore(shards).get(A)
    items = [(A, z) for z in range(30)]
    ds = SliceDataset(shards, items, labels=LABELS, image_size=16)
    seen_c2_fracture = False
    for i, (_, z) in enumerate(items):
        s = ds[i]
        ratio = np.asarray(shard.ratio[z])
        np.testing.assert_array_equal(s["ratio"].numpy(), ratio)
        visible = (ratio > 0.5).astype(np.float32)
        np.testing.assert_array_equal(s["visible"].numpy(), visible)
        np.testing.assert_array_equal(s["fracture"].numpy(), visible * LABELS[A][:7])
        np.testing.assert_array_equal(s["label"].numpy(), LABELS[A])
        finite = np.isfinite(shard.box[z]).all()
        assert s["box_valid"] == bool(finite and visible.any())
        assert s["has_targets"] and s["uid"] == A and s["z"] == z and s["study"] == 0
        if finite:
            np.testing.assert_allclose(s["box"].numpy(), shard.box[z])
        else:
            assert (s["box"] == 0).all()  # NaN replaced, never fed to a loss
        seen_c2_fracture |= bool(s["fracture"][1] == 1)
    assert seen_c2_fracture
    assert ds[0]["fracture"].sum() == 0  # slice 0 shows no vertebra


def test_slice_targets_without_segmentation_or_from_a_table(shards):
    plain = SliceDataset(shards, [(B, 3)], image_size=16)[0]
    assert not plain["has_targets"] and not plain["box_valid"]
    assert plain["ratio"].sum() == 0 and "fracture" not in plain and "label" not in plain
    table = np.zeros((20, 11), np.float32)
    table[3, :7] = [0.0, 0.9, 0.6, 0.2, 0, 0, 0]
    table[3, 7:] = [0.2, 0.3, 0.7, 0.8]
    s = SliceDataset(shards, [(B, 3)], labels=LABELS | {B: np.array([0, 1, 1, 1, 0, 0, 0, 1])},
                     image_size=16, slice_table={B: table})[0]
    assert s["has_targets"] and s["box_valid"]
    np.testing.assert_array_equal(s["visible"].numpy(), [0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(s["fracture"].numpy(), [0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(s["box"].numpy(), [0.2, 0.3, 0.7, 0.8])
    with pytest.raises(StudyError, match="slice table has shape"):
        SliceDataset(shards, [(B, 3)], image_size=16, slice_table={B: table[:5]})[0]


def test_bad_items_raise_study_errors(shards):
    with pytest.raises(StudyError, match="out of range"):
        SliceDataset(shards, [(A, 30)], image_size=16)[0]
    with pytest.raises(StudyError, match="no shard"):
        SliceDataset(shards, [("1.2.9", 0)], image_size=16)[0]
    with pytest.raises(StudyError, match="no labels"):
        SliceDataset(shards, [(A, 0)], labels={B: LABELS[B]}, image_size=16)
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        ShardStore(shards).get("../etc")


def test_store_memory_maps_and_datasets_pickle_without_volumes(shards):
    ds = SliceDataset(shards, [(A, z) for z in range(30)], labels=LABELS, image_size=16)
    assert len(ds.store) == 0  # nothing opened in __init__
    for i in range(len(ds)):
        ds[i]
    shard = ds.store.get(A)
    assert isinstance(shard.volume, np.memmap) and isinstance(shard.ratio, np.memmap)
    assert len(ds.store) == 1
    # a memmap would pickle as a full copy (30 x 64 x 64 int16 = 245 kB); the store drops it
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    assert len(pickle.loads(blob).store) == 0
    small = ShardStore(shards, max_open=1)
    small.get(A), small.get(C)
    assert len(small) == 1


def _count_after_get(store, uid, queue):
    store.get(uid)
    queue.put(len(store))


def test_store_reopens_in_a_forked_worker(shards):
    store = ShardStore(shards)
    store.get(A), store.get(C)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_count_after_get, args=(store, B, queue))  # fork: store not pickled
    child.start()
    opened_in_child = queue.get(timeout=30)
    child.join(timeout=30)
    assert opened_in_child == 1  # the parent's maps were dropped, only B opened there
    assert len(store) == 2


def test_slice_items_all_strided_subsampled_segmented(shards):
    assert slice_items(shards, [A, B]) == [(A, z) for z in range(30)] + [(B, z) for z in range(20)]
    assert slice_items(shards, [B], stride=7) == [(B, 0), (B, 7), (B, 14)]
    assert [u for u, _ in slice_items(shards, [A, B, C], segmented_only=True)].count(B) == 0
    draw = slice_items(shards, [A, C], per_study=5, rng=7)
    assert len(draw) == 10 and draw == slice_items(shards, [A, C], per_study=5, rng=7)
    a_z = [z for u, z in draw if u == A]
    assert a_z == sorted(set(a_z)) and all(0 <= z < 30 for z in a_z)
    assert draw != slice_items(shards, [A, C], per_study=5, rng=8)
    assert len(slice_items(shards, [B], per_study=50)) == 20


def test_dataloader_with_workers(shards):
    items = slice_items(shards, [A, B, C], stride=3)
    ds = SliceDataset(shards, items, labels=LABELS, image_size=32)
    loader = DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["z"]) for b in batches) == len(items)
    first = batches[0]
    assert first["image"].shape == (8, 3, 32, 32) and first["fracture"].shape == (8, 7)
    assert first["box_valid"].dtype == torch.bool and first["uid"][0] == A
    torch.testing.assert_close(first["image"][3], ds[3]["image"])


def test_study_labels_from_manifest():
    df = pd.DataFrame({"study_uid": [A, B], **{t: [1, None] for t in TARGETS}})
    labels = study_labels(df)
    assert list(labels) == [A] and labels[A].dtype == np.float32 and labels[A].tolist() == [1.0] * 8


# --- slice choice and crop -------------------------------------------------------------------

def table_with(vertebra, values, start, n=40):
    table = np.zeros((n, 7), np.float32)
    table[start:start + len(values), vertebra] = values
    return table


def test_choose_slices_even_spacing_within_the_passing_slices():
    idx, found = choose_slices(table_with(2, [1.0] * 10, 10), 2, length=2, smooth=1)
    assert found and idx.dtype == np.int64
    assert idx.tolist() == [10, 12, 14, 15, 17, 19]


def test_choose_slices_threshold():
    table = table_with(4, [0.2, 0.4, 0.4, 0.2, 0.5, 0.1], 5)
    idx, found = choose_slices(table, 4, length=1, threshold=0.3, smooth=1)
    assert found and idx.tolist() == [6, 7, 9]
    idx, _ = choose_slices(table, 4, length=1, threshold=0.45, smooth=1)
    assert idx.tolist() == [9, 9, 9]


def test_choose_slices_duplicates_evenly_when_too_few():
    idx, found = choose_slices(table_with(0, [1.0] * 5, 20), 0, length=8, smooth=1)
    assert found and len(idx) == 24 and idx.tolist() == sorted(idx.tolist())
    counts = np.bincount(idx)[20:25]
    assert set(counts.tolist()) <= {4, 5} and counts.sum() == 24
    idx, _ = choose_slices(table_with(0, [1.0] * 3, 20), 0, length=3, smooth=1)
    assert idx.tolist() == [20, 20, 20, 21, 21, 21, 22, 22, 22]


def test_choose_slices_smoothing():
    spike = table_with(1, [1.0], 20)
    assert choose_slices(spike, 1, length=1, smooth=1) == (pytest.approx([20, 20, 20]), True)
    _, found = choose_slices(spike, 1, length=1, smooth=5)  # smoothed to 0.2 < 0.3
    assert not found
    gap = table_with(1, [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1], 10)
    idx, _ = choose_slices(gap, 1, length=11, smooth=1)
    assert 15 not in idx
    idx, _ = choose_slices(gap, 1, length=11, smooth=5)
    assert 15 in idx and idx.min() >= 9 and idx.max() <= 21


def test_choose_slices_fallback_near_the_peak():
    faint = table_with(3, [0.05, 0.1, 0.2, 0.25, 0.2, 0.1, 0.05], 12)
    idx, found = choose_slices(faint, 3, length=2, threshold=0.3, smooth=1)
    assert not found and len(idx) == 6
    assert set(idx.tolist()) == {14, 15, 16}  # the run at >= half the peak (0.125)


def test_choose_slices_fallback_to_the_anatomical_position():
    table = np.zeros((40, 7), np.float32)
    table[7:14, 0] = 1.0   # C1 seen at 7..13
    table[20:28, 5] = 1.0  # C6 seen at 20..27: cervical range 7..27, 21 slices, thirds of 3
    idx, found = choose_slices(table, 3, length=2, smooth=1)
    assert not found and set(idx.tolist()) == {16, 17, 18}
    idx, found = choose_slices(np.zeros((14, 7)), 6, length=4)  # nothing cervical: whole study
    assert not found and len(idx) == 12 and set(idx.tolist()) == {12, 13}


def test_choose_slices_always_returns_3l_indices_in_range():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        for length in (1, 4, 8):
            table = rng.random((n, 7)) * rng.choice([0.0, 0.2, 1.0])
            for v in range(7):
                idx, _ = choose_slices(table, v, length)
                assert idx.shape == (3 * length,) and idx.min() >= 0 and idx.max() < n
                assert (np.diff(idx) >= 0).all()
    with pytest.raises(ValueError):
        choose_slices(np.zeros((5, 7)), 7, 2)


def test_choose_slices_run_keeps_only_the_run_around_the_peak():
    table = table_with(2, [0.6, 0.8, 1.0, 0.7], 3)
    table[15:17, 2] = 0.5  # a false-positive run far from the vertebra
    idx, found = choose_slices(table, 2, length=2, smooth=1)
    assert found and idx.tolist() == [3, 4, 5, 6, 15, 16]  # spread: the far run takes picks
    idx, found = choose_slices(table, 2, length=2, smooth=1, choice="run")
    # the run 3..6 around the peak at 5; 4 slices for 6 picks: positions 0,0,1,2,2,3
    assert found and idx.tolist() == [3, 3, 4, 5, 5, 6]
    faint = table_with(3, [0.05, 0.1, 0.2, 0.25, 0.2, 0.1, 0.05], 12)  # not found: same fallback
    assert choose_slices(faint, 3, 2, smooth=1, choice="run")[0].tolist() == \
        choose_slices(faint, 3, 2, smooth=1)[0].tolist()
    with pytest.raises(ValueError, match="slice choice"):
        choose_slices(table, 2, 2, choice="peak")


def test_choose_slices_per_step():
    idx, found = choose_slices(table_with(2, [1.0] * 10, 10), 2, length=2, smooth=1, per_step=5)
    # 10 passing slices, 10 picks: every one of them
    assert found and idx.tolist() == list(range(10, 20))


def test_sequence_steps_of_five_slices_and_the_step_ratio(shards):
    tables = shard_slice_tables(shards, [A])
    # C4 passes 0.1 on slices 11..14: 10 picks from 4 slices, 11 11 11 12 12 | 13 13 13 14 14;
    # with one step of 5: 11 11 12 13 14 (positions 0 0 1 2 3)
    for length, steps in ((2, [[11, 11, 11, 12, 12], [13, 13, 13, 14, 14]]),
                          (1, [[11, 11, 12, 13, 14]])):
        ds = VertebraSequenceDataset(shards, [(A, 3)], tables, LABELS, length=length,
                                     crop_size=24, windows=["bone", "soft"], smooth=1,
                                     threshold=0.1, per_step=5)
        s = ds[0]
        assert ds.channels == 10 and s["image"].shape == (length, 10, 24, 24)
        assert s["indices"].numpy().reshape(length, 5).tolist() == steps
        for step, chosen in enumerate(steps):
            for c, z in enumerate(chosen):  # bone window first, then soft
                torch.testing.assert_close(s["image"][step, c], torch.full((24, 24), bone(z)))
        # the step ratio: C4's ratio at each step's middle slice (smooth=1: the table itself)
        middle = [chosen[2] for chosen in steps]
        np.testing.assert_allclose(s["ratio"].numpy(), tables[A][middle, 3], rtol=1e-6)


def test_study_crop_box():
    nan = [np.nan] * 4
    boxes = np.array([nan, [0.4, 0.4, 0.6, 0.5], [0.45, 0.42, 0.55, 0.6], [0.0, 0.0, 1.0, 1.0]])
    assert study_crop_box(boxes, [0, 0]) == (0.0, 0.0, 1.0, 1.0)
    # union of the chosen rows only (row 3 not chosen), NaN ignored, margin 10 % per side
    assert study_crop_box(boxes, [0, 1, 2, 2]) == pytest.approx((0.38, 0.38, 0.62, 0.62))
    wide = np.array([[0.2, 0.4, 0.6, 0.5]])
    assert study_crop_box(wide, [0], margin=0) == pytest.approx((0.2, 0.25, 0.6, 0.65))  # squared
    corner = np.array([[0.0, 0.0, 0.2, 0.4]])
    assert study_crop_box(corner, [0], margin=0) == pytest.approx((0.0, 0.0, 0.4, 0.4))  # shifted in
    assert study_crop_box(np.array([[0.0, 0.3, 1.0, 0.5]]), [0]) == (0.0, 0.0, 1.0, 1.0)
    assert box_to_pixels((0.38, 0.38, 0.62, 0.62), 64, 64) == (24, 40, 24, 40)
    assert box_to_pixels((0.5, 0.5, 0.5, 0.5), 10, 10) == (5, 6, 5, 6)


# --- sequences -------------------------------------------------------------------------------

# The slices `choose_slices` must pick for each vertebra of study A (stacked_mask(30, 64),
# length 4 -> 12 indices, default threshold 0.3 and smoothing 5), worked by hand:
# vertebra k (0 = C1) covers z = 2+3k .. 6+3k with squares of side 2*half + k//2, half 2, 3, 5,
# 3, 2; the next vertebra overwrites the last two slices (its side-4+ square inside the side-6+
# one at j = 3, its side-6+ square over the side-4+ one at j = 4). Pixel counts at j = 0..4:
#   k = 0: 16, 36, 100, 36-16 = 20, 0     k = 1: 16, 36, 100, 36-25 = 11, 0
#   k = 2: 25, 49, 121, 49-25 = 24, 0     k = 3: 25, 49, 121, 49-36 = 13, 0
#   k = 4: 36, 64, 144, 64-36 = 28, 0     k = 5: 36, 64, 144, 64-49 = 15, 0
#   k = 6: 49, 81, 169, 81, 49 (last vertebra: nothing overwrites it)
# ratio = count / the j = 2 count. The rolling mean over 5 slices passes 0.3 where the window
# sum passes 1.5: at j = 0 (r0 + r1 + 1, e.g. k = 1: 0.16 + 0.36 + 1 = 1.52), j = 1, 2 (+ r3)
# and j = 3 (r1 + 1 + r3) except for k = 1 (0.36 + 1 + 0.11 = 1.47); k = 0 at z = 2..5 (at
# z = 2 the window 0..4 holds 1.52); k = 6 at j = 0..4 (j = 4: 1 + 0.479 + 0.290 = 1.769,
# j = 5: 0.769). 4 passing slices spread to 12 repeat 3 times each, 3 slices 4 times, and 5 as
# i * 5 // 12 for i = 0..11 -> positions 0,0,0,1,1,2,2,2,3,3,4,4.
A_CHOSEN = {
    0: [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5],
    1: [5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7],
    2: [8, 8, 8, 9, 9, 9, 10, 10, 10, 11, 11, 11],
    3: [11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14],
    4: [14, 14, 14, 15, 15, 15, 16, 16, 16, 17, 17, 17],
    5: [17, 17, 17, 18, 18, 18, 19, 19, 19, 20, 20, 20],
    6: [20, 20, 20, 21, 21, 22, 22, 22, 23, 23, 24, 24],
}


def test_sequence_samples_are_l_steps_of_three_chosen_slices(shards):
    tables = shard_slice_tables(shards, [A, B, C])
    assert set(tables) == {A, C} and tables[A].shape == (30, 11)
    samples = [(A, v) for v in range(7)]
    ds = VertebraSequenceDataset(shards, samples, tables, LABELS, length=4, crop_size=24,
                                 windows=["bone", "soft"])
    for i, (_, v) in enumerate(samples):
        s = ds[i]
        assert s["image"].shape == (4, 6, 24, 24) and s["image"].dtype == torch.float32
        assert s["found"] and s["vertebra"] == v and float(s["label"]) == LABELS[A][v]
        idx = s["indices"].numpy()
        np.testing.assert_array_equal(idx, A_CHOSEN[v])
        for step in range(4):
            chosen = idx[3 * step:3 * step + 3]
            # the crop keeps the air border out: every pixel is its slice's code
            for c, z in enumerate(chosen):
                torch.testing.assert_close(s["image"][step, c], torch.full((24, 24), bone(z)))
            soft = apply_windows(np.array([slice_hu(z) for z in chosen], float), ["soft"])[0]
            np.testing.assert_allclose(centre(s["image"][step, 3:]).numpy(), soft, atol=1e-6)
        x0, y0, x1, y1 = s["box"].tolist()
        assert 0 < x0 < x1 < 1 and x1 - x0 == pytest.approx(y1 - y0)


def test_step_targets_mark_the_steps_holding_a_fracture_box_slice():
    indices = np.array([3, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(step_targets(indices, 3, {7}, 1.0)[0], [0, 1, 0])
    np.testing.assert_array_equal(step_targets(indices, 3, {2, 11, 40}, 1.0)[0], [0, 0, 1])
    assert step_targets(indices, 3, {7}, 1.0)[1]
    # a vertebra not fractured: no step shows a fracture, whatever the boxes (another level's)
    targets, known = step_targets(indices, 3, {7}, 0.0)
    assert known and not targets.any()
    # fractured, but the study has no boxes: its fracture may be on any step
    targets, known = step_targets(indices, 3, set(), 1.0)
    assert not known and targets.shape == (3,)
    np.testing.assert_array_equal(step_targets(indices, 1, {4, 5}, 1.0)[0], [0, 1, 1, 0, 0, 0, 0, 0, 0])


def test_step_targets_from_the_label_mark_every_step_of_a_fractured_vertebra():
    indices = np.array([3, 4, 5, 6, 7, 8])
    for boxes in (set(), {7}):  # boxed or not: the label teaches every step
        targets, known = step_targets(indices, 3, boxes, 1.0, source="label")
        assert known and targets.tolist() == [1.0, 1.0]
    targets, known = step_targets(indices, 3, {7}, 0.0, source="label")
    assert known and targets.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="step targets"):
        step_targets(indices, 3, set(), 1.0, source="slices")


def test_balanced_samples_repeat_the_fractured_vertebrae_towards_the_fraction():
    labels = {"u": np.array([1, 0, 0, 0, 0, 0, 0, 1], np.float32),
              "w": np.array([0, 0, 1, 0, 0, 0, 0, 1], np.float32)}
    samples = [(u, v) for u in ("u", "w") for v in range(7)]  # 2 fractured of 14
    # 0.3 of the epoch: k = round(0.3 * 12 / (0.7 * 2)) = round(2.57) = 3 -> 6 of 18
    out = balance_samples(samples, labels, 0.3)
    assert out == [("u", 0)] * 3 + [("u", v) for v in range(1, 7)] + [("w", 0), ("w", 1)] + \
        [("w", 2)] * 3 + [("w", v) for v in range(3, 7)]
    assert balance_samples(samples, labels, 0.1) == samples   # already 2 / 14 > 0.1
    assert balance_samples(samples, {u: labels[u] * 0 for u in labels}, 0.3) == samples
    with pytest.raises(ValueError, match="fraction"):
        balance_samples(samples, labels, 1.0)


def test_sequence_step_labels_come_from_the_shards_fracture_boxes(tmp_path, shards):
    studies = tmp_path / "studies"
    d = "1.2.3.4"
    write_shard(studies, d, coded_volume(30, 64), stacked_mask(30, 64),
                fracture_boxes=[[12.0, 0.4, 0.4, 0.6, 0.6], [12.0, 0.1, 0.1, 0.2, 0.2]])
    tables = shard_slice_tables(tmp_path, [d])
    labels = {d: np.array([0, 0, 0, 1, 0, 0, 0, 1], np.float32)}
    # C4 (as in the test above): steps 11 11 11 12 12 | 13 13 13 14 14; the box is on slice 12
    ds = VertebraSequenceDataset(tmp_path, [(d, 3), (d, 0)], tables, labels, length=2,
                                 crop_size=16, smooth=1, threshold=0.1, per_step=5)
    fractured, intact = ds[0], ds[1]
    assert fractured["step_label"].tolist() == [1.0, 0.0] and fractured["step_known"]
    assert intact["step_label"].tolist() == [0.0, 0.0] and intact["step_known"]
    # study A has no boxes: its fractured C2 has unknown steps, its intact C1 known zeros
    plain = VertebraSequenceDataset(shards, [(A, 1), (A, 0)], shard_slice_tables(shards, [A]),
                                    LABELS, length=2, crop_size=16)
    assert not plain[0]["step_known"] and plain[1]["step_known"]
    assert "step_label" not in VertebraSequenceDataset(tmp_path, [(d, 3)], tables, None,
                                                       length=2, crop_size=16)[0]


# --- neighbour steps -------------------------------------------------------------------------

def test_neighbour_steps_are_a_centre_and_its_true_neighbours():
    # C3 passes on slices 10..19: 4 centres spread over them (positions 0, 3, 6, 9)
    idx, mask, found = choose_steps(table_with(2, [1.0] * 10, 10), 2, length=4, smooth=1,
                                    layout="neighbours")
    assert found and mask.tolist() == [True] * 4 and idx.dtype == np.int64
    assert idx.reshape(4, 3).tolist() == [[9, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 20]]
    # the thesis layout on the same table: consecutive groups of its 12 spread slices
    spread_idx, spread_mask, _ = choose_steps(table_with(2, [1.0] * 10, 10), 2, length=4, smooth=1)
    assert spread_mask.all()
    assert spread_idx.tolist() == choose_slices(table_with(2, [1.0] * 10, 10), 2, 4, smooth=1)[0].tolist()
    # offset 2, five slices a step
    idx, mask, _ = choose_steps(table_with(2, [1.0] * 10, 10), 2, length=2, smooth=1, per_step=5,
                                layout="neighbours", offset=2)
    assert idx.reshape(2, 5).tolist() == [[6, 8, 10, 12, 14], [15, 17, 19, 21, 23]]


def test_a_short_vertebra_gets_fewer_real_steps_padded_at_the_end():
    # two passing slices for four steps: two real steps, then two copies of the last (masked)
    idx, mask, found = choose_steps(table_with(0, [1.0] * 2, 20), 0, length=4, smooth=1,
                                    layout="neighbours")
    assert found and mask.tolist() == [True, True, False, False]
    assert idx.reshape(4, 3).tolist() == [[19, 20, 21], [20, 21, 22], [20, 21, 22], [20, 21, 22]]
    # one passing slice: one real step
    idx, mask, _ = choose_steps(table_with(0, [1.0], 20), 0, length=3, smooth=1, layout="neighbours")
    assert mask.tolist() == [True, False, False] and idx[:3].tolist() == [19, 20, 21]


def test_neighbour_steps_stay_inside_the_study_without_repeating_a_slice():
    # C1 passes on slices 0..5 of 40: centres 0 and 5 move inward so that z - 4 >= 0
    idx, mask, _ = choose_steps(table_with(0, [1.0] * 6, 0), 0, length=2, smooth=1, per_step=5,
                                layout="neighbours", offset=2)
    assert mask.all() and idx.reshape(2, 5).tolist() == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    # C7 at the study's end
    idx, _, _ = choose_steps(table_with(6, [1.0] * 3, 37), 6, length=3, smooth=1,
                             layout="neighbours")
    assert idx.reshape(3, 3).tolist() == [[36, 37, 38], [37, 38, 39], [37, 38, 39]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k, offset, length = int(rng.integers(16, 60)), int(rng.choice([1, 3, 5])), \
            int(rng.integers(1, 3)), int(rng.integers(1, 9))
        table = np.zeros((n, 7), np.float32)
        start, size = int(rng.integers(0, n)), int(rng.integers(1, 15))
        table[start:start + size, 3] = 1.0
        idx, mask, _ = choose_steps(table, 3, length, smooth=1, per_step=k, layout="neighbours",
                                    offset=offset)
        steps = idx.reshape(length, k)
        assert ((steps >= 0) & (steps < n)).all()
        assert (np.diff(steps, axis=1) == offset).all()           # true neighbours, never repeated
        real = steps[mask, k // 2]
        assert (np.diff(real) > 0).all()                           # distinct centres, ascending
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # padding last
        assert mask.sum() == min(length, len(np.unique(np.clip(
            np.arange(start, min(start + size, n)), (k // 2) * offset, n - 1 - (k // 2) * offset))))
    with pytest.raises(ValueError, match="layout"):
        choose_steps(table, 3, 2, layout="neighbors")
    with pytest.raises(ValueError, match="offset"):
        choose_steps(table, 3, 2, layout="neighbours", offset=0)


def test_neighbour_sequence_samples_read_the_neighbour_slices(shards):
    # study A (A_CHOSEN above): C1 passes on 2..5, C2 on 5..7
    tables = shard_slice_tables(shards, [A])
    ds = VertebraSequenceDataset(shards, [(A, 0), (A, 1)], tables, LABELS, length=4,
                                 crop_size=24, layout="neighbours")
    c1, c2 = ds[0], ds[1]
    expected = {0: [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]],
                1: [[4, 5, 6], [5, 6, 7], [6, 7, 8], [6, 7, 8]]}
    for s, v in ((c1, 0), (c2, 1)):
        assert s["indices"].reshape(4, 3).tolist() == expected[v]
        for step in range(4):
            for c, z in enumerate(expected[v][step]):  # each channel is its own slice
                torch.testing.assert_close(s["image"][step, c], torch.full((24, 24), bone(z)))
        # the ratio input is the centre slice's
        assert s["ratio"].shape == (4,)
    assert c1["step_mask"].tolist() == [True] * 4 and c2["step_mask"].tolist() == [True] * 3 + [False]
    assert ds[0]["step_mask"].dtype == torch.bool
    spread = VertebraSequenceDataset(shards, [(A, 1)], tables, LABELS, length=4, crop_size=24)[0]
    assert spread["step_mask"].all() and spread["indices"].tolist() == A_CHOSEN[1]
    with pytest.raises(ValueError, match="layout"):
        VertebraSequenceDataset(shards, [(A, 1)], tables, LABELS, layout="spreads")


def test_sequence_fallback_for_an_unseen_vertebra(shards):
    table = np.zeros((20, 11), np.float32)
    table[:, 7:] = np.nan
    s = VertebraSequenceDataset(shards, [(B, 2)], {B: table}, None, length=2, crop_size=16)[0]
    assert not s["found"] and "label" not in s and s["image"].shape == (2, 3, 16, 16)
    assert s["box"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert set(s["indices"].tolist()) <= {5, 6, 7, 8}  # part 3 of 7 of 20 slices
    assert (s["image"][:, :, 0, 0] == 0).all()  # full image: the air border is in


# --- volumes ---------------------------------------------------------------------------------

def test_volume_dataset_shapes_and_labels(shards):
    ds = VolumeDataset(shards, [A, B], LABELS, cube=16, windows=["bone", "soft"])
    s = ds[1]
    assert s["image"].shape == (2, 16, 16, 16) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["uid"] == B and s["label"].tolist() == LABELS[B].tolist()
    profile = s["image"][0, :, 8, 8]
    assert (torch.diff(profile) > 0).all()  # head -> feet order kept


def test_long_volumes_are_read_strided_and_still_cover_the_study():
    vol = np.stack([np.full((8, 8), -450 + 15 * z, np.int16) for z in range(120)])  # bone: z / 120
    cube = read_cube(vol, 8, ["bone"])
    assert cube.shape == (1, 8, 8, 8)
    profile = cube[0, :, 4, 4]
    assert (torch.diff(profile) > 0).all()
    assert profile[0] < 0.1 and profile[-1] > 0.85


# --- augmentation ----------------------------------------------------------------------------

ONLY = dict(hflip_p=0.0, brightness_contrast_p=0.0, affine_p=0.0, cutout_p=0.0)


def rect_images(b, h=32, w=40):
    x = torch.zeros(b, 1, h, w)
    x[:, :, 8:16, 5:15] = 1.0
    box = torch.tensor([[5 / w, 8 / h, 15 / w, 16 / h]]).repeat(b, 1)
    return x, box


def bright_box(image, h, w):
    ys, xs = torch.nonzero(image > 0.5, as_tuple=True)
    return torch.tensor([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])


def test_augment_disabled_is_identity_and_shapes_are_kept():
    x = torch.rand(3, 2, 4, 16, 16)
    boxes = torch.rand(3, 4)
    out, out_boxes = augment_batch(x, AugmentConfig(enabled=False), boxes=boxes)
    assert torch.equal(out, x) and torch.equal(out_boxes, boxes)
    out, out_boxes = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0), boxes=boxes)
    assert out.shape == x.shape and out_boxes.shape == (3, 4) and out.dtype == torch.float32
    assert augment_batch(x[:, 0], AugmentConfig()).shape == (3, 4, 16, 16)
    with pytest.raises(ValueError):
        augment_batch(torch.rand(16, 16), AugmentConfig())


def test_hflip_flips_image_and_boxes_consistently():
    x, box = rect_images(2)
    out, moved = augment_batch(x, AugmentConfig(**ONLY | {"hflip_p": 1.0}), boxes=box)
    assert torch.equal(out, x.flip(-1))
    torch.testing.assert_close(moved[0], torch.tensor([1 - 15 / 40, 8 / 32, 1 - 5 / 40, 16 / 32]))
    torch.testing.assert_close(moved[0], bright_box(out[0, 0], 32, 40))


def test_affine_moves_boxes_with_the_image():
    x, box = rect_images(4)
    cfg = AugmentConfig(**ONLY | {"affine_p": 1.0, "rotate": 0.0, "shift": 0.1, "scale": 0.2})
    out, moved = augment_batch(x, cfg, torch.Generator().manual_seed(1), boxes=box)
    for i in range(4):
        torch.testing.assert_close(moved[i], bright_box(out[i, 0], 32, 40), atol=1.5 / 32, rtol=0)
    cfg = AugmentConfig(**ONLY | {"affine_p": 1.0, "rotate": 40.0, "hflip_p": 0.5})
    out, moved = augment_batch(x, cfg, torch.Generator().manual_seed(2), boxes=box)
    for i in range(4):  # a rotated rectangle's extreme points are its corners
        torch.testing.assert_close(moved[i], bright_box(out[i, 0], 32, 40), atol=1.5 / 32, rtol=0)
    x = torch.zeros(8, 1, 32, 40)
    x[:, :, 4:12, 2:12] = 1.0  # near the top-left corner: large shifts push it out
    box = torch.tensor([[2 / 40, 4 / 32, 12 / 40, 12 / 32]]).repeat(8, 1)
    cfg = AugmentConfig(**ONLY | {"affine_p": 1.0, "rotate": 0.0, "scale": 0.0, "shift": 0.3})
    out, moved = augment_batch(x, cfg, torch.Generator().manual_seed(4), boxes=box)
    assert (moved >= 0).all() and (moved <= 1).all()
    for i in range(8):
        torch.testing.assert_close(moved[i], bright_box(out[i, 0], 32, 40), atol=1.5 / 32, rtol=0)
    nan_box = torch.full((8, 4), float("nan"))
    assert augment_batch(x, cfg, boxes=nan_box)[1].isnan().all()


def test_rotation_is_rigid_on_non_square_images():
    x = torch.zeros(8, 1, 48, 64)
    x[:, :, 18:30, 26:38] = 1.0
    cfg = AugmentConfig(**ONLY | {"affine_p": 1.0, "rotate": 45.0, "scale": 0.0, "shift": 0.0})
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.03, atol=0)
    assert not torch.allclose(out, x)


def test_same_transform_for_all_steps_and_different_across_samples():
    one = torch.rand(1, 1, 3, 24, 24).repeat(4, 5, 1, 1, 1)  # 4 identical samples of 5 identical steps
    cfg = AugmentConfig(hflip_p=0.5, brightness_contrast_p=1.0, affine_p=1.0, cutout_p=1.0)
    out = augment_batch(one, cfg, torch.Generator().manual_seed(3))
    assert out.shape == (4, 5, 3, 24, 24)
    for i in range(4):
        for step in range(1, 5):
            assert torch.equal(out[i, step], out[i, 0])
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])


def test_augment_is_deterministic_with_a_seeded_generator():
    x = torch.rand(6, 3, 20, 20)
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.7]]).repeat(6, 1)
    cfg = AugmentConfig(brightness_contrast_p=1.0, affine_p=1.0, cutout_p=1.0)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5), boxes=boxes)
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5), boxes=boxes)
    c = augment_batch(x, cfg, torch.Generator().manual_seed(6), boxes=boxes)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_crack_keeping_moves_are_exact_whole_pixel_moves():
    x, box = rect_images(3, h=32, w=32)
    out, moved = augment_batch(x, AugmentConfig(**ONLY | {"vflip_p": 1.0}), boxes=box)
    assert torch.equal(out, x.flip(-2))
    torch.testing.assert_close(moved[0], torch.tensor([5 / 32, 1 - 16 / 32, 15 / 32, 1 - 8 / 32]))
    torch.testing.assert_close(moved[0], bright_box(out[0, 0], 32, 32))
    out, moved = augment_batch(x, AugmentConfig(**ONLY | {"transpose_p": 1.0}), boxes=box)
    assert torch.equal(out, x.transpose(-1, -2))
    torch.testing.assert_close(moved[0], torch.tensor([8 / 32, 5 / 32, 16 / 32, 15 / 32]))
    with pytest.raises(ValueError, match="square"):
        augment_batch(torch.rand(2, 1, 16, 20), AugmentConfig(transpose_p=0.5))
    # a one-pixel crack: shifted by whole pixels it keeps every pixel, exactly
    crack = torch.zeros(6, 2, 3, 24, 24)
    crack[:, :, :, 5:19, 11] = 1.0
    cfg = AugmentConfig(**ONLY | {"affine_p": 1.0, "rotate": 0.0, "scale": 0.0, "shift": 0.2,
                                  "whole_pixel_shift": True})
    out = augment_batch(crack, cfg, torch.Generator().manual_seed(0))
    moved = 0
    for i in range(6):
        ys, xs = torch.nonzero(out[i, 0, 0] > 0.5, as_tuple=True)
        dy, dx = int(ys.min()) - 5, int(xs.min()) - 11
        expected = torch.roll(crack[i], (dy, dx), dims=(-2, -1))  # nothing reaches an edge here
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
        moved += (dy, dx) != (0, 0)
    assert moved >= 4
    # the thesis's bilinear rotation smears the same crack into a shade
    rotated = augment_batch(crack, AugmentConfig(**ONLY | {"affine_p": 1.0, "rotate": 15.0,
                                                           "scale": 0.0, "shift": 0.0}),
                            torch.Generator().manual_seed(0))
    assert not ((out > 0.05) & (out < 0.95)).any()
    assert ((rotated > 0.05) & (rotated < 0.95)).sum() > 6 * 14


def test_noise_adds_gaussian_noise_of_the_set_sd_and_leaves_the_thesis_draws_alone():
    x = torch.full((4, 1, 64, 64), 0.5)
    out = augment_batch(x, AugmentConfig(**ONLY | {"noise": 0.05, "noise_p": 1.0}),
                        torch.Generator().manual_seed(0))
    assert (out - x).std().item() == pytest.approx(0.05, rel=0.05)
    assert abs((out - x).mean().item()) < 0.005
    off = augment_batch(x, AugmentConfig(**ONLY | {"noise": 0.05, "noise_p": 0.0}),
                        torch.Generator().manual_seed(0))
    assert torch.equal(off, x)
    # the later options draw after the thesis set: with them off its transforms are unchanged
    y = torch.rand(5, 2, 20, 20)
    cfg = dict(brightness_contrast_p=1.0, affine_p=1.0, cutout_p=1.0)
    plain = augment_batch(y, AugmentConfig(**cfg), torch.Generator().manual_seed(7))
    with_noise = augment_batch(y, AugmentConfig(**cfg, noise=1e-9, noise_p=1.0),
                               torch.Generator().manual_seed(7))
    torch.testing.assert_close(with_noise, plain, atol=1e-6, rtol=0)


def test_augment_config_is_checked():
    assert from_dict(AugmentConfig, {"hflip_p": 1.0, "rotate": 10}).rotate == 10.0
    with pytest.raises(ConfigError, match="hflip_p"):
        from_dict(AugmentConfig, {"hflip_p": 1.5})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(AugmentConfig, {"flip": 0.5})
    for bad in ({"vflip_p": -0.1}, {"transpose_p": 2.0}, {"noise_p": 1.5}, {"noise": -0.01}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            from_dict(AugmentConfig, bad)


def test_found_vertebrae_are_choose_slices_found_flags():
    from cspine_ray.datasets.sequences import found_vertebrae

    table = table_with(1, [0.9] * 6, 5) + table_with(4, [1.0], 20) + table_with(6, [0.2] * 8, 30)
    # by hand, smooth 5: C2's run passes; C5's one-slice spike smooths to 0.2; C7 never passes 0.3
    assert found_vertebrae(table, 0.3, 5).tolist() == [False, True, False, False, False, False, False]
    assert found_vertebrae(table, 0.3, 1).tolist() == [False, True, False, False, True, False, False]
    for smooth in (1, 5):
        assert found_vertebrae(table, 0.3, smooth).tolist() == [
            choose_slices(table, v, length=2, threshold=0.3, smooth=smooth)[1] for v in range(7)]
