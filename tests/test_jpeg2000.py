"""Half-resolution reads: JPEG 2000 decoded at reduced resolution equals the 5/3 band computed
from full pixels, bit for bit, so shards do not depend on the transfer syntax that stored a study."""

from __future__ import annotations

import dataclasses
import struct
import warnings
from pathlib import Path

import numpy as np
import openjpeg
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from conftest import REAL_CT
from cspine_ray.io.dicom import iter_hu_slices, scan_series
from cspine_ray.io.jpeg2000 import decode_reduced, halve, halved_shape, parse_header, stored_range
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.resample import halvings, resize_labels, resize_slices, source_step
from cspine_ray.preprocess.shards import open_shard
from cspine_ray.preprocess.study import StudyItem, process_study
from cspine_ray.synth import StudySpec, synth_study, write_study

# resolved from this file (tests/conftest.py), not from the directory pytest was started in
EXAMPLE = REAL_CT / "totalseg_example" / "example_ct_dicom"


def dcm(path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def j2k_dataset(pixels: np.ndarray, bits: int, codestream: bytes | None = None) -> pydicom.Dataset:
    """A minimal single-frame JPEG 2000 Lossless data set holding `pixels` (encoded by openjpeg)."""
    signed = pixels.dtype.kind == "i"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    codestream = codestream or openjpeg.encode(pixels, bits_stored=bits, photometric_interpretation=2)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return ds


def hard_image(shape, bits, signed, seed=0) -> np.ndarray:
    """Noise over the whole stored range plus a flat corner at the minimum: the band overshoots
    the range at the edges, so the decoder's clamping is exercised too."""
    lo, hi = stored_range(bits, signed)
    pixels = np.random.default_rng(seed).integers(lo, hi + 1, shape)
    pixels[: shape[0] // 2, : shape[1] // 2] = lo
    return pixels.astype(np.int16 if signed else np.uint16)


@pytest.mark.parametrize("bits,signed", [(12, False), (16, True), (16, False), (10, False)])
@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (35, 35), (33, 50)])
def test_halve_equals_a_jpeg2000_decoder_at_reduced_resolution(shape, bits, signed):
    pixels = hard_image(shape, bits, signed)
    ds = j2k_dataset(pixels, bits)
    value_range = stored_range(bits, signed)
    assert (halve(pixels, 1, (-2**31, 2**31 - 1)) != halve(pixels, 1, value_range)).any()  # clamping matters here
    fast = 0
    for levels in (1, 2, 3):
        reduced = decode_reduced(ds, levels)
        expected = halve(pixels, levels, value_range)
        assert expected.shape == halved_shape(shape, levels)
        if reduced is not None:
            fast += 1
            np.testing.assert_array_equal(reduced, expected)
    # Pillow rounds some odd reduced sizes wrongly (33 px at 1/4): those fall back; level 1 never does
    assert fast == {(64, 64): 3, (128, 96): 3, (35, 35): 2, (33, 50): 1}[shape]


def test_halve_odd_and_single_sample_sides():
    x = np.arange(7, dtype=np.int32).reshape(7, 1) * 10
    band = halve(x, 1, (-1000, 1000))
    assert band.shape == (4, 1)
    np.testing.assert_array_equal(band[:, 0], [0, 20, 40, 60])  # a ramp stays a ramp
    assert halve(np.full((5, 9), 300), 2, (0, 4095)).tolist() == np.full((2, 3), 300).tolist()


def test_real_scanner_and_pydicom_files_reduce_like_their_full_pixels():
    names = ["693_J2KR.dcm", "MR2_J2KR.dcm", "explicit_VR-UN.dcm"]
    paths = [Path(get_testdata_file(n, download=False)) for n in names] + sorted(EXAMPLE.iterdir())[:4]
    for path in paths:
        ds = dcm(path)
        full = ds.pixel_array
        for levels in (1, 2):
            reduced = decode_reduced(ds, levels)
            assert reduced is not None, f"{path.name}: fast path not taken at level {levels}"
            np.testing.assert_array_equal(
                reduced, halve(full, levels, stored_range(int(ds.BitsStored), full.dtype.kind == "i")), path.name)


def test_codestreams_the_fast_path_cannot_take_fall_back():
    pixels = hard_image((64, 64), 12, False)
    codestream = openjpeg.encode(pixels, bits_stored=12, photometric_interpretation=2)
    header = parse_header(codestream)
    assert (header.width, header.height, header.levels, header.reversible, header.precision) == (64, 64, 5, True, 12)
    assert decode_reduced(j2k_dataset(pixels, 12, codestream), 1) is not None

    # a tiled codestream: its band differs from the whole-image transform at tile edges
    siz = codestream.index(b"\xff\x51")
    xt_at = siz + 4 + 2 + 16  # Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, then XTsiz
    tiled = codestream[:xt_at] + struct.pack(">I", 32) + codestream[xt_at + 4:]
    assert parse_header(tiled).tile == (32, 64)
    assert decode_reduced(j2k_dataset(pixels, 12, tiled), 1) is None
    # more halvings than the codestream has levels
    assert decode_reduced(j2k_dataset(pixels, 12, codestream), 6) is None
    # a COC for component 0 overrides the COD's levels even when it comes first in the header
    coc = b"\xff\x53" + struct.pack(">H", 9) + bytes([0, 0, 1, 4, 4, 0, 1])  # Ccoc, Scoc, 1 level, ..., 5/3
    cod_at = codestream.index(b"\xff\x52")
    with_coc = codestream[:cod_at] + coc + codestream[cod_at:]
    assert (parse_header(with_coc).levels, parse_header(with_coc).reversible) == (1, True)
    assert decode_reduced(j2k_dataset(pixels, 12, with_coc), 2) is None
    # the DICOM header contradicts the codestream's signedness
    ds = j2k_dataset(pixels, 12, codestream)
    ds.PixelRepresentation = 1
    assert decode_reduced(ds, 1) is None
    # lossy (9/7) JPEG 2000 and other transfer syntaxes
    assert decode_reduced(dcm(get_testdata_file("693_J2KI.dcm", download=False)), 1) is None
    assert decode_reduced(dcm(get_testdata_file("CT_small.dcm", download=False)), 1) is None
    assert parse_header(b"not a codestream") is None


def test_reader_delivers_the_band_in_hu_for_the_real_series():
    info = scan_series(EXAMPLE)
    half = list(iter_hu_slices(info, 1))
    for path, image in zip(info.files, half):
        ds = dcm(path)
        stored = halve(ds.pixel_array, 1, stored_range(int(ds.BitsStored), False))
        assert image.dtype == np.int16 and image.shape == (256, 256)
        np.testing.assert_array_equal(image, stored + int(ds.RescaleIntercept))
    full = np.stack(list(iter_hu_slices(info)))
    assert np.abs(np.stack(half).astype(float).mean() - full.astype(float).mean()) < 2  # same HU level


def test_resampling_plan_and_label_centres():
    assert [halvings(s, 256) for s in [(512, 512), (768, 768), (1024, 1024), (500, 500), (256, 256)]] == [1, 1, 2, 0, 0]
    assert halvings((512, 600), 300) == 0 and halvings((1200, 700), 300) == 1
    assert source_step(512, 256, 1) == 2.0 and source_step(768, 256, 1) == 3.0 and source_step(513, 256, 1) == 2 * 257 / 256
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, :, 4:] = 1
    labels[0, :, 6:] = 2
    # band sample n sits on source pixel 2n: labels are picked there, not between pixels
    assert resize_labels(labels, 4, 1)[0, 0].tolist() == [0, 0, 1, 2]
    assert resize_labels(labels, 4, 0)[0, 0].tolist() == [0, 0, 1, 2]  # centres 2n + 1: same here
    labels[0, :, 5] = 3
    assert resize_labels(labels, 4, 1)[0, 0].tolist() == [0, 0, 1, 2]
    assert resize_labels(labels, 4, 0)[0, 0].tolist() == [0, 0, 3, 2]


@pytest.mark.slow
def test_shards_do_not_depend_on_the_transfer_syntax_that_stored_the_study(tmp_path):
    base = StudySpec(uid="1.2.826.0.1.3680043.10.5.1", index=1, seed=3, size=128, slice_spacing=6.0,
                     fractured=("C2",), has_segmentation=True)
    truth = synth_study(base)
    cfg = PreprocessConfig(size=64)
    volumes = {}
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        for signed in (False, True):
            spec = dataclasses.replace(base, transfer_syntax=syntax, signed=signed, bits_stored=16 if signed else 12)
            root = tmp_path / f"{syntax}-{signed}"
            write_study(spec, root)
            item = StudyItem(study_uid=spec.uid, split="train",
                             image_dir=str(root / "train_images" / spec.uid),
                             segmentation=str(root / "segmentations" / f"{spec.uid}.nii"))
            if syntax == JPEG2000Lossless:  # the fast path is the one under test here
                assert decode_reduced(dcm(next(Path(item.image_dir).iterdir())), 1) is not None
            row = process_study(item, cfg, str(root / "shards"))
            assert row.status == "ok", row.reason
            shard = open_shard(root / "shards" / row.shard)
            volumes[syntax, signed] = np.asarray(shard.volume)
            # the 5/3 band of the true stored values, in HU: one halving takes 128 px to 64
            offset = 0 if signed else 1024
            bands = [halve(s + offset, 1, stored_range(spec.bits_stored, signed)) - offset for s in truth.hu]
            np.testing.assert_array_equal(volumes[syntax, signed], resize_slices(np.stack(bands), 64))
            np.testing.assert_array_equal(np.asarray(shard.mask), resize_labels(truth.labels, 64, 1))
            assert shard.meta["spacing"][1:] == pytest.approx([2 * truth.spacing[1], 2 * truth.spacing[2]])
    for signed in (False, True):  # the same storage gives the same shard, whatever the syntax
        same = [v for (_, s), v in volumes.items() if s == signed]
        assert all(np.array_equal(v, same[0]) for v in same)
    # unsigned storage (HU + 1024) cannot go below -1024 HU: the band's undershoot at air edges is
    # clamped there, as a JPEG 2000 decoder would clamp it; nothing else differs
    unsigned, signed = volumes[ExplicitVRLittleEndian, False], volumes[ExplicitVRLittleEndian, True]
    differ = unsigned != signed
    assert (unsigned[differ] == -1024).all() and (signed[differ] < -1024).all()


def test_scheduling_cost_knows_jpeg2000_is_read_at_half_resolution():
    import dataclasses

    from cspine_ray.preprocess.pipeline import estimated_cost

    item = StudyItem(study_uid="1.2.3", split="test", image_dir=str(EXAMPLE))
    halved, full = estimated_cost(item, 256), estimated_cost(item, 512)  # 512 px JPEG 2000 slices
    assert 0 < halved < full
    assert estimated_cost(dataclasses.replace(item, segmentation="seg.nii"), 256) > halved
    assert estimated_cost(dataclasses.replace(item, image_dir="/no/such/folder"), 256) == 0.0


def test_a_model_trained_on_older_shards_is_flagged_at_prediction(tmp_path, caplog):
    import json

    from cspine_ray.predict.inputs import load_preprocess_config
    from cspine_ray.preprocess.shards import SHARD_FORMAT

    settings = {"config": {"size": 64}, "shard_hash": "x"}
    older, current = tmp_path / "older.json", tmp_path / "current.json"
    older.write_text(json.dumps(settings))  # written before shard_format was recorded (format 2)
    current.write_text(json.dumps(dict(settings, shard_format=SHARD_FORMAT)))
    same_pixels = tmp_path / "format3.json"  # format 4 added checks, not other pixels
    same_pixels.write_text(json.dumps(dict(settings, shard_format=3)))
    with caplog.at_level("WARNING"):
        assert load_preprocess_config(current).size == 64
        assert load_preprocess_config(same_pixels).size == 64
        assert not caplog.records
        assert load_preprocess_config(older).size == 64
    assert "format 2" in caplog.text and f"format {SHARD_FORMAT}" in caplog.text
