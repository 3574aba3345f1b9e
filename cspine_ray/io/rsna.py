"""Find the studies in an RSNA 2022 layout and check its CSV files before anything reads pixels.

A layout root holds (docs/ARCHITECTURE.md, "Field facts"):

    train.csv                     StudyInstanceUID, patient_overall, C1..C7 (0/1)
    train_bounding_boxes.csv      optional: StudyInstanceUID, x, y, width, height, slice_number
    train_images/<UID>/*          one folder per study (the files need no .dcm extension)
    segmentations/<UID>.nii(.gz)  optional
    test.csv                      optional: row_id, StudyInstanceUID, prediction_type
    test_images/<UID>/            optional
    sample_submission.csv         optional (not read here)

`discover` never raises for a bad study: it records a `StudyError` in `Layout.problems` and
leaves the study out. Informative problems concern things that are not studies we could use
anyway (a test.csv row without images, a box for an unknown study, images without labels), so
the rule is simple: no study named by a problem is in `Layout.studies`, except those named only
by test.csv problems (test.csv is advisory: prediction covers the folders present) or by a
dropped optional annotation (faulty fracture boxes, a refused segmentation: the study is kept
with its labels, without that annotation). Only file-level faults (a CSV that is empty, not
text, not a CSV or without its required columns; a root that is no RSNA layout) raise
`LayoutError`, naming the file.

UIDs become folder and file names, so every UID, from a CSV or a folder name, must pass
`check_uid` before it is joined to a path; and every path reached through a symlink must pass
`resolves_inside` (the symlink policy) before it is read.
"""

from __future__ import annotations

import codecs
import io
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cspine_ray import TARGETS, VERTEBRAE
from cspine_ray.io.errors import LayoutError, StudyError

log = logging.getLogger(__name__)

# [0-9] rather than \d: \d also matches other scripts' digits ("١٢٣").
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LEN = 64  # DICOM UI value representation limit

TRAIN_COLUMNS = ("StudyInstanceUID",) + TARGETS
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
TEST_COLUMNS = ("row_id", "StudyInstanceUID", "prediction_type")

Box = tuple[float, float, float, float, int]  # (x, y, width, height, slice_number)


def check_uid(uid: str) -> str:
    """Return `uid` if it is a plain dotted number (e.g. 1.2.826.0.1), else raise ValueError."""
    if not isinstance(uid, str):
        raise ValueError(f"invalid StudyInstanceUID {uid!r}: not a string")
    if not uid:
        raise ValueError("invalid StudyInstanceUID '': empty")
    if len(uid) > UID_MAX_LEN:
        raise ValueError(f"invalid StudyInstanceUID {uid!r}: longer than {UID_MAX_LEN} characters")
    if not _UID.fullmatch(uid):
        raise ValueError(f"invalid StudyInstanceUID {uid!r}: must be dotted digits like 1.2.826.0.1")
    return uid


def parse_binary(text: str) -> int:
    """A 0/1 label cell as int; anything else (2, 0.5, 1.0, '', NaN) raises ValueError."""
    if text in ("0", "1"):
        return int(text)
    raise ValueError(f"{text!r} is not 0 or 1")


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """The symlink policy, the one place it is decided: a file or folder reached through
    symlinks (its own or a parent folder's) is read only when its target lies inside the data
    root, both resolved with os.path.realpath; links within the root are followed silently.

    A link that leads outside is refused, never followed: a study folder or segmentation so
    linked is a per-study problem with that reason, a slice file is skipped with a note in its
    study's warnings (a dataset must not be able to pull in files from elsewhere on the
    machine). Data on shared storage: make the root itself the link (or point --data at the
    share), rather than linking single studies from outside into a local root.
    """
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


OUTSIDE_ROOT = "links outside the data root; refused (symlinks are followed only within the root)"


def read_csv_strings(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV with every cell as a string (no NaN guessing), refusing missing columns.

    Strings keep UIDs like "1.10" from becoming floats and let the checks quote the exact text.
    UTF-8 (with or without a byte-order mark) and UTF-16 with a byte-order mark (what
    spreadsheets write as "Unicode text") are read; anything else is a LayoutError naming the
    file, as are an empty file, a file that is no CSV and missing columns.
    """
    text = _decoded_text(path)
    if not text.strip():
        raise LayoutError(f"{path}: empty file, expected columns {', '.join(required)}")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise LayoutError(f"{path}: not a CSV file ({str(e).strip().splitlines()[0][:120]})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise LayoutError(f"{path}: missing columns {', '.join(missing)} "
                          f"(found: {', '.join(map(str, table.columns))[:200]})")
    return table


def _decoded_text(path: Path) -> str:
    """The file's text: UTF-8 unless a byte-order mark says UTF-16; LayoutError otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise LayoutError(f"{path}: cannot be read ({e.strerror})") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # the codec reads the mark and the byte order
    else:
        encoding = "utf-8-sig"  # plain UTF-8, a leading UTF-8 mark dropped
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not {encoding.removesuffix('-sig').upper()} text (byte "
                          f"0x{raw[e.start]:02x} at offset {e.start} cannot be decoded); save it "
                          "as a UTF-8 CSV") from None
    if "\0" in text:  # UTF-16 without a mark, or a binary file that happens to decode
        raise LayoutError(f"{path}: not a text CSV file (it holds NUL bytes: UTF-16 without a "
                          "byte-order mark, or binary data); save it as a UTF-8 CSV")
    return text


@dataclass(frozen=True)
class StudyRecord:
    uid: str
    split: str                         # "train" | "test"
    image_dir: Path
    labels: dict[str, int] | None      # TARGETS -> 0/1 for train
    segmentation: Path | None
    fracture_boxes: tuple[Box, ...]    # sorted by slice_number


@dataclass
class Layout:
    root: Path
    studies: list[StudyRecord]                                # usable studies, sorted by (split, uid)
    problems: list[StudyError] = field(default_factory=list)  # never fatal; see module docstring


def discover(root: str | Path) -> Layout:
    """Validate an RSNA layout and list its usable studies (headers and pixels are not read)."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"not an RSNA layout: {root} is not a directory")
    has_train = (root / "train.csv").is_file()
    has_test = (root / "test_images").is_dir()
    if not has_train and not has_test:
        raise LayoutError(f"not an RSNA layout: {root} has neither train.csv nor test_images/")

    problems: list[StudyError] = []
    train = _discover_train(root, problems) if has_train else []
    train_uids = {r.uid for r in train}
    test = _discover_test(root, train_uids, problems)
    studies = sorted(train + test, key=lambda r: (r.split, r.uid))
    if problems:
        log.warning("%s: %d problem(s) found; %d usable studies", root, len(problems), len(studies))
        for problem in problems:
            log.debug("%s", problem)
    else:
        log.info("%s: %d usable studies", root, len(studies))
    return Layout(root=root, studies=studies, problems=problems)


# --- train part ----------------------------------------------------------------------------

def _discover_train(root: Path, problems: list[StudyError]) -> list[StudyRecord]:
    table = read_csv_strings(root / "train.csv", TRAIN_COLUMNS)
    bad: dict[str, list[str]] = defaultdict(list)   # uid -> problems that exclude it
    labels = _parse_train_rows(table, bad, problems)

    folders = _uid_folders(root, "train_images", problems)
    for uid in sorted(set(folders) - set(labels)):
        problems.append(StudyError(uid, f"train_images/{uid} has no row in train.csv; ignored"))
    for uid in labels:
        if uid not in folders:
            bad[uid].append(f"listed in train.csv but train_images/{uid} is missing")
        elif problem := _image_problem(root, "train_images", uid, folders[uid]):
            bad[uid].append(problem)

    boxes = _read_boxes(root, labels, bad, problems)
    segmentations = _find_segmentations(root, labels, bad, problems)

    records = []
    for uid in sorted(labels):
        if uid in bad:
            continue
        records.append(StudyRecord(uid=uid, split="train", image_dir=root / "train_images" / uid,
                                   labels=labels[uid], segmentation=segmentations.get(uid),
                                   fracture_boxes=tuple(sorted(boxes.get(uid, []),
                                                               key=lambda b: b[4]))))
    for uid in sorted(bad):
        problems.append(StudyError(uid, "; ".join(bad[uid])))
    return records


def _parse_train_rows(table: pd.DataFrame, bad: dict[str, list[str]],
                      problems: list[StudyError]) -> dict[str, dict[str, int]]:
    """uid -> labels for every valid train.csv UID; faults go to `bad` (per uid) or `problems`."""
    lines: dict[str, list[int]] = defaultdict(list)
    labels: dict[str, dict[str, int]] = {}
    for index, row in enumerate(table.itertuples(index=False)):
        line = index + 2  # header is line 1
        values = dict(zip(table.columns, row))
        raw = values["StudyInstanceUID"]
        try:
            uid = check_uid(raw)
        except ValueError as e:
            problems.append(StudyError(raw, f"train.csv line {line}: {e}; row ignored"))
            continue
        lines[uid].append(line)
        parsed, faults = {}, []
        for target in TARGETS:
            try:
                parsed[target] = parse_binary(values[target])
            except ValueError as e:
                faults.append(f"{target}={e}")
        if faults:
            bad[uid].append(f"train.csv line {line}: " + ", ".join(faults))
            continue
        positives = [v for v in VERTEBRAE if parsed[v] == 1]
        if parsed["patient_overall"] == 0 and positives:
            bad[uid].append(f"train.csv line {line}: patient_overall=0 but "
                            + ", ".join(f"{v}=1" for v in positives))
        elif parsed["patient_overall"] == 1 and not positives:
            bad[uid].append(f"train.csv line {line}: patient_overall=1 but C1..C7 are all 0")
        labels[uid] = parsed
    for uid, where in lines.items():
        if len(where) > 1:
            bad[uid].append(f"listed {len(where)} times in train.csv (lines "
                            + ", ".join(map(str, where)) + ")")
        labels.setdefault(uid, {})  # every valid UID is a study, even with faulty labels
    return labels


def _read_boxes(root: Path, labels: dict[str, dict[str, int]], bad: dict[str, list[str]],
                problems: list[StudyError]) -> dict[str, list[Box]]:
    """uid -> its boxes. A faulty row drops all of its study's boxes (a note, not an exclusion:
    boxes are an optional annotation, the labels stay); boxes on a study whose labels say no
    fracture contradict those labels, which excludes the study."""
    path = root / "train_bounding_boxes.csv"
    if not path.is_file():
        return {}
    table = read_csv_strings(path, BOX_COLUMNS)
    boxes: dict[str, list[Box]] = defaultdict(list)
    faulty: dict[str, list[str]] = defaultdict(list)
    rows: dict[str, int] = defaultdict(int)
    for index, row in enumerate(table.itertuples(index=False)):
        line = index + 2
        values = dict(zip(table.columns, row))
        raw = values["StudyInstanceUID"]
        where = f"train_bounding_boxes.csv line {line}"
        try:
            uid = check_uid(raw)
        except ValueError as e:
            problems.append(StudyError(raw, f"{where}: {e}; row ignored"))
            continue
        if uid not in labels:
            problems.append(StudyError(uid, f"{where}: box for a study not in train.csv; ignored"))
            continue
        rows[uid] += 1
        if faults := _box_faults(values):
            faulty[uid].append(f"{where}: " + ", ".join(faults))
            continue
        boxes[uid].append((*(float(values[n]) for n in ("x", "y", "width", "height")),
                           _int_or_none(values["slice_number"])))
    for uid, count in rows.items():
        if labels[uid].get("patient_overall") == 0:
            bad[uid].append(f"has {count} fracture box(es) in train_bounding_boxes.csv "
                            "but patient_overall=0")
        elif uid in faulty:
            boxes.pop(uid, None)
            problems.append(StudyError(uid, "; ".join(faulty[uid]) + f"; all {count} fracture "
                                            "box(es) of this study dropped, its labels kept"))
    return boxes


def _box_faults(values: dict[str, str]) -> list[str]:
    """What is wrong with one box row: corners at x, y >= 0, a positive size, a slice number.
    (Whether it lies inside the image is checked once the image size is known.)"""
    faults = []
    for name in ("x", "y", "width", "height"):
        number = _float_or_none(values[name])
        size = name in ("width", "height")  # 0 or less: an empty or reversed box
        if number is None or not math.isfinite(number) or number < 0 or (size and number == 0):
            faults.append(f"{name}={values[name]!r} must be a finite number "
                          f"{'> 0' if size else '>= 0'}")
    slice_number = _int_or_none(values["slice_number"])
    if slice_number is None or slice_number < 0:
        faults.append(f"slice_number={values['slice_number']!r} must be an integer >= 0")
    return faults


def _find_segmentations(root: Path, labels: dict[str, dict[str, int]],
                        bad: dict[str, list[str]], problems: list[StudyError]) -> dict[str, Path]:
    """uid -> its segmentation. One that cannot be used (two files, a link outside the root) is
    dropped with a note: a segmentation is optional, the study is kept without it."""
    folder = root / "segmentations"
    if not folder.is_dir():
        return {}
    found: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = entry.name
        stem = name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else None
        if stem is None:
            problems.append(StudyError(name, f"segmentations/{name!r} is not a .nii or .nii.gz "
                                             "file; ignored"))
            continue
        try:
            uid = check_uid(stem)
        except ValueError as e:
            problems.append(StudyError(stem, f"segmentations/{name!r}: {e}; ignored"))
            continue
        if uid not in labels:
            problems.append(StudyError(uid, f"segmentations/{name} is for a study not in "
                                            "train.csv; ignored"))
            continue
        found[uid].append(folder / name)
    usable = {}
    for uid, paths in found.items():
        if len(paths) > 1:
            problem = "more than one segmentation: " + ", ".join(p.name for p in paths)
        elif not resolves_inside(paths[0], root):
            problem = f"segmentations/{paths[0].name} {OUTSIDE_ROOT}"
        else:
            usable[uid] = paths[0]
            continue
        problems.append(StudyError(uid, f"{problem}; segmentation dropped, the study is kept "
                                        "without it"))
    return usable


# --- test part -----------------------------------------------------------------------------

def _discover_test(root: Path, train_uids: set[str], problems: list[StudyError]) -> list[StudyRecord]:
    """Test studies are the test_images folders; test.csv is only cross-checked."""
    folders = _uid_folders(root, "test_images", problems)  # {} without test_images/
    records = []
    for uid in sorted(folders):
        problem = _image_problem(root, "test_images", uid, folders[uid])
        if problem is None and uid in train_uids:
            problem = "present in both train_images and test_images; test copy ignored"
        if problem:
            problems.append(StudyError(uid, problem))
            continue
        records.append(StudyRecord(uid=uid, split="test", image_dir=root / "test_images" / uid,
                                   labels=None, segmentation=None, fracture_boxes=()))
    _check_test_csv(root, set(folders), problems)
    return records


def _check_test_csv(root: Path, folders: set[str], problems: list[StudyError]) -> None:
    path = root / "test.csv"
    if not path.is_file():
        return
    table = read_csv_strings(path, TEST_COLUMNS)
    missing_images: dict[str, int] = {}
    for index, row in enumerate(table.itertuples(index=False)):
        line = index + 2
        values = dict(zip(table.columns, row))
        raw, kind, row_id = values["StudyInstanceUID"], values["prediction_type"], values["row_id"]
        try:
            uid = check_uid(raw)
        except ValueError as e:
            problems.append(StudyError(raw, f"test.csv line {line}: {e}; row ignored"))
            continue
        if kind not in TARGETS:
            problems.append(StudyError(uid, f"test.csv line {line}: prediction_type={kind!r} is "
                                            f"not one of {', '.join(TARGETS)}"))
        elif row_id != f"{uid}_{kind}":
            problems.append(StudyError(uid, f"test.csv line {line}: row_id={row_id!r} disagrees "
                                            f"with StudyInstanceUID and prediction_type "
                                            f"(expected {uid}_{kind})"))
        if uid not in folders:
            missing_images.setdefault(uid, line)
    for uid, line in missing_images.items():
        problems.append(StudyError(uid, f"listed in test.csv (line {line}) but test_images/{uid} is "
                                        "missing; predictions cover the studies present"))


# --- shared helpers ------------------------------------------------------------------------

def _uid_folders(root: Path, part: str, problems: list[StudyError]) -> dict[str, os.DirEntry]:
    """Entries of root/part named by valid UIDs; other names are reported and never followed."""
    folder = root / part
    if not folder.is_dir():
        return {}
    entries = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        try:
            entries[check_uid(entry.name)] = entry
        except ValueError as e:
            problems.append(StudyError(entry.name, f"{part}/{entry.name!r}: {e}; ignored"))
    return entries


def _image_problem(root: Path, part: str, uid: str, entry: os.DirEntry) -> str | None:
    """Why the image folder of `uid` is unusable, or None. Stops at the first file found: any
    name will do (files need no .dcm extension); the reader decides what is DICOM."""
    if not entry.is_dir():
        return f"{part}/{uid} is not a folder"
    if not resolves_inside(entry.path, root):
        return f"{part}/{uid} {OUTSIDE_ROOT}"
    with os.scandir(entry.path) as files:
        if any(f.is_file() for f in files):
            return None
    return f"{part}/{uid} has no files"


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _int_or_none(text: str) -> int | None:
    """An integer cell; "12.0" counts (pandas writes ints as floats when a column has gaps)."""
    number = _float_or_none(text)
    if number is None or not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)
