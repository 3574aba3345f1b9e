"""The cluster path on a real multi-node Ray: Ray's fake autoscaling cluster on this machine.

A CPU-0 head and GPU worker nodes ({CPU: 2, GPU: 2}, 0 to 2 of them) that the autoscaler
starts as work asks for them, as on `ray up cluster.yaml`. Preprocess, a search with
`--gpus-per-trial 1`, promote and predict run as a user runs them (the CLI, `--address`);
the results must equal the single-node ones. Fake GPUs have no CUDA: training falls back to
the CPU with a warning.
"""

from __future__ import annotations

import copy
import json
import sys

import pandas as pd
import pytest
import yaml

from conftest import TINY, TINY_TRAIN
from fake_cluster import FakeCluster

pytestmark = pytest.mark.slow

GPU_NODE = {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    fake = FakeCluster(tmp_path_factory.mktemp("fake"), {"gpu_worker": GPU_NODE}, max_workers=2)
    try:
        yield fake.start()
    finally:
        fake.stop()


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _node_spread(cluster, name_part: str) -> int:
    """Distinct nodes that ran tasks whose name contains `name_part` (Ray's state API)."""
    script = ("import ray, json; from ray.util.state import list_tasks; ray.init(log_to_driver=False);"
              f"tasks = [t for t in list_tasks(limit=10000) if {name_part!r} in t.name];"
              "print(json.dumps(sorted({t.node_id for t in tasks if t.node_id})))")
    done = cluster.run([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return len(json.loads(done.stdout.strip().splitlines()[-1]))


def _overlap(runs) -> int:
    """The most MLflow trial runs that were running at the same moment."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_preprocess_tune_promote_predict_on_an_autoscaling_cluster(cluster, tiny_dataset,
                                                                  tiny_shards, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    from cspine_ray.cli import main
    from cspine_ray.preprocess.manifest import manifest_hash, read_manifest
    from cspine_ray.runtime import sqlite_uri

    def preprocess(out):
        done = cluster.run(_python("cspine_ray.preprocess", "--data", str(tiny_dataset), "--out",
                                   str(out), "--size", str(TINY["size"]), "--native-size", "96",
                                   "--folds", "2"))
        assert done.returncode == 0, done.stderr[-3000:]
        # the same shards as on one node
        assert manifest_hash(read_manifest(out)) == manifest_hash(read_manifest(tiny_shards))

    # from zero nodes: the autoscaler adds a node for the preprocessing tasks
    shards = tmp_path / "shards"
    preprocess(shards)

    # a search of 4 trials, one whole (fake) GPU each: each node holds two trials, so the
    # autoscaler's second node lets trials run side by side
    base = copy.deepcopy(TINY_TRAIN)
    base.pop("resources")
    base.update(family="cnn3d", optim={**base["optim"], "epochs": 1})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"description": "cluster", "base": base,
                                     "params": {"seed": {"type": "int", "low": 1, "high": 99}},
                                     "budget": {"trials": 4, "asha": None}}))
    storage = tmp_path / "runs"
    done = cluster.run(_python("cspine_ray.tune", "--space", str(space), "--shards", str(shards),
                               "--storage", str(storage), "--gpus-per-trial", "1",
                               "--experiment", "cspine-cluster"), timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert ("each trial: 2 folds on 1 worker(s) of {CPU: 1, GPU: 1} (worker 0: folds 0, 1); "
            "up to 4 trial(s) at once") in log
    assert "torch sees no CUDA device" in log  # fake GPUs: trained on the CPU, and said so
    uri = sqlite_uri(storage / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cspine-cluster")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert len(trials) == 4 and {t.info.status for t in trials} == {"FINISHED"}
    assert _overlap(trials) >= 2

    # with both nodes up, preprocessing tasks spread over them
    preprocess(tmp_path / "shards-again")
    assert _node_spread(cluster, "process_study") >= 2

    # promote, then predict on the cluster and on one node: the same probabilities
    assert main(["promote", "--tracking-uri", uri, "--experiment", "cspine-cluster"]) == 0
    from cspine_ray.predict.cli import local_model

    model = local_model("models:/cspine-fracture@champion", uri, tmp_path)  # tmp_path/model
    inputs = tiny_dataset / "test_images"
    done = cluster.run(_python("cspine_ray.predict", "--model", str(model), "--input", str(inputs),
                               "--out", str(tmp_path / "cluster.csv"), "--batch-size", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "up to 4 replica(s)" not in done.stderr + done.stdout  # capped by the 2 studies
    assert main(["predict", "--model", str(model), "--input", str(inputs),
                 "--out", str(tmp_path / "local.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cluster.csv"),
                                  pd.read_csv(tmp_path / "local.csv"), atol=1e-6)
