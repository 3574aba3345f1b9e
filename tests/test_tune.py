"""The product's front door on tiny settings: tune -> MLflow -> promote -> predict -> score."""

from __future__ import annotations

import contextlib
import io
import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from conftest import TINY_TRAIN
from cspine_ray import TARGETS
from cspine_ray.cli import main
from cspine_ray.metric import read_submission
from cspine_ray.promote import promote
from cspine_ray.runtime import sqlite_uri

pytestmark = pytest.mark.slow

EXPERIMENT = "cspine-tiny"


def write_space(path: Path, trials: int, params: dict) -> Path:
    """A space that `extends` a base file beside it, as a user's own space extends a shipped one."""
    base = copy.deepcopy(TINY_TRAIN)
    base["family"] = "two_stage"
    (path.parent / "tiny_base.yaml").write_text(yaml.safe_dump({"description": "b", "base": base}))
    # these tests check the search's bookkeeping, not stage 1
    path.write_text(yaml.safe_dump({"description": "test search", "extends": "tiny_base.yaml",
                                    "base": {"stage1": {"epochs": 2}}, "params": params,
                                    "budget": {"trials": trials, "asha": None}}))
    return path


def resolved_base() -> dict:
    """What write_space's base must resolve to, written out by hand."""
    base = copy.deepcopy(TINY_TRAIN)
    base["family"] = "two_stage"
    base["stage1"]["epochs"] = 2
    return base


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_shards, ray_local):
    """One 4-trial search: two sequence heads x the patient rule (N or the calibrator), so some
    trials differ only in the rule."""
    root = tmp_path_factory.mktemp("tune")
    space = write_space(root / "tiny.yaml", 4, {
        "sequence.head": {"type": "categorical", "choices": ["lstm", "gru"]},
        "top_n": {"type": "int", "low": 1, "high": 7},
        "calibrate": {"type": "categorical", "choices": [False, True]}})
    storage = root / "runs"
    here = root / "here"  # the folder the user runs from: not the storage's parent
    here.mkdir()
    cwd = Path.cwd()
    os.chdir(here)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rc = main(["tune", "--space", str(space), "--shards", str(tiny_shards), "--storage",
                       str(storage), "--experiment", EXPERIMENT, "--seed", "3"])
    finally:
        os.chdir(cwd)
    print(printed.getvalue())
    (root / "tune.out").write_text(printed.getvalue())  # what the user read
    assert rc == 0
    return storage, sqlite_uri(storage / "mlflow.db")


def _runs(uri: str, kind: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.kind = '{kind}'")


def test_every_trial_is_tracked_in_mlflow(search, tiny_dataset):
    storage, uri = search
    client, trials = _runs(uri, "trial")
    _, parents = _runs(uri, "search")
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.data.tags["best_run_id"] in {t.info.run_id for t in trials}
    assert "best_cv_metric" in parent.data.metrics
    # the runs table shows the search's source (the command as typed) and its dataset
    assert parent.data.tags["mlflow.source.name"].endswith("--experiment cspine-tiny --seed 3")
    assert " tune --space " in f" {parent.data.tags['mlflow.source.name']}"
    (dataset,) = [d.dataset for d in client.get_run(parent.info.run_id).inputs.dataset_inputs]
    assert dataset.digest == trials[0].data.tags["manifest_hash"]
    # the space file only names what it extends; the parent run also holds the resolved base
    local = Path(client.download_artifacts(parent.info.run_id, "space_base.yaml"))
    assert yaml.safe_load(local.read_text()) == resolved_base()
    for trial in trials:  # and every trial trained with it (2 stage-1 epochs from the child)
        assert trial.data.params["stage1.epochs"] == "2"
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["family"] == "two_stage"
        for key in ("manifest_hash", "code_version", "result_dir", "training_key"):
            assert run.data.tags.get(key), key
        params = run.data.params
        assert params["family"] == "two_stage" and params["sequence.head"] in ("lstm", "gru")
        assert params["top_n"] in {str(n) for n in range(1, 8)}
        assert params["calibrate"] in ("True", "False")
        for key in ("cv_metric", "oof_metric", "oof_auc_mean", "fold_0_metric", "fold_1_metric"):
            assert key in run.data.metrics, key
        # the shard set is the run's MLflow dataset input, named and hashed like the manifest
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert dataset.digest == run.data.tags["manifest_hash"]
        assert dataset.name.startswith("shards:") and "study_uid" not in dataset.schema
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"roc.png", "calibration.png", "oof_predictions.csv", "config.yaml",
                "history.json", "sagittal"} <= artifacts
        assert len(client.list_artifacts(run.info.run_id, "sagittal")) >= 2
    trained = [t for t in trials if t.data.tags["reused"] == "False"]
    history = client.get_metric_history(trained[0].info.run_id, "cv_metric")
    assert len(history) >= 2                                   # per-epoch, then the final figure

    # nothing identifying a patient reaches MLflow
    ds = pydicom.dcmread(next((tiny_dataset / "train_images").rglob("*.dcm")), stop_before_pixels=True)
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.StudyDate), "SYNTH"]
    for run in [parent, *trials]:
        text = " ".join(map(str, [*run.data.params.items(), *run.data.tags.items()]))
        local = Path(client.download_artifacts(run.info.run_id, ""))
        text += " ".join(p.read_text(errors="ignore") for p in local.rglob("*")
                         if p.suffix in (".csv", ".yaml", ".json", ".txt"))
        assert not [s for s in secrets if s in text]


def test_trials_differing_only_in_n_reuse_the_training(search):
    storage, uri = search
    client, trials = _runs(uri, "trial")
    by_key = {}
    for t in trials:
        by_key.setdefault(t.data.tags["training_key"], []).append(t)
    assert len(by_key) < len(trials)                           # 2 heads, 4 trials
    for group in by_key.values():
        trained = [t for t in group if t.data.tags["reused"] == "False"]
        reused = [t for t in group if t.data.tags["reused"] == "True"]
        assert len(trained) == 1 and len(reused) == len(group) - 1
        for r in reused:
            assert r.data.tags["result_dir"] == trained[0].data.tags["result_dir"]
            # no epoch was trained for it: its only cv_metric is the final, re-scored one
            assert len(client.get_metric_history(r.info.run_id, "cv_metric")) == 1
    assert len(list((storage / "results").iterdir())) == len(by_key)
    # one Ray Train run per training key and one for the shared stage 1, none for N alone
    runs = [p.name.split("-")[0] for p in (storage / "ray").iterdir() if p.is_dir()]
    assert sorted(runs) == ["locator"] + ["two_stage"] * len(by_key)


def test_promote_then_predict_with_a_broken_study_then_score(search, tiny_dataset, tiny_specs, tmp_path):
    storage, uri = search
    first = promote(uri, experiment=EXPERIMENT)
    assert first.promoted and first.champion_version == first.version

    _, trials = _runs(uri, "trial")
    worst = max(trials, key=lambda t: t.data.metrics["cv_metric"])
    refused = promote(uri, run_id=worst.info.run_id)
    assert not refused.promoted and "does not beat" in refused.reason
    assert refused.champion_version == first.version

    inputs = tmp_path / "new_studies"
    shutil.copytree(tiny_dataset / "test_images", inputs)
    broken = inputs / "1.2.3.4.5.6"
    broken.mkdir()
    (broken / "1.dcm").write_text("this is not DICOM\n")
    out = tmp_path / "submission.csv"
    rc = main(["predict", "--input", str(inputs), "--out", str(out), "--tracking-uri", uri,
               "--report-dir", str(tmp_path / "reports")])
    assert rc == 0
    studies = sorted(p.name for p in inputs.iterdir())
    sub = read_submission(out, studies)
    wide = pd.read_csv(tmp_path / "submission.studies.csv", dtype={"study_uid": str}).set_index("study_uid")
    assert wide.loc["1.2.3.4.5.6", "status"] == "failed" and "DICOM" in wide.loc["1.2.3.4.5.6", "reason"]
    from cspine_ray.train.result import load_result

    prior = load_result(trials[0].data.tags["result_dir"]).info.prior
    assert sub.loc["1.2.3.4.5.6"].tolist() == pytest.approx(prior)
    assert {p.stem for p in (tmp_path / "reports").glob("*.png")} == set(studies) - {"1.2.3.4.5.6"}

    labels = pd.DataFrame([{"StudyInstanceUID": s.uid, **s.targets} for s in tiny_specs if s.split == "test"]
                          + [{"StudyInstanceUID": "1.2.3.4.5.6", **{t: 0 for t in TARGETS}}])
    labels[["StudyInstanceUID", "patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]].to_csv(
        tmp_path / "labels.csv", index=False)
    assert main(["score", str(out), str(tmp_path / "labels.csv")]) == 0

    # a forced promotion moves the alias
    forced = promote(uri, run_id=worst.info.run_id, force=True)
    assert forced.promoted and forced.champion_version == forced.version

    # the registered model also loads from a plain local folder; one study folder is an input
    import mlflow

    from cspine_ray.predict.cli import local_model

    local = local_model("models:/cspine-fracture@champion", uri, tmp_path)
    good = next(s for s in studies if s != "1.2.3.4.5.6")
    one = inputs / good
    assert main(["predict", "--model", local, "--input", str(one), "--out", str(tmp_path / "one.csv")]) == 0
    here = read_submission(tmp_path / "one.csv", [good])
    assert here.shape == (1, len(TARGETS))

    # the registered version says what it is, and runs where this checkout cannot be imported
    from mlflow.tracking import MlflowClient

    version = MlflowClient(uri).get_model_version_by_alias("cspine-fracture", "champion")
    assert "not a medical device" in version.description
    assert "the constant prior" in version.description and "last epoch" in version.description
    assert f"manifest hash {trials[0].data.tags['manifest_hash']}" in version.description
    model = mlflow.models.Model.load(local)
    assert [c["name"] for c in model.signature.inputs.to_dict()] == ["archive", "study_dir", "study_uid"]
    assert model.saved_input_example_info is not None
    # the logged model carries the trial's CV figures and the shard set it was trained on
    logged = MlflowClient(uri).get_logged_model(model.model_id)
    by_key = {m.key: m for m in logged.metrics}
    trial = MlflowClient(uri).get_run(worst.info.run_id)
    assert by_key["cv_metric"].value == pytest.approx(trial.data.metrics["cv_metric"])
    assert by_key["cv_metric"].dataset_digest == trials[0].data.tags["manifest_hash"]
    checkout = str(Path(__file__).resolve().parents[1])
    script = f"""
import importlib.util, json, sys
# no editable-install finder, no checkout on the path: only the model's own copy of the code
sys.meta_path[:] = [f for f in sys.meta_path if "cspine_ray" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", ".") and "cspine_ray" not in p
               and not p.startswith({checkout!r})]
assert importlib.util.find_spec("cspine_ray") is None, "the checkout is still importable"
import mlflow.pyfunc, pandas as pd
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/cspine-fracture@champion")
import cspine_ray
assert not cspine_ray.__file__.startswith({checkout!r}), cspine_ray.__file__
out = model.predict(pd.DataFrame({{"study_dir": [{str(one)!r}]}}))
print(json.dumps(out.iloc[0].to_dict()))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CSPINE_ALLOWED_ROOTS"] = str(inputs)  # the serving environment's readable folders
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "ok"
    assert [row[t] for t in TARGETS] == pytest.approx(here.loc[good].tolist(), abs=1e-6)


def test_mlflow_models_serve_answers_an_archive_and_refuses_a_folder_outside_the_roots(
        search, tiny_dataset, tmp_path):
    """MLflow's own server for the registered champion, as the README shows it: a study sent as
    an archive is predicted; a folder outside CSPINE_ALLOWED_ROOTS is refused in its row, one
    inside is read."""
    import base64
    import socket

    import requests

    storage, uri = search
    promote(uri, experiment=EXPERIMENT)  # a champion, whichever test ran first
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    allowed = tmp_path / "allowed"
    studies = sorted((tiny_dataset / "test_images").iterdir())
    shutil.copytree(studies[1], allowed / studies[1].name)
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, CSPINE_ALLOWED_ROOTS=str(allowed))
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/cspine-fracture@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert server.poll() is None, server.stderr.read()[-3000:]
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(studies[0].iterdir()):
                z.write(f, f.name)
        rows = {}
        for columns, data in (
                (["archive", "study_uid"], [[base64.b64encode(archive.getvalue()).decode(), "sent"]]),
                (["study_dir", "study_uid"], [[str(studies[0]), "outside"],
                                              [str(allowed / studies[1].name), "inside"]])):
            reply = requests.post(f"{url}/invocations", timeout=300,
                                  json={"dataframe_split": {"columns": columns, "data": data}})
            assert reply.status_code == 200, reply.text[-2000:]
            rows.update({r["study_uid"]: r for r in reply.json()["predictions"]})
        assert rows["sent"]["status"] == "ok" and rows["inside"]["status"] == "ok"
        assert rows["outside"]["status"] == "failed"
        assert "CSPINE_ALLOWED_ROOTS" in rows["outside"]["reason"]
        assert all(0 <= rows["sent"][t] <= 1 for t in TARGETS)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_mlflow_ui_shows_the_search_as_training_runs_with_their_dataset_and_source(
        search, tmp_path):
    """`mlflow ui` as tune prints it, the page tune prints, in a real headless browser: the
    training runs (the parent run with its dataset and its command), not the GenAI overview."""
    import re
    import socket

    import requests

    storage, uri = search
    printed = (storage.parent / "tune.out").read_text()
    command = re.search(r"open the UI:  (mlflow ui .*)", printed).group(1).split()
    page = re.search(r"its runs: +(\S+)", printed).group(1)
    assert page.startswith("http://127.0.0.1:5000/#/experiments/") and page.endswith("/runs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = page.replace(":5000/", f":{port}/")  # the default port may be taken here
    ui = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-dev-shm-usage", "--virtual-time-budget=30000",
                   "--window-size=1400,900"]
        shot = tmp_path / "runs.png"
        subprocess.run([*browser, f"--screenshot={shot}", page], timeout=180, capture_output=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"      # the picture, for a person
        dom = subprocess.run([*browser, "--dump-dom", page], timeout=180, capture_output=True,
                             text=True).stdout
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(
            r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S)))
        (parent,) = _runs(uri, "search")[1]
        assert "Training runs" in text and parent.info.run_name in text, text[:2000]
        assert "shards:shards" in text                       # the dataset: the shard set
        assert f"--experiment {EXPERIMENT}" in text          # the source: the command as typed
        assert "Detect Issues" not in text and "Token Usage" not in text
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def test_resume_after_killing_the_driver(tiny_shards, tmp_path, ray_local):
    space = write_space(tmp_path / "resume.yaml", 3, {
        "top_n": {"type": "categorical", "choices": [1, 7]},
        "sequence.head": {"type": "categorical", "choices": ["lstm", "gru", "transformer"]}})
    storage = tmp_path / "runs"
    args = ["--space", str(space), "--shards", str(tiny_shards), "--storage", str(storage),
            "--experiment", "cspine-resume", "--seed", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "cspine_ray.tune", *args, "--address",
                             ray_local.get_runtime_context().gcs_address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from mlflow.tracking import MlflowClient

    def finished_trials() -> int:  # the driver has handled a trial's end (its run is closed)
        try:
            client = MlflowClient(sqlite_uri(storage / "mlflow.db"))
            exp = client.get_experiment_by_name("cspine-resume")
            return len(client.search_runs([exp.experiment_id], filter_string=
                                          "tags.kind = 'trial' and attributes.status = 'FINISHED'"))
        except Exception:  # the store is not created yet
            return 0

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not finished_trials():
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(storage.glob("results/*/result.json")), "the driver should have finished a trial"
    # the leaderboard of the stopped search: its finished trial first, the others as MLflow has them
    import io

    board = io.StringIO()
    with contextlib.redirect_stdout(board):
        assert main(["results", "--tracking-uri", sqlite_uri(storage / "mlflow.db"),
                     "--experiment", "cspine-resume", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(board.getvalue()))
    assert table["state"].iloc[0] == "FINISHED" and table["cv_metric"].iloc[0] > 0
    assert set(table["state"]) <= {"FINISHED", "RUNNING"}  # killed: nothing marked them

    assert main(["tune", *args, "--resume"]) == 0
    client = MlflowClient(sqlite_uri(storage / "mlflow.db"))
    exp = client.get_experiment_by_name("cspine-resume")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert len(trials) == 3                                     # no duplicated runs
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert len({t.data.tags["ray_trial_id"] for t in trials}) == 3


def test_a_calibrated_trial_is_scored_cross_fitted_and_promoted_with_its_calibrator(search, tmp_path):
    import json

    import mlflow

    from cspine_ray.models.calibrator import Calibrator
    from cspine_ray.predict.cli import local_model
    from cspine_ray.train.result import evaluate_result, fit_result_calibrator, load_result

    storage, uri = search
    _, trials = _runs(uri, "trial")
    calibrated = [t for t in trials if t.data.params["calibrate"] == "True"]
    plain = [t for t in trials if t.data.params["calibrate"] == "False"]
    assert calibrated and plain  # the seeded search samples both rules
    run = calibrated[0]
    result = load_result(run.data.tags["result_dir"])
    shards = result.info.shards_dir
    # the trial's figures are the cross-fitted calibrator's, not the top-N rule's
    figures = evaluate_result(result, shards, int(run.data.params["top_n"]), calibrate=True)
    assert run.data.metrics["oof_metric"] == pytest.approx(figures["oof_metric"])
    promoted = promote(uri, run_id=run.info.run_id, force=True)
    local = Path(local_model(f"models:/cspine-fracture/{promoted.version}", uri, tmp_path))
    info = json.loads(next(local.rglob("model.json")).read_text())
    assert info["calibrate"] is True
    assert Calibrator.from_dict(info["calibrator"]) == fit_result_calibrator(result, shards)
    model = mlflow.pyfunc.load_model(str(local))
    assert model.unwrap_python_model().ensemble.calibrator == fit_result_calibrator(result, shards)


def test_a_search_in_which_no_trial_finishes_exits_non_zero(tiny_shards, tmp_path, capsys):
    # the shards' volumes damaged after preprocessing (a disk fault): every trial fails reading
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    for volume in shards.glob("studies/*/volume.npy"):
        volume.write_bytes(volume.read_bytes()[:200])
    space = write_space(tmp_path / "broken.yaml", 1, {"top_n": {"type": "int", "low": 1, "high": 7}})
    rc = main(["tune", "--space", str(space), "--shards", str(shards), "--storage",
               str(tmp_path / "runs"), "--experiment", "cspine-broken"])
    assert rc == 1
    assert "no trial of search" in capsys.readouterr().err


def test_promote_with_no_flags_finds_the_search_run_from_the_same_folder(search, monkeypatch):
    from mlflow.tracking import MlflowClient

    storage, uri = search
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(storage.parent / "here")
    assert main(["promote", "--name", "cspine-from-folder"]) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the store it used does not outlive it
    versions = MlflowClient(uri).search_model_versions("name = 'cspine-from-folder'")
    assert len(versions) == 1
    (parent,) = _runs(uri, "search")[1]  # the search's run links to the registered model
    assert parent.data.tags["registered_model"] == "models:/cspine-from-folder/1"
    best = _runs(uri, "trial")[1]
    finished = [r for r in best if "cv_metric" in r.data.metrics]
    assert versions[0].run_id == min(finished, key=lambda r: r.data.metrics["cv_metric"]).info.run_id


def test_results_prints_the_leaderboard_of_a_search(search, monkeypatch, capsys):
    import io
    import math

    storage, uri = search
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(storage.parent / "here")  # no flags: the search started from this folder
    capsys.readouterr()
    assert main(["results", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    _, trials = _runs(uri, "trial")
    assert len(table) == len(trials) == 4
    by_name = {t.info.run_name: t for t in trials}
    finished = table[table["state"] == "FINISHED"]
    # each row's figures are its run's, finished trials best first
    for row in table.itertuples():
        run = by_name[row.trial]
        assert row.state.startswith(run.info.status)
        assert row.family == "two_stage"
        if "cv_metric" in run.data.metrics:
            assert row.cv_metric == pytest.approx(run.data.metrics["cv_metric"])
            assert row.last_epoch_cv == pytest.approx(run.data.metrics["last_epoch_cv_metric"])
            assert row.minutes == pytest.approx(run.data.metrics["trial_seconds"] / 60)
    assert list(finished["cv_metric"]) == sorted(finished["cv_metric"])
    assert list(table.index[table["state"] == "FINISHED"]) == list(range(len(finished)))
    # the searched values are the columns that differ between trials: the space's three, the
    # patient rule in its own column
    assert {"top_n", "sequence.head"} <= set(table.columns) and "calibrate" not in table.columns
    assert {str(v) for v in table["calibrated"]} == {"True", "False"}
    assert not {"backbone", "optim.lr"} & set(table.columns)  # the same in every trial
    assert set(table["reused"]) <= {"reused", "trained"} and "trained" in set(table["reused"])
    assert all(not math.isnan(m) for m in table["minutes"])
    assert main(["results", "--experiment", EXPERIMENT, "--tracking-uri", uri]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| trial ")]
    assert lines[0].startswith("| trial | state | family | cv_metric |") and len(lines) == 1 + 4
    assert main(["results", "--experiment", "nosuch", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nosuch'" in capsys.readouterr().err
