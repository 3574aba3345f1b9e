"""`python -m cspine_ray.tune`: search families, backbones, sequence lengths and N; track in MLflow.

With no options it is the demo: a synthetic dataset is generated into runs/, preprocessed, and
search_spaces/demo.yaml runs on a local Ray, tracked in runs/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SPACE = "demo.yaml"
# the shipped search spaces: package data, so an installed cspine-ray finds them from any folder
# (the checkout's top-level search_spaces/ is a link to this folder)
SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"


def find_space(value: str | None) -> Path:
    """A search-space file as given; else, for a bare name (`laptop`, `laptop.yaml`) or one
    under search_spaces/ as the README writes it, the shipped space of that name."""
    name = value or DEFAULT_SPACE
    given = Path(name)
    candidates = [given]
    if given.parent in (Path("."), Path("search_spaces")):
        candidates += [SPACES_DIR / given.name, SPACES_DIR / f"{given.name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"search space {name!r} not found (looked in "
                            f"{', '.join(map(str, candidates))}; shipped: {shipped})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", help="search-space YAML, or the name of a shipped one "
                                        "(demo, laptop, laptop_families, two_stage, families; "
                                        "default: demo)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", help="RSNA layout root; preprocessed on the fly (and reused)")
    data.add_argument("--shards", help="an already preprocessed shard folder")
    parser.add_argument("--trials", type=int, help="number of trials (default: the space's budget)")
    parser.add_argument("--storage", default="runs",
                        help="folder for data, checkpoints, results and Tune state "
                             "(shared storage such as /mnt/shared/runs on a cluster)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                             "sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default: cspine-<space name>)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="NAME",
                        help="continue an interrupted search (default: the latest of this space)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs per trial: N >= 1 whole GPUs shared out to the folds (4 runs "
                             "5 folds on 4 GPUs), a fraction shares one GPU")
    parser.add_argument("--max-concurrent", type=int,
                        help="at most this many trials at once (default: as many as the cluster "
                             "holds at its largest, autoscaled nodes included)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per fold worker")
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    parser.add_argument("--pretrained", action="store_true",
                        help="start backbones from pretrained timm weights (must be downloadable or cached)")
    parser.add_argument("--weights", metavar="FILE_OR_FOLDER",
                        help="pretrained backbone weights from this file, or from <backbone>"
                             ".safetensors in this folder (implies --pretrained)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def run(args: argparse.Namespace) -> int:
    from cspine_ray.runtime import init_ray, record_search, resolve_tracking
    from cspine_ray.tune.data import demo_dataset, demo_preprocess_config, prepared_shards
    from cspine_ray.tune.results import runs_page
    from cspine_ray.tune.search import SearchOptions, final_results, run_search
    from cspine_ray.tune.space import DemoData, load_space

    space_file = find_space(args.space)
    space = load_space(space_file)
    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tracking = resolve_tracking(args.tracking_uri, storage)
    tracking_uri = tracking.uri
    init_ray(address=args.address)

    if args.shards:
        shards = Path(args.shards)
    elif args.data:
        from cspine_ray.preprocess.config import PreprocessConfig

        shards = prepared_shards(Path(args.data), storage, PreprocessConfig(), address=args.address)
    else:
        demo = space.demo or DemoData()
        shards = prepared_shards(demo_dataset(storage, demo), storage, demo_preprocess_config(demo),
                                 address=args.address)

    opts = SearchOptions(space=space, space_file=space_file, shards_dir=shards, storage=storage,
                         tracking_uri=tracking_uri, experiment=args.experiment or f"cspine-{space.name}",
                         trials=args.trials, resume=args.resume, gpus_per_trial=args.gpus_per_trial,
                         cpus_per_worker=args.cpus_per_worker, seed=args.seed,
                         max_concurrent=args.max_concurrent,
                         pretrained=args.pretrained,
                         weights=args.weights and str(Path(args.weights).resolve()),
                         command=args.command_line)
    print(f"MLflow: {tracking_uri} ({tracking.source}), experiment {opts.experiment!r}")
    record_search(tracking_uri, opts.experiment)  # promote / predict / serve from here find it
    name, grid = run_search(opts)
    finished = final_results(grid)
    print(f"\nsearch {name}: {len(finished)} of {len(grid)} trials finished "
          f"(others stopped early by ASHA or failed)")
    for m in finished:
        c = m["config"]
        print(f"  cv_metric {m['cv_metric']:.4f}  oof AUC {m.get('oof_auc_mean', float('nan')):.3f}  "
              f"{'reused ' if m.get('reused') else 'trained'} {m['trial_seconds']:6.1f}s  {c}")
    if finished:
        best = finished[0]
        print(f"\nbest: cv_metric {best['cv_metric']:.4f} (result {best['result_dir']})")
    print(f"\nMLflow experiment {opts.experiment!r} at {tracking_uri}")
    if tracking_uri.startswith("sqlite"):
        print(f"open the UI:  mlflow ui --backend-store-uri {tracking_uri}")
    print(f"its runs:     {runs_page(tracking_uri, opts.experiment)}")
    if not finished:  # nothing to promote: a failed search must not look like a finished one
        print(f"cspine-ray tune: no trial of search {name} finished; each trial's error is in "
              f"its MLflow run (tag `error`) and under {storage}", file=sys.stderr)
        return 1
    print(f"promote the best: python -m cspine_ray.promote   (from this folder; elsewhere add "
          f"--tracking-uri {tracking_uri} --experiment {opts.experiment})")
    return 0
