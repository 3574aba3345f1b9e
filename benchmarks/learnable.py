"""A stage-2 option on the one generated set where stage 2 does learn: the learning test's.

    python benchmarks/learnable.py [--change "KEY=VALUE [KEY=VALUE ...]" | PRESET ...]
                                   [--set obvious|subtle] [--seeds 42 1 7 3]
                                   [--test-studies 200] [--storage runs/learnable]

The quality sets (benchmarks/quality.py) sit at the prior whatever is switched on, so they
cannot show whether an option helps a detector that learns. This runs the set and budget of
tests/test_learning.py (96 studies at 64 px, every one segmented, obvious fractures, 2 folds;
stage 1 20 epochs, stage 2 20 epochs, tiny backbones), where the thesis rules reach a patient
AUC of 0.6-0.8 (`--set obvious`; `--set subtle`: the same studies with subtle fractures whose
cracks are 1-3 pixels wide at the 64 px working resolution, as the real data's ~1 mm cracks are
at 512 px), once per training seed with the test's budget and once with each --change
on top of it (dotted TrainConfig keys, values as YAML: `sequence.step_loss=1.0`). The seed
moves both stages; one seed's stage 1 is shared by all its arms. Prints every run and, per
arm, quality.py's row over the seeds (mean ± sd): the OOF figures at the epoch chosen on the
same folds' vertebra loss, and the last epoch's CV figures, which nothing chose.

Every result is then scored on a held-out test set (benchmarks/heldout.py: `--test-studies`
studies of the same kind from a generator seed no training set uses; 0 = off): the metric and
its ratio to the training prior, the patient and pooled vertebra AUCs, the look-alike
false-positive rate, and the vertebra AUC by fracture kind; with --calibrate every figure comes
through the out-of-fold calibrator a promoted `calibrate: true` model applies. An arm is one or
more dotted settings in one argument ("augment.rotate=0 augment.scale=0"), or one of PRESETS.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import yaml

from heldout import HELDOUT_SEED, heldout_predictions, heldout_set, score_heldout
from quality import Timings, markdown, row, spread, start, timed

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# the test's set, budget and data: one home
from test_learning import BUDGET, SET, write_learning_shards  # noqa: E402

# the training set and its held-out test set: the learning test's, or the same draws with
# subtle fractures 1-3 working pixels wide
SETS = {"obvious": SET, "subtle": {**SET, "severity": "subtle", "crack_px": (1.0, 3.0)}}


# issue 29's changes, each an arm by name
PRESETS = {
    "neighbour steps": {"sequence.steps": "neighbours"},
    # the affine becomes an exact whole-pixel shift: no rotation or zoom resamples a crack
    "no resampling": {"augment.rotate": 0.0, "augment.scale": 0.0,
                      "augment.whole_pixel_shift": True},
    "crack-keeping augmentation": {"augment.rotate": 0.0, "augment.scale": 0.0,
                                   "augment.whole_pixel_shift": True, "augment.vflip_p": 0.5,
                                   "augment.transpose_p": 0.5, "augment.noise": 0.02},
}
PRESETS["neighbour steps + crack-keeping augmentation"] = {
    **PRESETS["neighbour steps"], **PRESETS["crack-keeping augmentation"]}
PRESETS.update({  # the recipe for few positives
    "EMA weights": {"optim.ema": 0.99},
    "balanced fractures": {"sequence.balance": 0.3},
    "label on every step": {"sequence.step_loss": 1.0, "sequence.step_target": "label"},
    "weight decay 0.05": {"optim.weight_decay": 0.05},
})
PRESETS.update({  # stage 2 sees the vertebra it judges (stage 1's per-vertebra boxes)
    "vertebra crop": {"stage1.vertebra_boxes": True, "sequence.crop": "vertebra"},
    "box channel": {"stage1.vertebra_boxes": True, "sequence.box_channel": True},
    "vertebra crop + box channel": {"stage1.vertebra_boxes": True, "sequence.crop": "vertebra",
                                    "sequence.box_channel": True},
})
PRESETS["vertebra crop + box channel, no resampling"] = {
    **PRESETS["vertebra crop + box channel"], **PRESETS["no resampling"]}
PRESETS["recipe (EMA, balanced, label on every step)"] = {
    **PRESETS["EMA weights"], **PRESETS["balanced fractures"], **PRESETS["label on every step"]}
HELDOUT_COLUMNS = ("model", "test metric", "/ prior", "patient AUC", "vertebra AUC",
                   "look-alike AUC", "look-alike FPR at 90% sensitivity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--change", nargs="+", default=[], metavar="KEY=VALUE",
                   help="an arm: the test's budget with these settings changed (one arm each), "
                        f"or a preset: {', '.join(PRESETS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 7, 3])
    p.add_argument("--calibrate", action="store_true",
                   help="score through the out-of-fold calibrator (calibrate: true) instead of N")
    p.add_argument("--test-studies", type=int, default=200,
                   help="held-out test studies (generator seed %d; 0 = none)" % HELDOUT_SEED)
    p.add_argument("--set", choices=SETS, default="obvious", dest="dataset",
                   help="the training and held-out sets' fracture severity (default obvious: the "
                        "learning test's)")
    p.add_argument("--storage", type=Path, default=None,
                   help="results and data (default runs/learnable, runs/learnable-subtle)")
    args = p.parse_args(argv)
    if args.storage is None:
        suffix = "" if args.dataset == "obvious" else f"-{args.dataset}"
        args.storage = Path(f"runs/learnable{suffix}")
    args.arms = {"thesis rules (the test's budget)": {}}
    for change in args.change:
        if change in PRESETS:
            args.arms[change] = PRESETS[change]
            continue
        args.arms[change] = {}
        for part in change.split():
            key, sep, value = part.partition("=")
            if not sep:
                p.error(f"--change wants KEY=VALUE or a preset ({', '.join(PRESETS)}), got {change!r}")
            args.arms[change][key] = yaml.safe_load(value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args, f"learnable: the learning test's set ({args.dataset}), arms {list(args.arms)}, "
                f"seeds {args.seeds}")
    from cspine_ray.config import from_dict, set_dotted
    from cspine_ray.train.config import TrainConfig
    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    data = args.storage / "shards"
    if not (data / "manifest.parquet").exists():  # generated and preprocessed once
        write_learning_shards(args.storage, processes=2, dataset=SETS[args.dataset])
    prior = evaluate_prior(data)["oof_metric"]
    print(f"constant prior: OOF metric {prior:.4f}")
    test = None
    if args.test_studies:
        generator = {k: v for k, v in SETS[args.dataset].items() if k not in ("studies", "seed")}
        test = heldout_set(args.storage / f"heldout-{args.test_studies}", args.test_studies,
                           **generator)
        print(f"held-out test set: {len(test.labels)} studies, seed {HELDOUT_SEED}", flush=True)
    tested: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    timings = Timings(args.storage / "timings.json")
    runs: dict[str, list[tuple]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm, changes in args.arms.items():
            settings = copy.deepcopy(BUDGET)
            settings["seed"] = seed
            for key, value in changes.items():
                set_dotted(settings, key, value)
            cfg = from_dict(TrainConfig, settings)
            result, timing = timed(timings, lambda: train(cfg, data, args.storage / "runs"))
            figures = evaluate_result(result, data, cfg.effective_top_n, calibrate=args.calibrate)
            runs[arm].append((figures, result, timing))
            print(f"seed {seed}, {arm}: OOF metric {figures['oof_metric']:.4f}, patient AUC "
                  f"{figures['oof_auc_patient_overall']:.3f}, best epoch {result.info.best_epoch}, "
                  f"last CV {result.info.last['cv_metric']:.4f}; {stage1_figures(result)}",
                  flush=True)
            if test is not None:
                preds = heldout_predictions(result, test, args.storage / "heldout-predictions"
                                            / str(args.test_studies),
                                            data if args.calibrate else None)
                held = score_heldout(preds, test, result.info.prior)
                tested[arm].append(held)
                print(f"  held out: metric {held['metric']:.4f} ({held['metric'] / held['prior_metric']:.2f}x "
                      f"the prior), patient AUC {held['auc_patient_overall']:.3f}, vertebra AUC "
                      f"{held['auc_vertebra']:.3f}, look-alike FPR {held['lookalike_fpr']:.2f}",
                      flush=True)
    rows = [row(arm, [f for f, _, _ in done], prior, [r for _, r, _ in done],
                [t for _, _, t in done], calibrated=args.calibrate) for arm, done in runs.items()]
    rows.append(["constant prior", f"{prior:.4f}", "1.00", "0.500", "-", "-", "-", "-", "-"])
    print(markdown(rows))
    if test is not None:
        how = "through the calibrator" if args.calibrate else "the top-N rule"
        print(f"\nHeld-out test set ({len(test.labels)} studies, seed {HELDOUT_SEED}, {how}), "
              f"mean ± sd over seeds {args.seeds}:\n")
        print(markdown([heldout_row(arm, figures) for arm, figures in tested.items()],
                       HELDOUT_COLUMNS))
        kinds = sorted({k for figures in tested.values() for f in figures for k in f
                        if k.startswith("auc_kind_")})
        print("\nVertebra AUC by fracture kind, within level (each fractured vertebra against the "
              "intact vertebrae of its level):\n")
        print(markdown([[arm] + [spread([f[k] for f in figures if k in f], 3) for k in kinds]
                        for arm, figures in tested.items()],
                       ("model", *(k[len("auc_kind_"):] for k in kinds))))
    return 0


def stage1_figures(result) -> str:
    """The chosen stage-1 epoch's CV figures: ratio + box error, z error and, with per-vertebra
    boxes, their IoU."""
    from cspine_ray.train.result import load_result

    best = load_result(result.info.stage1_dir).info.best
    text = f"stage 1 error {best['cv_metric']:.4f}, z {best['cv_z_error']:.2f} slices"
    if "cv_vertebra_box_iou" in best:
        text += f", vertebra box IoU {best['cv_vertebra_box_iou']:.3f}"
    return text


def heldout_row(name: str, figures: list[dict]) -> list[str]:
    metric = [f["metric"] for f in figures]
    prior = statistics.mean(f["prior_metric"] for f in figures)
    return [name, spread(metric, 4), f"{statistics.mean(metric) / prior:.2f}",
            spread([f["auc_patient_overall"] for f in figures], 3),
            spread([f["auc_vertebra"] for f in figures], 3),
            spread([f["lookalike_auc"] for f in figures], 3),
            spread([f["lookalike_fpr"] for f in figures], 2)]


if __name__ == "__main__":
    sys.exit(main())
