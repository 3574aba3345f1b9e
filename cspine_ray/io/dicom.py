"""Read one CT series from a study folder as int16 HU slices in canonical order (head -> feet).

Two steps keep big studies cheap:

- `scan_series` reads headers only. It skips files that are not usable DICOM images (and says
  why), keeps the series with the most slices, orders the slices by their position along the
  slice normal (never by file name), and checks the geometry: duplicates, missing slices, gantry
  tilt, non-axial planes. Every fault it works around becomes a line in `SeriesInfo.warnings`;
  a study it cannot use raises `StudyError`.
- `iter_hu_slices` then decodes one file at a time (any transfer syntax pydicom and its installed
  plugins decode: GDCM, OpenJPEG, RLE), applies the modality rescale, resizes odd-sized slices
  to the majority size and yields int16 HU. `read_series` stacks those slices for callers that
  want the whole volume.
  Asked for fewer pixels (`levels` halvings), it delivers the JPEG 2000 5/3 low-pass band,
  decoded at that resolution when the file is JPEG 2000 (io/jpeg2000.py).

Decisions: truncated or non-DICOM files are skipped at scan time (the pixel data length is
checked against the header without reading the pixels); a file that still fails to decode later
raises `StudyError` naming it, because the slice list is fixed by then. Enhanced / multi-frame
images are refused: the RSNA data are single-frame, and per-frame geometry would need its own
reader. Every file of the folder is tried, whatever its extension. Symlinked files follow the
layout's symlink policy (`rsna.resolves_inside`): one that leads outside the data root is
skipped with a note, one that leads elsewhere inside the root joins the study with a note.

Messages name a file only by a name that is a plain number or UID (`12.dcm`, `1.2.3.4`), else
by its place in the folder (`file #3`: the third entry by name): file names from outside may
hold a patient's name, and warnings end up in the manifest and the logs.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, EnhancedCTImageStorage
from scipy import ndimage

from cspine_ray.io.errors import StudyError
from cspine_ray.io.jpeg2000 import decode_reduced, halve, stored_range
from cspine_ray.io.rsna import resolves_inside

log = logging.getLogger(__name__)

MAX_AXIAL_ANGLE_DEG = 45.0  # slice normal further than this from patient z: not an axial series
TILT_WARN_DEG = 0.5  # slice offsets further than this from the normal: report gantry tilt
MAX_TILT_DEG = 30.0  # beyond this the unsheared volume is too distorted to use
GAP_RATIO = 1.5  # a gap this many times larger (or smaller) than the median is irregular
DUPLICATE_MM = 0.01  # slices closer than this along the normal share one position
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_LISTED = 5  # how many items a warning spells out before summarising


@dataclass(frozen=True)
class SeriesInfo:
    study: str  # name used in messages
    files: tuple[Path, ...]  # one per canonical slice, head -> feet
    instance_numbers: tuple[int, ...]  # InstanceNumber of each canonical slice (-1 if absent)
    z_positions: tuple[float, ...]  # mm along the slice normal (patient z), each canonical slice
    shape: tuple[int, int]  # (rows, cols) majority size; all slices are delivered at this size
    spacing: tuple[float, float, float]  # (z, row, col) in mm; z = median gap between slices
    z_increases_with_instance: bool  # True for studies numbered feet -> head
    warnings: tuple[str, ...]  # every fault handled (skipped files, other series, resized, ...)
    file_labels: tuple[str, ...] = ()  # how messages name each canonical slice's file (file_label)


@dataclass
class _Header:
    """What scan_series needs from one file (no pixels)."""

    path: Path
    series_uid: str
    instance: int | None
    position: np.ndarray | None  # ImagePositionPatient (3,)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6,)
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    thickness: float | None  # SpacingBetweenSlices, else SliceThickness
    modality: str
    label: str = ""  # how messages name the file (file_label)


# ----------------------------------------------------------------------------- safe names

# names that cannot hold a person's name: a number or dotted UID, optionally .dcm (RSNA: 12.dcm)
_PLAIN_NAME = re.compile(r"[0-9]+(\.[0-9]+)*(\.dcm)?", re.IGNORECASE)
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # DICOM CS, e.g. a Modality
_UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")


def file_label(path: Path, place: int) -> str:
    """How messages name a file: its name when that is a plain number or UID, else its place
    in the study folder ("file #3" = the third entry sorted by name)."""
    return path.name if _PLAIN_NAME.fullmatch(path.name) else f"file #{place}"


def _scrubbed(text: str, path: Path, label: str) -> str:
    """An exception's text with the file's path, and a name that is not plain, replaced by its
    label."""
    text = text.replace(str(path), label)
    return text if label == path.name else text.replace(path.name, label)


def _code_text(value: str) -> str:
    return value if _CODE_STRING.fullmatch(value) else "(not a DICOM code string)"


def _uid_text(value: str) -> str:
    return value if _UID_TEXT.fullmatch(value) and len(value) <= 64 else "(not a UID)"


# ----------------------------------------------------------------------------- headers


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """A multi-valued numeric attribute, or None when absent or malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = [value] if isinstance(value, (str, int, float)) else list(value)
    try:
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def _int_or_none(value) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=None)
def _decodable(transfer_syntax: str) -> bool:
    """Whether some installed plugin decodes this transfer syntax."""
    try:
        return get_decoder(UID(transfer_syntax)).is_available
    except (NotImplementedError, ValueError):  # no decoder class for this (or a malformed) UID
        return False


def _pixel_data_problem(fp, file_size: int, ds: pydicom.Dataset, expected: int) -> str | None:
    """Check the Pixel Data element that starts at fp's position without reading the pixels.

    Catches truncated files cheaply: a defined-length element must fit in the file and hold at
    least `expected` bytes; encapsulated (compressed) data must reach its sequence delimiter.
    """
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    head = fp.read(8)
    if len(head) < 8:
        return "no pixel data (file ends after the header; truncated?)"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return f"no integer Pixel Data element (found ({group:04X},{element:04X}))"
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
    else:  # explicit VR OB/OW/UN: 2 reserved bytes then a 4-byte length
        extra = fp.read(4)
        if len(extra) < 4:
            return "pixel data truncated (element header cut off)"
        (length,) = struct.unpack(endian + "L", extra)
    value_start = fp.tell()

    if length != 0xFFFFFFFF:
        present = file_size - value_start
        if present < length:
            return f"pixel data truncated: file holds {present} of {length} bytes"
        if length < expected:
            return f"pixel data too short: {length} bytes, expected {expected}"
        return None

    # Encapsulated: walk the item headers (always little endian) up to the delimiter.
    frames = 0
    position = value_start
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            return "compressed pixel data truncated (no sequence delimiter before end of file)"
        group, element, item_length = struct.unpack("<HHL", item)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            return f"malformed compressed pixel data (unexpected tag ({group:04X},{element:04X}))"
        position += 8 + item_length
        if position > file_size:
            return "compressed pixel data truncated (a fragment runs past the end of the file)"
        frames += 1
    if frames < 2:  # the first item is the basic offset table
        return "compressed pixel data holds no fragments"
    return None


def _value_problem(ds: pydicom.Dataset) -> str | None:
    """A rescale or pixel spacing no CT scanner writes (they would give constant, NaN or
    clamped HU, or an impossible geometry), or None."""
    for keyword, low, high in _PLAUSIBLE:
        raw = ds.get(keyword)
        if raw is None or raw == "":
            continue
        items = [raw] if isinstance(raw, (str, int, float)) else list(raw)
        try:
            values = [float(v) for v in items]
        except (TypeError, ValueError):
            return f"{keyword} {str(raw)[:40]!r} is not a number"
        bad = [v for v in values if not (math.isfinite(v) and low <= v <= high)]
        if bad:
            return f"{keyword} {bad[0]:g} is outside {low:g}..{high:g}"
    return None


# (keyword, lowest, highest) of the values CT files really hold; beyond these the HU or the
# geometry would be nonsense (slope 0: a constant volume; spacing 0: a division by zero)
_PLAUSIBLE = (("RescaleSlope", 1e-6, 1e3), ("RescaleIntercept", -1e5, 1e5),
              ("PixelSpacing", 1e-3, 50.0))
MAX_SIDE = 4096  # px per side a slice may declare (a 65535x65535 RLE header would need 8 GiB)


def _read_header(path: Path, label: str) -> _Header | str:
    """The header of one file, or the reason it cannot be used (naming the file by `label`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # force=True on junk (and odd UIDs) makes pydicom chatty
        header = _read_header_quietly(path)
    if isinstance(header, str):
        return _scrubbed(header, path, label)
    header.label = label
    return header


def _read_header_quietly(path: Path) -> _Header | str:
    try:
        file_size = path.stat().st_size
        if file_size == 0:
            return "empty file"
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            rows, cols = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
            if not rows or not cols:
                return "not a DICOM image (no Rows/Columns; not DICOM or not an image)"
            if max(rows, cols) > MAX_SIDE:  # before any decoder allocates rows x cols
                return (f"declared image size {rows}x{cols} exceeds {MAX_SIDE} px per side "
                        "(CT slices are at most about 1024)")
            problem = _value_problem(ds)
            if problem:
                return problem
            frames = _int_or_none(ds.get("NumberOfFrames")) or 1
            if frames > 1 or ds.get("SOPClassUID") == EnhancedCTImageStorage:
                # per-frame geometry lives in functional groups; the RSNA data are single-frame
                return (f"multi-frame image ({frames} frame{'s' if frames > 1 else ''}): enhanced/"
                        "multi-frame CT is not supported, export the series as single-frame slices")
            samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
            if samples != 1:
                return f"not a grayscale image (SamplesPerPixel {samples})"
            meta = getattr(ds, "file_meta", None)
            tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            if tsyntax and not _decodable(tsyntax):
                return (f"transfer syntax {UID(tsyntax).name} ({tsyntax}) cannot be decoded "
                        "here: no installed plugin decodes it (the default install decodes JPEG "
                        "Lossless, JPEG-LS, JPEG 2000 and RLE; `pip install cspine-ray[gpl-jpeg]` "
                        "adds libjpeg)")
            bits = _int_or_none(ds.get("BitsAllocated")) or 16
            expected = (rows * cols * bits + 7) // 8
            if tsyntax == DeflatedExplicitVRLittleEndian:
                # pydicom inflated the data set in memory, so fp's position means nothing:
                # read it whole (deflate is rare) and check the pixel bytes it holds.
                full = pydicom.dcmread(path, force=True)
                present = len(full.PixelData) if "PixelData" in full else 0
                problem = None if present >= expected else f"pixel data too short: {present} bytes, expected {expected}"
            else:
                problem = _pixel_data_problem(fp, file_size, ds, expected)
            if problem:
                return problem
    except Exception as exc:  # pydicom raises many exception types on junk input
        return f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:120]})"

    thickness = _floats(ds, "SpacingBetweenSlices", 1) or _floats(ds, "SliceThickness", 1)
    position = _floats(ds, "ImagePositionPatient", 3)
    return _Header(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        instance=_int_or_none(ds.get("InstanceNumber")),
        position=None if position is None else np.array(position, dtype=np.float64),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        rows=rows,
        cols=cols,
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        thickness=thickness[0] if thickness and thickness[0] > 0 else None,
        modality=str(ds.get("Modality", "") or ""),
    )


# ----------------------------------------------------------------------------- helpers


def _listing(items: list[str]) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


def _instance_label(h: _Header) -> str:
    return f"instance {h.instance if h.instance is not None else '?'} ({h.label})"


def _pick_series(headers: list[_Header], notes: list[str]) -> list[_Header]:
    """Keep the series with the most slices; report the others by uid and count."""
    counts = Counter(h.series_uid for h in headers)
    if len(counts) == 1:
        return headers
    chosen = sorted(counts, key=lambda uid: (-counts[uid], uid))[0]
    others = [f"{_uid_text(uid) if uid else '(empty uid)'} ({n} files)"
              for uid, n in sorted(counts.items()) if uid != chosen]
    notes.append(f"folder holds {len(counts)} series: kept {_uid_text(chosen) if chosen else '(empty uid)'} "
                 f"({counts[chosen]} files), ignored {_listing(others)}")
    return [h for h in headers if h.series_uid == chosen]


def _pick_orientation(headers: list[_Header], notes: list[str]) -> tuple[list[_Header], tuple[float, ...]]:
    """The majority ImageOrientationPatient; slices in another plane (e.g. a localizer) are dropped."""
    known = [h for h in headers if h.orientation is not None]
    if not known:
        notes.append("no ImageOrientationPatient: assumed axial (1, 0, 0, 0, 1, 0)")
        return headers, AXIAL
    rounded = Counter(tuple(round(v, 3) for v in h.orientation) for h in known)
    majority = rounded.most_common(1)[0][0]
    reference = np.array(majority)
    keep, off_plane = [], []
    for h in headers:
        if h.orientation is None or np.abs(np.array(h.orientation) - reference).max() < 1e-2:
            keep.append(h)
        else:
            off_plane.append(h.label)
    if off_plane:
        notes.append(f"skipped {len(off_plane)} file(s) in another plane than the series "
                     f"(ImageOrientationPatient differs): {_listing(off_plane)}")
    missing = [h.label for h in keep if h.orientation is None]
    if missing:
        notes.append(f"{len(missing)} file(s) lack ImageOrientationPatient, assumed the series "
                     f"orientation: {_listing(missing)}")
    orientation = tuple(np.mean([h.orientation for h in keep if h.orientation is not None], axis=0))
    return keep, orientation


def _slice_normal(orientation: tuple[float, ...], study: str) -> np.ndarray:
    """Unit normal of the image plane, checked to be near patient z (an axial series)."""
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise StudyError(study, f"invalid ImageOrientationPatient {orientation} (row and column parallel)")
    normal = normal / norm
    angle = math.degrees(math.acos(min(1.0, abs(normal[2]))))
    if angle > MAX_AXIAL_ANGLE_DEG:
        raise StudyError(study, f"non-axial series (normal ({normal[0]:.2f}, {normal[1]:.2f}, "
                                f"{normal[2]:.2f}) is {angle:.0f} degrees from the patient z axis)")
    return normal


def _fallback_thickness(headers: list[_Header], notes: list[str], why: str) -> float:
    values = [h.thickness for h in headers if h.thickness]
    if values:
        notes.append(f"{why}: z spacing taken from SpacingBetweenSlices/SliceThickness")
        return float(np.median(values))
    notes.append(f"{why}: no slice thickness either, z spacing set to 1.0 mm")
    return 1.0


def _order_by_instance(headers: list[_Header], study: str, notes: list[str]) -> tuple[list[_Header], np.ndarray, float]:
    """Fallback when no slice has a position: InstanceNumber order, assuming instance 1 = head."""
    numbered = [h for h in headers if h.instance is not None]
    if len(headers) > 1 and not numbered:
        raise StudyError(study, "cannot order slices: no ImagePositionPatient and no InstanceNumber")
    if len(headers) > 1:
        dropped = [h.label for h in headers if h.instance is None]
        if dropped:
            notes.append(f"skipped {len(dropped)} file(s) without position or InstanceNumber: {_listing(dropped)}")
        headers = sorted(numbered, key=lambda h: (h.instance, h.path.name))
        notes.append("no ImagePositionPatient: slices ordered by InstanceNumber, "
                     "assuming the lowest instance is the head end")
    spacing = _fallback_thickness(headers, notes, "no ImagePositionPatient")
    return headers, -spacing * np.arange(len(headers), dtype=np.float64), spacing


def _drop_duplicates(ordered: list[_Header], z: np.ndarray, notes: list[str]) -> tuple[list[_Header], np.ndarray]:
    keep = [0]
    duplicates = []
    for i in range(1, len(ordered)):
        if z[keep[-1]] - z[i] < DUPLICATE_MM:
            duplicates.append(f"z={z[i]:.2f} mm kept {_instance_label(ordered[keep[-1]])}, "
                              f"dropped {_instance_label(ordered[i])}")
        else:
            keep.append(i)
    if duplicates:
        notes.append(f"{len(duplicates)} duplicate slice position(s): {_listing(duplicates)}")
    return [ordered[i] for i in keep], z[keep]


def _check_gaps(ordered: list[_Header], z: np.ndarray, study: str, notes: list[str]) -> float:
    """Median gap between canonical slices; irregular gaps reported, hopeless ones refused."""
    gaps = z[:-1] - z[1:]
    median = float(np.median(gaps))
    irregular = np.flatnonzero((gaps > GAP_RATIO * median) | (gaps < median / GAP_RATIO))
    if len(irregular) > len(gaps) / 2:
        raise StudyError(study, f"slice gaps too irregular: {len(irregular)} of {len(gaps)} gaps differ "
                                f"from the median gap {median:.2f} mm by more than {GAP_RATIO}x")
    missing, uneven = [], []
    for i in irregular:
        text = (f"{gaps[i]:.2f} mm between {_instance_label(ordered[i])} and "
                f"{_instance_label(ordered[i + 1])}")
        (missing if gaps[i] > median else uneven).append(text)
    if missing:
        notes.append(f"missing slice(s): {len(missing)} gap(s) larger than {GAP_RATIO}x the median "
                     f"gap {median:.2f} mm: {_listing(missing)}")
    if uneven:
        notes.append(f"uneven slice gaps: {len(uneven)} gap(s) smaller than the median gap "
                     f"{median:.2f} mm / {GAP_RATIO}: {_listing(uneven)}")
    return median


def _check_tilt(ordered: list[_Header], normal: np.ndarray, study: str, notes: list[str]) -> None:
    """Gantry tilt: the stack runs along a direction that is not the image normal."""
    offset = ordered[-1].position - ordered[0].position
    length = np.linalg.norm(offset)
    if length < 1e-6:
        return
    angle = math.degrees(math.acos(min(1.0, abs(float(offset @ normal)) / length)))
    if angle > MAX_TILT_DEG:
        raise StudyError(study, f"gantry tilt of {angle:.1f} degrees (slice positions move off the "
                                f"slice normal) is more than {MAX_TILT_DEG:.0f} degrees")
    if angle > TILT_WARN_DEG:
        notes.append(f"gantry tilt of {angle:.1f} degrees: slice positions move off the slice normal; "
                     "slices kept as acquired (not resampled)")


def _order_by_position(headers: list[_Header], study: str, notes: list[str]) -> tuple[list[_Header], np.ndarray, float]:
    """Sort along the slice normal so patient z decreases (head first), whatever the normal's sign."""
    unplaced = [h.label for h in headers if h.position is None]
    if unplaced:
        notes.append(f"skipped {len(unplaced)} file(s) without ImagePositionPatient: {_listing(unplaced)}")
        headers = [h for h in headers if h.position is not None]
    headers, orientation = _pick_orientation(headers, notes)
    normal = _slice_normal(orientation, study)
    head_up = 1.0 if normal[2] > 0 else -1.0  # orient the normal towards the head (+z in LPS)
    z_of = {id(h): head_up * float(h.position @ normal) for h in headers}
    ordered = sorted(headers, key=lambda h: (-z_of[id(h)], h.instance if h.instance is not None else 0, h.path.name))
    z = np.array([z_of[id(h)] for h in ordered])
    ordered, z = _drop_duplicates(ordered, z, notes)
    if len(ordered) == 1:
        return ordered, z, _fallback_thickness(ordered, notes, "single slice")
    spacing = _check_gaps(ordered, z, study, notes)
    _check_tilt(ordered, normal, study, notes)
    return ordered, z, spacing


def _instance_direction(ordered: list[_Header], notes: list[str]) -> bool:
    """True when instance numbers grow from feet to head (canonical order runs them downwards)."""
    numbers = [h.instance for h in ordered if h.instance is not None]
    if len(numbers) < 2:
        return False
    steps = np.sign(np.diff(numbers))
    if not (np.all(steps > 0) or np.all(steps < 0)):
        notes.append("instance numbers are not monotonic along z (slices ordered by position)")
    return bool(numbers[0] > numbers[-1])


def _files_within(folder: Path, files: list[Path], root: str | Path | None,
                  label: dict[Path, str], notes: list[str]) -> list[Path]:
    """The symlink policy (rsna.resolves_inside) applied to a study's files: a file that
    resolves outside the root (or, without one, the study folder) is skipped; one that resolves
    elsewhere inside the root joins the study, said (it may be another study's slice)."""
    boundary, where = (root, "the data root") if root is not None else (folder, "the study folder")
    outside = [p for p in files if not resolves_inside(p, boundary)]
    if outside:
        notes.append(f"skipped {len(outside)} file(s) that link outside {where} (symlinks are "
                     f"followed only within it): {_listing([label[p] for p in outside])}")
    kept = [p for p in files if p not in outside]
    elsewhere = [label[p] for p in kept if not resolves_inside(p, folder)]
    if elsewhere:
        notes.append(f"{len(elsewhere)} file(s) are symlinks to files outside the study folder "
                     f"(elsewhere in {where}), read as part of this study: {_listing(elsewhere)}")
    return kept


# ----------------------------------------------------------------------------- public API


def scan_series(folder: str | Path, study: str | None = None,
                root: str | Path | None = None) -> SeriesInfo:
    """Read the headers of a study folder and work out the canonical slice order.

    Headers only (stop_before_pixels), so this is cheap even for 600-slice studies. `root` is
    the data root a symlinked file must resolve into (None: the study folder itself).
    Raises StudyError when the folder holds no usable axial series.
    """
    folder = Path(folder)
    study = study or folder.name
    if not folder.is_dir():
        raise StudyError(study, f"folder {folder} does not exist or is not a folder")
    entries = sorted(folder.iterdir())
    label = {p: file_label(p, place) for place, p in enumerate(entries, start=1)}
    notes: list[str] = []
    subfolders = [label[p] for p in entries if p.is_dir()]
    if subfolders:
        notes.append(f"ignored {len(subfolders)} subfolder(s): {_listing(subfolders)}")
    files = _files_within(folder, [p for p in entries if p.is_file()], root, label, notes)
    broken = [label[p] for p in entries if not p.is_file() and not p.is_dir()]
    if broken:  # dangling symlinks, link loops, sockets: nothing to read, said not hidden
        one = len(broken) == 1
        notes.append(f"skipped {len(broken)} entr{'y that is' if one else 'ies that are'} "
                     f"neither a file nor a folder (a broken symlink?): {_listing(broken)}")
    if not files:
        raise StudyError(study, f"no files in {folder}" + (f" ({'; '.join(notes)})" if notes else ""))

    headers, skipped = [], []
    for path in files:
        header = _read_header(path, label[path])
        if isinstance(header, str):
            skipped.append(f"{label[path]}: {header}")
        else:
            headers.append(header)
    if not headers:
        raise StudyError(study, f"no usable DICOM slice in {folder}: {_listing(skipped)}")
    notes.extend(f"skipped {s}" for s in skipped)

    headers = _pick_series(headers, notes)
    if any(h.position is not None for h in headers):
        ordered, z, z_spacing = _order_by_position(headers, study, notes)
    else:
        ordered, z, z_spacing = _order_by_instance(headers, study, notes)

    sizes = Counter((h.rows, h.cols) for h in ordered)
    shape = max(sizes, key=lambda s: (sizes[s], s))
    odd = [h for h in ordered if (h.rows, h.cols) != shape]
    if odd:
        odd_sizes = sorted({f"{h.rows}x{h.cols}" for h in odd})
        notes.append(f"resized {len(odd)} slice(s) of size {', '.join(odd_sizes)} to the majority size "
                     f"{shape[0]}x{shape[1]}: {_listing([_instance_label(h) for h in odd])}")

    in_plane = Counter(h.pixel_spacing for h in ordered if (h.rows, h.cols) == shape and h.pixel_spacing)
    if in_plane:
        row_mm, col_mm = in_plane.most_common(1)[0][0]
    else:
        notes.append("no PixelSpacing: in-plane spacing set to 1.0 mm")
        row_mm, col_mm = 1.0, 1.0

    modalities = sorted({_code_text(h.modality) if h.modality else "(missing)" for h in ordered} - {"CT"})
    if modalities:
        notes.append(f"modality {', '.join(modalities)}, not CT: values are not Hounsfield units")
    unnumbered = sum(h.instance is None for h in ordered)
    if unnumbered:
        notes.append(f"{unnumbered} slice(s) without InstanceNumber (reported as -1)")

    z_increases = _instance_direction(ordered, notes)
    messages = tuple(f"study {study}: {n}" for n in notes)
    for message in messages:
        log.warning(message)
    return SeriesInfo(
        study=study,
        files=tuple(h.path for h in ordered),
        instance_numbers=tuple(h.instance if h.instance is not None else -1 for h in ordered),
        z_positions=tuple(float(v) for v in z),
        shape=(int(shape[0]), int(shape[1])),
        spacing=(float(z_spacing), float(row_mm), float(col_mm)),
        z_increases_with_instance=z_increases,
        warnings=messages,
        file_labels=tuple(h.label for h in ordered),
    )


def _resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to an exact shape (pixel centres aligned, edges clamped)."""
    rows = (np.arange(shape[0]) + 0.5) * image.shape[0] / shape[0] - 0.5
    cols = (np.arange(shape[1]) + 0.5) * image.shape[1] / shape[1] - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float32), grid, order=1, mode="nearest")


def _to_int16(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        values = np.rint(values)
    return np.clip(values, -32768, 32767).astype(np.int16)


def _rescale(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> HU: the rescale apply_modality_lut does, in integers when it can."""
    if ("ModalityLUTSequence" not in ds and "RescaleSlope" in ds and "RescaleIntercept" in ds
            and pixels.dtype.kind in "iu" and float(ds.RescaleSlope) == 1
            and float(ds.RescaleIntercept).is_integer()):
        return pixels.astype(np.int32) + int(float(ds.RescaleIntercept))  # integer CT rescale: no float pass
    return apply_modality_lut(pixels, ds)  # RescaleSlope/Intercept or a modality LUT


def _decode_hu(path: Path, study: str, shape: tuple[int, int], levels: tuple[int, ...],
               label: str) -> list[np.ndarray]:
    """One file as HU at each of `levels` halvings of the series shape, from one decode.
    StudyError names the file (label).

    For one level, JPEG 2000 files that allow it are decoded straight at the reduced resolution;
    otherwise the file is decoded in full and halved with the same 5/3 filter (same values: see
    io/jpeg2000.py), so asking for several levels at once gives each the pixels it gets alone.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            pixels = None
            if len(levels) == 1 and levels[0] and (int(ds.Rows), int(ds.Columns)) == shape:
                pixels = decode_reduced(ds, levels[0])
            if pixels is not None:
                images = [_rescale(pixels, ds)]
            else:
                pixels = ds.pixel_array
                if pixels.ndim == 2 and (pixels.shape != shape or pixels.dtype.kind not in "iu"):
                    # an odd-sized (or float) slice: HU, resized to the series shape, then halved
                    hu = _to_int16(_resize_bilinear(np.asarray(_rescale(pixels, ds), dtype=np.float32), shape))
                    return [halve(hu, n, (-32768, 32767)) for n in levels]
                if pixels.ndim == 2:
                    bits = int(ds.get("BitsStored", 0) or 0) or 8 * pixels.dtype.itemsize
                    value_range = stored_range(bits, pixels.dtype.kind == "i")
                    images = [_rescale(halve(pixels, n, value_range) if n else pixels, ds) for n in levels]
                else:
                    images = [_rescale(pixels, ds)]
    except Exception as exc:  # decoder plugins raise assorted types
        hint = (" (`pip install cspine-ray[gpl-jpeg]` adds libjpeg, which decodes more JPEG "
                "variants)" if isinstance(exc, NotImplementedError) or "plugins" in str(exc) else "")
        raise StudyError(study, f"cannot decode {label}: {type(exc).__name__}: "
                                f"{_scrubbed(str(exc), path, label)[:200]}{hint}") from exc
    if images[0].ndim != 2:
        raise StudyError(study, f"cannot decode {label}: expected one 2-D frame, got shape {images[0].shape}")
    return images


def iter_hu_slices(info: SeriesInfo, levels: int = 0) -> Iterator[np.ndarray]:
    """Yield each canonical slice as int16 HU, decoding one file at a time.

    levels > 0 delivers every slice at `halved_shape(info.shape, levels)`: the JPEG 2000 5/3
    low-pass band, decoded at that resolution where the file allows (much less CPU).
    """
    for images in iter_hu_levels(info, (levels,)):
        yield images[0]


def iter_hu_levels(info: SeriesInfo, levels: tuple[int, ...]) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield each canonical slice at several resolutions at once (one int16 HU image per entry
    of `levels`), decoding each file once: a shard's reduced and native levels in one read."""
    labels = info.file_labels or tuple(file_label(p, i) for i, p in enumerate(info.files, start=1))
    for path, label in zip(info.files, labels):
        yield tuple(_to_int16(hu) for hu in _decode_hu(path, info.study, info.shape, tuple(levels), label))


def read_series(folder: str | Path, study: str | None = None) -> tuple[np.ndarray, SeriesInfo]:
    """The whole study as an int16 (z, rows, cols) HU volume, head -> feet, plus its SeriesInfo."""
    info = scan_series(folder, study)
    volume = np.empty((len(info.files), *info.shape), dtype=np.int16)
    for i, image in enumerate(iter_hu_slices(info)):
        volume[i] = image
    return volume, info
