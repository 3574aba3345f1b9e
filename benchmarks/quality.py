"""Model-quality benchmark: the four families on one synthetic set, with one budget, against a prior.

    python benchmarks/quality.py [--studies 256] [--size 128] [--epochs 30] [--storage DIR]
                                 [--seed 5] [--backbone test_efficientnet] [--retrain]
                                 [--report PATH]

One run:

1. generates `--studies` training studies (`cspine_ray.synth`, severity "obvious", 2 mm
   slices) and preprocesses them into 2 folds with Ray Data. Both are cached in --storage
   and reused by later runs with the same --studies/--size/--seed.
2. trains the stage-1 locator once (the two-stage model's first stage and the visibility
   model of the 2D families), then every family with `cspine_ray.train.job.train` on Ray
   Train, one worker per fold (2 workers). Every family gets the same epochs, the same
   timm backbone (cnn3d has none), the same learning rate and the same data.
3. scores each family's out-of-fold predictions (`evaluate_result`: every study predicted
   by the fold model that did not see it, best epoch by the CV metric) and a constant
   prior: each study gets the prevalence of every target among the OTHER fold's studies.

It prints one table (lower metric is better; AUC 0.5 is chance) and says plainly whether
two_stage beats the other families and the prior. Finished results are reused by key
(like any training job): `--retrain` trains the families again. Times are wall-clock
seconds on this machine, with the 1-minute load average measured around each step,
because other users share the CPUs; a reused result shows the time of the run that made it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

DATA_VERSION = 1          # bump when the generated dataset changes meaning
SLICE_SPACING = 2.0       # mm: ~90 slices per study, enough for the vertebra sequences
FAMILIES = ("two_stage", "cnn3d", "single_head", "multi_head")

# The shared budget, tuned on the two-stage model at 128-256 studies x 128 px (BENCHMARKS.md):
# tiny timm backbone, 64 px inputs, lr 1e-3 with one cosine cycle over all epochs, no cutout
# (a 10% hole can cover a whole crack on a 64 px crop).
BASE = {
    "optim": {"batch_size": 16, "lr": 1.0e-3},
    "input": {"image_size": 64, "slices_per_study": 16, "eval_stride": 2, "cube": 48,
              "loader_workers": 0},
    "augment": {"cutout_p": 0.0},
    "stage1": {"image_size": 64, "epochs": 40, "batch_size": 32, "slices_per_study": 48,
               "lr": 3.0e-3},
    "sequence": {"length": 4, "crop_size": 64, "hidden": 32, "layers": 1},
    "resources": {"num_workers": 2, "cpus_per_worker": 1.0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=256, help="training studies (default 256)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every family (default 30)")
    p.add_argument("--storage", type=Path, default=Path("runs/quality"),
                   help="data, shards and results (default runs/quality)")
    p.add_argument("--seed", type=int, default=5, help="dataset seed (default 5)")
    p.add_argument("--backbone", default="test_efficientnet",
                   help="timm backbone of every 2D model and of stage 1 (default test_efficientnet)")
    p.add_argument("--retrain", action="store_true", help="train the families again (stage 1 is reused)")
    p.add_argument("--report", type=Path, default=None, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    if args.studies < 8 or args.epochs < 1:
        p.error("need --studies >= 8 and --epochs >= 1")
    return args


def load() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- data

def generate(args: argparse.Namespace) -> Path:
    """The synthetic RSNA layout for these arguments, written once (2 processes) and reused."""
    from cspine_ray.synth import dataset_specs, write_dataset

    params = {"version": DATA_VERSION, "studies": args.studies, "size": args.size,
              "slice_spacing": SLICE_SPACING, "seed": args.seed, "severity": "obvious"}
    root = args.storage / f"data-{args.studies}x{args.size}px-seed{args.seed}"
    stamp = root / "benchmark-dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"data: reusing {root}")
        return root
    specs = dataset_specs(args.studies, seed=args.seed, n_test=0, size=args.size,
                          slice_spacing=SLICE_SPACING, severity="obvious")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    start, before = time.perf_counter(), load()
    write_dataset(tmp, specs, processes=2)
    tmp.rename(root)
    stamp.write_text(json.dumps(params))
    print(f"data: generated {len(specs)} studies in {time.perf_counter() - start:.0f} s "
          f"(load {before:.1f} -> {load():.1f}) into {root}")
    return root


def preprocess(data: Path, args: argparse.Namespace) -> Path:
    """Shards with 2 folds; run_preprocess reuses every finished shard, so a re-run is quick."""
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess

    out = args.storage / f"shards-{data.name}"
    start, before = time.perf_counter(), load()
    manifest = run_preprocess(data, out, PreprocessConfig(size=args.size, n_folds=2))
    ok = int((manifest["status"] == "ok").sum())
    print(f"shards: {ok}/{len(manifest)} studies ok in {time.perf_counter() - start:.0f} s "
          f"(load {before:.1f} -> {load():.1f}) in {out}")
    return out


# ----------------------------------------------------------------------------- training

def family_config(family: str, args: argparse.Namespace):
    from cspine_ray.train.config import build_config

    return build_config(BASE, {"family": family, "backbone": args.backbone,
                               "stage1.backbone": args.backbone, "optim.epochs": args.epochs,
                               "optim.t0": args.epochs})  # one cosine cycle over the whole run


class Timings:
    """Wall time of each training result, kept beside the results so reused ones show it too."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, result) -> dict | None:
        return self.data.get(str(result.path))

    def put(self, result, seconds: float, load_before: float, load_after: float) -> None:
        self.data[str(result.path)] = {"seconds": seconds, "load_before": load_before,
                                       "load_after": load_after}
        self.path.write_text(json.dumps(self.data, indent=1))


def timed(timings: Timings, fn):
    """Run fn() -> TrainResult and return (result, its timing record)."""
    start, before = time.perf_counter(), load()
    result = fn()
    if not result.reused:
        timings.put(result, time.perf_counter() - start, before, load())
    return result, timings.get(result)


# ----------------------------------------------------------------------------- report

COLUMNS = ("family", "OOF metric", "global metric", "mean AUC", "patient AUC", "train s", "load")


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        f = r["figures"]
        t = r.get("timing")
        out.append([r["name"], f"{f['oof_metric']:.4f}", f"{f['oof_global_metric']:.4f}",
                    f"{f['oof_auc_mean']:.3f}", f"{f['oof_auc_patient_overall']:.3f}",
                    "-" if t is None else f"{t['seconds']:.0f}",
                    "-" if t is None else f"{t['load_before']:.1f}-{t['load_after']:.1f}"])
    return out


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    by = {r["name"]: r["figures"] for r in rows}
    two = by["two_stage"]
    lines = []
    for name, f in by.items():
        if name == "two_stage":
            continue
        metric = "beats" if two["oof_metric"] < f["oof_metric"] else "does NOT beat"
        auc = "higher" if two["oof_auc_patient_overall"] > f["oof_auc_patient_overall"] else "NOT higher"
        lines.append(f"two_stage {metric} {name} on the OOF metric "
                     f"({two['oof_metric']:.4f} vs {f['oof_metric']:.4f}); patient AUC {auc} "
                     f"({two['oof_auc_patient_overall']:.3f} vs {f['oof_auc_patient_overall']:.3f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.storage = args.storage.resolve()
    args.storage.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from cspine_ray.runtime import init_ray
    from cspine_ray.train.job import ensure_stage1, train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    print(f"quality benchmark: {args.studies} studies x {args.size} px, {args.epochs} epochs, "
          f"backbone {args.backbone}, {os.cpu_count()} CPUs, load {load():.1f}")
    data = generate(args)
    init_ray(num_cpus=2, object_store_memory=400 * 2**20)
    shards = preprocess(data, args)
    runs = args.storage / "runs"
    timings = Timings(args.storage / "timings.json")

    rows = []
    stage1, t = timed(timings, lambda: ensure_stage1(family_config("two_stage", args), shards, runs))
    print(f"stage 1: {'reused ' if stage1.reused else ''}{stage1.path.name}, CV ratio+box error "
          f"{stage1.info.cv_metric:.4f}" + (f", {t['seconds']:.0f} s" if t else ""))
    stage1_timing = t
    for family in FAMILIES:
        cfg = family_config(family, args)
        result, t = timed(timings, lambda: train(cfg, shards, runs, reuse=not args.retrain))
        figures = evaluate_result(result, shards, cfg.effective_top_n)
        rows.append({"name": family, "figures": figures, "timing": t})
        print(f"{family}: OOF metric {figures['oof_metric']:.4f}, patient AUC "
              f"{figures['oof_auc_patient_overall']:.3f}, best epoch {result.info.best_epoch}"
              + (" (reused)" if result.reused else ""))
    rows.append({"name": "constant prior", "figures": evaluate_prior(shards), "timing": None})

    table = markdown(table_rows(rows))
    prior = rows[-1]["figures"]["oof_metric"]
    beaten = [r["name"] for r in rows[:-1] if r["figures"]["oof_metric"] < prior]
    summary = verdict(rows[:-1] + [rows[-1]])
    summary.append(f"families better than the constant prior ({prior:.4f}) on the OOF metric: "
                   f"{', '.join(beaten) or 'none'}")
    if stage1_timing:
        summary.append(f"stage 1 (shared by two_stage, single_head, multi_head; not in 'train s'): "
                       f"{stage1_timing['seconds']:.0f} s")
    print()
    print(table)
    print()
    for line in summary:
        print(line)
    if args.report:
        args.report.write_text(f"{table}\n\n" + "\n".join(f"- {line}" for line in summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
