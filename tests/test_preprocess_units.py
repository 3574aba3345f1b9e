"""Pure-logic pieces of preprocessing: targets, folds, resampling, shard commit and reuse."""

import json

import numpy as np
import pandas as pd
import pytest

from cspine_ray import VERTEBRAE
from cspine_ray.config import ConfigError, from_dict
from cspine_ray.preprocess import shards
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.folds import assign_folds
from cspine_ray.preprocess.manifest import COLUMNS, manifest_hash, read_manifest, write_manifest
from cspine_ray.preprocess.resample import nearest_indices, resize_labels, resize_slices
from cspine_ray.preprocess.targets import (
    cervical_boxes,
    fracture_boxes,
    vertebra_pixel_counts,
    vertebra_ratios,
)


def test_ratios_are_counts_over_the_study_maximum():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, :2, :2] = 1  # C1: 4 px
    labels[1, :1, :2] = 1  # C1: 2 px
    labels[1, 3, :] = 2    # C2: 4 px
    labels[2, 3, :2] = 2   # C2: 2 px
    labels[2, 0, 0] = 9    # T2 is ignored
    counts = vertebra_pixel_counts(labels)
    assert counts[:, 0].tolist() == [4, 2, 0]
    assert counts[:, 1].tolist() == [0, 4, 2]
    ratio = vertebra_ratios(counts)
    np.testing.assert_allclose(ratio[:, 0], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(ratio[:, 1], [0.0, 1.0, 0.5])
    assert (ratio[:, 2:] == 0).all()


def test_boxes_union_regions_and_drop_specks():
    labels = np.zeros((2, 10, 20), np.uint8)
    labels[0, 2:5, 4:8] = 3       # 12 px region
    labels[0, 6:9, 10:14] = 4     # 12 px region, separate
    labels[0, 0, 19] = 5          # 1 px speck: dropped
    labels[1, 8, 0] = 12          # thoracic only: no cervical box
    boxes = cervical_boxes(labels, min_region_pixels=4)
    np.testing.assert_allclose(boxes[0], [4 / 20, 2 / 10, 14 / 20, 9 / 10])
    assert np.isnan(boxes[1]).all()


def test_fracture_boxes_map_instance_numbers_to_canonical_index():
    boxes, warnings = fracture_boxes(
        ((10.0, 20.0, 30.0, 40.0, 7), (0.0, 0.0, 5.0, 5.0, 99)),
        instance_numbers=(9, 8, 7, 6),
        shape=(100, 200),
    )
    assert boxes == [[2.0, 0.05, 0.2, 0.2, 0.6]]
    assert "slice 99" in warnings[0]


def test_resize_keeps_hu_and_labels():
    flat = np.full((2, 64, 64), 300, np.int16)
    out = resize_slices(flat, 32)
    assert out.shape == (2, 32, 32) and out.dtype == np.int16 and (out == 300).all()
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, 4:, 4:] = 7
    small = resize_labels(labels, 4)
    assert set(np.unique(small)) == {0, 7} and small[0, 3, 3] == 7 and small[0, 0, 0] == 0
    assert nearest_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert nearest_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]


def _studies(n, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"study_uid": [f"1.2.{i}" for i in range(n)]})
    for v in VERTEBRAE:
        df[v] = (rng.random(n) < 0.15).astype(int)
    df["patient_overall"] = df[list(VERTEBRAE)].max(axis=1)
    df["has_segmentation"] = rng.random(n) < 0.25
    return df


def test_folds_deterministic_balanced_and_order_independent():
    df = _studies(200)
    folds = assign_folds(df, 5, seed=1)
    assert folds.value_counts().tolist() == [40] * 5
    shuffled = df.sample(frac=1, random_state=3)
    assert (assign_folds(shuffled, 5, seed=1).loc[df.index] == folds).all()
    pos = df.assign(fold=folds).groupby("fold")["patient_overall"].sum()
    assert pos.max() - pos.min() <= 1
    seg = df.assign(fold=folds).groupby("fold")["has_segmentation"].sum()
    assert seg.max() - seg.min() <= 1
    assert not (assign_folds(df, 5, seed=2) == folds).all()


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="size"):
        from_dict(PreprocessConfig, {"size": 4})
    with pytest.raises(ConfigError, match="unknown key sise"):
        from_dict(PreprocessConfig, {"sise": 128})
    assert PreprocessConfig(size=128).shard_hash() != PreprocessConfig().shard_hash()
    assert PreprocessConfig(n_folds=3).shard_hash() == PreprocessConfig().shard_hash()


def test_shard_commit_is_atomic_and_checked(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    final = studies / "1.2.3"
    tmp = shards.new_tmp_dir(studies, "1.2.3")
    np.save(tmp / "volume.npy", np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    assert not final.exists()  # nothing visible before commit
    shards.commit(tmp, final, {"study_uid": "1.2.3", "spacing": [1, 1, 1], "shard_hash": "h",
                               "source_fingerprint": "f"})
    shard = shards.open_shard(final)
    assert shard.volume.shape == (2, 3, 4) and isinstance(shard.volume, np.memmap)
    assert shard.mask is None and shard.uid == "1.2.3"
    assert shards.reusable_meta(final, "h", "f", verify=True) is not None
    assert shards.reusable_meta(final, "other", "f") is None
    assert shards.reusable_meta(final, "h", "changed") is None
    # corruption of the same size is caught by verify, a truncation even without it
    data = bytearray((final / "volume.npy").read_bytes())
    data[-1] ^= 0xFF
    (final / "volume.npy").write_bytes(bytes(data))
    assert shards.reusable_meta(final, "h", "f", verify=True) is None
    (final / "volume.npy").write_bytes(bytes(data[:-2]))
    assert shards.reusable_meta(final, "h", "f") is None
    # leftovers of an interrupted run are swept
    shards.new_tmp_dir(studies, "1.2.4")
    assert shards.remove_stale_tmp(studies) == 1
    assert [p.name for p in studies.iterdir()] == ["1.2.3"]


def test_manifest_round_trip_and_hash(tmp_path):
    df = _studies(4)
    for c in COLUMNS:
        if c not in df:
            df[c] = 0
    df["split"] = "train"
    df["status"] = "ok"
    df["reason"] = df["shard"] = df["checksum"] = df["warnings"] = ""
    write_manifest(df, tmp_path)
    back = read_manifest(tmp_path)
    assert list(back.columns) == COLUMNS and len(back) == 4
    assert manifest_hash(back) == manifest_hash(df.sample(frac=1, random_state=0))
    df.loc[0, "fold"] = 3
    assert manifest_hash(df) != manifest_hash(back)
    with pytest.raises(FileNotFoundError, match="preprocess"):
        read_manifest(tmp_path / "nothing")


def _manifest_rows():
    """Three studies as the pipeline records them, typed as it types them, out of order, with
    one column the manifest does not keep ("reused")."""
    targets = {"C1": [0, 1, 0], "C2": [0, 0, 0], "C3": [0, 1, 0], "C4": [0, 0, 0],
               "C5": [0, 0, 0], "C6": [0, 0, 0], "C7": [0, 0, 1], "patient_overall": [0, 1, 1]}
    return pd.DataFrame({
        "study_uid": ["1.2.9", "1.2.10", "1.2.5"],
        "split": ["train", "test", "train"],
        "status": ["ok", "ok", "failed"],
        "reason": ["", "", "no pixel data"],
        "shard": ["studies/1.2.9", "studies/1.2.10", ""],
        "n_slices": [120, 80, 0],
        "height": [256, 256, 0],
        "width": [256, 256, 0],
        "spacing_z": [1.0, 0.625, np.nan],
        "spacing_y": [0.5, 0.4, np.nan],
        "spacing_x": [0.5, 0.4, np.nan],
        **targets,
        "has_segmentation": [True, False, False],
        "n_fracture_boxes": [0, 3, 0],
        "fold": [2, -1, 0],
        "checksum": ["ab12", "cd34", ""],
        "warnings": ["", "slice 7 duplicated", ""],
        "reused": [False, True, False],
    })


def test_manifest_keeps_every_column_value_and_type(tmp_path):
    df = _manifest_rows()
    write_manifest(df, tmp_path)
    back = read_manifest(tmp_path)
    # exactly the manifest columns, every one of them, in order; the extra column is dropped
    assert list(back.columns) == COLUMNS and "reused" not in back.columns
    expected_columns = ["study_uid", "split", "status", "reason", "shard", "n_slices", "height",
                        "width", "spacing_z", "spacing_y", "spacing_x", "C1", "C2", "C3", "C4",
                        "C5", "C6", "C7", "patient_overall", "has_segmentation",
                        "n_fracture_boxes", "fold", "checksum", "warnings"]
    assert COLUMNS == expected_columns
    # rows sorted by (split, study_uid): "test" before "train", "1.2.5" before "1.2.9"
    assert back["study_uid"].tolist() == ["1.2.10", "1.2.5", "1.2.9"]
    assert back["split"].tolist() == ["test", "train", "train"]
    # every value survives: the input rows, in the hand-sorted order, less the extra column
    expected = df.drop(columns="reused").iloc[[1, 2, 0]].reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_exact=True)
    assert back.loc[0, "warnings"] == "slice 7 duplicated" and back.loc[0, "fold"] == -1
    assert back.loc[1, "reason"] == "no pixel data" and np.isnan(back.loc[1, "spacing_z"])
    # and every type: numbers stay numbers (no column turned into strings), flags stay bool
    for c in ("n_slices", "height", "width", "n_fracture_boxes", "fold", "C1", "patient_overall"):
        assert back[c].dtype == np.int64, c
    for c in ("spacing_z", "spacing_y", "spacing_x"):
        assert back[c].dtype == np.float64, c
    assert back["has_segmentation"].dtype == np.bool_
    for c in ("study_uid", "split", "status", "reason", "shard", "checksum", "warnings"):
        assert all(isinstance(v, str) for v in back[c]), c


@pytest.mark.parametrize("column", ["fold", "checksum", "patient_overall"])
def test_read_manifest_refuses_a_file_missing_a_column_and_names_it(tmp_path, column):
    df = _manifest_rows()
    df[[c for c in COLUMNS if c != column]].to_parquet(tmp_path / "manifest.parquet", index=False)
    with pytest.raises(ValueError, match=rf"manifest\.parquet: not a cspine-ray manifest "
                                         rf"\(missing columns \['{column}'\]\)"):
        read_manifest(tmp_path)


# --- one output folder, one set of shard settings --------------------------------------------

def test_check_settings_refuses_other_shard_settings_in_the_same_folder(tmp_path):
    from cspine_ray.preprocess.pipeline import SETTINGS, check_settings

    out = tmp_path / "shards-64"
    out.mkdir()
    source = tmp_path / "rsna"
    check_settings(out, PreprocessConfig(size=64), source)
    recorded = (out / SETTINGS).read_bytes()
    settings = json.loads(recorded)
    assert settings["config"]["size"] == 64 and settings["source"] == str(source)

    with pytest.raises(ValueError) as refused:
        check_settings(out, PreprocessConfig(size=128), source)
    message = str(refused.value)
    assert str(out) in message and "other settings" in message
    assert "'size': 128" in message  # what was asked for, so the user can pick another --out
    assert (out / SETTINGS).read_bytes() == recorded  # the folder still says size 64
    assert [p.name for p in out.iterdir()] == [SETTINGS]  # no temp file left behind

    # the same shard settings pass (folds are not a shard setting), and the record stays 64 px
    check_settings(out, PreprocessConfig(size=64), source)
    check_settings(out, PreprocessConfig(size=64, n_folds=3), source)
    assert json.loads((out / SETTINGS).read_text())["config"]["size"] == 64
    # a fresh folder takes any settings
    other = tmp_path / "shards-128"
    other.mkdir()
    check_settings(other, PreprocessConfig(size=128), source)
    assert json.loads((other / SETTINGS).read_text())["config"]["size"] == 128
