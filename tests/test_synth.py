"""The synthetic RSNA-layout generator: determinism, layout, labels, storage round trips."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cspine_ray import TARGETS, VERTEBRAE
from cspine_ray.cli import main
from cspine_ray.synth import StudySpec, dataset_specs, missing_test_uid, synth_study
from cspine_ray.synth.dataset import PATIENT_PREVALENCE, VERTEBRA_PREVALENCE, write_study
from cspine_ray.synth.dicom_writer import TRANSFER_SYNTAXES
from cspine_ray.synth.phantom import LABEL

SMALL = dict(size=64, slice_spacing=3.0)
UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_dicom(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU volume head -> feet, sorted by ImagePositionPatient (not by file name)."""
    datasets = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]), reverse=True)
    hu = np.stack([ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in datasets])
    return hu, datasets


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "preview.png"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "demo"
    rc = main(["synth", str(out), "--studies", "5", "--test-studies", "1", "--seed", "3",
               "--size", "64", "--slice-spacing", "3", "--preview"])
    assert rc == 0
    return out


# ----------------------------------------------------------------------------- specs

def test_specs_follow_the_real_label_statistics():
    specs = dataset_specs(400, seed=11, n_test=0, **SMALL)
    labels = np.array([[s.targets[t] for t in TARGETS] for s in specs])
    # patient_overall is exactly "any vertebra fractured"
    assert np.array_equal(labels[:, -1], labels[:, :-1].max(axis=1))
    assert abs(labels[:, -1].mean() - PATIENT_PREVALENCE) < 0.08
    for i, v in enumerate(VERTEBRAE):
        assert abs(labels[:, i].mean() - VERTEBRA_PREVALENCE[v]) < 0.06, v
    counts = labels[labels[:, -1] == 1, :-1].sum(axis=1)
    assert 0.5 < np.mean(counts == 1) < 0.8 and np.mean(counts >= 2) > 0.2
    assert 0.15 < np.mean([s.has_segmentation for s in specs]) < 0.35
    assert 0.05 < np.mean([s.z_increases_with_instance for s in specs]) < 0.3
    assert {s.transfer_syntax for s in specs} == set(TRANSFER_SYNTAXES)
    assert {s.signed for s in specs} == {True, False}
    assert any(s.size == 96 for s in specs) and any(s.size == 64 for s in specs)
    assert all(UID.match(s.uid) for s in specs)
    assert all(s.has_boxes <= bool(s.fractured) for s in specs)
    # specs are a pure function of the arguments; another seed gives other studies
    assert dataset_specs(400, seed=11, n_test=0, **SMALL) == specs
    assert dataset_specs(400, seed=12, n_test=0, **SMALL) != specs


def test_small_datasets_still_get_a_segmentation_and_test_studies():
    specs = dataset_specs(2, seed=0, **SMALL)
    assert [s.split for s in specs] == ["train", "train", "test", "test"]
    assert any(s.has_segmentation for s in specs if s.split == "train")
    assert not any(s.has_segmentation or s.has_boxes for s in specs if s.split == "test")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        dataset_specs(3, seed=-1)
    with pytest.raises(ValueError):
        dataset_specs(3, severity="dramatic")
    with pytest.raises(ValueError):
        StudySpec(uid="1.2", index=1, seed=0, fractured=("C8",))


# ----------------------------------------------------------------------------- layout

def test_layout_is_complete(dataset: Path):
    train = _csv(dataset / "train.csv")
    assert list(train[0]) == ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    assert len(train) == 5
    for row in train:
        assert UID.match(row["StudyInstanceUID"])
        assert int(row["patient_overall"]) == max(int(row[v]) for v in VERTEBRAE)
        files = sorted((dataset / "train_images" / row["StudyInstanceUID"]).glob("*.dcm"))
        assert files and sorted(int(f.stem) for f in files) == list(range(1, len(files) + 1))
    segs = list((dataset / "segmentations").glob("*.nii"))
    assert segs and {p.name[:-4] for p in segs} <= {r["StudyInstanceUID"] for r in train}

    test_rows = _csv(dataset / "test.csv")
    assert list(test_rows[0]) == ["row_id", "StudyInstanceUID", "prediction_type"]
    listed = sorted({r["StudyInstanceUID"] for r in test_rows})
    with_images = sorted(p.name for p in (dataset / "test_images").iterdir())
    assert len(with_images) == 1 and len(listed) == 2          # one listed study has no images
    assert set(with_images) < set(listed)
    specs = dataset_specs(5, seed=3, n_test=1, **SMALL)
    assert missing_test_uid(specs) in listed and missing_test_uid(specs) not in with_images
    assert {r["row_id"] for r in test_rows} == {f"{u}_{t}" for u in listed for t in TARGETS}
    assert all(r["row_id"] == f"{r['StudyInstanceUID']}_{r['prediction_type']}" for r in test_rows)
    sub = _csv(dataset / "sample_submission.csv")
    assert list(sub[0]) == ["row_id", "fractured"]
    assert [r["row_id"] for r in sub] == [r["row_id"] for r in test_rows]
    assert all(float(r["fractured"]) == 0.5 for r in sub)
    assert (dataset / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_boxes_only_on_fractured_vertebrae_and_their_slices(dataset: Path):
    specs = {s.uid: s for s in dataset_specs(5, seed=3, n_test=1, **SMALL)}
    header = (dataset / "train_bounding_boxes.csv").read_text().splitlines()[0]
    assert header == "StudyInstanceUID,x,y,width,height,slice_number"
    rows = _csv(dataset / "train_bounding_boxes.csv")
    boxed = {r["StudyInstanceUID"] for r in rows}
    assert boxed and boxed == {u for u, s in specs.items() if s.has_boxes}
    for uid in boxed:
        spec = specs[uid]
        assert spec.split == "train" and spec.fractured
        truth = synth_study(spec)
        n = truth.hu.shape[0]
        mine = [r for r in rows if r["StudyInstanceUID"] == uid]
        assert len(mine) == len(truth.boxes)
        for r in mine:
            number = int(r["slice_number"])
            assert (dataset / "train_images" / uid / f"{number}.dcm").exists()
            z = int(np.nonzero(truth.instance_numbers == number)[0][0])
            x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
            assert 0 <= x and 0 <= y and x + w <= spec.size and y + h <= spec.size and w > 0 and h > 0
            inside = truth.labels[z, int(y):int(y + h), int(x):int(x + w)]
            assert any(LABEL[v] in inside for v in spec.fractured)
            assert 1 <= number <= n


def test_every_fracture_gets_boxes_where_its_vertebra_is():
    spec = StudySpec(uid="1.2.3", index=4, seed=0, severity="obvious", fractured=VERTEBRAE, **SMALL)
    study = synth_study(spec)
    assert {b.level for b in study.boxes} == set(VERTEBRAE)
    clean = synth_study(replace(spec, fractured=()))
    base = np.abs(study.hu.astype(float) - clean.hu)[study.labels == LABEL["T2"]].mean()
    for level in VERTEBRAE:
        boxes = [b for b in study.boxes if b.level == level]
        mask = np.zeros(study.hu.shape, dtype=bool)
        for b in boxes:
            assert (study.labels[b.z] == LABEL[level]).any()  # the vertebra is on that slice
            mask[b.z, int(b.y):int(b.y + b.height), int(b.x):int(b.x + b.width)] = True
        # an obvious fracture changes the pixels in its boxes well beyond the texture differences
        changed = np.abs(study.hu.astype(float) - clean.hu)[mask].mean()
        assert changed > 2 * base, (level, changed, base)


def test_same_seed_same_files_other_seed_other_files(dataset: Path, tmp_path: Path):
    again = tmp_path / "again"
    assert main(["synth", str(again), "--studies", "5", "--test-studies", "1", "--seed", "3",
                 "--size", "64", "--slice-spacing", "3"]) == 0
    assert _files(again) == _files(dataset)
    other = tmp_path / "other"
    assert main(["synth", str(other), "--studies", "5", "--test-studies", "1", "--seed", "4",
                 "--size", "64", "--slice-spacing", "3"]) == 0
    assert (other / "train.csv").read_bytes() != (dataset / "train.csv").read_bytes()
    first = lambda root: sorted((root / "train_images").iterdir())[0]  # noqa: E731
    a, _ = _read_dicom(first(dataset))
    b, _ = _read_dicom(first(other))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_cli_refuses_a_folder_that_is_not_empty(dataset: Path, capsys):
    assert main(["synth", str(dataset), "--studies", "1", "--size", "64"]) == 2
    assert "not an empty folder" in capsys.readouterr().out


# ----------------------------------------------------------------------------- storage round trips

STORAGE = [(ts, reversed_, signed) for ts in TRANSFER_SYNTAXES for reversed_ in (False, True)
           for signed in (False, True)]


@pytest.mark.parametrize("syntax,reversed_,signed", STORAGE,
                         ids=[f"{t.name.split()[0]}-{'rev' if r else 'fwd'}-{'s' if s else 'u'}"
                              for t, r, s in STORAGE])
def test_dicom_and_nifti_round_trip(tmp_path: Path, syntax, reversed_, signed):
    spec = StudySpec(uid="1.2.826.0.1.3680043.10.9.7", index=7, seed=9, fractured=("C2",),
                     transfer_syntax=syntax, z_increases_with_instance=reversed_, signed=signed,
                     bits_stored=16 if signed else 12, has_segmentation=True, has_boxes=True, **SMALL)
    write_study(spec, tmp_path)
    truth = synth_study(spec)
    hu, datasets = _read_dicom(tmp_path / "train_images" / spec.uid)
    assert np.array_equal(hu, truth.hu)
    assert datasets[0].file_meta.TransferSyntaxUID == syntax
    assert int(datasets[0].PixelRepresentation) == int(signed)
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert numbers == (sorted(numbers, reverse=True) if reversed_ else sorted(numbers))
    assert numbers == list(truth.instance_numbers)
    assert str(datasets[0].PatientName).startswith("SYNTH^") and datasets[0].Modality == "CT"

    img = nib.load(tmp_path / "segmentations" / f"{spec.uid}.nii")
    nii = np.asarray(img.dataobj)
    # the affine puts the head slice's first pixel where the DICOM says it is (RAS = -LPS in x, y)
    head = next(ds for ds in datasets if int(ds.InstanceNumber) == int(truth.instance_numbers[0]))
    corner = img.affine @ np.array([0, nii.shape[1] - 1, nii.shape[2] - 1, 1.0])
    lps = np.array([float(v) for v in head.ImagePositionPatient])
    assert np.allclose(corner[:3], lps * np.array([-1, -1, 1]), atol=1e-3)
    file_order = nii[:, ::-1, ::-1].transpose(2, 1, 0)       # the RSNA recipe
    if reversed_:
        file_order = file_order[::-1]                          # numbered feet -> head
    by_number = np.argsort(truth.instance_numbers)
    assert np.array_equal(file_order, truth.labels[by_number])
    cervical = (truth.labels >= 1) & (truth.labels <= 7)
    assert hu[cervical].mean() > 150


def test_storage_options_do_not_change_the_pixels():
    base = StudySpec(uid="1.2.5", index=2, seed=1, **SMALL)
    a = synth_study(base)
    b = synth_study(replace(base, z_increases_with_instance=True, signed=True, bits_stored=16,
                            transfer_syntax=TRANSFER_SYNTAXES[3]))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.hu.dtype == np.int16 and a.labels.dtype == np.uint8
    assert a.hu.min() >= -1024 and set(np.unique(a.labels)) >= set(range(0, 10))


def test_round_trip_through_the_project_readers(tmp_path: Path):
    from cspine_ray.io.dicom import read_series
    from cspine_ray.io.segmentation import load_segmentation

    for reversed_ in (False, True):
        spec = StudySpec(uid=f"1.2.826.0.1.3680043.10.9.{8 + reversed_}", index=8 + reversed_, seed=9,
                         z_increases_with_instance=reversed_, has_segmentation=True,
                         transfer_syntax=TRANSFER_SYNTAXES[2], **SMALL)
        write_study(spec, tmp_path)
        truth = synth_study(spec)
        hu, info = read_series(tmp_path / "train_images" / spec.uid)
        assert np.array_equal(hu, truth.hu)
        assert info.z_increases_with_instance == reversed_
        assert np.allclose(info.spacing, truth.spacing, atol=1e-3)
        seg = load_segmentation(tmp_path / "segmentations" / f"{spec.uid}.nii", info, hu=hu)
        assert np.array_equal(seg.labels, truth.labels)
        assert seg.bone_hu is not None and seg.bone_hu > 150


def test_the_generators_truth_lists_every_fracture_and_look_alike_it_drew(dataset: Path):
    specs = {s.uid: s for s in dataset_specs(5, seed=3, n_test=1, **SMALL)}
    rows = _csv(dataset / "synth_truth.csv")
    assert list(rows[0]) == ["StudyInstanceUID", "level", "kind", "fracture"]
    for uid, spec in specs.items():  # train and test studies
        truth = synth_study(spec)
        mine = sorted((r["level"], r["kind"], r["fracture"]) for r in rows
                      if r["StudyInstanceUID"] == uid)
        drawn = sorted([(f.level, f.kind, "1") for f in truth.fractures]
                       + [(d.level, d.kind, "0") for d in truth.distractors])
        assert mine == drawn and drawn  # every study shows a fracture or a look-alike
        assert {lv for lv, _, f in mine if f == "1"} == set(spec.fractured)


def test_writing_in_processes_gives_the_same_files(tmp_path):
    from cspine_ray.synth import write_dataset

    specs = dataset_specs(3, seed=1, n_test=1, size=48, slice_spacing=4.0, severity="obvious")

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    write_dataset(tmp_path / "one", specs)
    write_dataset(tmp_path / "two", specs, processes=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_crack_widths_can_be_drawn_in_pixels_of_the_working_resolution():
    # the pixel size comes from the study's own spacing (its field of view / its side), and a
    # study drawn 1.5x larger still gets widths in pixels of the working side (64)
    spec = StudySpec(uid="1.2.7", index=4, seed=0, severity="subtle", fractured=("C4", "C6"),
                     crack_px=(2.0, 3.0), crack_side=64, **SMALL)
    for side in (64, 96):
        study = synth_study(replace(spec, size=side))
        working_px = study.spacing[1] * side / 64
        cracks = [f for f in study.fractures if f.kind != "wedge"]  # a wedge opens no gap
        assert cracks
        for f in cracks:
            assert 2.0 * working_px - 0.01 <= f.gap_mm <= 3.0 * working_px + 0.01, (side, f)
    default = synth_study(replace(spec, crack_px=None, crack_side=0))
    assert all(0.8 <= f.gap_mm <= 1.2 for f in default.fractures if f.kind != "wedge")
    obvious = synth_study(replace(spec, severity="obvious", crack_px=(1.0, 1.0)))
    assert all(abs(f.gap_mm - obvious.spacing[1]) < 0.01 for f in obvious.fractures
               if f.kind != "wedge")
    assert [s.crack_px for s in dataset_specs(3, n_test=0, size=64, crack_px=(1, 3))] == [(1.0, 3.0)] * 3
    assert {s.crack_side for s in dataset_specs(3, n_test=0, size=64, crack_px=(1, 3))} == {64}
    with pytest.raises(ValueError, match="crack widths"):
        replace(spec, crack_px=(3.0, 1.0))


def test_wider_cracks_change_more_of_the_vertebra():
    spec = StudySpec(uid="1.2.8", index=5, seed=2, severity="obvious", fractured=("C5",), **SMALL)
    clean = synth_study(replace(spec, fractured=()))
    inside = clean.labels == LABEL["C5"]

    def changed(lo_hi) -> int:
        study = synth_study(replace(spec, crack_px=lo_hi, crack_side=64))
        return int((np.abs(study.hu.astype(float) - clean.hu)[inside] > 150).sum())

    thin, wide = changed((0.5, 0.5)), changed((3.0, 3.0))
    assert wide > 2 * thin > 0, (thin, wide)
