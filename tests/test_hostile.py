"""Issue 12's corpus: hostile and broken inputs mixed with good studies, through the real pipeline.

Done when the run ends with its manifest written; every good study's shard is bit-identical to
a clean run holding only the good studies; every bad input is either a failed study with its
reason or a kept study whose bad annotation was dropped with a warning; and no file name that
could be a patient's reaches the manifest, the shard folder or the driver's log.
The corpus is built here (`corpus_specs`, `break_studies`); `benchmarks/hostile.py` builds it
several times over (other sizes, slice spacings and shifts) and counts the outcomes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import RLELossless

from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.pipeline import run_preprocess
from cspine_ray.synth import dataset_specs, write_dataset
from test_io_segmentation import fitted, shifted_along_z

PATIENT, OTHER_PATIENT = "DOE^JOHN_19011231", "ROE^JANE_19020202"

# benign variants of a good study: each must give exactly the clean study's shard
GOOD = ("plain", "segmented", "boxed", "folder_linked_inside_root", "no_extension", "patient_named")
# (status, words of the reason or warning) for each hostile input
BAD = {
    "dangling_symlink": ("ok", "broken symlink"),
    "symlink_loop": ("ok", "broken symlink"),
    "file_linked_outside_root": ("ok", "skipped 1 file(s) that link outside the data root"),
    "folder_linked_outside_root": ("failed", "links outside the data root; refused"),
    "slope_zero": ("failed", "RescaleSlope 0 is outside"),
    "slope_nan": ("failed", "RescaleSlope nan is outside"),
    "slope_huge": ("failed", "RescaleSlope 1e+30 is outside"),
    "spacing_zero": ("failed", "PixelSpacing 0 is outside"),
    "spacing_negative": ("failed", "PixelSpacing -0.5 is outside"),
    "rle_bomb": ("ok", "declared image size 65535x65535 exceeds 4096"),
    "box_outside_image": ("ok", "does not lie inside the"),
    "box_reversed": ("ok", "width='-12.0' must be a finite number > 0"),
    "seg_shifted": ("ok", "is misaligned"),
    "seg_foreign": ("ok", "segmentation dropped"),
    "seg_label_200": ("ok", "holds label 200, above the highest allowed 19"),
    "seg_all_zero": ("ok", "holds none of the checked labels"),
    "seg_wrong_shape": ("ok", "does not match the series"),
    "one_slice": ("failed", "too short to hold the cervical spine: 1 slice(s)"),
    "two_slices": ("failed", "too short to hold the cervical spine: 2 slice(s)"),
    "same_position": ("failed", "too short to hold the cervical spine: 1 slice(s)"),
}
SEGMENTED = {"segmented", "seg_shifted", "seg_foreign", "seg_label_200", "seg_all_zero", "seg_wrong_shape"}
BOXED = {"boxed", "box_outside_image", "box_reversed"}


def corpus_specs(seed: int = 12, size: int = 48, slice_spacing: float = 4.0) -> dict[str, object]:
    """One small generated study per case: name -> StudySpec (UIDs differ by seed)."""
    names = GOOD + tuple(BAD)
    specs = dataset_specs(len(names), seed=seed, n_test=0, size=size, slice_spacing=slice_spacing,
                          severity="obvious")
    out = {}
    for name, spec in zip(names, specs):
        boxed = name in BOXED
        out[name] = dataclasses.replace(
            spec, size=size, z_increases_with_instance=False, has_segmentation=name in SEGMENTED,
            fractured=("C2",) if boxed else spec.fractured, has_boxes=boxed)
    return out


def slices_of(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda p: int(p.name.split(".")[0]))


def rewrite_headers(folder: Path, keyword: str, value) -> None:
    """Every slice's header gets `value`, written raw as a broken scanner would write it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that no valid DS holds NaN: the point
        for path in folder.iterdir():
            ds = pydicom.dcmread(path)
            ds.add_new(pydicom.datadict.tag_for_keyword(keyword), "DS", value)
            ds.save_as(path)


def rle_bomb(path: Path) -> None:
    """The slice re-encoded as RLE whose header declares 65535x65535 pixels (8 GiB decoded)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 65535
    ds.save_as(path)


def replace_segmentation(root: Path, uid: str, change) -> None:
    path = root / "segmentations" / f"{uid}.nii"
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).copy()
    nib.save(nib.Nifti1Image(change(data).astype(np.uint8), image.affine), path)


def rewrite_boxes(root: Path, uid: str, **values) -> None:
    path = root / "train_bounding_boxes.csv"
    table = pd.read_csv(path, dtype=str)
    assert (table["StudyInstanceUID"] == uid).any(), "the boxed study has no boxes to break"
    for column, value in values.items():
        table.loc[table["StudyInstanceUID"] == uid, column] = value
    table.to_csv(path, index=False)


def break_studies(root: Path, outside: Path, uid: dict[str, str], size: int = 48,
                  shift: int = 5) -> None:
    """Turn each case's study into its hostile (or benign) variant, in place. `outside` is a
    folder beside the root; `size` the studies' pixels per side; `shift` the slices the shifted
    segmentation moves."""
    images = root / "train_images"
    folder = {name: images / u for name, u in uid.items()}
    outside.mkdir(exist_ok=True)

    (root / "store").mkdir(exist_ok=True)  # a study folder reached through a link that stays in the root
    shutil.move(folder["folder_linked_inside_root"], root / "store")
    folder["folder_linked_inside_root"].symlink_to(root / "store" / uid["folder_linked_inside_root"])
    for path in folder["no_extension"].iterdir():
        path.rename(path.with_suffix(""))
    slices_of(folder["patient_named"])[3].rename(folder["patient_named"] / f"{PATIENT}.dcm")
    (folder["patient_named"] / f"{OTHER_PATIENT}.dcm").write_text("not a DICOM file")

    (folder["dangling_symlink"] / "gone.dcm").symlink_to(outside / "never-there.dcm")
    (folder["symlink_loop"] / "loop.dcm").symlink_to(folder["symlink_loop"] / "loop.dcm")
    middle = slices_of(folder["file_linked_outside_root"])[10]
    shutil.move(middle, outside / middle.name)
    middle.symlink_to(outside / middle.name)
    shutil.move(folder["folder_linked_outside_root"], outside)
    folder["folder_linked_outside_root"].symlink_to(outside / uid["folder_linked_outside_root"])

    rewrite_headers(folder["slope_zero"], "RescaleSlope", "0")
    rewrite_headers(folder["slope_nan"], "RescaleSlope", "NaN")
    rewrite_headers(folder["slope_huge"], "RescaleSlope", "1e30")
    rewrite_headers(folder["spacing_zero"], "PixelSpacing", ["0", "0.5"])
    rewrite_headers(folder["spacing_negative"], "PixelSpacing", ["-0.5", "-0.5"])
    rle_bomb(slices_of(folder["rle_bomb"])[10])
    for path in slices_of(folder["one_slice"])[1:]:
        path.unlink()
    for path in slices_of(folder["two_slices"])[2:]:
        path.unlink()
    first = pydicom.dcmread(slices_of(folder["same_position"])[0]).ImagePositionPatient
    rewrite_headers(folder["same_position"], "ImagePositionPatient", [str(v) for v in first])

    rewrite_boxes(root, uid["box_outside_image"], x=f"{size - 8}.0", width="20.0")  # past the edge
    rewrite_boxes(root, uid["box_reversed"], width="-12.0")                 # x1 < x0

    own = root / "segmentations"
    replace_segmentation(root, uid["seg_shifted"], lambda d: shifted_along_z(d, shift))
    donor = np.asanyarray(nib.load(own / f"{uid['segmented']}.nii").dataobj)
    replace_segmentation(root, uid["seg_foreign"], lambda d: fitted(donor, d.shape))
    replace_segmentation(root, uid["seg_label_200"], lambda d: np.where(d == 3, 200, d))
    replace_segmentation(root, uid["seg_all_zero"], np.zeros_like)
    replace_segmentation(root, uid["seg_wrong_shape"], lambda d: d[:, :, 3:])


def shard_bytes(shards: Path, uid: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((shards / "studies" / uid).glob("*.npy"))}


@pytest.mark.slow
def test_hostile_corpus_fails_or_warns_and_leaves_good_studies_bit_identical(
        tmp_path, ray_local, caplog):
    specs = corpus_specs()
    uid = {name: spec.uid for name, spec in specs.items()}
    clean_root, root = tmp_path / "clean", tmp_path / "rsna"
    write_dataset(clean_root, [specs[name] for name in GOOD])
    write_dataset(root, list(specs.values()))
    for folder in (clean_root, root):  # train studies only: no test.csv row without images
        (folder / "test.csv").unlink()
    break_studies(root, tmp_path / "outside", uid)
    cfg = PreprocessConfig(size=48, n_folds=2)
    clean = run_preprocess(clean_root, tmp_path / "clean-shards", cfg).set_index("study_uid")
    with caplog.at_level(logging.INFO):
        manifest = run_preprocess(root, tmp_path / "shards", cfg)
    assert (tmp_path / "shards" / "manifest.parquet").is_file()
    rows = manifest.set_index("study_uid")
    assert len(rows) == len(specs)  # no study lost, none added

    for name in GOOD:
        row = rows.loc[uid[name]]
        assert row["status"] == "ok", (name, row["reason"])
        assert clean.loc[uid[name], "status"] == "ok"
        same = shard_bytes(tmp_path / "shards", uid[name]) == shard_bytes(tmp_path / "clean-shards", uid[name])
        assert same, f"{name}: shard differs from the clean run's"
        assert row["checksum"] == clean.loc[uid[name], "checksum"], name
        assert (row["has_segmentation"], row["n_fracture_boxes"] > 0) == (name == "segmented", name == "boxed")
    for name in ("plain", "segmented", "boxed", "folder_linked_inside_root", "no_extension"):
        assert rows.loc[uid[name], "warnings"] == "", (name, rows.loc[uid[name], "warnings"])
    assert "file #" in rows.loc[uid["patient_named"], "warnings"]  # the junk file, by its place

    for name, (status, words) in BAD.items():
        row = rows.loc[uid[name]]
        said = row["reason"] if status == "failed" else row["warnings"]
        assert row["status"] == status, (name, row["status"], row["reason"], row["warnings"])
        assert words in said, (name, said)
        if status == "ok":  # the study and its fracture labels stay
            targets = specs[name].targets
            assert {t: int(row[t]) for t in targets} == targets, name
    for name in BAD:
        if name.startswith("seg_"):
            row = rows.loc[uid[name]]
            assert not row["has_segmentation"]
            assert f"study {uid[name]}: segmentation dropped" in row["warnings"]
        if name.startswith("box_"):
            row = rows.loc[uid[name]]
            assert row["n_fracture_boxes"] == 0 and f"study {uid[name]}:" in row["warnings"]
            assert row["C2"] == 1 and row["patient_overall"] == 1
    assert rows.loc[uid["seg_shifted"], "fold"] >= 0  # still trains, without the mask

    # no file name that could be a patient's, anywhere the run wrote or logged
    written = [manifest.astype(str).to_csv(), caplog.text]
    written += [p.read_text() for p in (tmp_path / "shards").rglob("*.json")]
    for text in written:
        for part in ("DOE", "JOHN", "19011231", "ROE", "JANE", "never-there"):
            assert part not in text


@pytest.mark.parametrize("content, words", [
    ("StudyInstanceUID,patient_overall,C1\n1.2,0,0\n".encode("utf-16-le"), "holds NUL bytes"),
    (b"StudyInstanceUID,patient_overall\n1.2,0\n", "missing columns C1, C2"),
    (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
])
def test_preprocess_cli_says_which_file_is_unreadable_in_one_line(tmp_path, content, words):
    root = tmp_path / "rsna"
    root.mkdir()
    (root / "train.csv").write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "cspine_ray.preprocess", "--data", str(root),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"python -m cspine_ray.preprocess: error: {root / 'train.csv'}: ")
    assert words in lines[0]
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_train_cli_refuses_a_bad_setting_in_one_line_naming_it(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("family: two_stage\nsequence: {step_loss: -1.0}\n")
    result = subprocess.run([sys.executable, "-m", "cspine_ray.train", "--config", str(config),
                             "--shards", str(tmp_path / "none")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m cspine_ray.train: error: ")
    assert "sequence.step_loss must be >= 0" in lines[0]


def test_an_unexpected_error_quoting_a_file_name_is_recorded_without_it(tmp_path, monkeypatch, caplog):
    from cspine_ray.preprocess import study

    def broken(*args, **kwargs):  # a reader bug whose error quotes the file it was reading
        raise PermissionError(13, "Permission denied", f"/data/train_images/1.2.3/{PATIENT}.dcm")

    monkeypatch.setattr(study, "build_shard", broken)
    (tmp_path / "studies").mkdir()
    item = study.StudyItem(study_uid="1.2.3", split="train", image_dir=str(tmp_path / "none"))
    with caplog.at_level(logging.DEBUG):
        row = study.process_study(item, PreprocessConfig(size=32), str(tmp_path))
    assert row.status == "failed" and row.reason == "unexpected PermissionError: Permission denied"
    assert "DOE" not in caplog.text
    assert "broken" in caplog.text  # the stack of the bug is still logged
    assert "DOE" not in (tmp_path / "studies" / "1.2.3.failed.json").read_text()
