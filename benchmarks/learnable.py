"""A stage-2 option on the one generated set where stage 2 does learn: the learning test's.

    python benchmarks/learnable.py [--change KEY=VALUE ...] [--seeds 42 1 7 3]
                                   [--storage runs/learnable]

The quality sets (benchmarks/quality.py) sit at the prior whatever is switched on, so they
cannot show whether an option helps a detector that learns. This runs the set and budget of
tests/test_learning.py (96 studies at 64 px, every one segmented, obvious fractures, 2 folds;
stage 1 20 epochs, stage 2 20 epochs, tiny backbones), where the thesis rules reach a patient
AUC of 0.6-0.8, once per training seed with the test's budget and once with each --change
on top of it (dotted TrainConfig keys, values as YAML: `sequence.step_loss=1.0`). The seed
moves both stages; one seed's stage 1 is shared by all its arms. Prints every run and, per
arm, quality.py's row over the seeds (mean ± sd): the OOF figures at the epoch chosen on the
same folds' vertebra loss, and the last epoch's CV figures, which nothing chose.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import yaml

from quality import Timings, markdown, row, start, timed

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# the test's set, budget and data: one home
from test_learning import BUDGET, write_learning_shards  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--change", nargs="+", default=[], metavar="KEY=VALUE",
                   help="an arm: the test's budget with this setting changed (one arm each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 7, 3])
    p.add_argument("--storage", type=Path, default=Path("runs/learnable"))
    args = p.parse_args(argv)
    args.arms = {"thesis rules (the test's budget)": {}}
    for change in args.change:
        key, sep, value = change.partition("=")
        if not sep:
            p.error(f"--change wants KEY=VALUE, got {change!r}")
        args.arms[change] = {key: yaml.safe_load(value)}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args, f"learnable: the learning test's set, arms {list(args.arms)}, seeds {args.seeds}")
    from cspine_ray.config import from_dict, set_dotted
    from cspine_ray.train.config import TrainConfig
    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_prior, evaluate_result

    data = args.storage / "shards"
    if not (data / "manifest.parquet").exists():  # generated and preprocessed once
        write_learning_shards(args.storage, processes=2)
    prior = evaluate_prior(data)["oof_metric"]
    print(f"constant prior: OOF metric {prior:.4f}")
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
            figures = evaluate_result(result, data, cfg.effective_top_n)
            runs[arm].append((figures, result, timing))
            print(f"seed {seed}, {arm}: OOF metric {figures['oof_metric']:.4f}, patient AUC "
                  f"{figures['oof_auc_patient_overall']:.3f}, best epoch {result.info.best_epoch}, "
                  f"last CV {result.info.last['cv_metric']:.4f}", flush=True)
    rows = [row(arm, [f for f, _, _ in done], prior, [r for _, r, _ in done],
                [t for _, _, t in done]) for arm, done in runs.items()]
    rows.append(["constant prior", f"{prior:.4f}", "1.00", "0.500", "-", "-", "-", "-", "-"])
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
