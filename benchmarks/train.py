"""Training throughput: one Ray Train fold worker vs a plain PyTorch loop, side by side.

    python benchmarks/train.py [--studies 24] [--size 96] [--epochs 3] [--threads 2]

Both train the same two-stage model on the same fold-0 batches (same dataset class, same loss,
same augmentation, same batch size, same torch threads). The plain loop is the simplest
PyTorch code (DataLoader + model + AdamW); the Ray Train side is the product's fold loop in a
TorchTrainer with one worker, timed by the worker itself (training phase of each epoch, so
worker start-up and validation are excluded; they are reported separately). Also reported:
the fraction of training time spent waiting for data, which should stay small.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cspine_ray.train.config import TrainConfig
from cspine_ray.train.config import build_config

CONFIG = {
    "family": "two_stage",
    "backbone": "test_convnext",
    "optim": {"epochs": 3, "batch_size": 16, "lr": 0.002, "t0": 3},
    "input": {"loader_workers": 1},
    "stage1": {"backbone": "test_efficientnet", "image_size": 64, "epochs": 4, "batch_size": 32,
               "slices_per_study": 16},
    "sequence": {"length": 4, "crop_size": 64, "hidden": 32, "layers": 1},
    "resources": {"num_workers": 1},
}


def prepare(args) -> tuple[Path, TrainConfig, Path]:
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.synth import dataset_specs, write_dataset
    from cspine_ray.train.job import ensure_stage1

    root = Path(args.workdir)
    data = root / f"data-{args.studies}-{args.size}"
    if not (data / "train.csv").exists():
        write_dataset(data, dataset_specs(args.studies, seed=1, n_test=0, size=args.size,
                                          slice_spacing=3.0, severity="obvious"))
    shards = root / f"shards-{args.studies}-{args.size}"
    run_preprocess(data, shards, PreprocessConfig(size=args.size, n_folds=2))
    cfg = build_config(CONFIG, {"optim.epochs": args.epochs,
                                "resources.cpus_per_worker": float(args.threads)})
    stage1 = ensure_stage1(cfg, shards, root / "runs")
    return shards, cfg, stage1.path


def plain_loop(shards: Path, cfg: TrainConfig, stage1: Path | None, threads: int,
               task_name: str | None = None, device: str = "cpu") -> dict:
    """The baseline: a hand-written PyTorch loop over fold 0's training studies (bf16
    autocast on a GPU when the config asks for mixed precision, as is usual)."""
    import contextlib

    from cspine_ray.train.tasks import JobData, make_task

    torch.set_num_threads(threads)
    device = torch.device(device)
    data = JobData.load(shards, stage1)
    task = make_task(task_name or cfg.family, cfg, data)
    optim = task.optim()
    train_uids, _ = task.split(0)
    torch.manual_seed(0)
    model = task.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and optim.amp
           else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates, waits = [], []
    for epoch in range(optim.epochs):
        loader = torch.utils.data.DataLoader(task.train_dataset(train_uids, epoch, 0),
                                             batch_size=optim.batch_size, shuffle=True,
                                             num_workers=cfg.input.loader_workers, drop_last=True,
                                             pin_memory=device.type == "cuda")
        model.train()
        seen, waited = 0, 0.0
        start = tick = time.perf_counter()
        for batch in loader:
            waited += time.perf_counter() - tick
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            with amp:
                loss = task.loss(model, batch, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(batch["uid"])
            tick = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        rates.append(seen / elapsed)
        waits.append(waited / elapsed)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"samples_per_second": rates, "data_wait": waits, "gpu_memory_gb": peak}


def ray_train(shards: Path, cfg: TrainConfig, stage1: Path | None, task_name: str | None = None) -> dict:
    from cspine_ray.train.job import _fit
    from cspine_ray.train.loop import fold_file
    from cspine_ray.train.result import torch_load
    from cspine_ray.train.tasks import JobData

    storage = Path(tempfile.mkdtemp(prefix="bench-train-"))
    start = time.perf_counter()
    result = _fit(task_name or cfg.family, cfg, JobData.load(shards), storage, "bench", stage1, [],
                  None)
    wall = time.perf_counter() - start
    with result.checkpoint.as_directory() as folder:
        history = torch_load(Path(folder) / fold_file(0, "state.pt"))["history"]
    return {"samples_per_second": [h["fold_0_samples_per_second"] for h in history],
            "data_wait": [h["fold_0_data_wait_fraction"] for h in history],
            "train_seconds": sum(h["fold_0_train_seconds"] + h["fold_1_train_seconds"] for h in history),
            "gpu_memory_gb": max(h.get("fold_0_gpu_memory_gb", float("nan")) for h in history),
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cspine-bench-train"))
    args = parser.parse_args()

    from cspine_ray.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    shards, cfg, stage1 = prepare(args)
    load = os.getloadavg()[0]
    plain = plain_loop(shards, cfg, stage1, args.threads)
    ray = ray_train(shards, cfg, stage1)
    # the first epoch warms caches and (for Ray) the worker: compare the steady epochs
    steady = slice(1, None) if args.epochs > 1 else slice(None)
    p = float(np.mean(plain["samples_per_second"][steady]))
    r = float(np.mean(ray["samples_per_second"][steady]))
    print(f"\ntwo-stage fold 0, {args.studies} studies at {args.size} px, batch {cfg.optim.batch_size}, "
          f"{args.threads} torch threads each, load average {load:.2f}")
    print(f"{'':24}{'samples/s':>12}{'data wait':>12}")
    print(f"{'plain PyTorch loop':24}{p:12.1f}{np.mean(plain['data_wait'][steady]):12.1%}")
    print(f"{'Ray Train fold worker':24}{r:12.1f}{np.mean(ray['data_wait'][steady]):12.1%}")
    print(f"ratio Ray Train / plain: {r / p:.2f}  (goal >= 0.90: {'PASS' if r / p >= 0.9 else 'FAIL'})")
    print(f"Ray Train job wall time {ray['wall']:.1f}s for {ray['train_seconds']:.1f}s of training "
          f"(start-up, validation and checkpoints make the rest)")


if __name__ == "__main__":
    main()
