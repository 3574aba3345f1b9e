"""`cspine-ray synth OUT --studies N`: write a synthetic RSNA-layout demo dataset."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cspine_ray.synth.dataset import SEGMENTED_FRACTION, dataset_specs, missing_test_uid, write_dataset
from cspine_ray.synth.fractures import SEVERITIES


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (created; must be empty if it exists)")
    parser.add_argument("--studies", type=_positive, required=True, help="number of train studies")
    parser.add_argument("--test-studies", type=_non_negative, default=None,
                        help="number of test studies with images (default max(2, studies // 8))")
    parser.add_argument("--seed", type=_non_negative, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image rows = columns (default 256)")
    parser.add_argument("--slice-spacing", type=float, default=1.0, help="mm between slices (default 1.0)")
    parser.add_argument("--severity", choices=SEVERITIES, default="subtle",
                        help="subtle (realistic) or obvious (learnable by small models at low resolution)")
    parser.add_argument("--crack-px", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="crack widths in pixels at --size (e.g. 1 3, as ~1 mm cracks are on "
                             "the real data at 512 px) instead of the severity's millimetres")
    parser.add_argument("--segmented-fraction", type=float, default=SEGMENTED_FRACTION,
                        help=f"share of train studies with a segmentation (default {SEGMENTED_FRACTION}; "
                             "the real data: 0.04); at least 2 in a set of 8 or more")
    parser.add_argument("--preview", action="store_true", help="also save OUT/preview.png")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"cspine-ray synth: {out} exists and is not an empty folder; choose a new one")
        return 2
    try:
        specs = dataset_specs(args.studies, seed=args.seed, n_test=args.test_studies, size=args.size,
                              slice_spacing=args.slice_spacing, severity=args.severity,
                              segmented_fraction=args.segmented_fraction,
                              crack_px=args.crack_px)
    except ValueError as e:
        print(f"cspine-ray synth: {e}")
        return 2
    start = time.perf_counter()
    written = write_dataset(out, specs, preview=args.preview)
    seconds = time.perf_counter() - start
    train = [w for w in written if w.spec.split == "train"]
    print(f"wrote {len(train)} train and {len(written) - len(train)} test studies to {out} "
          f"in {seconds:.1f} s ({seconds / len(written):.2f} s per study)")
    print(f"  fractured train studies: {sum(bool(w.spec.fractured) for w in train)}, "
          f"with boxes: {sum(bool(w.boxes) for w in train)}, "
          f"segmented: {sum(w.spec.has_segmentation for w in train)}")
    print(f"  test.csv also lists {missing_test_uid(specs)}, which has no images (as in the public data)")
    if args.preview:
        print(f"  preview: {out / 'preview.png'}")
    return 0
