"""Stage-1 benchmark: the locator alone, from many and from few segmentations, with and without
the anatomy constraint and a pseudo-label round.

    python benchmarks/stage1.py [--studies 100] [--size 96] [--fractions 0.25 0.05]
                                [--epochs 20] [--seed 8] [--min-peak P] [--storage runs/stage1]

One run, per segmented share in --fractions:

1. generates --studies training studies (`cspine_ray.synth`, 2 mm slices, "obvious") of which
   that share is segmented (`dataset_specs(segmented_fraction=...)`: the same images and labels
   for every share, only the segmentations differ) and preprocesses them into 2 folds. Both are
   cached in --storage and reused by later runs with the same arguments.
2. trains stage 1 four times (`ensure_stage1`; results are reused by key):
     plain   stage1.anatomy on, no pseudo round: its validation reports the constrained
             figures and, as raw_*, the unconstrained ones of the SAME models each epoch, so
             "baseline" (raw, best epoch chosen on the raw CV error) and "anatomy" (constrained,
             best epoch chosen on the constrained error) come from one training (the constraint
             only post-processes tables: without pseudo labels training is the same);
     long    the same with twice the epochs (a warm restart halfway, as in a pseudo run): the
             control that says how much of a pseudo round's gain is just its extra epochs;
     pseudo  anatomy off, one pseudo round (--epochs more epochs on the segmented studies plus
             the fold model's tables of the unsegmented studies of its training folds, those
             whose every vertebra peaks at --min-peak or more);
     both    anatomy on (also on the pseudo labels), one pseudo round.
3. prints one table: per arm the CV ratio+box error, ratio error, z_error (|predicted - true
   vertebra centre| in slices, mean over vertebrae) and found rate at the best epoch, the error
   and z_error of the last epoch (not chosen on the folds), the pseudo-labelled studies per
   fold, and the training time.

The budget is the quality benchmark's stage 1 scaled down (test_efficientnet, 64 px inputs, 48
slices per study, lr 3e-3, batch 32, one cosine cycle per round). Times are wall-clock seconds
on this machine with the 1-minute load average around each training.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from quality import Timings, generate, markdown, preprocess, start, timed

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

BASE = {
    "family": "two_stage",
    "backbone": "test_efficientnet",
    "optim": {"batch_size": 16, "lr": 1.0e-3},
    "input": {"image_size": 64, "loader_workers": 0},
    "augment": {"cutout_p": 0.0},
    "stage1": {"backbone": "test_efficientnet", "image_size": 64, "batch_size": 32,
               "slices_per_study": 48, "lr": 3.0e-3},
    "resources": {"num_workers": 2, "cpus_per_worker": 1.0},
}
RUNS = {"plain": {"stage1.anatomy": True, "stage1.pseudo_rounds": 0},
        "long": {"stage1.anatomy": True, "stage1.pseudo_rounds": 0},   # epochs doubled below
        "pseudo": {"stage1.anatomy": False, "stage1.pseudo_rounds": 1},
        "both": {"stage1.anatomy": True, "stage1.pseudo_rounds": 1}}
COLUMNS = ("segmented", "arm", "best epoch", "ratio+box", "ratio", "z_error", "found",
           "last ratio+box", "last z_error", "pseudo studies", "train s", "load")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=100, help="training studies (default 100)")
    p.add_argument("--size", type=int, default=96, help="image size in pixels (default 96)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.05],
                   help="segmented shares to measure (default 0.25 0.05)")
    p.add_argument("--epochs", type=int, default=20, help="stage-1 epochs per round (default 20)")
    p.add_argument("--seed", type=int, default=8, help="dataset seed (default 8)")
    p.add_argument("--min-peak", type=float, default=None,
                   help="stage1.pseudo_min_peak of the pseudo runs (default: the config's)")
    p.add_argument("--storage", type=Path, default=Path("runs/stage1"),
                   help="data, shards and results (default runs/stage1)")
    args = p.parse_args(argv)
    if args.studies < 8 or args.epochs < 1 or not all(0 < f <= 1 for f in args.fractions):
        p.error("need --studies >= 8, --epochs >= 1 and fractions in (0, 1]")
    return args


def config(args: argparse.Namespace, changes: dict):
    from cspine_ray.train.config import build_config

    return build_config(BASE, {"stage1.epochs": args.epochs, "optim.t0": args.epochs, **changes})


def figures(history: list[dict], best: int, prefix: str = "") -> dict[str, float]:
    """The arm's figures at its best epoch (1-based) and at the last epoch."""
    at, last = history[best - 1], history[-1]
    return {"best": best, "metric": at[f"cv_{prefix}metric"], "ratio": at[f"cv_{prefix}ratio_mae"],
            "z_error": at[f"cv_{prefix}z_error"], "found": at[f"cv_{prefix}found_rate"],
            "last_metric": last[f"cv_{prefix}metric"], "last_z_error": last[f"cv_{prefix}z_error"],
            "pseudo": last.get("cv_pseudo_studies")}


def first_min(history: list[dict], key: str) -> int:
    """1-based epoch the training loop's rule (`improves`) picks on `key` over `history`."""
    from cspine_ray.train.loop import improves

    best, best_cv = -1, math.nan
    for epoch, h in enumerate(history, start=1):
        if improves(h[key], best_cv, best):
            best, best_cv = epoch, h[key]
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cspine_ray.train.job import ensure_stage1

    start(args, f"stage-1 benchmark: {args.studies} studies x {args.size} px, {args.epochs} "
                f"epochs a round, seed {args.seed}")
    timings = Timings(args.storage / "timings.json")
    rows = []
    for fraction in args.fractions:
        data = generate(argparse.Namespace(**{**vars(args), "segmented": fraction}), "obvious")
        segmented = len(list((data / "segmentations").glob("*.nii*")))
        shards = preprocess(data, args)
        label = f"{fraction:.0%} ({segmented})"
        results = {}
        for name, changes in RUNS.items():
            changes = dict(changes)
            if name == "long":
                changes["stage1.epochs"] = 2 * args.epochs
            if changes["stage1.pseudo_rounds"] and args.min_peak is not None:
                changes["stage1.pseudo_min_peak"] = args.min_peak
            result, _ = timed(timings, lambda: ensure_stage1(config(args, changes), shards,
                                                             args.storage / "runs"))
            results[name] = result
            print(f"{label} {name}: {'reused ' if result.reused else ''}{result.path.name}")
        def own(name):  # the arm's own figures, best epoch as training chose it
            return results[name], figures(results[name].info.history, results[name].info.best_epoch)

        def raw(name):  # the same models' unconstrained figures, best epoch chosen on those
            history = results[name].info.history
            return results[name], figures(history, first_min(history, "cv_raw_metric"), "raw_")

        arms = {"baseline": raw("plain"), "anatomy": own("plain"),
                f"baseline, {2 * args.epochs} epochs": raw("long"),
                f"anatomy, {2 * args.epochs} epochs": own("long"),
                "pseudo": own("pseudo"), "both": own("both")}
        for arm, (result, f) in arms.items():
            t = timings.get(result)
            rows.append([label, arm, str(f["best"]), f"{f['metric']:.4f}", f"{f['ratio']:.4f}",
                         f"{f['z_error']:.2f}", f"{f['found']:.3f}", f"{f['last_metric']:.4f}",
                         f"{f['last_z_error']:.2f}",
                         "-" if f["pseudo"] is None else f"{f['pseudo']:.1f}",
                         "-" if t is None else f"{t['seconds']:.0f}",
                         "-" if t is None else f"{t['load_before']:.1f}-{t['load_after']:.1f}"])
    print()
    print(markdown(rows, COLUMNS))
    print("\nbaseline and anatomy rows: the same trained models each, unconstrained and "
          "constrained tables; train s of a pseudo or doubled run covers both halves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
