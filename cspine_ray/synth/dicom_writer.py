"""Write a synthetic study the way scanners and the RSNA data store it.

DICOM: one CT Image Storage file per slice, `<InstanceNumber>.dcm`, with the headers a reader
needs (geometry, rescale, pixel format, windows) and fake patient identifiers that downstream
stages must never log. Four transfer syntaxes are written: Explicit and Implicit VR Little
Endian, RLE Lossless and JPEG 2000 Lossless (pylibjpeg-openjpeg encodes the latter).

NIfTI: the segmentation is stored like the RSNA files, so that
`nii[:, ::-1, ::-1].transpose(2, 1, 0)` is the stack in file-number order for studies numbered
head -> feet; the NIfTI slice axis always runs feet -> head (physical order), so studies numbered
the other way need one more flip of the slice axis.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, PYDICOM_IMPLEMENTATION_UID, RLELossless)

from cspine_ray.synth.study import SynthStudy

TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless)
UNSIGNED_OFFSET = 1024       # unsigned storage: stored = HU + 1024, RescaleIntercept -1024


def _ds(value: float) -> str:
    """A decimal string that round-trips the value (DS allows 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def stored_pixels(study: SynthStudy) -> np.ndarray:
    """The stored values for the study's pixel representation (exact for every HU we make)."""
    if study.spec.signed:
        return study.hu.astype(np.int16)
    return (study.hu.astype(np.int32) + UNSIGNED_OFFSET).clip(0, 2 ** study.spec.bits_stored - 1).astype(np.uint16)


def _common_elements(study: SynthStudy) -> dict:
    spec = study.spec
    dz, dy, dx = study.spacing
    return {
        "SOPClassUID": CTImageStorage,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "StudyDate": f"2022{(spec.index % 12) + 1:02d}{(spec.index % 28) + 1:02d}",
        "StudyTime": "120000",
        "Modality": "CT",
        "Manufacturer": "cspine-ray synth",
        "InstitutionName": "Synthetic Hospital",
        "PatientName": f"SYNTH^{spec.index}",
        "PatientID": f"SYNTH{spec.seed:04d}{spec.index:05d}",
        "PatientBirthDate": f"19{50 + spec.index % 50:02d}0101",
        "PatientSex": "MF"[spec.index % 2],
        "BodyPartExamined": "CSPINE",
        "SliceThickness": _ds(study.slice_thickness),
        "KVP": "120",
        "ConvolutionKernel": "BONE",
        "PatientPosition": "HFS",
        "StudyInstanceUID": spec.uid,
        "SeriesInstanceUID": f"{spec.uid}.1",
        "FrameOfReferenceUID": f"{spec.uid}.2",
        "StudyID": str(spec.index),
        "SeriesNumber": 1,
        "AcquisitionNumber": 1,
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": study.hu.shape[1],
        "Columns": study.hu.shape[2],
        "PixelSpacing": [_ds(dy), _ds(dx)],
        "BitsAllocated": 16,
        "BitsStored": spec.bits_stored,
        "HighBit": spec.bits_stored - 1,
        "PixelRepresentation": 1 if spec.signed else 0,
        "WindowCenter": ["500", "40"],
        "WindowWidth": ["2000", "400"],
        "RescaleIntercept": "0" if spec.signed else str(-UNSIGNED_OFFSET),
        "RescaleSlope": "1",
        "RescaleType": "HU",
    }


def write_dicom_series(study: SynthStudy, folder: str | Path) -> list[Path]:
    """Write every slice as `<InstanceNumber>.dcm` into `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = study.spec
    syntax = spec.transfer_syntax
    if syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {syntax} is not one the generator writes")
    pixels = stored_pixels(study)
    common = _common_elements(study)
    # openjpeg logs one INFO line per encoded tile; keep the caller's log readable
    quiet = logging.getLogger("openjpeg")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        return _write_slices(study, folder, pixels, common)
    finally:
        quiet.setLevel(level)


def _write_slices(study: SynthStudy, folder: Path, pixels: np.ndarray, common: dict) -> list[Path]:
    spec = study.spec
    syntax = spec.transfer_syntax
    x0, y0 = study.corner_xy
    paths = []
    for k in range(pixels.shape[0]):
        instance = int(study.instance_numbers[k])
        z = float(study.z_positions[k])
        ds = Dataset()
        for keyword, value in common.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = f"{spec.uid}.1.{instance}"
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CSPINE_RAY_SYNTH"
        ds.file_meta = meta
        arr = np.ascontiguousarray(pixels[k])
        if syntax in (RLELossless, JPEG2000Lossless):
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(syntax, arr, generate_instance_uid=False)
        else:
            meta.TransferSyntaxUID = syntax
            ds.PixelData = arr.tobytes()
        path = folder / f"{instance}.dcm"
        ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
                   enforce_file_format=True)
        paths.append(path)
    return paths


def segmentation_affine(study: SynthStudy) -> np.ndarray:
    """NIfTI (RAS) affine of the RSNA-style array: i = column, j = reversed row, k = feet -> head."""
    ny = study.labels.shape[1]
    dz, dy, dx = study.spacing
    x0, y0 = study.corner_xy
    z_feet = float(study.z_positions[-1])
    return np.array([
        [-dx, 0.0, 0.0, -x0],
        [0.0, dy, 0.0, -(y0 + (ny - 1) * dy)],
        [0.0, 0.0, dz, z_feet],
        [0.0, 0.0, 0.0, 1.0],
    ])


def to_rsna_nifti_array(labels: np.ndarray) -> np.ndarray:
    """Canonical (z head->feet, y, x) labels -> the RSNA NIfTI array (x, y reversed, z reversed)."""
    return np.ascontiguousarray(labels.transpose(2, 1, 0)[:, ::-1, ::-1])


def write_segmentation(study: SynthStudy, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(to_rsna_nifti_array(study.labels).astype(np.uint8), segmentation_affine(study))
    img.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path
