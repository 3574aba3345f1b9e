"""Model-quality benchmark: the two-stage model with each of the top teams' techniques on and
off, the three baselines and the constant prior, on generated sets the product did not tune on.

    python benchmarks/quality.py [--sets obvious subtle] [--studies 64] [--size 128]
                                 [--segmented 0.25] [--epochs E] [--stage1-epochs E1]
                                 [--storage DIR]
                                 [--seed 11] [--retrain] [--quick | --baselines-only]
                                 [--report PATH]

One run, for each set (a fracture severity):

1. generates `--studies` training studies (`cspine_ray.synth`, 2 mm slices, `--segmented` of
   them with a segmentation) and preprocesses them into 2 folds with Ray Data (both cached in
   --storage and reused by later runs with the same arguments);
2. trains the stage-1 locator (plain, with the anatomy constraint, and with a pseudo-label
   round in the same number of epochs), then the two-stage model with every technique off (the thesis's rules), each technique on
   alone, and all on; then cnn3d, single_head and multi_head. The budget is the laptop search
   space's base (`search_spaces/laptop.yaml`: the shipped CPU budget) with `--epochs`, and
   for each baseline the budget tuned for it on another set (benchmarks/budgets.py, kept in
   `search_spaces/laptop_families.yaml`);
3. scores every result out of fold (`evaluate_result`: each study predicted by the fold model
   that did not see it) under its family's top-N rule and, with no retraining, with the
   second-level calibrator (cross-fitted on the folds), against the constant prior (each
   study gets the prevalences of the OTHER fold's studies).

Figures, honestly labelled: "OOF" is at the epoch chosen on the same folds (the vertebra loss,
N-independent), so it is optimistic; "last CV" is the last epoch's CV metric and patient AUC,
which nothing chose. `--quick` trains only the plain stage 1 and the thesis-rules two-stage
model (with and without the calibrator) beside the prior: one configuration measured, e.g. at
another --segmented or --epochs; `--baselines-only` trains only the three baselines (at their
tuned budgets) beside the prior. Finished results are reused by key; `--retrain` trains them again. Times
are wall-clock seconds with the 1-minute load average, because other work shares the CPUs.
"""

from __future__ import annotations

import argparse
import functools
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

DATA_VERSION = 2          # bump when the generated dataset changes meaning
SLICE_SPACING = 2.0       # mm: ~90 slices per study, enough for the vertebra sequences
# the laptop space's base (it extends laptop.yaml) and each baseline's budget, tuned for it on
# another generated set by benchmarks/budgets.py (its `conditional` section)
SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "laptop_families.yaml"

# Every technique off: the thesis's rules. Each arm below switches some of them on.
OFF = {"sequence.slice_choice": "spread", "sequence.mask_not_found": False,
       "sequence.ratio_channel": False, "sequence.per_step": 3, "sequence.flip_tta": False,
       "stage1.anatomy": False, "stage1.pseudo_rounds": 0}
TECHNIQUES = {
    "robust slice choice": {"sequence.slice_choice": "run"},
    "not-found masked": {"sequence.mask_not_found": True},
    "ratio channel": {"sequence.ratio_channel": True},
    "5 slices a step": {"sequence.per_step": 5},
    "flip TTA": {"sequence.flip_tta": True},
    "stage 1 anatomy": {"stage1.anatomy": True},
}
# Stage 1 alone: plain, anatomical, and a pseudo-label round against the same number of epochs
# without one (a round doubles the epochs; the extra epochs alone are the fair control).
STAGE1_ARMS = {
    "stage 1": {},
    "stage 1 anatomy": {"stage1.anatomy": True},
    "stage 1 anatomy, half the epochs + a pseudo-label round": {"stage1.anatomy": True,
                                                                "stage1.pseudo_rounds": 1},
}
ALL = {k: v for change in TECHNIQUES.values() for k, v in change.items()}
BASELINES = ("cnn3d", "single_head", "multi_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=["obvious", "subtle"],
                   help="fracture severities, one generated set each (default obvious subtle)")
    p.add_argument("--studies", type=int, default=64, help="training studies per set (default 64)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--segmented", type=float, default=0.25,
                   help="share of studies with a segmentation (default 0.25; the real data: 0.04)")
    p.add_argument("--epochs", type=int, default=None,
                   help="stage-2 / family epochs (default: the laptop space's)")
    p.add_argument("--stage1-epochs", type=int, default=None,
                   help="stage-1 epochs per round (default: the laptop space's)")
    p.add_argument("--storage", type=Path, default=Path("runs/quality"),
                   help="data, shards and results (default runs/quality)")
    p.add_argument("--seed", type=int, default=11, help="dataset seed (default 11)")
    p.add_argument("--retrain", action="store_true", help="train every result again")
    p.add_argument("--quick", action="store_true",
                   help="only stage 1 and the thesis-rules two-stage model (no technique arms, "
                        "no baselines)")
    p.add_argument("--baselines-only", action="store_true",
                   help="only the three baselines at their tuned budgets (no stage-1 or two-stage arms)")
    p.add_argument("--report", type=Path, default=None, help="also write the tables as Markdown here")
    args = p.parse_args(argv)
    if args.studies < 8 or min(args.epochs or 1, args.stage1_epochs or 1) < 1:
        p.error("need --studies >= 8 and at least 1 epoch")
    if args.quick and args.baselines_only:
        p.error("--quick and --baselines-only exclude each other")
    if not 0 < args.segmented <= 1:
        p.error("--segmented must be in (0, 1]")
    return args


def load() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- data

def generate(args: argparse.Namespace, severity: str) -> Path:
    """The synthetic RSNA layout of one set, written once (2 processes) and reused."""
    from cspine_ray.synth import dataset_specs, write_dataset

    params = {"version": DATA_VERSION, "studies": args.studies, "size": args.size,
              "slice_spacing": SLICE_SPACING, "seed": args.seed, "severity": severity,
              "segmented": args.segmented}
    root = args.storage / (f"data-{severity}-{args.studies}x{args.size}px-seg{args.segmented:g}"
                           f"-seed{args.seed}")
    stamp = root / "benchmark-dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"data: reusing {root}")
        return root
    specs = dataset_specs(args.studies, seed=args.seed, n_test=0, size=args.size,
                          slice_spacing=SLICE_SPACING, severity=severity,
                          segmented_fraction=args.segmented)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    start, before = time.perf_counter(), load()
    write_dataset(tmp, specs, processes=2)
    tmp.rename(root)
    stamp.write_text(json.dumps(params))
    segmented = sum(s.has_segmentation for s in specs)
    print(f"data: generated {len(specs)} studies ({segmented} segmented) in "
          f"{time.perf_counter() - start:.0f} s (load {before:.1f} -> {load():.1f}) into {root}")
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

def config(family: str, changes: dict, args: argparse.Namespace, budget: bool = True):
    """The laptop space's base for `family` with its tuned budget (unless `budget` is False)
    and `changes`, on 2 fold workers."""
    from cspine_ray.train.config import build_config

    tuned = tuned_budget(family) if budget else {}
    values = {"family": family, **OFF, **tuned, **changes, "resources.num_workers": 2}
    if args.epochs is not None:
        values.update({"optim.epochs": args.epochs, "optim.t0": args.epochs})
    if args.stage1_epochs is not None:
        values["stage1.epochs"] = args.stage1_epochs
    return build_config(space().base, values)


@functools.cache
def space():
    """SPACE, read once per run."""
    from cspine_ray.tune.space import load_space

    return load_space(SPACE)


def tuned_budget(family: str) -> dict:
    """The fixed settings SPACE gives `family` (its `conditional` values that are not searched)."""
    from cspine_ray.tune.space import is_param

    return {k: v for k, v in space().conditional.get(family, {}).items() if not is_param(v)}


def budget_label(settings: dict) -> str:
    """"lr 0.003, epochs 30": the budget's settings by their last name, without the patient
    rule and the cosine period (which follows the epochs)."""
    return ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in settings.items()
                     if k not in ("top_n", "optim.t0"))


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

COLUMNS = ("model", "OOF metric", "/ prior", "patient AUC", "mean AUC", "last CV metric",
           "last CV patient AUC", "epoch (best/last)", "train s")


def row(name: str, figures: dict, prior: float, result=None, timing=None,
        calibrated: bool = False) -> list[str]:
    last = result.info.last if result is not None else None
    no_last = last is None or calibrated  # the calibrator is fitted after the last epoch too
    return [name, f"{figures['oof_metric']:.4f}", f"{figures['oof_metric'] / prior:.2f}",
            f"{figures['oof_auc_patient_overall']:.3f}", f"{figures['oof_auc_mean']:.3f}",
            "-" if no_last else f"{last['cv_metric']:.4f}",
            "-" if no_last else f"{last.get('cv_auc_patient_overall', float('nan')):.3f}",
            "-" if result is None else f"{result.info.best_epoch}/{last['epoch']}",
            "-" if timing is None else f"{timing['seconds']:.0f}"]


def markdown(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_set(severity: str, args: argparse.Namespace, runs: Path, timings: Timings) -> str:
    from cspine_ray.train.job import ensure_stage1, train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    shards = preprocess(generate(args, severity), args)
    prior = evaluate_prior(shards)["oof_metric"]
    budget = config("two_stage", {}, args)
    lines = [f"### {severity} fractures: {args.studies} studies x {args.size} px, "
             f"{args.segmented:.0%} segmented, 2 folds, stage 1 {budget.stage1.epochs} epochs, "
             f"stage 2 {budget.optim.epochs} epochs", ""]
    stage1_arms = list(STAGE1_ARMS.items())
    if args.quick or args.baselines_only:
        stage1_arms = stage1_arms[: 0 if args.baselines_only else 1]
    for name, changes in stage1_arms:
        cfg = config("two_stage", changes, args)
        if changes.get("stage1.pseudo_rounds"):
            cfg.stage1.epochs //= 1 + cfg.stage1.pseudo_rounds
        stage1, t = timed(timings, lambda: ensure_stage1(cfg, shards, runs, reuse=not args.retrain))
        best, last = stage1.info.best, stage1.info.last
        line = (f"{name}: CV ratio+box error {best['cv_metric']:.4f} at epoch "
                f"{stage1.info.best_epoch} (last {last['cv_metric']:.4f}), ratio error "
                f"{best['cv_ratio_mae']:.4f}, z error {best.get('cv_z_error', float('nan')):.2f} "
                f"slices" + (f", {t['seconds']:.0f} s" if t else ""))
        print(line)
        lines.append(f"- {line}")
    lines.append("")

    rows = []
    arms = [("two_stage, thesis rules", {})] + [(f"two_stage + {k}", v) for k, v in TECHNIQUES.items()]
    arms += [("two_stage, all techniques", ALL)]
    if args.quick or args.baselines_only:
        arms = arms[: 0 if args.baselines_only else 1]
    for name, changes in arms:
        cfg = config("two_stage", changes, args)
        result, t = timed(timings, lambda: train(cfg, shards, runs, reuse=not args.retrain))
        figures = evaluate_result(result, shards, cfg.effective_top_n)
        rows.append(row(name, figures, prior, result, t))
        print(" | ".join(rows[-1]))
        if name.startswith("two_stage, "):  # the calibrator: no retraining
            figures = evaluate_result(result, shards, cfg.effective_top_n, calibrate=True)
            rows.append(row(f"{name} + calibrator", figures, prior, result, calibrated=True))
            print(" | ".join(rows[-1]))
    for family in () if args.quick else BASELINES:
        cfg = config(family, {}, args)
        result, t = timed(timings, lambda: train(cfg, shards, runs, reuse=not args.retrain))
        budget = budget_label(tuned_budget(family))
        for calibrate in (False, True):
            figures = evaluate_result(result, shards, cfg.effective_top_n, calibrate=calibrate)
            name = f"{family} ({budget or 'laptop base'})"
            rows.append(row(name + (" + calibrator" if calibrate else ""), figures, prior,
                            result, None if calibrate else t, calibrated=calibrate))
            print(" | ".join(rows[-1]))
    prior_figures = evaluate_prior(shards)
    rows.append(row("constant prior", prior_figures, prior))
    lines += [markdown(rows), ""]
    return "\n".join(lines)


def print_report(parts: list[str], start: float, path: Path | None) -> int:
    """Print the tables with the wall time since `start` (and write them to `path`); 0."""
    text = "\n".join(parts) + f"\nwall time {time.perf_counter() - start:.0f} s\n"
    print()
    print(text)
    if path:
        path.write_text(text)
    return 0


def start(args: argparse.Namespace, banner: str) -> None:
    """What every training benchmark does first: its storage folder, quiet logs, the banner
    (with the CPUs and the load) and a local Ray of 2 CPUs."""
    from cspine_ray.runtime import init_ray

    args.storage = args.storage.resolve()
    args.storage.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"{banner}, {os.cpu_count()} CPUs, load {load():.1f}")
    init_ray(num_cpus=2, object_store_memory=400 * 2**20)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args, f"quality benchmark: sets {', '.join(args.sets)}, {args.studies} studies x "
                f"{args.size} px, {args.segmented:.0%} segmented, budget {SPACE.name}")
    runs = args.storage / "runs"
    timings = Timings(args.storage / "timings.json")
    began = time.perf_counter()
    report = [run_set(severity, args, runs, timings) for severity in args.sets]
    return print_report(report, began, args.report)


if __name__ == "__main__":
    sys.exit(main())
