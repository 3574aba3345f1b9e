"""Inference speed of the registered model: the product's predict vs the bare forward passes.

    python benchmarks/predict.py [--studies 2] [--folds 5] [--slice-spacing 3] [--threads 2]
                                 [--backbone convnext_tiny] [--device cpu|cuda]

A two-stage ensemble at the thesis's sizes (ConvNeXt-Tiny; stage 1 at 384 px on every slice,
stage 2 L = 8 steps of 320 px crops; `--folds` fold models per stage, random weights) is saved as
the MLflow model `promote` registers, then on `--studies` generated 512 px studies:

  (a) the product: `mlflow.pyfunc` predict on the study folders (shards them, stage 1, stage 2);
  (b) the floor: the same models' bare forward passes on as many inputs of the same shapes, in
      the same batch sizes (no data, no preprocessing), i.e. what the hardware must do anyway;
  (c) the old per-fold loop: each fold model run over the data on its own (stage 1 fold by fold,
      tables averaged, then stage 2 fold by fold), on the same shards.

Printed side by side with the ratios (a)/(b) (goal <= 1.3) and (c)/(a). Every figure is
measured in this one run; the load average is printed because the CPUs may be shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_model(root: Path, args) -> Path:
    """A random-weight two-stage ensemble saved as an MLflow pyfunc model folder."""
    import mlflow.pyfunc

    from cspine_ray.config import to_dict
    from cspine_ray.predict.pyfunc import EnsembleModel, make_bundle
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import SETTINGS
    from cspine_ray.preprocess.shards import SHARD_FORMAT, write_json_atomic
    from cspine_ray.train.config import build_config
    from cspine_ray.train.result import ModelSpec, ResultInfo, write_info, RESULT
    from cspine_ray.train.tasks import JobData, make_task

    if root.exists():
        shutil.rmtree(root)  # a model of an earlier run's settings
    cfg = build_config({"family": "two_stage", "backbone": args.backbone,
                        "stage1": {"backbone": args.backbone, "image_size": 384, "batch_size": 64},
                        "sequence": {"length": 8, "crop_size": 320},
                        "optim": {"batch_size": 8}, "input": {"loader_workers": 0}}, {})
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    pre = PreprocessConfig()
    write_json_atomic(shards / SETTINGS, {"config": to_dict(pre), "shard_hash": pre.shard_hash(),
                                         "shard_format": SHARD_FORMAT, "source": "benchmark"})
    empty = JobData(shards_dir=str(shards), uids=[], folds={}, labels={}, segmented=set())
    dirs = {}
    for name in ("locator", "two_stage"):
        task = make_task(name, cfg, empty)
        model_name, kwargs = task.model_spec()
        out = root / name
        out.mkdir(exist_ok=True)
        for fold in range(args.folds):
            torch.manual_seed(fold)
            torch.save({"model": task.build_model().state_dict(), "epoch": 1}, out / f"fold_{fold}.pt")
        info = ResultInfo(task=name, key="benchmark", config=cfg, n_folds=args.folds,
                          manifest_hash="benchmark", shards_dir=str(shards),
                          stage1_dir=str(root / "locator") if name == "two_stage" else None,
                          model=ModelSpec(model_name, kwargs), prior=[0.1] * 7 + [0.5],
                          history=[{"epoch": 1, "cv_metric": 0.5}], best_epoch=1,
                          cv_metric=0.5, created="")
        write_info(info, out / RESULT)
        (out / "config.yaml").write_text("")
        dirs[name] = out
    bundle = make_bundle(dirs["two_stage"], dirs["locator"], shards, root / "bundle",
                         {"family": "two_stage", "top_n": 7, "run_id": "benchmark"})
    mlflow.pyfunc.save_model(str(root / "model"), python_model=EnsembleModel(),
                             artifacts={"bundle": str(bundle)})
    return root / "model"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def floor(ensemble, n_slices: list[int], device) -> float:
    """Seconds of the bare forward passes predict must make, on inputs of its shapes made
    before the clock starts."""
    s1 = ensemble.stage1.config.stage1
    seq = ensemble.result.config.sequence
    batch1, batch2 = s1.batch_size, ensemble.result.config.optim.batch_size
    channels = ensemble.result.config.input.channels
    total, samples = sum(n_slices), 7 * len(n_slices)
    stage1 = [torch.rand(min(batch1, total - i), channels, s1.image_size, s1.image_size,
                         device=device) for i in range(0, total, batch1)]
    stage2 = [torch.rand(min(batch2, samples - i), seq.length, channels, seq.crop_size,
                         seq.crop_size, device=device) for i in range(0, samples, batch2)]

    def passes():
        for x in stage1:  # stage 1: every slice through every fold model
            for m in ensemble.stage1_models:
                m(x)
        for x in stage2:  # stage 2: every vertebra's sequence through every fold model
            v = torch.zeros(len(x), dtype=torch.long, device=device)
            for m in ensemble.models:
                m(x, v)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    passes()
    return time.perf_counter() - start


@torch.no_grad()
def warm_up(ensemble, device) -> None:
    """One small batch through every model at each stage's input shape (allocator, thread
    pools, kernel choice), so no contender pays the first call's costs."""
    s1, seq = ensemble.stage1.config.stage1, ensemble.result.config.sequence
    channels = ensemble.result.config.input.channels
    x1 = torch.rand(2, channels, s1.image_size, s1.image_size, device=device)
    x2 = torch.rand(1, seq.length, channels, seq.crop_size, seq.crop_size, device=device)
    for m in ensemble.stage1_models:
        m(x1)
    for m in ensemble.models:
        m(x2, torch.zeros(1, dtype=torch.long, device=device))


@torch.no_grad()
def per_fold_loop(ensemble, shards_dir: str, uids: list[str]) -> pd.DataFrame:
    """The old Ensemble.predict: each fold model over the data on its own."""
    from cspine_ray.train.tasks import make_task
    from cspine_ray.train.tasks.base import Studies, to_targets

    locator = make_task("locator", ensemble.stage1.config, Studies(shards_dir))
    runs = [locator.predict_tables([m], uids, ensemble.device) for m in ensemble.stage1_models]
    tables = {u: np.mean([r[u] for r in runs], axis=0).astype(np.float32) for u in uids}
    task = make_task("two_stage", ensemble.result.config, Studies(shards_dir, tables))
    folds = [task.predict([m], uids, ensemble.device, prior=ensemble.prior) for m in ensemble.models]
    return to_targets(sum(f.loc[uids] for f in folds) / len(folds), ensemble.top_n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--slice-spacing", type=float, default=3.0, help="mm (study length in slices)")
    parser.add_argument("--backbone", default="convnext_tiny")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cspine-bench-predict"))
    args = parser.parse_args()

    import mlflow.pyfunc

    from cspine_ray.predict.inputs import shard_study
    from cspine_ray.synth import dataset_specs, write_dataset

    torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    data = root / f"data-{args.studies}-{args.slice_spacing}"
    if not (data / "test_images").exists():
        write_dataset(data, dataset_specs(1, seed=3, n_test=args.studies, size=512,
                                          slice_spacing=args.slice_spacing, severity="obvious"))
    studies = sorted((data / "test_images").iterdir())
    model_dir = build_model(root / "model-build", args)
    wrapper = mlflow.pyfunc.load_model(str(model_dir))
    ensemble = wrapper.unwrap_python_model().ensemble
    device = torch.device(args.device)
    for m in ensemble.models + ensemble.stage1_models:
        m.to(device)
    ensemble.device = device
    frame = pd.DataFrame({"study_dir": [str(s) for s in studies]})
    os.environ["CSPINE_ALLOWED_ROOTS"] = str(data)  # the pyfunc reads folders only under these
    warm_up(ensemble, device)

    load = os.getloadavg()[0]
    t_a, out_a = timed(lambda: wrapper.predict(frame))
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    rows = [shard_study({"study_uid": s.name, "study_dir": str(s), "index": i},
                        wrapper.unwrap_python_model().preprocess, str(work))
            for i, s in enumerate(studies)]
    n_slices = [int(np.load(work / "studies" / r["shard"] / "volume.npy", mmap_mode="r").shape[0])
                for r in rows]
    t_b = floor(ensemble, n_slices, device)
    uids = [r["shard"] for r in rows]
    t_c, out_c = timed(lambda: per_fold_loop(ensemble, str(work), uids))
    one_pass, _ = ensemble.predict(str(work), uids)
    diff = float(np.abs(one_pass.loc[uids].to_numpy() - out_c.loc[uids].to_numpy()).max())
    load_after = os.getloadavg()[0]

    n = len(studies)
    print(f"{n} studies of 512 px, {sum(n_slices)} slices in all; {args.folds} folds per stage, "
          f"{args.backbone}, stage 1 at 384 px, stage 2 L=8 at 320 px; device {args.device}, "
          f"{args.threads} threads; load {load:.2f} -> {load_after:.2f}")
    print(f"{'method':<46}{'s/study':>10}")
    print(f"{'(a) product predict (pyfunc, with sharding)':<46}{t_a / n:>10.2f}")
    print(f"{'(b) bare forward passes (the floor)':<46}{t_b / n:>10.2f}")
    print(f"{'(c) old per-fold loop (on the same shards)':<46}{t_c / n:>10.2f}")
    print(f"(a)/(b) = {t_a / t_b:.2f} (goal <= 1.3); (c)/(a) = {t_c / t_a:.2f}; "
          f"max |one pass - per-fold loop| = {diff:.2e}")
    assert len(out_a) == n


if __name__ == "__main__":
    main()
