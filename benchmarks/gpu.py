"""The GPU check, one command (under 8 minutes on one recent GPU): training and predict speed at
the thesis's real sizes.

    python benchmarks/gpu.py [--studies 12] [--epochs 3] [--folds 5]

1. generates `--studies` 512 px studies (2 mm slices, a third segmented) and shards them;
2. stage 1 (ConvNeXt-Tiny locator, 384 px slices, batch 64) and stage 2 (ConvNeXt-Tiny +
   BiLSTM, L = 8 steps of 320 px crops, batch 8): training samples/s of the product's fold loop
   (a Ray Train worker holding one GPU) beside a plain PyTorch loop on the same batches, with the
   share of time spent waiting for data and the peak GPU memory;
3. predict seconds per study of the `--folds`-fold two-stage ensemble (benchmarks/predict.py:
   product vs bare forward passes vs the old per-fold loop).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train import plain_loop, ray_train  # benchmarks/train.py, beside this file

from cspine_ray.train.config import build_config

REAL = {
    "family": "two_stage", "backbone": "convnext_tiny",
    "optim": {"epochs": 3, "batch_size": 8},
    "input": {"image_size": 384, "loader_workers": 6},
    "stage1": {"backbone": "convnext_tiny", "image_size": 384, "epochs": 3, "batch_size": 64,
               "slices_per_study": 64},
    "sequence": {"length": 8, "crop_size": 320},
    "resources": {"num_workers": 1, "gpus": 1.0, "cpus_per_worker": 8.0},
}


def prepare(root: Path, studies: int):
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.synth import dataset_specs, write_dataset

    data = root / f"data-{studies}"
    if not (data / "train.csv").exists():
        write_dataset(data, dataset_specs(studies, seed=11, n_test=0, size=512, slice_spacing=2.0,
                                          severity="obvious"))
    shards = root / f"shards-{studies}"
    run_preprocess(data, shards, PreprocessConfig(n_folds=2), dashboard=False)
    return shards


def row(name: str, r: dict) -> str:
    steady = slice(1, None) if len(r["samples_per_second"]) > 1 else slice(None)
    return (f"{name:<34}{np.mean(r['samples_per_second'][steady]):>12.1f}"
            f"{np.mean(r['data_wait'][steady]):>12.1%}{r['gpu_memory_gb']:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5, help="fold models per stage for predict")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cspine-bench-gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch sees none)")

    from cspine_ray.runtime import init_ray
    from cspine_ray.train.job import ensure_stage1

    start = time.time()
    root = Path(args.workdir)
    init_ray(num_cpus=os.cpu_count())
    shards = prepare(root, args.studies)
    cfg = build_config(REAL, {"optim.epochs": args.epochs, "stage1.epochs": args.epochs})
    threads = int(cfg.resources.cpus_per_worker)
    print(f"{torch.cuda.get_device_name(0)}; {args.studies} studies of 512 px; "
          f"{args.epochs} epochs, steady epochs averaged", flush=True)
    print(f"{'':<34}{'samples/s':>12}{'data wait':>12}{'GPU GiB':>12}")
    s1_plain = plain_loop(shards, cfg, None, threads, "locator", "cuda")
    s1_ray = ray_train(shards, cfg, None, "locator")
    print(row("stage 1, plain PyTorch loop", s1_plain))
    print(row("stage 1, product fold worker", s1_ray), flush=True)
    stage1 = ensure_stage1(build_config(REAL, {"stage1.epochs": 1}), shards, root / "runs")
    s2_plain = plain_loop(shards, cfg, stage1.path, threads, "two_stage", "cuda")
    s2_ray = ray_train(shards, cfg, stage1.path, "two_stage")
    print(row("stage 2, plain PyTorch loop", s2_plain))
    print(row("stage 2, product fold worker", s2_ray), flush=True)
    for name, plain, ray in (("stage 1", s1_plain, s1_ray), ("stage 2", s2_plain, s2_ray)):
        steady = slice(1, None) if args.epochs > 1 else slice(None)
        ratio = np.mean(ray["samples_per_second"][steady]) / np.mean(plain["samples_per_second"][steady])
        print(f"{name}: product / plain = {ratio:.2f}")
    print(f"training part: {time.time() - start:.0f} s", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("predict.py")), "--studies", "2",
                    "--folds", str(args.folds), "--device", "cuda",
                    "--workdir", str(root / "predict")], check=True)
    print(f"total: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
