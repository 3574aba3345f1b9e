"""Hostile inputs: broken and hostile studies and files through the real preprocessing run.

    python benchmarks/hostile.py            # about 2 minutes on 2 CPUs

Builds the corpus of `tests/test_hostile.py` (one generated study per hostile input beside good
studies and benign variants of them; the builder lives there, one home) once per variant below
(another seed, image size, slice spacing and segmentation shift), adds the file-level CSV
faults, and runs preprocessing once on everything and once on the good studies alone. Counts:

- inputs tried: hostile studies plus CSV files;
- crashes: a run that aborted (an exception out of `run_preprocess`, a traceback or an exit code
  other than 2 from the command line);
- silent wrong: a bad input that ended `ok` with no warning, or whose bad annotation was kept
  (a refused segmentation still marked present, dropped boxes still counted);
- good studies lost: a good study not `ok`, or its shard not bit-identical to the clean run's.

Goal: 0 crashes, 0 silent wrong, 0 good studies lost. Also printed: inputs that were reported
but not with the expected reason (should be 0 too).

Then the segmentation checks alone, on more masks (`--masks N` generated studies per variant,
no Ray): each study's own mask must be kept, every copy shifted by 3 to 10 slices refused, and
the masks of the other studies of its variant (cut to its shape) are counted as refused or not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile import BAD, GOOD, break_studies, corpus_specs, shard_bytes  # noqa: E402
from test_io_segmentation import fitted, shifted_along_z  # noqa: E402

# (seed, pixels per side, slice spacing mm, slices the shifted segmentation moves)
VARIANTS = ((12, 48, 4.0, 5), (13, 64, 3.0, 3), (14, 64, 2.0, 10), (15, 96, 2.5, 7))

CSV_HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
# (file, bytes): each refused as a whole, in one line naming the file
CSV_FAULTS = {
    "train.csv, a column missing": ("train.csv", b"StudyInstanceUID,patient_overall,C1\n1.2,0,0\n"),
    "train.csv, empty": ("train.csv", b""),
    "train.csv, blank lines only": ("train.csv", b"\n \n"),
    "train.csv, UTF-16 without a byte-order mark": ("train.csv", (CSV_HEADER + "1.2,0,0,0,0,0,0,0,0\n")
                                                    .encode("utf-16-le")),
    "train.csv, Latin-1 bytes": ("train.csv", (CSV_HEADER.replace("C1", "C\xe9")).encode("latin-1")),
    "train.csv, a PNG image": ("train.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"),
    "train.csv, ragged rows (not a CSV)": ("train.csv", (CSV_HEADER + "1.2,0\n1,2,3,4,5,6,7,8,9,10,11\n")
                                           .encode()),
    "train_bounding_boxes.csv, a column missing": ("train_bounding_boxes.csv",
                                                   b"StudyInstanceUID,x,y,w,h,slice_number\n"),
    "test.csv, a zip archive": ("test.csv", b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00"),
}


def build(work: Path) -> tuple[Path, Path, dict[tuple[int, str], object]]:
    """The hostile root, the clean root (good studies only) and (variant, case) -> spec."""
    from cspine_ray.synth import write_dataset

    root, clean = work / "rsna", work / "clean"
    specs = {}
    for v, (seed, size, spacing, _) in enumerate(VARIANTS):
        for name, spec in corpus_specs(seed, size, spacing).items():
            specs[v, name] = spec
    write_dataset(root, list(specs.values()), processes=os.cpu_count() or 1)
    write_dataset(clean, [s for (_, name), s in specs.items() if name in GOOD],
                  processes=os.cpu_count() or 1)
    for folder in (root, clean):
        (folder / "test.csv").unlink()  # train studies only
    for v, (_, size, _, shift) in enumerate(VARIANTS):
        uid = {name: s.uid for (w, name), s in specs.items() if w == v}
        break_studies(root, work / "outside", uid, size=size, shift=shift)
    return root, clean, specs


def bad_outcome(name: str, row) -> str:
    """What became of one hostile study."""
    status, words = BAD[name]
    if ((name.startswith("seg_") and row["has_segmentation"])
            or (name.startswith("box_") and row["n_fracture_boxes"] > 0)
            or (row["status"] == "ok" and not row["warnings"])):
        return "silent wrong"
    said = row["reason"] if row["status"] == "failed" else row["warnings"]
    if row["status"] != status or words not in said:
        return "reported, not as expected"
    return "failed with its reason" if status == "failed" else "kept, bad part dropped or warned"


def csv_outcome(work: Path, name: str, file: str, content: bytes) -> str:
    """A CSV fault through the command line: refused in one line naming the file, exit 2."""
    root = work / "csv" / name.replace(" ", "_").replace(",", "")
    (root / "test_images").mkdir(parents=True)  # a layout, whichever file is broken
    for other in ("train.csv", "test.csv"):
        if other != file:
            (root / other).write_text(CSV_HEADER if other == "train.csv" else
                                      "row_id,StudyInstanceUID,prediction_type\n")
    (root / file).write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "cspine_ray.preprocess", "--data", str(root),
                           "--out", str(root / "out")], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    if "Traceback" in done.stderr or done.returncode not in (0, 2):
        return "crash"
    if done.returncode == 0:
        return "silent wrong"
    if len(lines) == 1 and str(root / file) in lines[0]:
        return "refused in one line naming the file"
    return "reported, not as expected"


def utf16_with_mark_is_read(clean: Path) -> str:
    """train.csv saved as UTF-16 with a byte-order mark: read as the UTF-8 original."""
    from cspine_ray.io.rsna import discover

    path = clean / "train.csv"
    before = [(s.uid, s.labels) for s in discover(clean).studies]
    original = path.read_bytes()
    path.write_bytes(original.decode().encode("utf-16"))
    try:
        after = [(s.uid, s.labels) for s in discover(clean).studies]
    finally:
        path.write_bytes(original)
    return "read as the UTF-8 original" if after == before else "silent wrong"


SHIFTS = (3, -3, 5, -5, 7, 10)  # slices along the NIfTI slice axis


def mask_sweep(work: Path, per_variant: int, size: int) -> dict[str, list[int]]:
    """[refused, tried] for own, shifted and foreign masks, checked as preprocessing checks them
    (against the study's HU resampled to the shard size)."""
    import dataclasses

    import nibabel as nib
    import numpy as np

    from cspine_ray.io.dicom import iter_hu_slices, scan_series
    from cspine_ray.io.errors import StudyError
    from cspine_ray.io.segmentation import load_segmentation
    from cspine_ray.preprocess.resample import halvings, resize_slices
    from cspine_ray.synth import dataset_specs, write_study

    counts = {"own": [0, 0], "shifted": [0, 0], "foreign": [0, 0]}

    def refused(kind: str, data, affine, info, hu) -> None:
        path = work / "masks" / "case.nii"
        nib.save(nib.Nifti1Image(data, affine), path)
        try:
            load_segmentation(path, info, hu=hu)
        except StudyError:
            counts[kind][0] += 1
        counts[kind][1] += 1

    for v, (seed, px, spacing, _) in enumerate(VARIANTS):
        specs = [dataclasses.replace(s, size=px, has_segmentation=True) for s in
                 dataset_specs(per_variant, seed=100 + seed, n_test=0, size=px,
                               slice_spacing=spacing, severity="subtle")]
        studies = []
        for spec in specs:
            write_study(spec, work / "masks")
            info = scan_series(work / "masks" / "train_images" / spec.uid)
            hu = resize_slices(np.stack(list(iter_hu_slices(info, halvings(info.shape, size)))), size)
            image = nib.load(work / "masks" / "segmentations" / f"{spec.uid}.nii")
            studies.append((info, hu, np.asanyarray(image.dataobj), image.affine))
        for k, (info, hu, data, affine) in enumerate(studies):
            refused("own", data, affine, info, hu)
            for slices in SHIFTS:
                refused("shifted", shifted_along_z(data, slices), affine, info, hu)
            for j, (_, _, donor, _) in enumerate(studies):
                if j != k:
                    refused("foreign", fitted(donor, data.shape), affine, info, hu)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the corpus and shards go (default: a temp folder)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--masks", type=int, default=8,
                        help="generated studies per variant for the segmentation sweep (default 8; 0: skip)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hostile-"))
    work.mkdir(parents=True, exist_ok=True)

    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess

    start = time.time()
    root, clean, specs = build(work)
    built = time.time() - start
    crashes = 0
    cfg = PreprocessConfig(size=48, n_folds=2)
    try:
        rows = run_preprocess(root, work / "shards", cfg, num_cpus=args.num_cpus,
                              dashboard=False).set_index("study_uid")
        reference = run_preprocess(clean, work / "clean-shards", cfg, num_cpus=args.num_cpus,
                                   dashboard=False).set_index("study_uid")
    except Exception as e:  # the one outcome the goal forbids outright
        print(f"CRASH: {type(e).__name__}: {e}")
        raise SystemExit(1)
    ran = time.time() - start - built

    outcomes: dict[str, Counter] = {}
    for (v, name), spec in specs.items():
        if name in BAD:
            outcomes.setdefault(name, Counter())[bad_outcome(name, rows.loc[spec.uid])] += 1
    lost = [f"{name} (variant {v})" for (v, name), spec in specs.items() if name in GOOD and (
        rows.loc[spec.uid, "status"] != "ok"
        or shard_bytes(work / "shards", spec.uid) != shard_bytes(work / "clean-shards", spec.uid))]
    for name, (file, content) in CSV_FAULTS.items():
        result = csv_outcome(work, name, file, content)
        crashes += result == "crash"
        outcomes.setdefault(name, Counter())[result] += 1
    outcomes.setdefault("train.csv, UTF-16 with a byte-order mark", Counter())[
        utf16_with_mark_is_read(clean)] += 1

    good = sum(name in GOOD for _, name in specs)
    print(f"corpus: {len(VARIANTS)} variants (seed, px, mm, shift) {VARIANTS}; "
          f"{good} good studies ({len(GOOD)} kinds), {len(specs) - good} hostile studies "
          f"({len(BAD)} kinds), {len(CSV_FAULTS) + 1} CSV files")
    print(f"built in {built:.0f} s, preprocessed (both runs) in {ran:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"\n{'input':<45} outcome")
    for name, counts in outcomes.items():
        print(f"{name:<45} " + ", ".join(f"{n}x {what}" for what, n in sorted(counts.items())))
    total = Counter()
    for counts in outcomes.values():
        total.update(counts)
    print(f"\ninputs tried: {sum(total.values())}")
    print(f"crashes (run aborted): {crashes}")
    print(f"silent wrong (bad input ended ok with no warning, or its bad annotation kept): "
          f"{total['silent wrong']}")
    print(f"good studies lost (not ok, or shard not bit-identical to the clean run): "
          f"{len(lost)} of {good}" + (f": {', '.join(lost)}" if lost else ""))
    print(f"reported, but not with the expected reason: {total['reported, not as expected']}")
    if args.masks:
        start = time.time()
        counts = mask_sweep(work, args.masks, cfg.size)
        own, moved, foreign = counts["own"], counts["shifted"], counts["foreign"]
        print(f"\nsegmentation checks ({args.masks} generated studies per variant, "
              f"{len(VARIANTS) * args.masks} in all, against {cfg.size} px shards; "
              f"{time.time() - start:.0f} s):")
        print(f"  own masks kept: {own[1] - own[0]} of {own[1]}")
        print(f"  shifted by {', '.join(map(str, SHIFTS))} slices, refused: {moved[0]} of {moved[1]}")
        print(f"  other studies' masks (cut to shape), refused: {foreign[0]} of {foreign[1]}")
    print(f"(corpus and shards in {work})")


if __name__ == "__main__":
    main()
