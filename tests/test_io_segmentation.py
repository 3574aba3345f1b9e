"""Segmentation loader: the real TotalSegmentator example (rows flipped against the DICOM) and
synthetic NIfTI files written in the RSNA convention and in other layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REAL_CT
from cspine_ray.io.dicom import SeriesInfo, read_series
from cspine_ray.io.errors import StudyError
from cspine_ray.io.segmentation import load_segmentation, mean_hu_inside

EXAMPLE = REAL_CT / "totalseg_example"
VERTEBRAE_T11_T12 = (32, 33)  # TotalSegmentator v2 ids (T12 = 32, T11 = 33: numbered feet to head)
# the example's map: 117 classes, vertebrae numbered feet to head
TOTALSEG = {"max_label": 117, "label_direction": "feet_to_head"}


@pytest.fixture(scope="module")
def example():
    volume, info = read_series(EXAMPLE / "example_ct_dicom")
    return volume, info


# ----------------------------------------------------------------------------- real example


def test_real_example_aligned_on_bone(example):
    volume, info = example
    seg = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=VERTEBRAE_T11_T12,
                            **TOTALSEG)
    assert seg.labels.dtype == np.uint8 and seg.labels.shape == volume.shape
    assert seg.orientation == "rsna" and seg.warnings == ()
    assert seg.bone_hu == pytest.approx(274, abs=5)
    assert mean_hu_inside(seg.labels, volume, VERTEBRAE_T11_T12) == pytest.approx(seg.bone_hu)
    # the check matters: without the row flip the vertebrae would sit on soft tissue/air
    assert mean_hu_inside(seg.labels[:, ::-1, :], volume, VERTEBRAE_T11_T12) == pytest.approx(-294, abs=5)


def test_real_example_checked_on_resized_volume(example):
    volume, info = example
    full = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=VERTEBRAE_T11_T12,
                             **TOTALSEG)
    small = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume[:, ::2, ::2],
                              check_labels=VERTEBRAE_T11_T12, **TOTALSEG)
    assert small.orientation == full.orientation
    assert small.bone_hu == pytest.approx(full.bone_hu, abs=15)
    np.testing.assert_array_equal(small.labels, full.labels)  # labels stay at the series size


def test_real_example_without_hu_uses_rsna_recipe(example):
    volume, info = example
    checked = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume,
                                check_labels=VERTEBRAE_T11_T12, **TOTALSEG)
    unchecked = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, **TOTALSEG)
    assert unchecked.orientation == "rsna" and unchecked.bone_hu is None
    np.testing.assert_array_equal(unchecked.labels, checked.labels)


def test_real_example_with_rows_already_flipped_is_detected(example, tmp_path):
    volume, info = example
    image = nib.load(EXAMPLE / "example_seg_dicom.nii.gz")
    flipped = np.asanyarray(image.dataobj)[:, ::-1, :]  # NIfTI y flipped: the recipe now lands off bone
    path = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), image.affine), path)
    seg = load_segmentation(path, info, volume, check_labels=VERTEBRAE_T11_T12, **TOTALSEG)
    assert seg.orientation == "rsna+flip_rows" and seg.bone_hu == pytest.approx(274, abs=5)
    assert "orientation rsna+flip_rows chosen" in seg.warnings[0] and seg.warnings[0].startswith("study ")
    reference = load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume,
                                  check_labels=VERTEBRAE_T11_T12, **TOTALSEG)
    np.testing.assert_array_equal(seg.labels, reference.labels)


def test_real_example_soft_tissue_label_is_not_bone(example):
    volume, info = example
    with pytest.raises(StudyError, match=r"does not sit on bone in any orientation: mean HU inside labels \[5\] "
                                         r"below 150"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=(5,), **TOTALSEG)  # liver


def test_real_example_shape_and_label_errors(example):
    volume, info = example
    shorter = dataclasses.replace(info, files=info.files[:19])
    with pytest.raises(StudyError, match=r"study example_ct_dicom: segmentation example_seg_dicom\.nii\.gz shape "
                                         r"\(512, 512, 20\) does not match the series \(19 slices of 512x512\)"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", shorter, **TOTALSEG)
    with pytest.raises(StudyError, match=r"holds none of the checked labels \[2, 3, 4\]"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume, check_labels=(4, 3, 2),
                          **TOTALSEG)  # absent ids
    with pytest.raises(StudyError, match=r"HU volume shape \(19, 512, 512\)"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume[:19], check_labels=VERTEBRAE_T11_T12,
                          **TOTALSEG)


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
    with pytest.raises(StudyError, match=r"study 1\.2\.826\.9: .* below 150 in all 4 that keep the labels in order, "
                                         r"of 8 tried \(best: rsna 100"):
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


# ----------------------------------------------------------------------------- masks that do not belong


def shifted_along_z(nii: np.ndarray, slices: int) -> np.ndarray:
    """The NIfTI array moved `slices` along its slice axis (axis 2), the gap left empty."""
    out = np.zeros_like(nii)
    if slices > 0:
        out[:, :, slices:] = nii[:, :, :-slices]
    else:
        out[:, :, :slices] = nii[:, :, -slices:]
    return out


@pytest.mark.parametrize("slices", [3, -3, 5, 10, -10])
def test_real_example_shifted_mask_is_refused(example, tmp_path, slices):
    volume, info = example
    image = nib.load(EXAMPLE / "example_seg_dicom.nii.gz")
    path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(shifted_along_z(np.asanyarray(image.dataobj), slices), image.affine), path)
    for hu in (volume, volume[:, ::2, ::2]):  # full size and a shard-like half size
        with pytest.raises(StudyError, match=r"is misaligned \(shifted, or another study's mask\): "
                                             r"its edges fit the bone's better moved by -?\d+ slice"):
            load_segmentation(path, info, hu, check_labels=VERTEBRAE_T11_T12, **TOTALSEG)


def test_real_example_needs_its_own_label_direction(example):
    # TotalSegmentator numbers vertebrae feet to head: read as RSNA numbering (head to feet),
    # the orientations that put T11 below T12 are the only ones tried, and none fits
    volume, info = example
    with pytest.raises(StudyError, match=r"out of order along z|does not sit on bone|is misaligned"):
        load_segmentation(EXAMPLE / "example_seg_dicom.nii.gz", info, volume,
                          check_labels=VERTEBRAE_T11_T12, max_label=117)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Three generated studies with segmentations: (root, specs, {uid: (hu, info)})."""
    from cspine_ray.synth import dataset_specs, write_study

    root = tmp_path_factory.mktemp("seg") / "rsna"
    specs = [dataclasses.replace(s, has_segmentation=True, z_increases_with_instance=False)
             for s in dataset_specs(3, seed=5, n_test=0, size=64, slice_spacing=3.0, severity="obvious")]
    read = {}
    for spec in specs:
        write_study(spec, root)
        read[spec.uid] = read_series(root / "train_images" / spec.uid)
    return root, specs, read


def fitted(nii: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Another study's array cut or padded to this study's shape (what a mix-up would hand us)."""
    out = np.zeros(shape, nii.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(nii.shape, shape))
    out[common] = nii[common]
    return out


def test_generated_masks_shifted_or_foreign_are_refused(generated, tmp_path):
    root, specs, read = generated
    mine, other = specs[0].uid, specs[1].uid
    hu, info = read[mine]
    own = nib.load(root / "segmentations" / f"{mine}.nii")
    seg = load_segmentation(own.get_filename(), info, hu)  # the study's own mask passes
    assert seg.orientation == "rsna" and seg.warnings == ()
    data = np.asanyarray(own.dataobj)
    # a shifted mask keeps a mean HU far above the 150 HU bone threshold: the offset search
    # is what refuses it
    for slices in (3, -4, 7, 10):
        moved = shifted_along_z(data, slices)
        canonical = moved[:, ::-1, ::-1].transpose(2, 1, 0)  # the RSNA recipe, by hand
        assert mean_hu_inside(canonical, hu, range(1, 8)) > 200
        path = save_nifti(tmp_path / f"shift{slices}.nii", moved)
        # the NIfTI slice axis runs feet to head: moving it up moves the canonical mask down
        with pytest.raises(StudyError, match=rf"is misaligned .* moved by {slices} slice\(s\)"):
            load_segmentation(path, info, hu)
    foreign = np.asanyarray(nib.load(root / "segmentations" / f"{other}.nii").dataobj)
    path = save_nifti(tmp_path / "foreign.nii", fitted(foreign, data.shape))
    with pytest.raises(StudyError, match=r"is misaligned|off bone"):
        load_segmentation(path, info, hu)


def test_each_vertebra_must_sit_on_bone(tmp_path):
    labels = np.zeros((6, 20, 24), dtype=np.uint8)
    labels[0:3, 2:8, 3:9] = 1     # 108 voxels on bone
    labels[3:6, 12:16, 14:19] = 2  # 60 voxels on soft tissue
    hu = np.where(labels == 1, 900, -1000).astype(np.int16)
    hu[labels == 2] = 60
    assert mean_hu_inside(labels, hu, [1, 2]) > 150  # the pooled mean alone would pass
    path = save_nifti(tmp_path / "seg.nii", labels.transpose(2, 1, 0)[:, ::-1, ::-1])
    with pytest.raises(StudyError, match=r"has label 2 \(C2\) off bone: mean HU 60 inside it, below 150"):
        load_segmentation(path, series_info(6, (20, 24), False), hu)


def test_labels_out_of_vertebral_order_are_refused(tmp_path):
    column = np.full((6, 20, 24), -1000, dtype=np.int16)
    column[:, 2:8, 3:9] = 800  # a bone column: C1 over C2 or C2 over C1 fit it equally
    upside_down = np.zeros((6, 20, 24), dtype=np.uint8)
    upside_down[0:3, 2:8, 3:9], upside_down[3:6, 2:8, 3:9] = 2, 1  # C2 drawn above C1
    path = save_nifti(tmp_path / "upside_down.nii", upside_down.transpose(2, 1, 0)[:, ::-1, ::-1])
    info = series_info(6, (20, 24), False)
    # the preferred orientation puts C2 on top: skipped for the z-flipped one, said
    seg = load_segmentation(path, info, column)
    assert seg.orientation == "rsna+flip_z" and "(labels out of order)" in seg.warnings[0]
    np.testing.assert_array_equal(seg.labels, upside_down[::-1])
    three = np.zeros((6, 20, 24), dtype=np.uint8)
    three[0:2, 2:8, 3:9], three[2:4, 2:8, 3:9], three[4:6, 2:8, 3:9] = 2, 1, 3  # no flip helps
    path = save_nifti(tmp_path / "three.nii", three.transpose(2, 1, 0)[:, ::-1, ::-1])
    with pytest.raises(StudyError, match=r"labels \[1, 2, 3, 4, 5, 6, 7\] out of order along z in every "
                                         r"orientation \(they must be numbered head to feet\)"):
        load_segmentation(path, info, np.where(three > 0, 800, -1000).astype(np.int16))


def test_labels_above_the_rsna_range_are_refused(tmp_path):
    labels, hu = canonical_case()  # holds label 9 (T2): thoracic labels up to 19 are fine
    nii = labels.transpose(2, 1, 0)[:, ::-1, ::-1].copy()
    info = series_info(6, (20, 24), False)
    load_segmentation(save_nifti(tmp_path / "ok.nii", nii), info, hu)
    nii[0, 0, 0] = 19
    load_segmentation(save_nifti(tmp_path / "t12.nii", nii), info, hu)
    nii[0, 0, 0] = 200
    with pytest.raises(StudyError, match=r"holds label 200, above the highest allowed 19 \(RSNA masks: "
                                         r"1-7 = C1-C7, 8-19 = T1-T12\)"):
        load_segmentation(save_nifti(tmp_path / "wide.nii", nii), info, hu)
    assert load_segmentation(tmp_path / "wide.nii", info, hu, max_label=255).labels.max() == 200


def test_one_vertebra_off_its_bone_is_refused(generated, tmp_path):
    # the whole mask fits, one vertebra does not (another patient's spine curves differently):
    # each vertebra's edges are searched on their own
    root, specs, read = generated
    hu, info = read[specs[0].uid]
    data = np.asanyarray(nib.load(root / "segmentations" / f"{specs[0].uid}.nii").dataobj)
    labels = np.ascontiguousarray(data[:, ::-1, ::-1].transpose(2, 1, 0))  # canonical (RSNA recipe)
    c4 = labels == 4
    labels[c4] = 0
    labels[np.roll(c4, 3, axis=2) & (labels == 0)] = 4  # C4 alone moved 3 px sideways
    path = save_nifti(tmp_path / "c4.nii", labels.transpose(2, 1, 0)[:, ::-1, ::-1])
    with pytest.raises(StudyError, match=r"is misaligned \(another study's mask\?\): the edges of label 4 "
                                         r"\(C4\) fit the bone's better moved by 0 slice\(s\) along z and "
                                         r"\(0, -2\) px"):
        load_segmentation(path, info, hu)


def test_a_correct_mask_below_the_skull_base_is_kept(tmp_path):
    # moved up, the mask would sit on the dense skull base: more HU inside, but no better edge
    # fit (the skull is as dense just outside the labels): the search scores edges, not HU
    labels = np.zeros((16, 20, 24), np.uint8)
    hu = np.full(labels.shape, 40, np.int16)  # soft tissue
    hu[0:4, 2:18, 2:22] = 1400                 # the skull base
    for label, top in ((1, 5), (2, 8), (3, 11)):
        labels[top:top + 2, 6:12, 8:14] = label
        hu[top:top + 2, 6:12, 8:14] = 500      # vertebral bodies, discs of soft tissue between
    # moved up 5 slices: C1 on the skull, C2 half on it, C3 on C1's bone and a disc
    moved_up = (1400 + 1400 + 1400 + 40 + 500 + 40) / 6
    assert mean_hu_inside(np.roll(labels, -5, axis=0), hu, [1, 2, 3]) == pytest.approx(moved_up)
    path = save_nifti(tmp_path / "seg.nii", labels.transpose(2, 1, 0)[:, ::-1, ::-1])
    seg = load_segmentation(path, series_info(16, (20, 24), False), hu)
    assert seg.orientation == "rsna" and seg.warnings == () and seg.bone_hu == 500.0
