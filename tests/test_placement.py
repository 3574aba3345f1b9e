"""Fold workers fitted to the cluster: layouts by hand, and the user's paths through the CLI.

Expected layouts are worked out by hand from the rules in train/placement.py: worker r trains
folds r, r + W, ...; whole GPUs for jobs of >= 1 GPU; a fraction shares one GPU.
"""

from __future__ import annotations

import copy
import logging

import pytest
import yaml

from conftest import TINY_TRAIN
from cspine_ray.train.placement import (UNBOUNDED, Cluster, NodeShape, PlacementError,
                                        fold_layout, jobs_at_once)

LAPTOP = Cluster((NodeShape("laptop", 2, 0, 1),))
WORKSTATION = Cluster((NodeShape("ws", 16, 1, 1),))
# cluster.yaml's shape: a CPU-0 head, GPU nodes of 48 CPUs + 4 GPUs and CPU nodes, from zero
AUTOSCALING = Cluster((NodeShape("head", 0, 0, 1), NodeShape("gpu_worker", 48, 4, 4),
                       NodeShape("cpu_worker", 32, 0, 4)), autoscaling=True)


def test_five_folds_on_a_two_core_laptop_take_two_workers_in_turn():
    layout = fold_layout(5, LAPTOP)
    assert (layout.num_workers, layout.cpus_per_worker, layout.gpus_per_worker) == (2, 1.0, 0.0)
    assert [layout.folds_of(r) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert jobs_at_once(layout, LAPTOP) == 1
    assert "worker 0: folds 0, 2, 4; worker 1: folds 1, 3" in layout.describe()


def test_cpu_folds_all_at_once_where_they_fit():
    layout = fold_layout(5, WORKSTATION)
    assert layout.num_workers == 5 and layout.folds_of(4) == [4]
    assert jobs_at_once(layout, WORKSTATION) == 3  # 16 CPUs // 5 workers
    assert fold_layout(5, WORKSTATION, cpus_per_worker=4).num_workers == 4  # 16 // 4


def test_five_folds_on_four_gpus_use_whole_gpus():
    layout = fold_layout(5, AUTOSCALING, cpus_per_worker=8, gpus=4)
    assert (layout.num_workers, layout.gpus_per_worker) == (4, 1.0)
    assert [layout.folds_of(r) for r in range(4)] == [[0, 4], [1], [2], [3]]
    # 4 GPU nodes x 4 GPUs, each trial 4 whole GPUs: 4 trials at once once all nodes are up
    assert jobs_at_once(layout, AUTOSCALING) == 4
    # more GPUs than folds: one GPU per fold, the rest would idle
    assert fold_layout(5, AUTOSCALING, gpus=8).num_workers == 5


def test_a_gpu_share_trains_every_fold_on_one_worker():
    layout = fold_layout(5, WORKSTATION, gpus=0.5)
    assert (layout.num_workers, layout.gpus_per_worker) == (1, 0.5)
    assert layout.folds_of(0) == [0, 1, 2, 3, 4]
    assert jobs_at_once(layout, WORKSTATION) == 2  # two halves of the one GPU
    assert jobs_at_once(fold_layout(5, WORKSTATION, gpus=0.3), WORKSTATION) == 3


def test_the_autoscaler_global_cap_limits_trials_at_once():
    capped = Cluster(AUTOSCALING.shapes, max_gpus=8, autoscaling=True)
    assert jobs_at_once(fold_layout(5, capped, gpus=4), capped) == 2
    unbounded = Cluster((NodeShape("gpu", 8, 2, UNBOUNDED),), autoscaling=True)
    assert jobs_at_once(fold_layout(5, unbounded, gpus=2), unbounded) == UNBOUNDED


def test_forced_worker_counts_are_kept_or_refused():
    assert fold_layout(5, LAPTOP, num_workers=0).num_workers == 0
    assert fold_layout(5, LAPTOP, num_workers=1).folds_of(0) == [0, 1, 2, 3, 4]
    with pytest.raises(PlacementError, match="3 workers of {CPU: 1, GPU: 0}.*at most 2"):
        fold_layout(5, LAPTOP, num_workers=3)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(gpus=1), r"asks {CPU: 1, GPU: 1}.*1 x laptop {CPU: 2, GPU: 0}"),
    (dict(gpus=0.5), r"asks {CPU: 1, GPU: 0.5}"),
    (dict(cpus_per_worker=4), r"asks {CPU: 4, GPU: 0}.*no node of the cluster can ever hold"),
])
def test_requests_that_can_never_be_placed_name_what_was_asked_and_what_exists(kwargs, needle):
    with pytest.raises(PlacementError, match=needle):
        fold_layout(5, LAPTOP, **kwargs)


def test_a_gpu_node_too_small_in_cpus_is_refused():
    small = Cluster((NodeShape("g", 4, 4, 2),), autoscaling=True)
    with pytest.raises(PlacementError, match="an autoscaling cluster of up to 2 x g"):
        fold_layout(5, small, cpus_per_worker=8, gpus=4)


# --- the user's paths through the CLI, on the shared local Ray (2 CPUs) ----------------------

def _space(path, family="cnn3d", epochs=1):
    base = copy.deepcopy(TINY_TRAIN)
    base.pop("resources")  # the default layout: nothing forced
    base["family"] = family
    base["optim"]["epochs"] = epochs
    path.write_text(yaml.safe_dump({"description": "user path", "base": base,
                                    "params": {"seed": {"type": "int", "low": 1, "high": 9}},
                                    "budget": {"trials": 1, "asha": None}}))
    return path


@pytest.mark.slow
def test_tune_on_own_data_with_the_default_five_folds(tiny_dataset, tmp_path, ray_local, caplog):
    from cspine_ray.cli import main
    from cspine_ray.train.result import load_result

    caplog.set_level(logging.INFO, logger="cspine_ray")
    storage = tmp_path / "runs"
    rc = main(["tune", "--data", str(tiny_dataset), "--space", str(_space(tmp_path / "s.yaml")),
               "--storage", str(storage)])
    assert rc == 0
    assert "5 folds on 2 worker(s) of {CPU: 1, GPU: 0} (worker 0: folds 0, 2, 4; " \
           "worker 1: folds 1, 3)" in caplog.text
    results = list((storage / "results").glob("cnn3d-*"))
    assert len(results) == 1
    result = load_result(results[0])
    assert result.n_folds == 5
    oof = result.oof()
    assert sorted(oof["fold"].unique()) == [0, 1, 2, 3, 4]
    assert oof["study_uid"].is_unique and len(oof) == 16  # every train study, out of fold


@pytest.mark.slow
def test_an_impossible_request_fails_at_once_with_its_reason(tiny_shards, tmp_path, ray_local,
                                                             capsys):
    from cspine_ray.cli import main

    rc = main(["tune", "--shards", str(tiny_shards), "--space", str(_space(tmp_path / "s.yaml")),
               "--storage", str(tmp_path / "runs"), "--gpus-per-trial", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "a fold worker asks {CPU: 1, GPU: 1}" in err and "GPU: 0}" in err, err
    assert not (tmp_path / "runs" / "tune").exists()  # refused before any trial was started


def test_cluster_yaml_gives_four_trials_of_four_whole_gpus():
    # read as the driver on the head reads ray up's bootstrap config: node types, max counts,
    # the global max_workers cap (8 = 4 GPU + 4 CPU nodes), the CPU-0 head
    from pathlib import Path

    from cspine_ray.train.placement import cluster_from_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    cluster = cluster_from_config(config)
    layout = fold_layout(5, cluster, gpus=4)
    assert (layout.num_workers, layout.gpus_per_worker) == (4, 1.0)
    assert jobs_at_once(layout, cluster) == 4
    # the global cap counts nodes: with max_workers 2, at most 2 GPU nodes, 2 trials
    config["max_workers"] = 2
    assert jobs_at_once(layout, cluster_from_config(config)) == 2
    assert "at most 2 worker nodes" in cluster_from_config(config).describe()


def test_prediction_replicas_follow_the_gpus_the_cluster_can_reach():
    from cspine_ray.predict.cli import replica_plan

    assert replica_plan(AUTOSCALING, n_studies=100, batch_size=4) == (16, 1.0)
    assert replica_plan(AUTOSCALING, n_studies=6, batch_size=4) == (2, 1.0)  # 2 batches
    assert replica_plan(LAPTOP, n_studies=100, batch_size=4) == (1, 0.0)
    with pytest.raises(PlacementError, match="GPU: 1"):
        replica_plan(LAPTOP, 10, 4, gpus_per_replica=1.0)


def test_a_job_is_fitted_to_the_cluster_it_is_given(monkeypatch):
    # a Tune trial may run on a worker node that cannot see the autoscaler: it is handed the
    # driver's view of the cluster and must not look at the live one
    import cspine_ray.train.job as job
    from cspine_ray.train.config import build_config

    def live():
        raise AssertionError("looked at the live cluster")

    monkeypatch.setattr(job, "current_cluster", live)
    cfg = build_config({"resources": {"gpus": 4}}, {})
    layout = job.job_layout(cfg, 5, AUTOSCALING)
    assert (layout.num_workers, layout.gpus_per_worker) == (4, 1.0)
    with pytest.raises(AssertionError, match="live cluster"):
        job.job_layout(cfg, 5)
