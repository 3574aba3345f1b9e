"""Per-family budgets for the baselines: a small grid per family on a tuning set, chosen by CV.

    python benchmarks/budgets.py [--studies 96] [--size 128] [--seed 5] [--storage runs/budgets]
                                 [--report PATH]

The thesis compares its two-stage model with three baselines (cnn3d, single_head, multi_head);
a baseline trained at a budget picked for another model is a straw man. So each baseline is
trained over a grid of the settings that make up a family's budget, from the laptop search
space's base (`search_spaces/laptop.yaml`, the shipped CPU budget), on a generated *tuning* set
(subtle fractures, `--seed` 5 by default: not one of the sets benchmarks/quality.py reports on),
2 folds:

    cnn3d                      optim.lr x optim.epochs (one cosine cycle over the run)
    single_head, multi_head    optim.lr x input.slices_per_study (training slices per study)

Each family's budget is the grid point with the lowest OOF metric under its own patient rule
(at the epoch chosen on the vertebra loss, the figure a Tune search ranks trials by); the grid
includes the laptop base itself. The chosen budgets are written by hand into
`search_spaces/laptop_families.yaml` (`conditional`), where benchmarks/quality.py reads them, so
the figures it reports for the baselines come from budgets chosen on other data.

Data, shards and results are cached in --storage (reused by later runs with the same arguments).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the data, config, timing and table helpers)

GRIDS = {
    "cnn3d": {"optim.lr": [1.0e-3, 3.0e-3], "optim.epochs": [15, 30]},
    "single_head": {"optim.lr": [1.0e-3, 3.0e-3], "input.slices_per_study": [16, 32]},
    "multi_head": {"optim.lr": [1.0e-3, 3.0e-3], "input.slices_per_study": [16, 32]},
}
COLUMNS = ("family", "budget", "OOF metric", "/ prior", "patient AUC", "mean AUC",
           "+ calibrator", "last CV metric", "epoch (best/last)", "train s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=96, help="tuning studies (default 96)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--segmented", type=float, default=0.25, help="segmented share (default 0.25)")
    p.add_argument("--seed", type=int, default=5, help="tuning-set seed (default 5)")
    p.add_argument("--storage", type=Path, default=Path("runs/budgets"), help="default runs/budgets")
    p.add_argument("--report", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    # what quality's data, shard and config helpers read
    args.epochs = args.stage1_epochs = None
    args.retrain = False
    return args


def grid(family: str) -> list[dict]:
    """The grid points of `family` (one cosine cycle over the run when epochs change)."""
    keys = list(GRIDS[family])
    points = [dict(zip(keys, values)) for values in itertools.product(*GRIDS[family].values())]
    for point in points:
        if "optim.epochs" in point:
            point["optim.t0"] = point["optim.epochs"]
    return points


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    quality.start(args, f"budgets: {args.studies} subtle studies x {args.size} px, "
                        f"{args.segmented:.0%} segmented, seed {args.seed}")
    runs = args.storage / "runs"
    timings = quality.Timings(args.storage / "timings.json")
    began = time.perf_counter()
    shards = quality.preprocess(quality.generate(args, "subtle"), args)
    prior = evaluate_prior(shards)["oof_metric"]

    rows, chosen = [], {}
    for family in GRIDS:
        scored = []
        for point in grid(family):
            cfg = quality.config(family, point, args, budget=False)
            result, t = quality.timed(timings, lambda: train(cfg, shards, runs))
            plain = evaluate_result(result, shards, cfg.effective_top_n)
            calibrated = evaluate_result(result, shards, cfg.effective_top_n, calibrate=True)
            last = result.info.last
            scored.append((plain["oof_metric"], point))
            rows.append([family, quality.budget_label(point), f"{plain['oof_metric']:.4f}",
                         f"{plain['oof_metric'] / prior:.2f}",
                         f"{plain['oof_auc_patient_overall']:.3f}", f"{plain['oof_auc_mean']:.3f}",
                         f"{calibrated['oof_metric']:.4f}", f"{last['cv_metric']:.4f}",
                         f"{result.info.best_epoch}/{last['epoch']}",
                         "-" if t is None else f"{t['seconds']:.0f}"])
            print(" | ".join(rows[-1]))
        chosen[family] = min(scored, key=lambda s: s[0])[1]
    lines = [f"### Tuning set: {args.studies} subtle studies x {args.size} px, seed {args.seed}, "
             f"constant prior {prior:.4f}", "", quality.markdown(rows, COLUMNS), "",
             "Chosen (lowest OOF metric per family):", ""]
    lines += [f"- {family}: {quality.budget_label(point)}" for family, point in chosen.items()]
    return quality.print_report(lines, began, args.report)


if __name__ == "__main__":
    sys.exit(main())
