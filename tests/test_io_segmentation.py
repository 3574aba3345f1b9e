"""Segmentation loader: the real TotalSegmentator example (rows flipped against the DICOM) and
synthetic NIfTI files written in the RSNA convention and in other layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cspine_ray.io.dicom import SeriesInfo, read_series
from cspine_ray.io.errors import StudyError
from cspine_ray.io.segmentation import load_segmentation, mean_hu_inside

EXAMPLE = Path("../shared/data/real_ct/totalseg_example")
VERTEBRAE_T11_T12 = (32, 33)  # TotalSegmentator v2 ids


@pytest.fixture(scope="module")
def example():
    volume, info = read_series(EXAMPLE / "example_ct_dicom")
    return volume, info


# ----------------------------------------------------------------------------- real example


def test_real_example_aligned_on_bone(example):
    volume, info = example
    seg = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=VERTEBRAE_T11_T12)
    assert seg.labels.dtype == np.uint8 and seg.labels.shape == volume.shape
    assert seg.orientation == "rsna" and seg.warnings == ()
    assert seg.bone_hu == pytest.approx(274, abs=5)
    assert mean_hu_inside(seg.labels, volume, VERTEBRAE_T11_T12) == pytest.approx(seg.bone_hu)
    # the check matters: without the row flip the vertebrae would sit on soft tissue/air
    assert mean_hu_inside(seg.labels[:, ::-1, :], volume, VERTEBRAE_T11_T12) == pytest.approx(-294, abs=5)


def test_real_example_checked_on_resized_volume(example):
    volume, info = example
    full = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=VERTEBRAE_T11_T12)
    small = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume[:, ::2, ::2],
                              check_labels=VERTEBRAE_T11_T12)
    assert small.orientation == full.orientation
    assert small.bone_hu == pytest.approx(full.bone_hu, abs=15)
    np.testing.assert_array_equal(small.labels, full.labels)  # labels stay at the series size


def test_real_example_without_hu_uses_rsna_recipe(example):
    volume, info = example
    checked = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=VERTEBRAE_T11_T12)
    unchecked = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info)
    assert unchecked.orientation == "rsna" and unchecked.bone_hu is None
    np.testing.assert_array_equal(unchecked.labels, checked.labels)


def test_real_example_with_rows_already_flipped_is_detected(example, tmp_path):
    volume, info = example
    image = nib.load(EXAMPLE / "example_seg_dicom.nii.gz")
    flipped = np.asanyarray(image.dataobj)[:, ::-1, :]  # NIfTI y flipped: the recipe now lands off bone
    path = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), image.affine), path)
    seg = load_segmentation(path, info, volume, check_labels=VERTEBRAE_T11_T12)
    assert seg.orientation == "rsna+flip_rows" and seg.bone_hu == pytest.approx(274, abs=5)
    assert "orientation rsna+flip_rows chosen" in seg.warnings[0] and seg.warnings[0].startswith("study ")
    reference = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=VERTEBRAE_T11_T12)
    np.testing.assert_array_equal(seg.labels, reference.labels)


def test_real_example_soft_tissue_label_is_not_bone(example):
    volume, info = example
    with pytest.raises(StudyError, match=r"does not sit on bone in any orientation: mean HU inside labels \[5\] "
                                         r"below 150"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=(5,))  # liver


def test_real_example_shape_and_label_errors(example):
    volume, info = example
    shorter = dataclasses.replace(info, files=info.files[:19])
    with pytest.raises(StudyError, match=r"study example_ct_dicom: segmentation example_seg_dicom\.nii\.gz shape "
                                         r"\(512, 512, 20\) does not match the series \(19 slices of 512x512\)"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", shorter)
    with pytest.raises(StudyError, match=r"holds none of the checked labels \[2, 3, 4\]"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=(4, 3, 2))  # absent ids
    with pytest.raises(StudyError, match=r"HU volume shape \(19, 512, 512\)"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume[:19], check_labels=VERTEBRAE_T11_T12)


# ----------------------------------------------------------------------------- synthetic layouts


def series_info(slices: int, shape: tuple[int, int], z_increases: bool) -> SeriesInfo:
    """Only the geometry load_segmentation reads; the files are never opened."""
    return SeriesInfo(study="1.2.826.9", files=tuple(Path(f"{i}.dcm") for i in range(slices)),
                      instance_numbers=tuple(range(1, slices + 1)), z_positions=tuple(-float(i) for i in range(slices)),
                      shape=shape, spacing=(1.0, 1.0, 1.0), z_increases_with_instance=z_increases, warnings=())


def canonical_case() -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric vertebra blocks on bone (800 HU) in air (-1000 HU); shape (6, 20, 24)."""
    labels = np.zeros((6, 20, 24), dtype=np.uint8)
    labels[0:2, 2:6, 3:7] = 1
    labels[2:4, 12:16, 14:19] = 2
    labels[5, 17:19, 20:23] = 9  # a thoracic label, not checked
    hu = np.where(labels > 0, 800, -1000).astype(np.int16)
    return labels, hu


def save_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4)), path)
    return path


@pytest.mark.parametrize("z_increases", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_rsna_convention_both_directions(tmp_path, z_increases, dtype):
    labels, hu = canonical_case()
    by_instance = labels[::-1] if z_increases else labels  # the stack sorted by file number
    nii = by_instance.transpose(2, 1, 0)[:, ::-1, ::-1]  # inverse of nii[:, ::-1, ::-1].transpose(2, 1, 0)
    path = save_nifti(tmp_path / "seg.nii", nii.astype(dtype))
    info = series_info(6, (20, 24), z_increases)
    for given in (None, hu):
        seg = load_segmentation(path, info, given)
        assert seg.orientation == "rsna"
        assert seg.labels.dtype == np.uint8
        np.testing.assert_array_equal(seg.labels, labels)
    assert seg.bone_hu == 800.0


def test_plain_xyz_nifti_is_found(tmp_path):
    labels, hu = canonical_case()
    path = save_nifti(tmp_path / "xyz.nii.gz", labels.transpose(2, 1, 0))  # (x, y, z) as stored, no flips
    seg = load_segmentation(path, series_info(6, (20, 24), False), hu)
    assert seg.orientation == "rsna+flip_z+flip_rows"
    np.testing.assert_array_equal(seg.labels, labels)
    # unchecked, the recipe is applied as documented (and is wrong here)
    unchecked = load_segmentation(path, series_info(6, (20, 24), False))
    assert unchecked.orientation == "rsna" and not np.array_equal(unchecked.labels, labels)


def test_stack_ordered_nifti_is_found(tmp_path):
    labels, hu = canonical_case()
    path = save_nifti(tmp_path / "zyx.nii.gz", labels[:, :, ::-1])  # (slice, row, col), columns mirrored
    seg = load_segmentation(path, series_info(6, (20, 24), False), hu)
    assert seg.orientation == "zyx+flip_cols"
    np.testing.assert_array_equal(seg.labels, labels)
    with pytest.raises(StudyError, match=r"does not fit the RSNA layout; pass the HU volume"):
        load_segmentation(path, series_info(6, (20, 24), False))


def test_min_bone_hu_is_configurable(tmp_path):
    labels, hu = canonical_case()
    path = save_nifti(tmp_path / "seg.nii", labels.transpose(2, 1, 0)[:, ::-1, ::-1])
    info = series_info(6, (20, 24), False)
    soft = np.where(labels > 0, 100, -1000).astype(np.int16)
    with pytest.raises(StudyError, match=r"study 1\.2\.826\.9: .* below 150 in all 8 tried \(best: rsna 100"):
        load_segmentation(path, info, soft)
    assert load_segmentation(path, info, soft, min_bone_hu=50).bone_hu == 100.0


def test_bad_label_values_are_errors(tmp_path):
    labels, hu = canonical_case()
    info = series_info(6, (20, 24), False)
    wide = labels.transpose(2, 1, 0)[:, ::-1, ::-1].astype(np.int16)
    wide[0, 0, 0] = 300
    with pytest.raises(StudyError, match=r"labels outside 0\.\.255 \(0\.\.300\)"):
        load_segmentation(save_nifti(tmp_path / "wide.nii", wide), info, hu)
    fractional = labels.transpose(2, 1, 0)[:, ::-1, ::-1].astype(np.float32)
    fractional[0, 0, 0] = 0.5
    with pytest.raises(StudyError, match=r"non-integer labels"):
        load_segmentation(save_nifti(tmp_path / "frac.nii", fractional), info, hu)
    (tmp_path / "junk.nii").write_text("not nifti")
    with pytest.raises(StudyError, match=r"cannot read segmentation junk\.nii"):
        load_segmentation(tmp_path / "junk.nii", info, hu)


def test_mean_hu_inside_with_resized_hu():
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[0, :2, :2] = 1
    labels[1, 2:, 2:] = 2
    hu = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    assert mean_hu_inside(labels, hu, [1]) == pytest.approx(np.mean([0, 1, 4, 5]))
    assert mean_hu_inside(labels, hu, [1, 2]) == pytest.approx(np.mean([0, 1, 4, 5, 26, 27, 30, 31]))
    assert np.isnan(mean_hu_inside(labels, hu, [7]))
    small = hu[:, ::2, ::2]  # 2x2 in-plane: each label block maps onto one voxel
    assert mean_hu_inside(labels, small, [1]) == 0.0 and mean_hu_inside(labels, small, [2]) == 26.0
