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
                         artifact_root=str(tmp_path / "artifacts"), search_params={"trials": 2}, space_base={"family": "two_stage"},
                         command="cspine-ray tune --space space.yaml")


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


def test_one_rule_picks_the_store_of_every_command(tmp_path, monkeypatch):
    from cspine_ray.runtime import record_search, resolve_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking(None) == resolve_tracking(None, None)
    assert (resolve_tracking(None).uri, resolve_tracking(None).experiment) == (default, None)
    # tune with --storage X tracks to X/mlflow.db and records it for the folder it ran from
    shared = tmp_path / "shared"
    assert resolve_tracking(None, shared).uri == f"sqlite:///{shared}/mlflow.db"
    record_search(f"sqlite:///{shared}/mlflow.db", "cspine-laptop")
    later = resolve_tracking(None)  # promote, predict, serve: no flags
    assert (later.uri, later.experiment) == (f"sqlite:///{shared}/mlflow.db", "cspine-laptop")
    assert "last search" in later.source
    # the environment's URI, then the flag, come first; the last search's experiment only
    # goes with its own store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    env = resolve_tracking(None)
    assert (env.uri, env.source, env.experiment) == ("http://mlflow.example:5000",
                                                     "MLFLOW_TRACKING_URI", None)
    assert resolve_tracking(None, shared).uri == "http://mlflow.example:5000"
    flag = resolve_tracking("sqlite:///elsewhere.db", shared)
    assert (flag.uri, flag.source) == ("sqlite:///elsewhere.db", "--tracking-uri")
    # another folder has its own last search (none: the default there)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking(None).uri == f"sqlite:///{other}/runs/mlflow.db"


def test_predict_and_serve_resolve_registry_uris_by_the_same_rule(tmp_path, monkeypatch):
    from cspine_ray.predict.cli import registry_uri
    from cspine_ray.runtime import record_search

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record_search("sqlite:///searched.db", "cspine-demo")
    assert registry_uri("models:/cspine-fracture@champion", None) == "sqlite:///searched.db"
    assert registry_uri("runs:/abc/model", None) == "sqlite:///searched.db"
    assert registry_uri("models:/m/1", "sqlite:///given.db") == "sqlite:///given.db"
    assert registry_uri(str(tmp_path / "model"), None) is None  # a local bundle needs no store


def test_a_commands_mlflow_store_does_not_outlive_it(tmp_path, monkeypatch):
    import os

    import mlflow

    from cspine_ray.runtime import mlflow_store, resolve_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = sqlite_uri(tmp_path / "a.db")
    with mlflow_store(uri):
        assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert resolve_tracking(None).source == "the default"  # not the store of the block before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    with mlflow_store(uri):
        assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert mlflow.get_tracking_uri() == "http://mlflow.example:5000"


def test_the_leaderboard_of_a_search_over_families_shows_only_what_was_searched(tmp_path):
    from cspine_ray.tune.results import FIXED, leaderboard

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("cspine-mixed")
    # three finished trials of two families: only top_n and sequence.head differ where present
    trials = [("two_stage", {"backbone": "b", "top_n": "7", "sequence.head": "lstm", "calibrate": "False"}, 0.61),
              ("cnn3d", {"model.hidden": "32", "top_n": "5", "calibrate": "True"}, 0.58),
              ("two_stage", {"backbone": "b", "top_n": "7", "sequence.head": "gru", "calibrate": "False"}, 0.60)]
    for i, (family, params, cv) in enumerate(trials):
        run = client.create_run(exp, run_name=f"trial {i}", tags={"kind": "trial", "family": family})
        for k, v in {"family": family, **params}.items():
            client.log_param(run.info.run_id, k, v)
        client.log_metric(run.info.run_id, "cv_metric", cv)
        client.set_terminated(run.info.run_id, "FINISHED")
    running = client.create_run(exp, run_name="trial 3", tags={"kind": "trial", "family": "cnn3d"})
    client.log_metric(running.info.run_id, "cv_metric", 0.5)  # an epoch so far, not judged
    table = leaderboard(uri, "cspine-mixed")
    assert list(table.columns) == [*FIXED, "sequence.head", "top_n"]
    assert list(table["trial"]) == ["trial 1", "trial 2", "trial 0", "trial 3"]  # finished, best first
    assert list(table["state"]) == ["FINISHED"] * 3 + ["RUNNING"]
    assert list(table["sequence.head"]) == ["", "gru", "lstm", ""]
    assert list(table["calibrated"]) == ["True", "False", "False", ""]
