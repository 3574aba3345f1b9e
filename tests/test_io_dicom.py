"""DICOM series reader: real files in every transfer syntax, the real example study, and a corpus
of broken series written here with pydicom (each fault must be reported with its reason)."""

from __future__ import annotations

import inspect
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from conftest import REAL_CT
from cspine_ray.io.dicom import iter_hu_slices, read_series, scan_series
from cspine_ray.io.errors import StudyError

EXAMPLE = REAL_CT / "totalseg_example" / "example_ct_dicom"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
AXIAL_NORMAL_DOWN = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # row x col = (0, 0, -1)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal (-1, 0, 0)


def pydicom_file(name: str) -> Path:
    """A pydicom test file, never downloaded (no network here)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom-data lacks {name}"
    return Path(path)


def dcm(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def reference_hu(path: Path) -> np.ndarray:
    """HU computed here from pydicom directly: pixel_array * slope + intercept."""
    ds = dcm(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def one_file_study(tmp_path: Path, source: Path, name: str | None = None) -> Path:
    folder = tmp_path / (name or source.stem)
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    return folder


# ----------------------------------------------------------------------------- series writer


def write_slice(path: Path, hu: np.ndarray, *, position=(0.0, 0.0, 0.0), orientation=AXIAL, instance=1,
                series_uid="1.2.826.0.1.1", slope=1.0, intercept=-1024.0, spacing=(0.5, 0.5),
                thickness=1.0) -> Path:
    """One uncompressed signed 16-bit CT slice whose HU are `hu` (position None = omit it)."""
    raw = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1"
    ds.SeriesInstanceUID = series_uid
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = raw.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, positions, *, orientation=AXIAL, sizes=None, instances=None,
                 series_uid="1.2.826.0.1.1", names=None, **kwargs) -> list[Path]:
    """A series with one slice per position. Each slice is constant HU = 10 * patient z, so the
    canonical order can be read back from the pixels alone. File names default to <instance>.dcm."""
    folder.mkdir(parents=True, exist_ok=True)
    instances = list(instances or range(1, len(positions) + 1))
    paths = []
    for i, position in enumerate(positions):
        size = sizes[i] if sizes else (32, 32)
        z = position[2] if position is not None else 0.0
        name = names[i] if names else f"{instances[i]}.dcm"
        paths.append(write_slice(folder / name, np.full(size, 10.0 * z), position=position,
                                 orientation=orientation, instance=instances[i], series_uid=series_uid, **kwargs))
    return paths


def axial(zs, step_y: float = 0.0) -> list[tuple[float, float, float]]:
    """Axial positions at the given patient z; step_y shifts y per slice (gantry tilt)."""
    return [(0.0, i * step_y, float(z)) for i, z in enumerate(zs)]


def warning_with(info, text: str) -> str:
    found = [w for w in info.warnings if text in w]
    assert found, f"no warning containing {text!r} in {info.warnings}"
    return found[0]


# ----------------------------------------------------------------------------- real files, every syntax


def test_uncompressed_ct_gives_rescaled_hu(tmp_path):
    source = pydicom_file("693_UNCR.dcm")
    volume, info = read_series(one_file_study(tmp_path, source))
    assert volume.dtype == np.int16 and volume.shape == (1, 512, 512)
    np.testing.assert_array_equal(volume[0], reference_hu(source))
    assert volume.min() == -2000 - 1024  # signed raw pixels, intercept -1024
    assert info.instance_numbers == (21,) and info.spacing[1:] == (0.478516, 0.478516)
    assert info.spacing[0] == 20.0  # single slice: SpacingBetweenSlices (20) wins over SliceThickness (5)
    warning_with(info, "single slice")


@pytest.mark.parametrize("name", ["693_J2KR.dcm"])
def test_jpeg2000_lossless_ct_matches_uncompressed(tmp_path, name):
    ours, _ = read_series(one_file_study(tmp_path, pydicom_file(name)))
    plain, _ = read_series(one_file_study(tmp_path, pydicom_file("693_UNCR.dcm")))
    np.testing.assert_array_equal(ours, plain)


def test_jpeg2000_lossy_ct_is_close_to_original(tmp_path):
    lossy, _ = read_series(one_file_study(tmp_path, pydicom_file("693_J2KI.dcm")))
    # 693_UNCI is the reference decompression of the lossy file: identical
    unci, _ = read_series(one_file_study(tmp_path, pydicom_file("693_UNCI.dcm")))
    np.testing.assert_array_equal(lossy, unci)
    original, _ = read_series(one_file_study(tmp_path, pydicom_file("693_UNCR.dcm")))
    difference = np.abs(lossy.astype(np.int32) - original)
    assert np.median(difference) <= 40
    assert np.corrcoef(lossy.ravel(), original.ravel())[0, 1] > 0.99
    assert not np.array_equal(lossy, original)


def test_jpeg_lossless_ct(tmp_path):
    import imagecodecs  # decode the codestream independently of pydicom and its plugins

    source = pydicom_file("bad_sequence.dcm")
    volume, info = read_series(one_file_study(tmp_path, source))
    frame = next(generate_frames(dcm(source).PixelData, number_of_frames=1))
    np.testing.assert_array_equal(volume[0], imagecodecs.ljpeg_decode(frame).astype(np.int32) - 1024)
    assert -1024 <= volume.min() and volume.max() < 3000 and info.shape == (512, 512)


def test_jpeg2000_signedness_mismatch_is_corrected(tmp_path):
    import openjpeg

    source = pydicom_file("J2K_pixelrep_mismatch.dcm")  # unsigned 13-bit codestream, PixelRepresentation 1
    volume, info = read_series(one_file_study(tmp_path, source))
    frame = next(generate_frames(dcm(source).PixelData, number_of_frames=1))
    raw = openjpeg.decode(frame).astype(np.int32)
    assert raw.min() >= 0  # the codestream itself says unsigned
    signed = np.where(raw >= 4096, raw - 8192, raw)  # 13-bit two's complement
    np.testing.assert_array_equal(volume[0], signed)
    assert volume.min() == -2000
    # oblique plane 22 degrees from axial: still accepted as an axial series
    assert info.shape == (512, 512)


def test_jpeg2000_ct_with_downward_normal(tmp_path):
    source = pydicom_file("explicit_VR-UN.dcm")  # ImageOrientationPatient (1, 0, 0, 0, -1, 0)
    volume, info = read_series(one_file_study(tmp_path, source))
    np.testing.assert_array_equal(volume[0], reference_hu(source))
    assert info.instance_numbers == (122,) and volume.min() == -1024


def _transcoded_ct_small(folder: Path, syntax) -> Path:
    """CT_small.dcm (a real CT slice) rewritten in another transfer syntax with pydicom."""
    ds = dcm(pydicom_file("CT_small.dcm"))
    folder.mkdir()
    path = folder / "1.dcm"
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
        ds.save_as(path)
    elif syntax == ExplicitVRBigEndian:
        ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    assert dcm(path).file_meta.TransferSyntaxUID == syntax
    return folder


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
                                    RLELossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_ct_small_in_every_writable_syntax(tmp_path, syntax):
    expected, _ = read_series(one_file_study(tmp_path, pydicom_file("CT_small.dcm")))
    np.testing.assert_array_equal(expected[0], reference_hu(pydicom_file("CT_small.dcm")))
    volume, info = read_series(_transcoded_ct_small(tmp_path / "transcoded", syntax))
    np.testing.assert_array_equal(volume, expected)
    assert info.shape == (128, 128)


MR_VARIANTS = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
               "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_real_slice_in_other_syntaxes_decodes_identically(tmp_path, name):
    """The only JPEG-LS / RLE / big-endian real images in pydicom's data are this MR slice."""
    expected, _ = read_series(one_file_study(tmp_path, pydicom_file("MR_small.dcm")))
    volume, info = read_series(one_file_study(tmp_path, pydicom_file(name)))
    np.testing.assert_array_equal(volume, expected)
    warning_with(info, "modality MR, not CT")


def test_enhanced_multiframe_ct_is_refused(tmp_path):
    folder = one_file_study(tmp_path, pydicom_file("eCT_Supplemental.dcm"))
    with pytest.raises(StudyError, match=r"file #1: multi-frame image \(2 frames\)"):
        scan_series(folder)


def test_real_truncated_file_detected_at_scan(tmp_path):
    folder = one_file_study(tmp_path, pydicom_file("MR_truncated.dcm"), "study")
    with pytest.raises(StudyError, match=r"study study: no usable DICOM slice .*file #1: pixel data "
                                         r"truncated: file holds 8130 of 8192 bytes"):
        scan_series(folder)
    shutil.copy(pydicom_file("MR_small.dcm"), folder / "MR_small.dcm")
    info = scan_series(folder)
    assert [p.name for p in info.files] == ["MR_small.dcm"]
    warning_with(info, "skipped file #2: pixel data truncated")  # MR_small.dcm is #1 by name


# ----------------------------------------------------------------------------- the real example study


def test_real_example_loads_head_to_feet():
    volume, info = read_series(EXAMPLE)
    assert volume.shape == (20, 512, 512) and volume.dtype == np.int16
    assert info.instance_numbers == tuple(range(267, 287))
    assert np.all(np.diff(info.z_positions) < 0) and info.z_positions[0] == -766.5
    assert info.spacing == (2.0, 0.9765625, 0.9765625)  # SliceThickness says 3, positions say 2
    assert info.z_increases_with_instance is False
    assert (volume.min(), volume.max()) == (-1024, 1839)
    assert info.study == "example_ct_dicom" and info.warnings == ()
    first = sorted(EXAMPLE.iterdir())[0]
    np.testing.assert_array_equal(volume[0], reference_hu(first))


def test_real_example_order_ignores_file_names(tmp_path):
    expected, info = read_series(EXAMPLE)
    folder = tmp_path / "renamed"
    folder.mkdir()
    for i, path in enumerate(sorted(EXAMPLE.iterdir())):  # names now run the opposite way
        shutil.copy(path, folder / f"{100 - i:03d}.dcm")
    volume, renamed = read_series(folder, study="1.2.3")
    np.testing.assert_array_equal(volume, expected)
    assert renamed.instance_numbers == info.instance_numbers and renamed.study == "1.2.3"


def test_iter_hu_slices_is_lazy_and_names_undecodable_file(tmp_path):
    folder = tmp_path / "lazy"
    paths = write_series(folder, axial([3, 2, 1]))
    info = scan_series(folder)
    slices = iter_hu_slices(info)
    assert inspect.isgenerator(slices)
    assert next(slices)[0, 0] == 30  # first slice decoded before the last file is touched
    paths[-1].unlink()
    next(slices)
    with pytest.raises(StudyError, match=r"study lazy: cannot decode 3\.dcm"):
        next(slices)


def test_corrupt_codestream_fails_at_decode_naming_the_file(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    ds = dcm(pydicom_file("693_J2KR.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # well-formed file, broken codestream
    ds.save_as(folder / "7.dcm")
    info = scan_series(folder)  # headers and encapsulation are fine
    assert info.files == (folder / "7.dcm",)
    with pytest.raises(StudyError, match=r"study corrupt: cannot decode 7\.dcm"):
        read_series(folder)


# ----------------------------------------------------------------------------- canonical z order


@pytest.mark.parametrize("orientation", [AXIAL, AXIAL_NORMAL_DOWN], ids=["normal_up", "normal_down"])
@pytest.mark.parametrize("numbered_from_head", [True, False])
def test_canonical_order_is_head_to_feet(tmp_path, orientation, numbered_from_head):
    zs = [10.0, 12.5, 15.0, 17.5, 20.0]  # patient z, head is +z
    instances = [5, 4, 3, 2, 1] if numbered_from_head else [1, 2, 3, 4, 5]
    names = ["e.dcm", "a.dcm", "d.dcm", "b.dcm", "c.dcm"]  # names carry no order
    write_series(tmp_path / "s", axial(zs), orientation=orientation, instances=instances, names=names)
    volume, info = read_series(tmp_path / "s")
    np.testing.assert_array_equal(volume[:, 0, 0], [200, 175, 150, 125, 100])  # HU = 10 * z
    assert info.z_positions == (20.0, 17.5, 15.0, 12.5, 10.0)
    assert info.instance_numbers == ((1, 2, 3, 4, 5) if numbered_from_head else (5, 4, 3, 2, 1))
    assert info.z_increases_with_instance is (not numbered_from_head)
    assert info.spacing == (2.5, 0.5, 0.5) and info.warnings == ()


def test_rescale_slope_intercept_and_clipping(tmp_path):
    folder = tmp_path / "rescale"
    folder.mkdir()
    hu = np.array([[-1000.0, 0.0], [1000.0, 3000.0]])
    write_slice(folder / "1.dcm", np.kron(hu, np.ones((16, 16))), slope=2.0, intercept=-1000.0)
    volume, _ = read_series(folder)
    np.testing.assert_array_equal(volume[0, ::16, ::16], hu)
    big = tmp_path / "clip"
    big.mkdir()
    write_slice(big / "1.dcm", np.full((8, 8), 100000.0), slope=4.0, intercept=0.0)  # beyond int16
    volume, _ = read_series(big)
    assert volume.dtype == np.int16 and np.all(volume == 32767)


# ----------------------------------------------------------------------------- broken series


def test_truncated_file_is_skipped_and_reported(tmp_path):
    folder = tmp_path / "trunc"
    paths = write_series(folder, axial([5, 4, 3, 2, 1]))
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-300])
    volume, info = read_series(folder)
    assert len(info.files) == 4 and volume.shape == (4, 32, 32)
    warning_with(info, "study trunc: skipped 3.dcm: pixel data truncated: file holds 1748 of 2048 bytes")
    warning_with(info, "missing slice(s): 1 gap(s) larger than 1.5x the median gap 1.00 mm: 2.00 mm between "
                       "instance 2 (2.dcm) and instance 4 (4.dcm)")


def test_text_file_named_dcm_is_skipped(tmp_path):
    folder = tmp_path / "text"
    write_series(folder, axial([2, 1]))
    (folder / "notes.dcm").write_text("this is not DICOM\n" * 50)
    (folder / "empty.dcm").write_bytes(b"")
    volume, info = read_series(folder)
    assert volume.shape == (2, 32, 32)
    # named by their place in the folder (1.dcm, 2.dcm, empty.dcm, notes.dcm), not their names
    warning_with(info, "skipped file #4: not a DICOM image")
    warning_with(info, "skipped file #3: empty file")
    assert not [w for w in info.warnings if "notes" in w or "empty.dcm" in w]


def test_two_series_keeps_the_larger(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, axial([4, 3, 2, 1]), series_uid="1.2.3.100")
    write_series(folder, axial([4, 3, 2]), series_uid="1.2.3.200", names=["x1.dcm", "x2.dcm", "x3.dcm"])
    volume, info = read_series(folder)
    assert volume.shape == (4, 32, 32) and all(p.name[0] != "x" for p in info.files)
    warning_with(info, "folder holds 2 series: kept 1.2.3.100 (4 files), ignored 1.2.3.200 (3 files)")


def test_empty_series_uids_are_fine(tmp_path):
    write_series(tmp_path / "nouid", axial([2, 1]), series_uid="")
    volume, info = read_series(tmp_path / "nouid")
    assert volume.shape == (2, 32, 32) and info.warnings == ()


def test_missing_slice_reported_with_instances(tmp_path):
    folder = tmp_path / "gap"
    write_series(folder, axial([10, 9, 8, 6, 5, 4]), instances=[1, 2, 3, 5, 6, 7])
    volume, info = read_series(folder)
    assert volume.shape[0] == 6 and info.spacing[0] == 1.0
    warning_with(info, "2.00 mm between instance 3 (3.dcm) and instance 5 (5.dcm)")


def test_uneven_small_gap_reported(tmp_path):
    write_series(tmp_path / "uneven", axial([10, 8, 6, 5.5, 4, 2]))
    info = scan_series(tmp_path / "uneven")
    warning_with(info, "uneven slice gaps: 1 gap(s) smaller than the median gap 2.00 mm / 1.5: 0.50 mm between "
                       "instance 3 (3.dcm) and instance 4 (4.dcm)")


def test_hopeless_gaps_are_an_error(tmp_path):
    write_series(tmp_path / "hopeless", axial([0, -1, -3, -7, -8, -16, -17, -30]))
    with pytest.raises(StudyError, match=r"study hopeless: slice gaps too irregular: \d of 7 gaps"):
        scan_series(tmp_path / "hopeless")


def test_mixed_sizes_resized_to_majority(tmp_path):
    folder = tmp_path / "sizes"
    write_series(folder, axial([4, 3, 2, 1]), sizes=[(32, 32), (16, 16), (32, 32), (32, 32)])
    volume, info = read_series(folder)
    assert info.shape == (32, 32) and volume.shape == (4, 32, 32)
    assert np.all(volume[1] == 30)  # the constant 16x16 slice, bilinearly resized
    warning_with(info, "resized 1 slice(s) of size 16x16 to the majority size 32x32: instance 2 (2.dcm)")


def test_duplicate_position_keeps_one(tmp_path):
    folder = tmp_path / "dup"
    write_series(folder, axial([3, 2, 2, 1]), instances=[1, 2, 3, 4])
    volume, info = read_series(folder)
    assert info.instance_numbers == (1, 2, 4) and volume.shape[0] == 3
    warning_with(info, "1 duplicate slice position(s): z=2.00 mm kept instance 2 (2.dcm), dropped instance 3 (3.dcm)")


def test_small_gantry_tilt_is_reported(tmp_path):
    step = math.tan(math.radians(10.0))  # y moves 0.176 mm per 1 mm along z
    write_series(tmp_path / "tilt", axial([5, 4, 3, 2, 1], step_y=step))
    volume, info = read_series(tmp_path / "tilt")
    assert volume.shape[0] == 5 and info.spacing[0] == pytest.approx(1.0)
    warning_with(info, "gantry tilt of 10.0 degrees")


def test_huge_gantry_tilt_is_an_error(tmp_path):
    write_series(tmp_path / "tilt45", axial([5, 4, 3, 2, 1], step_y=1.0))
    with pytest.raises(StudyError, match=r"study tilt45: gantry tilt of 45\.0 degrees .* more than 30 degrees"):
        scan_series(tmp_path / "tilt45")


def test_sagittal_series_is_an_error(tmp_path):
    positions = [(float(x), 0.0, 0.0) for x in range(5)]
    write_series(tmp_path / "sag", positions, orientation=SAGITTAL)
    with pytest.raises(StudyError, match=r"non-axial series \(normal \(-1\.00, 0\.00, 0\.00\) is 90 degrees"):
        scan_series(tmp_path / "sag")


def test_empty_missing_and_junk_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError, match=r"study empty: no files in"):
        scan_series(tmp_path / "empty")
    with pytest.raises(StudyError, match=r"study 1\.2\.3: folder .*nowhere does not exist"):
        scan_series(tmp_path / "nowhere", study="1.2.3")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_text("hello")
    with pytest.raises(StudyError, match=r"study junk: no usable DICOM slice .*file #1: not a DICOM image"):
        read_series(tmp_path / "junk")


def test_missing_positions_fall_back_to_instance_order(tmp_path):
    folder = tmp_path / "nopos"
    write_series(folder, [None, None, None], instances=[3, 1, 2], thickness=2.0)
    volume, info = read_series(folder)
    assert info.instance_numbers == (1, 2, 3) and info.spacing[0] == 2.0
    warning_with(info, "no ImagePositionPatient: slices ordered by InstanceNumber")
    partial = tmp_path / "partial"
    write_series(partial, [(0, 0, 3.0), None, (0, 0, 1.0), (0, 0, 0.0)])
    info = scan_series(partial)
    assert info.instance_numbers == (1, 3, 4)
    warning_with(info, "skipped 1 file(s) without ImagePositionPatient: 2.dcm")


def test_nothing_to_order_by_is_an_error(tmp_path):
    folder = tmp_path / "noorder"
    write_series(folder, [None, None], names=["a.dcm", "b.dcm"], instances=[None, None])
    with pytest.raises(StudyError, match=r"cannot order slices: no ImagePositionPatient and no InstanceNumber"):
        scan_series(folder)


# --- the default install decodes every compressed syntax with permissive code only ----------

PERMISSIVE = [  # (file, its syntax's permissive pydicom plugin, an independent reference)
    ("bad_sequence.dcm", "gdcm", "imagecodecs"),           # JPEG Lossless SV1, real CT
    ("JPEG-LL.dcm", "gdcm", "imagecodecs"),                # JPEG Lossless SV1, 16 bit
    ("MR_small_jpeg_ls_lossless.dcm", "gdcm", "MR_small.dcm"),  # JPEG-LS
    ("MR_small_jp2klossless.dcm", "pylibjpeg", "MR_small.dcm"),  # JPEG 2000 (OpenJPEG)
    ("MR_small_RLE.dcm", "pydicom", "MR_small.dcm"),       # RLE
]


@pytest.mark.parametrize("name,plugin,reference", PERMISSIVE, ids=[p[0] for p in PERMISSIVE])
def test_every_compressed_syntax_decodes_with_permissive_plugins(name, plugin, reference):
    from pydicom.pixels import pixel_array

    path = pydicom_file(name)
    decoded = pixel_array(path, decoding_plugin=plugin)  # this plugin alone, whatever else is here
    if reference == "imagecodecs":
        import imagecodecs

        frame = next(generate_frames(dcm(path).PixelData, number_of_frames=1))
        np.testing.assert_array_equal(decoded, imagecodecs.ljpeg_decode(frame))
    elif reference:
        np.testing.assert_array_equal(decoded, dcm(pydicom_file(reference)).pixel_array)
    else:
        assert decoded.shape == (dcm(path).Rows, dcm(path).Columns) and decoded.std() > 0


def test_default_install_pulls_in_no_gpl_code():
    # cspine-ray's requirements without extras, followed through every installed dependency:
    # none may be GPL (LGPL is not matched). pylibjpeg-libjpeg (GPL-3.0) is the opt-in
    # `gpl-jpeg` extra only.
    import re
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    gpl = re.compile(r"(?<![L])GPL|GNU General Public", re.IGNORECASE)
    seen, offenders = set(), []

    def walk(name: str, extras: frozenset) -> None:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, extras) in seen:
            return
        seen.add((key, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            return
        meta = dist.metadata
        licence = " ".join([meta.get("License-Expression") or "", (meta.get("License") or "")[:200],
                            *[c for c in meta.get_all("Classifier") or [] if c.startswith("License")]])
        if gpl.search(licence) and not re.search(r"lesser|LGPL", licence, re.IGNORECASE):
            offenders.append(f"{name}: {licence.strip()[:120]}")
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            walk(req.name, frozenset(req.extras))

    walk("cspine-ray", frozenset())
    assert len(seen) > 20  # the closure really was followed
    assert offenders == []
    from importlib.metadata import requires

    assert any("pylibjpeg-libjpeg" in r and "gpl-jpeg" in r for r in requires("cspine-ray"))


def test_twelve_bit_jpeg_extended_needs_the_gpl_extra_and_says_so(tmp_path):
    # lossy 12-bit JPEG Extended (not in the RSNA data) is the one syntax only libjpeg decodes
    from pydicom.pixels import pixel_array

    source = pydicom_file("JPGExtended.dcm")
    with pytest.raises((NotImplementedError, RuntimeError), match="12-bit"):
        pixel_array(source, decoding_plugin="gdcm")
    try:
        import libjpeg  # noqa: F401  (the opt-in extra is installed here: it decodes)
    except ImportError:
        with pytest.raises(StudyError, match=r"(?s)JPGExtended.*12-bit.*cspine-ray\[gpl-jpeg\]"):
            read_series(one_file_study(tmp_path, source))


# --- values no scanner writes: refused per file, before any pixel is decoded ---------------

@pytest.mark.parametrize("keyword,value,needle", [
    ("RescaleSlope", "0", "RescaleSlope 0 is outside"),            # a constant volume
    ("RescaleSlope", "NaN", "RescaleSlope nan is outside"),         # all-NaN HU
    ("RescaleSlope", "1e30", "RescaleSlope 1e+30 is outside"),      # clamped to 32767
    ("RescaleIntercept", "inf", "RescaleIntercept inf is outside"),
    ("RescaleSlope", "abc", "RescaleSlope 'abc' is not a number"),
    ("PixelSpacing", ["0", "0.5"], "PixelSpacing 0 is outside"),    # ZeroDivisionError later
    ("PixelSpacing", ["-0.5", "-0.5"], "PixelSpacing -0.5 is outside"),
    ("Rows", 65535, "declared image size 65535x32 exceeds 4096"),   # a decompression bomb
])
def test_impossible_header_values_are_refused_with_their_reason(tmp_path, keyword, value, needle):
    folder = tmp_path / "study"
    paths = write_series(folder, axial([0.0, 2.0, 4.0]))
    for path in paths:
        ds = dcm(path)
        if keyword == "Rows":
            ds.Rows = value
        else:  # written raw, as a broken scanner or a hostile file would hold them
            vr = "LO" if value == "abc" else "DS"  # DS refuses to hold text
            ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, value)
        ds.save_as(path)
    with pytest.raises(StudyError, match=re.escape(needle)):
        scan_series(folder)
    # one bad file among good ones is skipped with its reason; the study goes on
    good = write_series(tmp_path / "mixed", axial([0.0, 2.0, 4.0, 6.0]))
    ds = dcm(good[0])
    ds.RescaleSlope = 0
    ds.save_as(good[0])
    info = scan_series(tmp_path / "mixed")
    assert len(info.files) == 3 and any("RescaleSlope 0" in w for w in info.warnings)


def test_a_study_too_short_for_the_cervical_spine_is_refused(tmp_path):
    from cspine_ray.preprocess.study import MIN_EXTENT_MM, MIN_SLICES, check_usable

    cases = {"one slice": [0.0], "two slices": [0.0, 1.0],
             "16 slices over 15 mm": [float(i) for i in range(16)]}
    for name, zs in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        write_series(folder, axial(zs))
        with pytest.raises(StudyError, match="too short to hold the cervical spine"):
            check_usable(scan_series(folder))
    # preprocessing records the reason instead of writing a shard
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.study import StudyItem, process_study

    item = StudyItem(study_uid="1.2.3", split="train", image_dir=str(tmp_path / "two_slices"))
    (tmp_path / "shards" / "studies").mkdir(parents=True)
    row = process_study(item, PreprocessConfig(size=32), str(tmp_path / "shards"))
    assert row.status == "failed" and "too short" in row.reason
    folder = tmp_path / "enough"
    write_series(folder, axial([3.0 * i for i in range(MIN_SLICES)]))  # 45 mm
    assert 3.0 * (MIN_SLICES - 1) >= MIN_EXTENT_MM
    check_usable(scan_series(folder))  # no error


# --- file names from outside never reach a message; any extension is read; symlink policy ---

def test_file_names_that_are_not_numbers_never_reach_a_message(tmp_path):
    folder = tmp_path / "named"
    names = ["DOE^JOHN_19011231.dcm", "2.dcm", "3.dcm", "4.dcm", "ROE^RICHARD.dcm"]
    write_series(folder, axial([10, 9, 8, 8, 6]), names=names)  # a duplicate and a gap
    (folder / "SMITH^JANE.dcm").write_text("not DICOM")
    (folder / "MILLER^ANN").symlink_to(tmp_path / "gone")  # dangling
    info = scan_series(folder)
    text = " ".join(info.warnings)
    for person in ("DOE", "JOHN", "19011231", "ROE", "SMITH", "JANE", "MILLER"):
        assert person not in text, text
    # sorted names: 2.dcm 3.dcm 4.dcm DOE^JOHN.. (#4) MILLER^ANN (#5) ROE^RICHARD.. (#6) SMITH^JANE (#7)
    warning_with(info, "skipped file #7: not a DICOM image")
    warning_with(info, "(a broken symlink?): file #5")
    warning_with(info, "kept instance 3 (3.dcm), dropped instance 4 (4.dcm)")
    warning_with(info, "2.00 mm between instance 3 (3.dcm) and instance 5 (file #6)")
    assert info.file_labels == ("file #4", "2.dcm", "3.dcm", "file #6")
    (folder / "ROE^RICHARD.dcm").unlink()  # gone before it is decoded: the error names it safely
    with pytest.raises(StudyError) as error:
        list(iter_hu_slices(info))
    assert "cannot decode file #6" in str(error.value) and "ROE" not in str(error.value)


def test_files_without_dcm_extension_are_read(tmp_path):
    expected, _ = read_series(write_series(tmp_path / "plain", axial([3, 2, 1]))[0].parent)
    folder = tmp_path / "bare"
    write_series(folder, axial([3, 2, 1]), names=["1", "2", "3"])
    volume, info = read_series(folder)
    np.testing.assert_array_equal(volume, expected)
    assert info.warnings == () and [p.name for p in info.files] == ["1", "2", "3"]


def test_symlinks_are_followed_only_inside_the_data_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_series(root / "store" / "s", axial([5, 4, 3, 2]))  # HU = 10 * z
    (root / "train_images").mkdir()
    (root / "train_images" / "s").symlink_to(root / "store" / "s")  # a folder link inside the root
    study = root / "train_images" / "s"
    volume, info = read_series(study)
    assert scan_series(study, root=root).warnings == ()  # followed silently
    np.testing.assert_array_equal(volume, read_series(root / "store" / "s")[0])

    write_series(outside, axial([1]), instances=[5])
    (study / "5.dcm").symlink_to(outside / "5.dcm")  # a slice from outside the root
    info = scan_series(study, root=root)
    assert info.instance_numbers == (1, 2, 3, 4)
    warning_with(info, "skipped 1 file(s) that link outside the data root (symlinks are followed "
                       "only within it): 5.dcm")

    write_series(root / "other", axial([1]), instances=[6])
    (study / "6.dcm").symlink_to(root / "other" / "6.dcm")  # another folder of the root
    info = scan_series(study, root=root)
    assert info.instance_numbers == (1, 2, 3, 4, 6)  # joins, but never unnoticed
    warning_with(info, "1 file(s) are symlinks to files outside the study folder (elsewhere in "
                       "the data root), read as part of this study: 6.dcm")
    # without a data root the study folder is the boundary
    info = scan_series(study)
    assert info.instance_numbers == (1, 2, 3, 4)
    warning_with(info, "skipped 2 file(s) that link outside the study folder")
