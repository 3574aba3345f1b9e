"""The shards' native-resolution level: what it costs at real size and what it buys on thin
fractures.

    python benchmarks/native.py [--cost-studies 4] [--studies 64] [--size 256] [--seeds 3]
                                [--storage DIR] [--report PATH] [--skip-cost] [--skip-quality]
                                [--mixed SEEDS]

1. Cost at real size. `--cost-studies` generated studies of 512 px and about 300 slices
   (0.6 mm; one in ten is a 768 px study, like the real data), one per transfer syntax in turn,
   each sharded to 256 px without and with the native level (512), one study at a time in this
   process (`build_shard`, no Ray: exact seconds per study): seconds and disk per study, and the
   time to build one stage-2 sample at the real-data settings (L = 8 steps of 3 slices, 320 px
   crops) from either level, read warm (the pages in memory, as in later epochs).
2. What it buys. A generated set of `--studies` studies with subtle (thin) fractures at
   `--size` px, sharded at half that size with a native level at full size. The two-stage model
   at the laptop budget (`search_spaces/laptop.yaml`'s base, 2 folds) crops from the shard-size
   volume (input.native false) and from the native level (true), `--seeds` seeds each. Both arms
   of a seed share its stage 1 (the locator reads the shard-size volume either way), so they
   differ only in where the crops come from. Figures out of fold, at the epoch chosen on the
   vertebra loss, and the last epoch's CV figures, which nothing chose.
3. `--mixed 42,1`: one native resolution per shard set, or not. The learning test's set and
   budget (tests/test_learning.py: 96 studies of 64 px, 18% of them at 96 px) sharded with
   native_size 96, so only the 96 px studies have a native level (what a rule of "any study
   finer than the shards" gives), trained with input.native off and on for each seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from quality import Timings, config, generate, load, markdown, print_report, row, timed

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

COST_SPACING = 0.6   # mm: about 300 slices over the generated neck, as in a real study
COST_SIZE, COST_SHARD = 512, 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cost-studies", type=int, default=4, help="real-size studies (default 4)")
    p.add_argument("--studies", type=int, default=64, help="thin-fracture set size (default 64)")
    p.add_argument("--size", type=int, default=256,
                   help="generated image size of the thin-fracture set; shards at half (default 256)")
    p.add_argument("--segmented", type=float, default=0.25, help="share segmented (default 0.25)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default 3)")
    p.add_argument("--seed", type=int, default=31, help="dataset seed (default 31)")
    p.add_argument("--storage", type=Path, default=Path("runs/native"), help="default runs/native")
    p.add_argument("--report", type=Path, default=None, help="also write the tables here")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--mixed", default="", help="seeds for part 3, e.g. 42,1 (default: not run)")
    args = p.parse_args(argv)
    args.epochs = args.stage1_epochs = None  # quality.config: the laptop budget as it ships
    args.retrain = False
    return args


# ----------------------------------------------------------------------------- 1. cost

def cost_data(args: argparse.Namespace) -> Path:
    from cspine_ray.synth import dataset_specs, write_dataset

    root = args.storage / f"cost-{args.cost_studies}x{COST_SIZE}px-seed{args.seed}"
    stamp = root / "benchmark-dataset.json"
    params = {"studies": args.cost_studies, "size": COST_SIZE, "spacing": COST_SPACING,
              "seed": args.seed}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return root
    shutil.rmtree(root, ignore_errors=True)
    specs = dataset_specs(args.cost_studies, seed=args.seed, n_test=0, size=COST_SIZE,
                          slice_spacing=COST_SPACING, severity="subtle", segmented_fraction=1.0)
    write_dataset(root, specs, processes=1)
    stamp.write_text(json.dumps(params))
    return root


def shard_sizes(folder: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_size for p in folder.glob("*.npy")}


def sample_ms(shards: Path, uids: list[str], native: bool, repeats: int = 3) -> float:
    """Median ms to build one stage-2 sample (ground-truth slice tables), warm."""
    from cspine_ray.datasets import VertebraSequenceDataset
    from cspine_ray.preprocess.shards import open_shard, study_path

    tables = {}
    for uid in uids:
        shard = open_shard(study_path(shards, uid))
        tables[uid] = np.concatenate([shard.ratio, shard.box], axis=1)
    ds = VertebraSequenceDataset(shards, [(u, v) for u in uids for v in range(7)], tables,
                                 length=8, crop_size=320, native=native)
    for i in range(len(ds)):  # warm the page cache and the store
        ds[i]
    times = []
    for _ in range(repeats):
        for i in range(len(ds)):
            start = time.perf_counter()
            ds[i]
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def run_cost(args: argparse.Namespace) -> str:
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.shards import study_path
    from cspine_ray.preprocess.study import StudyItem, build_shard, source_fingerprint

    data = cost_data(args)
    uids = sorted(p.name for p in (data / "train_images").iterdir())
    rows, outs = [], {}
    for name, native in (("shard size only (native_size 0)", 0), ("with the native level (512)", 512)):
        cfg = PreprocessConfig(size=COST_SHARD, native_size=native, n_folds=2)
        out = args.storage / f"cost-shards-native{native}"
        shutil.rmtree(out, ignore_errors=True)
        seconds, disk, natives, slices = [], [], [], []
        for uid in uids:
            seg = data / "segmentations" / f"{uid}.nii"
            item = StudyItem(study_uid=uid, split="train", image_dir=str(data / "train_images" / uid),
                             segmentation=str(seg) if seg.exists() else None)
            final = study_path(out, uid)
            final.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            meta = build_shard(item, cfg, final, source_fingerprint(item))
            seconds.append(time.perf_counter() - start)
            sizes = shard_sizes(final)
            disk.append(sum(sizes.values()))
            natives.append(sizes.get("native", 0))
            slices.append(meta["shape"][0])
        outs[native] = out
        rows.append([name, f"{np.mean(slices):.0f}", f"{np.mean(seconds):.1f}",
                     f"{np.mean(disk) / 2**20:.0f}", f"{np.mean(natives) / 2**20:.0f}"])
        print(" | ".join(rows[-1]))
    read = {native: sample_ms(out, uids, native=bool(native)) for native, out in outs.items()}
    header = ("shards", "slices", "s per study", "MiB per study", "of it native.npy")
    lines = [f"### Cost at real size: {len(uids)} studies of {COST_SIZE} px (768 px for one in ten), "
             f"{COST_SPACING} mm slices, sharded to {COST_SHARD} px, one at a time, load {load():.1f}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"One stage-2 sample (8 steps x 3 slices, 320 px crops, warm): {read[0]:.1f} ms from "
                  f"the {COST_SHARD} px volume, {read[512]:.1f} ms from the native level "
                  f"({read[512] / read[0]:.2f}x).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. quality

def run_quality(args: argparse.Namespace) -> str:
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    data = generate(args, "subtle")
    shards = args.storage / f"shards-{data.name}-native"
    cfg = PreprocessConfig(size=args.size // 2, native_size=args.size, n_folds=2)
    start = time.perf_counter()
    run_preprocess(data, shards, cfg)
    print(f"shards: {time.perf_counter() - start:.0f} s into {shards}")
    prior = evaluate_prior(shards)["oof_metric"]
    runs = args.storage / "runs"
    timings = Timings(args.storage / "timings.json")
    rows, summary = [], {False: [], True: []}
    for seed in range(args.seeds):
        for native in (False, True):
            train_cfg = config("two_stage", {"seed": seed, "input.native": native}, args)
            result, t = timed(timings, lambda: train(train_cfg, shards, runs))
            figures = evaluate_result(result, shards, train_cfg.effective_top_n)
            name = f"seed {seed}, crops from the {'native level' if native else 'shard-size volume'}"
            rows.append(row(name, figures, prior, result, t))
            print(" | ".join(rows[-1]))
            summary[native].append((figures["oof_metric"] / prior, figures["oof_auc_patient_overall"],
                                    result.info.last["cv_metric"] / prior))
    means = {k: np.mean(v, axis=0) for k, v in summary.items()}
    lines = [f"### Thin fractures: {args.studies} subtle studies at {args.size} px, shards at "
             f"{args.size // 2} px + native level at {args.size}, {args.segmented:.0%} segmented, "
             f"2 folds, prior {prior:.4f}", "", markdown(rows), ""]
    for native, name in ((False, "shard-size crops"), (True, "native crops")):
        m = means[native]
        lines.append(f"- {name}, mean of {args.seeds} seeds: OOF {m[0]:.3f}x the prior, patient AUC "
                     f"{m[1]:.3f}, last-epoch CV {m[2]:.3f}x the prior")
    diffs = [n[0] - s[0] for s, n in zip(summary[False], summary[True])]
    lines.append(f"- native minus shard-size, OOF metric / prior per seed: "
                 f"{', '.join(f'{d:+.3f}' for d in diffs)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 3. mixed

def run_mixed(args: argparse.Namespace) -> str:
    import copy
    import dataclasses

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_learning import BUDGET, SET  # the learning test's set and budget: one home

    from cspine_ray.config import from_dict
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.synth import dataset_specs, write_dataset
    from cspine_ray.train.config import TrainConfig
    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    root = args.storage / "learning-set"
    if not (root / "train.csv").exists():
        specs = dataset_specs(SET["studies"], seed=SET["seed"], n_test=0, size=SET["size"],
                              slice_spacing=SET["slice_spacing"], severity=SET["severity"])
        write_dataset(root, [dataclasses.replace(s, has_segmentation=True) for s in specs])
    shards = args.storage / "learning-set-shards-native96"
    manifest = run_preprocess(root, shards, PreprocessConfig(size=SET["size"], native_size=96, n_folds=2))
    with_native = sum((shards / p / "native.npy").exists() for p in manifest["shard"] if p)
    prior = evaluate_prior(shards)["oof_metric"]
    header = ("seed", "crops from", "patient AUC", "mean AUC", "OOF metric", "/ prior")
    lines = [f"### Mixed resolutions: the learning set, {with_native} of {len(manifest)} studies with a "
             f"native level, prior {prior:.4f}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed in (int(s) for s in args.mixed.split(",")):
        for native in (False, True):
            budget = copy.deepcopy(BUDGET)
            budget["seed"], budget["input"]["native"] = seed, native
            cfg = from_dict(TrainConfig, budget)
            f = evaluate_result(train(cfg, shards, args.storage / "runs"), shards, cfg.effective_top_n)
            lines.append(f"| {seed} | {'native level where present' if native else 'the 64 px volume'} | "
                         f"{f['oof_auc_patient_overall']:.3f} | {f['oof_auc_mean']:.3f} | "
                         f"{f['oof_metric']:.4f} | {f['oof_metric'] / prior:.2f} |")
            print(lines[-1])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.storage = args.storage.resolve()
    args.storage.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = []
    if not args.skip_cost:
        report.append(run_cost(args))
    if not args.skip_quality or args.mixed:
        from cspine_ray.runtime import init_ray

        init_ray(num_cpus=2, object_store_memory=400 * 2**20)
    if not args.skip_quality:
        report.append(run_quality(args))
    if args.mixed:
        report.append(run_mixed(args))
    return print_report(report, start, args.report)


if __name__ == "__main__":
    sys.exit(main())
