"""`python -m cspine_ray.train --config FILE --shards DIR`: one fold-parallel training job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspine_ray.config import load_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig keys (default: thesis settings)")
    parser.add_argument("--shards", required=True, help="preprocessed shard folder (with manifest)")
    parser.add_argument("--storage", default="runs",
                        help="where checkpoints and results go (shared storage on a cluster)")
    parser.add_argument("--family", help="override the config's family")
    parser.add_argument("--epochs", type=int, help="override optim.epochs")
    parser.add_argument("--ensemble", type=int, metavar="K",
                        help="a seed ensemble of K (seeds seed..seed+K-1, both stages; "
                             "K times the training)")
    parser.add_argument("--num-workers", type=int,
                        help="Ray Train workers (default: as many folds at once as the cluster "
                             "holds; 0 = in-process)")
    parser.add_argument("--gpus", type=float,
                        help="GPUs for the job: 4 runs 5 folds on 4 whole GPUs, 0.5 shares one")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from pretrained timm weights (needs them downloaded or cached)")
    parser.add_argument("--weights", metavar="FILE_OR_FOLDER",
                        help="pretrained backbone weights from this file, or from <backbone>"
                             ".safetensors in this folder (implies --pretrained)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train both stages again from scratch even if results exist")


def config_from_args(args: argparse.Namespace):
    from cspine_ray.train.config import build_config

    overrides = {"family": args.family or None, "optim.epochs": args.epochs,
                 "ensemble": args.ensemble,
                 "resources.num_workers": args.num_workers,
                 "resources.gpus": args.gpus,
                 "pretrained": args.pretrained or None,
                 # absolute: Ray workers may run in another directory
                 "weights": args.weights and str(Path(args.weights).resolve())}
    return build_config(load_yaml(args.config) if args.config else {},
                        {k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from cspine_ray.preprocess.shards import ShardSet
    from cspine_ray.runtime import init_ray
    from cspine_ray.train.job import train
    from cspine_ray.train.result import evaluate_result

    cfg = config_from_args(args)
    shards = ShardSet.open(args.shards)
    init_ray(address=args.address)
    result = train(cfg, shards, args.storage, reuse=not args.no_reuse)
    figures = evaluate_result(result, shards, cfg.effective_top_n)
    info = result.info
    print(f"{cfg.family}: CV metric {info.cv_metric:.4f} ({info.how_chosen()}); out-of-fold "
          f"metric {figures['oof_metric']:.4f}, mean AUC {figures['oof_auc_mean']:.3f}")
    print(json.dumps(figures, indent=1))
    print(f"result: {result.path}")
    return 0
