"""MlflowTracker's run statuses over a search's life: started, stopped by hand, resumed, done.

Real Tune Trial objects and a real sqlite MLflow store; the tracker's hooks are called in the
order Tune calls them (setup, on_trial_start, on_experiment_end).
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from cspine_ray.runtime import sqlite_uri
from cspine_ray.tune.tracking import MlflowTracker


def _tracker(tmp_path) -> MlflowTracker:
    space = tmp_path / "space.yaml"
    space.write_text("description: t\n")
    return MlflowTracker(tracking_uri=sqlite_uri(tmp_path / "mlflow.db"), experiment="e",
                         search_id="s-1", space_file=str(space), shards=None,
                         artifact_root=str(tmp_path / "artifacts"), search_params={"trials": 2}, space_base={"family": "two_stage"})


def _trial(trial_id: str, status: str) -> Trial:
    trial = Trial("run_trial", config={"family": "two_stage", "top_n": 3}, trial_id=trial_id,
                  stub=True)
    trial.set_status(status)
    return trial


def _runs(tmp_path) -> dict[str, object]:
    client = MlflowClient(sqlite_uri(tmp_path / "mlflow.db"))
    exp = client.get_experiment_by_name("e")
    runs = client.search_runs([exp.experiment_id])
    return {r.data.tags.get("ray_trial_id", "parent"): r for r in runs}


def test_a_search_stopped_by_hand_leaves_no_run_running_and_resume_reopens_it(tmp_path):
    tracker = _tracker(tmp_path)
    tracker.setup()
    started, pending = _trial("t1", Trial.RUNNING), _trial("t2", Trial.PENDING)
    tracker.on_trial_start(0, [started, pending], started)
    assert _runs(tmp_path)["t1"].info.status == "RUNNING"

    tracker.on_experiment_end([started, pending])   # what Tune calls after Ctrl-C
    runs = _runs(tmp_path)
    assert runs["t1"].info.status == "KILLED" and runs["t1"].data.tags["interrupted"] == "true"
    assert "t2" not in runs                           # never started: no run made for it
    assert runs["parent"].info.status == "KILLED"
    assert runs["parent"].data.tags["trials_interrupted"] == "2"

    # --resume: a new driver, the same search id; the same runs come back, running again
    resumed = _tracker(tmp_path)
    resumed.setup()
    resumed.on_trial_start(0, [started], started)
    runs = _runs(tmp_path)
    assert set(runs) == {"parent", "t1"}
    assert runs["parent"].info.status == "RUNNING" and runs["t1"].info.status == "RUNNING"
    started.set_status(Trial.TERMINATED)
    resumed.on_experiment_end([started])
    runs = _runs(tmp_path)
    assert runs["t1"].info.status == "RUNNING"        # not touched: its own hook ends it
    assert runs["parent"].info.status == "FAILED"     # no trial reached a final result
    assert runs["parent"].data.tags["trials_interrupted"] == "0"


def test_experiments_open_as_model_training_in_the_mlflow_ui(tmp_path):
    from cspine_ray.tune.tracking import get_or_create_experiment

    client = MlflowClient(sqlite_uri(tmp_path / "mlflow.db"))
    new = get_or_create_experiment(client, "cspine-new", tmp_path / "art")
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    # one made before the kind existed gets it; one a user marked otherwise keeps theirs
    old = client.create_experiment("cspine-old")
    assert get_or_create_experiment(client, "cspine-old", None) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    mine = client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    get_or_create_experiment(client, "mine", None)
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"
