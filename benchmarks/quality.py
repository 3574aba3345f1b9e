"""Model-quality benchmark: the two-stage model with each of the top teams' techniques on and
off, the three baselines and the constant prior, on generated sets the product did not tune on.

    python benchmarks/quality.py [--sets obvious subtle] [--studies 64] [--size 128]
                                 [--segmented 0.25] [--folds 2] [--epochs E]
                                 [--stage1-epochs E1] [--storage DIR] [--seed 11]
                                 [--seeds S ...] [--retrain]
                                 [--quick [--also ARM ...] | --baselines-only] [--report PATH]

One run, for each set (a fracture severity):

1. generates `--studies` training studies (`cspine_ray.synth`, 2 mm slices, `--segmented` of
   them with a segmentation) and preprocesses them into `--folds` folds with Ray Data (cached in
   --storage and reused by later runs with the same arguments);
2. trains the stage-1 locator (plain, with the anatomy constraint, and with a pseudo-label
   round in the same number of epochs), then the two-stage model with every technique off (the
   thesis's rules), each of the top teams' techniques on alone, and all of them on, and stage 2
   started from its fold's stage-1 backbone (ours); then cnn3d, single_head and multi_head.
   The budget is the laptop search space's base (`search_spaces/laptop.yaml`: the shipped CPU
   budget) with `--epochs`, and for each baseline the budget tuned for it on another set
   (benchmarks/budgets.py, kept in `search_spaces/laptop_families.yaml`);
3. scores every result out of fold (`evaluate_result`: each study predicted by the fold model
   that did not see it) under its family's top-N rule and, with no retraining, with the
   second-level calibrator (cross-fitted on the folds), against the constant prior (each
   study gets the prevalences of the OTHER fold's studies).

Figures, honestly labelled: "OOF" is at the epoch chosen on the same folds (the vertebra loss,
N-independent), so it is optimistic; "last CV" is the last epoch's CV metric and patient AUC,
which nothing chose. `--quick` trains only the plain stage 1 and the thesis-rules two-stage
model (with and without the calibrator) beside the prior, and the two-stage arms named with
`--also`: one configuration measured, e.g. at another --segmented, --folds or --epochs;
`--baselines-only` trains only the three baselines (at their tuned budgets) beside the prior.
`--seeds` trains every arm once per training seed (both stages; the stage-1 lines stay at the
space's seed) and shows each figure as mean ± sd over the seeds, since at this scale one seed
moves the patient AUC by up to 0.15 (BENCHMARKS.md, learning test).
Finished results are reused by key; `--retrain` trains them again. Times are wall-clock seconds
with the 1-minute load average, because other work shares the CPUs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
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
       "sequence.init_from_stage1": False, "sequence.step_loss": 0.0, "stage1.anatomy": False,
       "stage1.pseudo_rounds": 0}
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
# not a top team's: with no ImageNet weights, stage 2 starts from weights trained on this CT;
# the fracture boxes' slices as per-step targets beside the vertebra label
OURS = {"stage-1 backbone init": {"sequence.init_from_stage1": True},
        "fracture-box step loss": {"sequence.step_loss": 1.0}}
BASELINES = ("cnn3d", "single_head", "multi_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=["obvious", "subtle"],
                   help="fracture severities, one generated set each (default obvious subtle)")
    p.add_argument("--studies", type=int, default=64, help="training studies per set (default 64)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--segmented", type=float, default=0.25,
                   help="share of studies with a segmentation (default 0.25; the real data: 0.04)")
    p.add_argument("--folds", type=int, default=2,
                   help="cross-validation folds (default 2; the product's default is 5)")
    p.add_argument("--epochs", type=int, default=None,
                   help="stage-2 / family epochs (default: the laptop space's)")
    p.add_argument("--stage1-epochs", type=int, default=None,
                   help="stage-1 epochs per round (default: the laptop space's)")
    p.add_argument("--storage", type=Path, default=Path("runs/quality"),
                   help="data, shards and results (default runs/quality)")
    p.add_argument("--seed", type=int, default=11, help="dataset seed (default 11)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (both stages): every arm once per seed, figures as mean "
                        "± sd (default: the space's seed, once)")
    p.add_argument("--retrain", action="store_true", help="train every result again")
    p.add_argument("--quick", action="store_true",
                   help="only stage 1 and the thesis-rules two-stage model (no technique arms, "
                        "no baselines)")
    p.add_argument("--also", nargs="+", default=[], choices=[*TECHNIQUES, *OURS], metavar="ARM",
                   help="with --quick: also these two-stage arms (technique names)")
    p.add_argument("--baselines-only", action="store_true",
                   help="only the three baselines at their tuned budgets (no stage-1 or two-stage arms)")
    p.add_argument("--report", type=Path, default=None, help="also write the tables as Markdown here")
    args = p.parse_args(argv)
    if args.studies < 8 or min(args.epochs or 1, args.stage1_epochs or 1) < 1:
        p.error("need --studies >= 8 and at least 1 epoch")
    if args.quick and args.baselines_only:
        p.error("--quick and --baselines-only exclude each other")
    if args.also and not args.quick:
        p.error("--also goes with --quick (a full run trains every arm)")
    if args.folds < 2:
        p.error("need --folds >= 2")
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


def preprocess(data: Path, args: argparse.Namespace, folds: int = 2) -> Path:
    """Shards with `folds` folds; run_preprocess reuses every finished shard, so a re-run is
    quick."""
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess

    out = args.storage / (f"shards-{data.name}" + ("" if folds == 2 else f"-{folds}folds"))
    start, before = time.perf_counter(), load()
    manifest = run_preprocess(data, out, PreprocessConfig(size=args.size, n_folds=folds))
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


def spread(values: list[float], digits: int) -> str:
    """"0.5641" for one value; "0.5641 ± 0.0123" (mean ± sample sd) for several (seeds)."""
    text = f"{statistics.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {statistics.stdev(values):.{digits}f}"


def row(name: str, figures: list[dict], prior: float, results: list | None = None,
        timings: list | None = None, calibrated: bool = False) -> list[str]:
    """One table row: a result's figures, or with one result per seed their mean ± sd."""
    lasts = [r.info.last for r in results] if results else []
    no_last = not lasts or calibrated  # the calibrator is fitted after the last epoch too
    metric = [f["oof_metric"] for f in figures]
    seconds = [t["seconds"] for t in timings or [] if t is not None]
    return [name, spread(metric, 4), f"{statistics.mean(metric) / prior:.2f}",
            spread([f["oof_auc_patient_overall"] for f in figures], 3),
            spread([f["oof_auc_mean"] for f in figures], 3),
            "-" if no_last else spread([last["cv_metric"] for last in lasts], 4),
            "-" if no_last else spread([last.get("cv_auc_patient_overall", float("nan"))
                                        for last in lasts], 3),
            "-" if not results else (",".join(str(r.info.best_epoch) for r in results)
                                     + f"/{lasts[0]['epoch']}"),
            f"{statistics.mean(seconds):.0f}" if seconds else "-"]


def markdown(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def train_seeds(family: str, changes: dict, args: argparse.Namespace, shards: Path, runs: Path,
                timings: Timings) -> list[tuple]:
    """(result, timing) of `family` with `changes`, once per --seeds value (both stages'
    training seed; without --seeds once, at the space's seed)."""
    from cspine_ray.train.job import train

    trained = []
    for seed in [{"seed": s} for s in args.seeds] if args.seeds else [{}]:
        cfg = config(family, {**changes, **seed}, args)
        trained.append(timed(timings, lambda: train(cfg, shards, runs, reuse=not args.retrain)))
    return trained


def scored_rows(name: str, trained: list[tuple], shards: Path, prior: float,
                calibrator: bool) -> list[list[str]]:
    """The out-of-fold row of `trained` (one result per seed), and with `calibrator` the same
    results under the cross-fitted calibrator; printed as they come."""
    from cspine_ray.train.result import evaluate_result

    results, times = [r for r, _ in trained], [t for _, t in trained]
    rows = [row(name, [evaluate_result(r, shards, r.config.effective_top_n) for r in results],
                prior, results, times)]
    if calibrator:
        rows.append(row(f"{name} + calibrator",
                        [evaluate_result(r, shards, r.config.effective_top_n, calibrate=True)
                         for r in results], prior, results, calibrated=True))
    for r in rows:
        print(" | ".join(r))
    return rows


def run_set(severity: str, args: argparse.Namespace, runs: Path, timings: Timings) -> str:
    from cspine_ray.train.job import ensure_stage1
    from cspine_ray.train.result import evaluate_prior

    shards = preprocess(generate(args, severity), args, args.folds)
    prior = evaluate_prior(shards)["oof_metric"]
    budget = config("two_stage", {}, args)
    lines = [f"### {severity} fractures: {args.studies} studies x {args.size} px, "
             f"{args.segmented:.0%} segmented, {args.folds} folds, stage 1 {budget.stage1.epochs} epochs, "
             f"stage 2 {budget.optim.epochs} epochs"
             + (f", seeds {' '.join(map(str, args.seeds))} (mean ± sd)" if args.seeds else ""), ""]
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
    # (row name, changes, with a calibrator row: it costs no retraining, so it is shown for the
    # thesis rules, all techniques together and our own arm)
    named = {**TECHNIQUES, **OURS}
    arms = []
    if not args.baselines_only:
        arms = [("two_stage, thesis rules", {}, True)]
        arms += [(f"two_stage + {k}", named[k], k in OURS) for k in (args.also if args.quick else named)]
    if not (args.quick or args.baselines_only):
        arms.append(("two_stage, all techniques", ALL, True))
    for name, changes, calibrator in arms:
        trained = train_seeds("two_stage", changes, args, shards, runs, timings)
        rows += scored_rows(name, trained, shards, prior, calibrator)
    for family in () if args.quick else BASELINES:
        trained = train_seeds(family, {}, args, shards, runs, timings)
        name = f"{family} ({budget_label(tuned_budget(family)) or 'laptop base'})"
        rows += scored_rows(name, trained, shards, prior, calibrator=True)
    rows.append(row("constant prior", [evaluate_prior(shards)], prior))
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
