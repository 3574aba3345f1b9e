"""`python -m cspine_ray.preprocess --data ROOT --out DIR`: shard an RSNA-layout dataset."""

from __future__ import annotations

import argparse

from cspine_ray.config import from_dict, load_yaml
from cspine_ray.preprocess.config import PreprocessConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="RSNA layout root (train.csv, train_images/, ...)")
    parser.add_argument("--out", required=True, help="shard folder (local path or shared storage)")
    parser.add_argument("--config", help="YAML file with PreprocessConfig keys")
    parser.add_argument("--size", type=int, help="in-plane size of the shards (default 256)")
    parser.add_argument("--native-size", type=int,
                        help="side of the native-resolution level for stage-2 crops and the 2D "
                             "families (default 512; 0: none)")
    parser.add_argument("--folds", type=int, help="number of CV folds (default 5)")
    parser.add_argument("--seed", type=int, help="fold assignment seed (default 42)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    parser.add_argument("--verify", action="store_true",
                        help="re-check the checksum of every existing shard before reusing it")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    data = load_yaml(args.config) if args.config else {}
    for key, value in (("size", args.size), ("native_size", args.native_size),
                       ("n_folds", args.folds), ("seed", args.seed)):
        if value is not None:
            data[key] = value
    return from_dict(PreprocessConfig, data)


def run(args: argparse.Namespace) -> int:
    from cspine_ray.preprocess.pipeline import run_preprocess

    manifest = run_preprocess(args.data, args.out, config_from_args(args), address=args.address,
                              num_cpus=args.num_cpus, verify=args.verify, dashboard=False)
    ok = int((manifest["status"] == "ok").sum())
    print(f"{ok}/{len(manifest)} studies sharded into {args.out} "
          f"({len(manifest) - ok} failed; see the manifest's reason column)")
    return 0
