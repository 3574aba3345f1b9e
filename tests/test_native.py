"""The shards' native-resolution level: written from the same decode as the shard-size volume,
exact against the generator's HU in every transfer syntax, read by stage 2 and the 2D families
(never by stage 1), keyed where it changes a result, off for models from before it."""

from __future__ import annotations

import dataclasses
import json
import argparse

import numpy as np
import pytest

from cspine_ray.config import digest
from cspine_ray.datasets import SliceDataset, VertebraSequenceDataset
from cspine_ray.predict.inputs import load_preprocess_config
from cspine_ray.preprocess import cli as preprocess_cli
from cspine_ray.preprocess import shards
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.resample import resize_slices
from cspine_ray.preprocess.shards import open_shard, study_path
from cspine_ray.preprocess.study import StudyItem, build_shard, source_fingerprint
from cspine_ray.synth import dataset_specs, synth_study, write_study
from cspine_ray.synth.dicom_writer import TRANSFER_SYNTAXES
from cspine_ray.train.config import build_config
from cspine_ray.train.tasks import JobData, make_task


def test_native_side_and_settings():
    cfg = PreprocessConfig()  # 256 px shards, a native level of 512 for studies at least that large
    assert [cfg.native_side(s) for s in [(512, 512), (768, 768), (384, 384), (256, 256), (600, 400)]] \
        == [512, 512, 0, 0, 512]
    assert PreprocessConfig(native_size=0).native_side((512, 512)) == 0
    for bad in (256, 100, 4096):  # not finer than the shards, or absurd
        with pytest.raises(ValueError, match="native_size"):
            PreprocessConfig(native_size=bad)
    # shards without a native level keep the hash they had before it existed
    assert PreprocessConfig(native_size=0).shard_hash() == digest(
        {"size": 256, "min_region_pixels": 8, "min_bone_hu": 150.0})
    assert PreprocessConfig().shard_hash() != PreprocessConfig(native_size=0).shard_hash()
    assert PreprocessConfig(native_size=384).shard_hash() != PreprocessConfig().shard_hash()


def _build(spec, root, cfg, out):
    item = StudyItem(study_uid=spec.uid, split="train", image_dir=str(root / "train_images" / spec.uid))
    final = study_path(out, spec.uid)
    final.parent.mkdir(parents=True, exist_ok=True)
    meta = build_shard(item, cfg, final, source_fingerprint(item))
    return meta, open_shard(final)


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda s: s.name)
def test_native_level_is_the_full_resolution_hu_and_leaves_the_shard_volume_as_it_was(tmp_path, syntax):
    spec = dataclasses.replace(dataset_specs(1, seed=3, n_test=0, size=64, slice_spacing=4.0)[0],
                               size=64, transfer_syntax=syntax, has_segmentation=False)
    write_study(spec, tmp_path)
    truth = synth_study(spec).hu
    meta, shard = _build(spec, tmp_path, PreprocessConfig(size=32, native_size=64), tmp_path / "a")
    # the source is 64 px: its native level is the generator's HU itself, bit for bit
    assert shard.native.shape == truth.shape and shard.native.dtype == np.int16
    np.testing.assert_array_equal(np.asarray(shard.native), truth)
    # the shard-size volume is what a build without the native level writes (one decode gives
    # both: for JPEG 2000 the reduced decode is not used then, yet the pixels are the same)
    _, plain = _build(spec, tmp_path, PreprocessConfig(size=32, native_size=0), tmp_path / "b")
    assert plain.native is None
    np.testing.assert_array_equal(np.asarray(shard.volume), np.asarray(plain.volume))
    assert meta["native"]["side"] == 64
    np.testing.assert_allclose(meta["native"]["spacing"][1:], [s / 2 for s in meta["spacing"][1:]])
    assert "native" in meta["arrays"] and meta["nbytes"]["native"] == shard.native.nbytes + 128
    # the checksum covers the native level: a flipped byte there is caught on --verify
    assert shards.reusable_meta(shard.path, meta["shard_hash"], meta["source_fingerprint"], verify=True)
    with open(shard.path / "native.npy", "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert shards.reusable_meta(shard.path, meta["shard_hash"], meta["source_fingerprint"], verify=True) is None


def test_a_source_finer_than_native_size_is_resized_to_it(tmp_path):
    spec = dataclasses.replace(dataset_specs(1, seed=4, n_test=0, size=48, slice_spacing=4.0)[0],
                               size=48, has_segmentation=False)
    write_study(spec, tmp_path)
    meta, shard = _build(spec, tmp_path, PreprocessConfig(size=16, native_size=32), tmp_path / "s")
    np.testing.assert_array_equal(np.asarray(shard.native), resize_slices(synth_study(spec).hu, 32))
    assert meta["native"]["side"] == 32
    # a source no finer than the shards gets no native level at all
    meta, shard = _build(spec, tmp_path, PreprocessConfig(size=48, native_size=96), tmp_path / "t")
    assert shard.native is None and meta["native"] is None and "native" not in meta["arrays"]


# ----------------------------------------------------------------------------- readers

BRIGHT, DARK = 3000, -1000  # beyond both ends of the bone window: exactly 1 and 0


def hand_shard(root, uid, native: bool):
    """20 slices; the 16 px volume all dark; the 32 px native level bright in its top-left
    quadrant: whatever a reader shows bright came from the native level."""
    tmp = shards.new_tmp_dir(root / shards.STUDIES, uid)
    np.save(tmp / "volume.npy", np.full((20, 16, 16), DARK, np.int16))
    if native:
        fine = np.full((20, 32, 32), DARK, np.int16)
        fine[:, :16, :16] = BRIGHT
        np.save(tmp / "native.npy", fine)
    shards.commit(tmp, shards.study_path(root, uid), {"study_uid": uid, "spacing": [1, 1, 1]})


def table() -> np.ndarray:
    """C1 on slices 5..14, its box the top-left quadrant (x0, y0, x1, y1)."""
    t = np.zeros((20, 11), np.float32)
    t[5:15, 0] = 1.0
    t[:, 7:] = np.nan
    t[5:15, 7:] = [0.0, 0.0, 0.5, 0.5]
    return t


def test_stage2_crops_come_from_the_native_level_where_the_shard_has_one(tmp_path):
    hand_shard(tmp_path, "1.1", native=True)
    hand_shard(tmp_path, "1.2", native=False)
    tables = {"1.1": table(), "1.2": table()}

    def crops(uid, native):
        ds = VertebraSequenceDataset(tmp_path, [(uid, 0)], tables, length=2, crop_size=8,
                                     margin=0.0, native=native)
        return ds[0]["image"]

    assert crops("1.1", native=True).shape == (2, 3, 8, 8)
    assert (crops("1.1", native=True) == 1.0).all()    # the bright quadrant, 16 native px -> 8
    assert (crops("1.1", native=False) == 0.0).all()   # the shard-size volume
    assert (crops("1.2", native=True) == 0.0).all()    # no native level: the volume


def test_2d_slices_come_from_the_native_level(tmp_path):
    hand_shard(tmp_path, "1.1", native=True)
    for native, left in ((True, 1.0), (False, 0.0)):
        image = SliceDataset(tmp_path, [("1.1", 10)], image_size=8, native=native)[0]["image"]
        assert image.shape == (3, 8, 8)
        assert float(image[:, 0, 0].min()) == left and float(image[:, -1, -1].max()) == 0.0


def test_which_tasks_read_the_native_level():
    data = JobData(shards_dir="", uids=[], folds={}, labels={}, segmented=set())
    tables = {"1.1": table()}
    for native in (True, False):
        cfg = build_config({"family": "two_stage", "input": {"native": native}}, {})
        assert make_task("two_stage", cfg, data).dataset([], slice_tables=tables).native is native
        for family in ("single_head", "multi_head"):
            task = make_task(family, build_config({"family": family, "input": {"native": native}}, {}), data)
            assert task.dataset([], slice_table=tables).native is native
        # stage 1 keeps its small view whatever the family's input says
        assert make_task("locator", cfg, data).dataset([]).native is False


def test_the_native_setting_is_keyed_for_the_families_that_read_it():
    def keys(family, native):
        c = build_config({"family": family, "input": {"native": native}}, {})
        return c.training_key("0123456789abcdef"), c.stage1_key("0123456789abcdef")

    for family in ("two_stage", "single_head", "multi_head"):
        assert keys(family, True)[0] != keys(family, False)[0], family
    for family in ("two_stage", "single_head", "multi_head", "cnn3d"):
        assert keys(family, True)[1] == keys(family, False)[1], family  # stage 1 never reads it
    assert keys("cnn3d", True) == keys("cnn3d", False)  # nor the 3D CNN


def test_models_from_before_the_native_level_predict_without_one(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": {"size": 256, "n_folds": 5}, "shard_format": 4}))
    assert load_preprocess_config(old).native_size == 0
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"config": {"size": 256, "native_size": 384}, "shard_format": 5}))
    assert load_preprocess_config(new).native_size == 384


def test_preprocess_cli_takes_the_native_size():
    parser = argparse.ArgumentParser()
    preprocess_cli.add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--native-size", "0"])
    assert preprocess_cli.config_from_args(args).native_size == 0
    assert preprocess_cli.config_from_args(parser.parse_args(["--data", "d", "--out", "o"])).native_size == 512
