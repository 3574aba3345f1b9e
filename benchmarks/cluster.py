"""Trials at once and (fake) GPU use: one node vs Ray's local autoscaling cluster, same search.

    python benchmarks/cluster.py            # about 5 minutes on 2 CPUs

Both runs search the same space (4 trials of cnn3d, 2 epochs, 2 folds, `--gpus-per-trial 1`) on
the same generated shards, through the CLI as a user runs it:

- one node: a plain Ray node declaring {CPU: 2, GPU: 2} (the search sees 2 GPUs);
- autoscaling: a CPU-0 head and GPU nodes {CPU: 2, GPU: 2}, 0 to 2 of them, started by Ray's
  autoscaler as the trials ask for them (`tests/fake_cluster.py`).

Trials at once is the most MLflow trial runs running at one moment; GPU use is the trials'
GPU-seconds over (search wall time x the GPUs the cluster has at its largest). Fake GPUs have
no CUDA: every trial really trains on this machine's 2 CPUs, so wall time shows the contention,
not what real GPUs would give.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY, TINY_TRAIN  # noqa: E402
from fake_cluster import FakeCluster  # noqa: E402

GPU_NODE = {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2}


def search(cluster: FakeCluster, space: Path, shards: Path, storage: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from cspine_ray.runtime import sqlite_uri

    start = time.time()
    done = cluster.run([sys.executable, "-m", "cspine_ray.tune", "--space", str(space), "--shards",
                        str(shards), "--storage", str(storage), "--gpus-per-trial", "1",
                        "--experiment", "bench"], timeout=1800)
    wall = time.time() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    client = MlflowClient(sqlite_uri(storage / "mlflow.db"))
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    spans = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    at_once = now = 0
    for _, step in events:
        now += step
        at_once = max(at_once, now)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    busy = sum(b - a for a, b in spans)  # one GPU per trial
    return {"trials": len(runs), "at_once": at_once, "search_s": last - first, "wall_s": wall,
            "gpu_seconds": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.synth import dataset_specs, write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="cspine-bench-cluster-"))
    specs = dataset_specs(TINY["studies"], seed=TINY["seed"], n_test=0, size=TINY["size"],
                          slice_spacing=TINY["slice_spacing"], severity=TINY["severity"])
    write_dataset(tmp / "rsna", specs)
    run_preprocess(tmp / "rsna", tmp / "shards", PreprocessConfig(size=TINY["size"], n_folds=2),
                   num_cpus=2, dashboard=False)
    import ray

    ray.shutdown()
    base = copy.deepcopy(TINY_TRAIN)
    base.pop("resources")
    base.update(family="cnn3d", optim={**base["optim"], "epochs": args.epochs})
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({"description": "bench", "base": base,
                                     "params": {"seed": {"type": "int", "low": 1, "high": 99}},
                                     "budget": {"trials": args.trials, "asha": None}}))

    rows = {}
    for name, cluster, gpus in (
            ("one node {CPU: 2, GPU: 2}", FakeCluster(tmp, None, head_cpus=2, head_gpus=2), 2),
            ("autoscaling: 0-2 nodes {CPU: 2, GPU: 2}",
             FakeCluster(tmp, {"gpu_worker": GPU_NODE}, max_workers=2), 4)):
        cluster.start()
        try:
            figures = search(cluster, space, tmp / "shards", tmp / f"runs-{len(rows)}")
        finally:
            cluster.stop()
        figures["gpu_use"] = figures["gpu_seconds"] / (figures["search_s"] * gpus)
        figures["gpus"] = gpus
        rows[name] = figures
        print(f"{name}: {figures}", flush=True)

    print("\n| cluster | GPUs at most | trials | most at once | search s | GPU-s | GPU use |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f in rows.items():
        print(f"| {name} | {f['gpus']} | {f['trials']} | {f['at_once']} | {f['search_s']:.0f} | "
              f"{f['gpu_seconds']:.0f} | {f['gpu_use']:.2f} |")
    one, auto = rows.values()
    print(f"\ntrials at once, autoscaling / one node: {auto['at_once'] / one['at_once']:.2f}x; "
          f"search time: {auto['search_s'] / one['search_s']:.2f}x")


if __name__ == "__main__":
    main()
