"""Preprocessing end to end on generated studies with Ray Data: shards, faults, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pydicom
import pytest

from cspine_ray import TARGETS
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.manifest import read_manifest
from cspine_ray.preprocess.pipeline import run_preprocess
from cspine_ray.preprocess.resample import resize_labels, resize_slices
from cspine_ray.preprocess.shards import SHARD_FORMAT, open_shard
from cspine_ray.preprocess.targets import vertebra_pixel_counts, vertebra_ratios
from cspine_ray.synth import synth_study, write_dataset

pytestmark = pytest.mark.slow


def test_shards_hold_exactly_what_the_generator_wrote(tiny_shards, tiny_specs):
    manifest = read_manifest(tiny_shards).set_index("study_uid")
    assert {s.z_increases_with_instance for s in tiny_specs} == {False, True}  # both directions
    assert len({s.transfer_syntax for s in tiny_specs}) >= 4
    assert any(s.size > 64 for s in tiny_specs)  # a study with a native level
    for spec in tiny_specs:
        row = manifest.loc[spec.uid]
        assert row["status"] == "ok", row["reason"]
        truth = synth_study(spec)
        shard = open_shard(tiny_shards / row["shard"])
        # same reader-independent resampling of the true HU: equal only if decoding, HU,
        # slice order and direction are all exactly right
        np.testing.assert_array_equal(np.asarray(shard.volume), resize_slices(truth.hu, 64))
        # the 1.5x studies (96 px) keep their own pixels in the native level; 64 px ones have none
        if spec.size > 64:
            np.testing.assert_array_equal(np.asarray(shard.native), truth.hu)
        else:
            assert shard.native is None
        if spec.split == "train":
            assert {t: int(row[t]) for t in TARGETS} == spec.targets
            assert row["fold"] in (0, 1)
            assert row["n_fracture_boxes"] == (len(truth.boxes) if spec.has_boxes else 0)
        else:
            assert row["fold"] == -1 and row["patient_overall"] == -1
        assert bool(row["has_segmentation"]) == spec.has_segmentation
        if spec.has_segmentation:
            np.testing.assert_array_equal(np.asarray(shard.mask), resize_labels(truth.labels, 64))
            np.testing.assert_allclose(shard.ratio, vertebra_ratios(vertebra_pixel_counts(truth.labels)))
    # the test.csv study without images is recorded, not lost
    missing = manifest[manifest["status"] == "failed"]
    assert len(missing) == 1 and "test.csv" in missing["reason"].iloc[0]
    assert missing["split"].iloc[0] == "test"


def _write_slice_like(source: Path, target: Path, rows: int, cols: int) -> None:
    """Rewrite one slice at another size (uncompressed), as a scanner mixing matrices would."""
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array
    yi = np.linspace(0, pixels.shape[0] - 1, rows).astype(int)
    xi = np.linspace(0, pixels.shape[1] - 1, cols).astype(int)
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.ascontiguousarray(pixels[np.ix_(yi, xi)]).tobytes()
    ds.save_as(target, enforce_file_format=True)


@pytest.fixture(scope="module")
def broken_layout(tmp_path_factory, tiny_specs) -> tuple[Path, dict[str, str]]:
    """Five good studies plus one of each fault, and bad rows in the CSVs."""
    root = tmp_path_factory.mktemp("broken") / "rsna"
    train = [s for s in tiny_specs if s.split == "train"]
    write_dataset(root, train[:10])
    images = root / "train_images"
    uid = [s.uid for s in train[:10]]
    expect = {}

    files = sorted((images / uid[0]).glob("*.dcm"), key=lambda p: int(p.stem))
    files[3].write_bytes(files[3].read_bytes()[:-200])              # truncated file
    expect[uid[0]] = "truncated"
    for f in (images / uid[1]).glob("*.dcm"):                         # only text files
        f.write_text("not a DICOM file\n")
    expect[uid[1]] = "DICOM"
    for f in sorted((images / uid[3]).glob("*.dcm"))[:3]:             # a second series mixed in
        shutil.copy(f, images / uid[2] / f"9{f.name}")
    expect[uid[2]] = "series"
    middle = sorted((images / uid[3]).glob("*.dcm"), key=lambda p: int(p.stem))
    middle[len(middle) // 2].unlink()                                 # a missing slice
    expect[uid[3]] = "gap"
    sized = sorted((images / uid[4]).glob("*.dcm"), key=lambda p: int(p.stem))
    _write_slice_like(sized[5], sized[5], 40, 40)                     # one slice of another size
    expect[uid[4]] = "resized"
    for f in (images / uid[5]).glob("*.dcm"):                         # an empty folder
        f.unlink()
    expect[uid[5]] = "has no files"

    # a dangling symlink and a symlink loop beside good slices: the study is read all the same
    (images / uid[8] / "dangling.dcm").symlink_to("/nonexistent/gone.dcm")
    (images / uid[8] / "loop.dcm").symlink_to(images / uid[8] / "loop.dcm")

    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[table["StudyInstanceUID"] == uid[6], "C3"] = "2"        # not 0/1
    expect[uid[6]] = "C3"
    hostile = table.iloc[[7]].copy()
    hostile["StudyInstanceUID"] = "../x"                              # a path escape
    table = pd.concat([table, hostile])
    expect["../x"] = "invalid StudyInstanceUID"
    expect[uid[8]] = "skipped"  # last: the links' study
    table.to_csv(root / "train.csv", index=False)
    return root, expect


def test_broken_studies_are_recorded_and_the_rest_go_on(broken_layout, tmp_path, ray_local,
                                                      monkeypatch):
    root, expect = broken_layout
    # the driver parses no study file (on a cluster it runs on the head, with AWS rights):
    # headers, pixels and segmentations are read in Ray tasks, in other processes
    parsed_here = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parsed_here.append(a) or 1 / 0)
    monkeypatch.setattr(nibabel, "load", lambda *a, **k: parsed_here.append(a) or 1 / 0)
    manifest = run_preprocess(root, tmp_path / "shards", PreprocessConfig(size=64, n_folds=2))
    assert parsed_here == []
    rows = manifest.set_index("study_uid")
    text = (rows["reason"] + " " + rows["warnings"]).to_dict()
    for uid, needle in expect.items():
        assert uid in rows.index, f"{uid} was lost"
        assert needle.lower() in text[uid].lower(), f"{uid}: {text[uid]!r} lacks {needle!r}"
    failed = set(rows.index[rows["status"] == "failed"])
    assert failed >= {list(expect)[1], list(expect)[5], list(expect)[6], "../x"}
    # the readable ones (some with warnings) and the untouched ones are sharded
    good = set(rows.index) - failed
    assert len(good) >= 6 and list(expect)[-1] in good  # the study with the broken links
    assert (rows.loc[sorted(good), "shard"] != "").all()
    assert not (tmp_path / "shards" / "studies" / ".." / "x").exists()


def _snapshot(shards: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (shards / "studies").glob("*/meta.json")}


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_dataset, tmp_path, ray_local):
    cfg = PreprocessConfig(size=64, n_folds=2)
    reference = run_preprocess(tiny_dataset, tmp_path / "reference", cfg)

    out = tmp_path / "resumed"
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "cspine_ray.preprocess", "--data", str(tiny_dataset), "--out", str(out),
         "--size", "64", "--folds", "2", "--address", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(_snapshot(out)) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _snapshot(out)
    assert 1 <= len(done_before) < len(reference), "the kill should land mid-run"
    assert not (out / "manifest.parquet").exists()

    resumed = run_preprocess(tiny_dataset, out, cfg)
    after = _snapshot(out)
    # finished shards were reused, not recomputed
    assert all(after[uid] == mtime for uid, mtime in done_before.items())
    key = ["study_uid", "status", "checksum", "fold", *TARGETS]
    pd.testing.assert_frame_equal(resumed[key].reset_index(drop=True), reference[key].reset_index(drop=True))
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".tmp")]
    meta = json.loads((out / "preprocess.json").read_text())
    assert meta["config"]["size"] == 64 and meta["shard_format"] == SHARD_FORMAT
