"""`python -m cspine_ray.predict --model models:/cspine-fracture@champion --input DIR --out FILE`.

Batch inference with Ray Data: CPU tasks shard the new studies (as preprocessing did for
training), then model replicas (actors, one GPU each when there are GPUs) predict them.
Writes the competition submission (row_id, fractured), a wide per-study CSV with each study's
status and reason, and optionally a PNG report per study.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from cspine_ray import TARGETS
from cspine_ray.runtime import TRACKING_HELP

log = logging.getLogger(__name__)


class Predictor:
    """A model replica: loads the ensemble once, predicts batches of sharded studies."""

    def __init__(self, model_path: str, work_dir: str, report_dir: str | None):
        import mlflow.pyfunc

        self.model = mlflow.pyfunc.load_model(model_path).unwrap_python_model()
        self.work_dir, self.report_dir = work_dir, report_dir

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from cspine_ray.predict.pyfunc import predict_sharded

        return predict_sharded(self.model.ensemble, self.work_dir, batch.to_dict("records"),
                               self.report_dir)


def local_model(model_uri: str, tracking_uri: str | None, work: Path) -> str:
    """A local folder holding the MLflow model (downloaded once for all replicas)."""
    if Path(model_uri).is_dir():
        return str(Path(model_uri).resolve())
    import mlflow

    from cspine_ray.runtime import mlflow_store

    def download() -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(work / "model"))

    if not tracking_uri:
        return download()
    with mlflow_store(tracking_uri):
        return download()


def run_predict(model_uri: str, input_dir: str, out: str, wide: str | None = None,
                report_dir: str | None = None, tracking_uri: str | None = None,
                replicas: int | None = None, gpus_per_replica: float | None = None,
                batch_size: int = 4, work_dir: str | None = None,
                address: str | None = None) -> pd.DataFrame:
    import ray

    from cspine_ray.predict.inputs import discover_studies, shard_study
    from cspine_ray.predict.pyfunc import bundle_preprocess
    from cspine_ray.runtime import init_ray
    from cspine_ray.train.placement import current_cluster

    studies = discover_studies(input_dir)
    out_path = Path(out).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir or tempfile.mkdtemp(prefix=".cspine-predict-", dir=out_path.parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_path = local_model(model_uri, tracking_uri, work)
        preprocess = bundle_preprocess(model_path)  # the replicas load the models themselves
        init_ray(address=address)
        replicas, gpus_per_replica = replica_plan(current_cluster(), len(studies), batch_size,
                                                  replicas, gpus_per_replica)
        log.info("predicting %d studies with up to %d replica(s) of %s (%g GPU each)",
                 len(studies), replicas, model_uri, gpus_per_replica)

        items = [{**s, "index": i} for i, s in enumerate(studies)]
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(shard_study, fn_kwargs={"cfg": preprocess, "work_dir": str(work)}, num_cpus=1)
        ds = ds.map_batches(Predictor, batch_size=batch_size, batch_format="pandas",
                            fn_constructor_kwargs={"model_path": model_path, "work_dir": str(work),
                                                   "report_dir": report_dir},
                            # from one replica up: GPU nodes that start at zero join as
                            # the autoscaler adds them, instead of blocking the first batch
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=replicas),
                            num_gpus=gpus_per_replica,
                            num_cpus=0 if gpus_per_replica else 1)
        table = ds.to_pandas().sort_values("study_uid").reset_index(drop=True)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    write_outputs(table, out_path, Path(wide) if wide else default_wide(out_path))
    return table


def replica_plan(cluster, n_studies: int, batch_size: int, replicas: int | None = None,
                 gpus_per_replica: float | None = None) -> tuple[int, float]:
    """(replicas, GPUs each): one replica per GPU the cluster can grow to (autoscaled nodes
    included), else one CPU replica; never more replicas than batches of studies."""
    from cspine_ray.train.placement import PlacementError

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if cluster.slots(0, 1.0) else 0.0
    fits = cluster.slots(0 if gpus_per_replica else 1, gpus_per_replica)
    if fits < 1:
        raise PlacementError(f"a prediction replica asks {{GPU: {gpus_per_replica:g}}}, but no "
                             f"node of the cluster can ever hold one: {cluster.describe()}")
    if replicas is None:
        replicas = fits if gpus_per_replica else 1
    batches = max(1, -(-n_studies // batch_size))
    return max(1, min(replicas, fits, batches)), gpus_per_replica


def default_wide(out: Path) -> Path:
    return out.with_name(f"{out.stem}.studies.csv")


def write_outputs(table: pd.DataFrame, out: Path, wide: Path) -> None:
    from cspine_ray.io.rsna import check_uid
    from cspine_ray.metric import write_submission

    table.to_csv(wide, index=False)
    failed = table[table["status"] != "ok"]
    for _, r in failed.iterrows():
        log.warning("study %s could not be read (%s): answered with the training prior",
                    r["study_uid"], r["reason"])
    try:
        for uid in table["study_uid"]:
            check_uid(uid)
    except ValueError as e:
        log.warning("no submission written: study folder names must be UIDs for row ids (%s); "
                    "see %s", e, wide)
        return
    write_submission(table.set_index("study_uid")[list(TARGETS)], out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models:/cspine-fracture@champion",
                        help="MLflow model URI or a local model folder (default: the champion)")
    parser.add_argument("--input", required=True,
                        help="RSNA root (uses test_images/), a folder of study folders, or one study")
    parser.add_argument("--out", required=True, help="submission CSV (row_id, fractured)")
    parser.add_argument("--wide", help="per-study CSV (default: <out>.studies.csv)")
    parser.add_argument("--report-dir", help="write a PNG report per study here")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--replicas", type=int,
                        help="model replicas at most (default: one per GPU the cluster can grow "
                             "to, autoscaled nodes included; else 1)")
    parser.add_argument("--gpus-per-replica", type=float,
                        help="default 1 when the cluster has or can add GPUs, else 0")
    parser.add_argument("--batch-size", type=int, default=4, help="studies per replica call")
    parser.add_argument("--work-dir", help="where new studies are sharded (kept); shared storage on a cluster")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def registry_uri(model_uri: str, tracking_uri: str | None) -> str | None:
    """Where a models:/ or runs:/ URI resolves (`runtime.resolve_tracking`'s rule); a local
    model folder needs none."""
    from cspine_ray.runtime import resolve_tracking

    if model_uri.startswith(("models:/", "runs:/")):
        return resolve_tracking(tracking_uri).uri
    return tracking_uri


def run(args: argparse.Namespace) -> int:
    tracking = registry_uri(args.model, args.tracking_uri)
    table = run_predict(args.model, args.input, args.out, args.wide, args.report_dir, tracking,
                        args.replicas, args.gpus_per_replica, args.batch_size, args.work_dir,
                        args.address)
    failed = int((table["status"] != "ok").sum())
    print(f"{len(table)} studies predicted ({failed} unreadable, given the training prior): "
          f"{args.out}, {args.wide or default_wide(Path(args.out))}")
    return 0
