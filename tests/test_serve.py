"""The champion served over HTTP: real requests to a Ray Serve endpoint on the local Ray."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_TRAIN
from cspine_ray import TARGETS, VERTEBRAE
from cspine_ray.serve.archive import ArchiveError, Limits, extract_study

LIMITS = Limits(max_request_bytes=8 << 20, max_expanded_bytes=16 << 20, max_files=500)


# --- archives, without Ray ---------------------------------------------------------------------
def zip_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # a symlink, as `zip --symlinks` stores it
            z.writestr(info, target)
    return buffer.getvalue()


def tar_of(files: dict[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            t.addfile(info)
    return buffer.getvalue()


def study_archive(study: Path, kind: str = "zip") -> bytes:
    files = {f"{study.name}/{p.name}": p.read_bytes() for p in sorted(study.iterdir())}
    return zip_of(files) if kind == "zip" else tar_of(files)


def test_archives_unpack_to_numbered_plain_files(tmp_path, tiny_dataset):
    study = next((tiny_dataset / "test_images").iterdir())
    n = len(list(study.iterdir()))
    for kind in ("zip", "tar"):
        out = extract_study(study_archive(study, kind), tmp_path / kind, LIMITS)
        names = sorted(p.name for p in out.iterdir())
        assert names == [f"{i:05d}.dcm" for i in range(n)]  # member names never become paths
        originals = sorted(p.read_bytes() for p in study.iterdir())
        assert sorted(p.read_bytes() for p in out.iterdir()) == originals


@pytest.mark.parametrize("data, reason", [
    (b"this is not an archive", "neither a zip nor a tar"),
    (zip_of({"../evil.dcm": b"x"}), "outside the study"),
    (zip_of({"/etc/evil.dcm": b"x"}), "outside the study"),
    (zip_of({"a\\..\\..\\evil.dcm": b"x"}), "outside the study"),
    (zip_of({"ok.dcm": b"x"}, links={"link.dcm": "/etc/passwd"}), "symbolic link"),
    (tar_of({"ok.dcm": b"x"}, link=("link.dcm", "/etc/passwd")), "is a link"),
    (tar_of({"../../evil.dcm": b"x"}), "outside the study"),
    (zip_of({}), "no files"),
    (zip_of({f"{i}.dcm": b"x" for i in range(501)}), "more than 500 files"),
    (zip_of({"bomb.dcm": bytes(17 << 20)}), "expands to more than 16 MiB"),  # ~17 KB compressed
    (bytes(9 << 20), "larger than 8 MiB"),
])
def test_hostile_archives_are_refused_before_anything_escapes(tmp_path, data, reason):
    with pytest.raises(ArchiveError, match=reason):
        extract_study(data, tmp_path / "study", LIMITS)
    assert not (tmp_path / "evil.dcm").exists() and not (tmp_path.parent / "evil.dcm").exists()


def test_refusals_never_quote_a_member_name(tmp_path):
    name = "DOE^JOHN_19011231.dcm"  # a file name can hold a patient's name
    for data in (zip_of({f"../{name}": b"x"}), zip_of({"a.dcm": b"x"}, links={name: "/etc"}),
                 tar_of({f"/{name}": b"x"}), zip_of({name: bytes(1000)}).replace(
                     (1000).to_bytes(4, "little"), (10).to_bytes(4, "little"))):
        with pytest.raises(ArchiveError) as refused:
            extract_study(data, tmp_path / "study", LIMITS)
        assert "DOE" not in str(refused.value)
        shutil.rmtree(tmp_path / "study", ignore_errors=True)


def test_a_member_that_lies_about_its_size_is_refused(tmp_path):
    data = bytearray(zip_of({"a.dcm": bytes(1000)}))
    # lie in the central directory and the local header: declare 10 bytes, hold 1000
    data = bytes(data).replace((1000).to_bytes(4, "little"), (10).to_bytes(4, "little"))
    with pytest.raises(ArchiveError, match="cannot be read"):
        extract_study(data, tmp_path / "study", LIMITS)


# --- the endpoint ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_shards, tiny_runs, ray_local) -> Path:
    """A two-stage ensemble saved as the MLflow model promote would register (the tiny
    two-stage result test_train.py trains too: whichever module runs first trains it)."""
    import mlflow.pyfunc

    from cspine_ray.predict.pyfunc import EnsembleModel, make_bundle
    from cspine_ray.train.config import build_config
    from cspine_ray.train.job import train

    root = tmp_path_factory.mktemp("serve")
    cfg = build_config({**TINY_TRAIN, "family": "two_stage"}, {})
    result = train(cfg, tiny_shards, tiny_runs)
    info = {"run_id": "test-run", "family": "two_stage", "cv_metric": result.info.cv_metric,
            "top_n": 7}
    bundle = make_bundle(result.path, result.info.stage1_dir, tiny_shards, root / "bundle", info)
    mlflow.pyfunc.save_model(str(root / "model"), python_model=EnsembleModel(),
                             artifacts={"bundle": str(bundle)})
    return root / "model"


@pytest.fixture(scope="module")
def endpoint(model_folder, ray_local, tmp_path_factory):
    import requests
    from ray import serve

    from cspine_ray.serve.app import ServeOptions
    from cspine_ray.serve.app import deployment
    from cspine_ray.serve.cli import APP

    allowed = tmp_path_factory.mktemp("allowed")
    port = free_port()
    options = ServeOptions(model_path=str(model_folder), model_uri=str(model_folder),
                           version="7", allow_roots=(str(allowed),), limits=LIMITS,
                           max_batch_size=4, batch_wait_s=0.5)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(options, replicas=1, gpus=0.0), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=60).json()["model"]["version"] == "7"
    yield url, allowed
    serve.shutdown()


def post(url: str, data: bytes, **kwargs):
    import requests

    return requests.post(f"{url}/predict", data=data, timeout=120, **kwargs)


@pytest.mark.slow
def test_the_endpoint_answers_like_predict_and_refuses_bad_input(endpoint, model_folder,
                                                                  tiny_dataset, monkeypatch):
    import mlflow.pyfunc

    url, allowed = endpoint
    studies = sorted((tiny_dataset / "test_images").iterdir())
    monkeypatch.setenv("CSPINE_ALLOWED_ROOTS", str(tiny_dataset))  # the pyfunc may read them
    expected = mlflow.pyfunc.load_model(str(model_folder)).predict(
        pd.DataFrame({"study_dir": [str(s) for s in studies]})).set_index("study_uid")

    good = post(url, study_archive(studies[0]), params={"report": "1"})
    assert good.status_code == 200, good.text
    answer = good.json()
    assert answer["status"] == "ok" and answer["model"]["version"] == "7"
    assert [answer["probabilities"][t] for t in TARGETS] == pytest.approx(
        expected.loc[studies[0].name, list(TARGETS)].tolist(), abs=1e-6)
    assert set(answer["found"]) == set(VERTEBRAE)
    assert answer["report_png"].startswith("iVBOR")            # base64 of a PNG

    bad = {
        "not an archive": (b"GIF89a not a study", 400),
        "no DICOM inside": (zip_of({"notes.txt": b"hello"}), 422),
        "a path that escapes": (zip_of({"../../x.dcm": b"x"}), 400),
        "a symlink": (zip_of({"a.dcm": b"x"}, links={"b.dcm": "/etc/passwd"}), 400),
        "a bomb": (zip_of({"bomb.dcm": bytes(17 << 20)}), 400),
        "a body over the limit": (bytes(9 << 20), 413),
        "a broken series": (zip_of({f"{i}.dcm": b"DICM broken" for i in range(20)}), 422),
    }
    for name, (data, status) in bad.items():
        reply = post(url, data)
        assert reply.status_code == status, (name, reply.status_code, reply.text)
        assert reply.json()["error"], name
        # and the replica goes on serving
        assert post(url, study_archive(studies[1], "tar")).status_code == 200, name

    # a folder on shared storage: allowed under --allow-root, refused elsewhere
    inside = allowed / studies[1].name
    inside.mkdir(exist_ok=True)
    for f in studies[1].iterdir():
        (inside / f.name).write_bytes(f.read_bytes())
    by_path = post(url, json.dumps({"path": str(inside)}).encode(),
                   headers={"content-type": "application/json"})
    assert by_path.status_code == 200
    assert [by_path.json()["probabilities"][t] for t in TARGETS] == pytest.approx(
        expected.loc[studies[1].name, list(TARGETS)].tolist(), abs=1e-6)
    outside = post(url, json.dumps({"path": str(studies[1])}).encode(),
                   headers={"content-type": "application/json"})
    assert outside.status_code == 403


@pytest.mark.slow
def test_concurrent_requests_are_batched(endpoint, tiny_dataset):
    url, _ = endpoint
    study = study_archive(sorted((tiny_dataset / "test_images").iterdir())[0])
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(post(url, study))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r.status_code for r in replies] == [200] * 4
    assert max(r.json()["batched_with"] for r in replies) > 1
    first = replies[0].json()["probabilities"]
    assert all(r.json()["probabilities"] == pytest.approx(first, abs=1e-6) for r in replies)


def test_a_spooled_upload_unpacks_as_its_bytes_do(tmp_path, tiny_dataset):
    study = sorted((tiny_dataset / "test_images").iterdir())[0]
    spooled = tmp_path / "upload.bin"
    spooled.write_bytes(study_archive(study, "tar"))
    out = extract_study(spooled, tmp_path / "from-file", LIMITS)
    files = sorted(p.read_bytes() for p in out.iterdir())
    assert files == sorted(p.read_bytes() for p in study.iterdir())
    spooled.write_bytes(zip_of({"../x.dcm": b"x"}))
    with pytest.raises(ArchiveError, match="outside the study"):
        extract_study(spooled, tmp_path / "refused", LIMITS)
    spooled.write_bytes(bytes(9 << 20))
    with pytest.raises(ArchiveError, match="larger than 8 MiB"):
        extract_study(spooled, tmp_path / "too-large", LIMITS)


def test_the_pyfunc_reads_archives_by_the_endpoints_rules_and_folders_only_under_allowed_roots(
        tmp_path, tiny_dataset, monkeypatch):
    import base64

    from cspine_ray.predict.pyfunc import InputRefused, study_folder

    study = sorted((tiny_dataset / "test_images").iterdir())[0]
    archive = study_archive(study)
    for given in (archive, base64.b64encode(archive).decode()):  # bytes, or JSON's base64
        out = study_folder({"archive": given}, tmp_path / f"upload-{type(given).__name__}")
        assert sorted(p.read_bytes() for p in out.iterdir()) == sorted(
            p.read_bytes() for p in study.iterdir())
    with pytest.raises(InputRefused, match="outside the study"):
        study_folder({"archive": zip_of({"../x.dcm": b"x"})}, tmp_path / "escape")
    with pytest.raises(InputRefused, match="neither bytes nor base64"):
        study_folder({"archive": "not base64!"}, tmp_path / "garbled")
    monkeypatch.delenv("CSPINE_ALLOWED_ROOTS", raising=False)
    with pytest.raises(InputRefused, match="CSPINE_ALLOWED_ROOTS"):   # unset: no folder at all
        study_folder({"study_dir": str(study)}, tmp_path / "x")
    monkeypatch.setenv("CSPINE_ALLOWED_ROOTS", f"{tmp_path}:{study.parent}")
    assert study_folder({"study_dir": str(study)}, tmp_path / "x") == study
    monkeypatch.setenv("CSPINE_ALLOWED_ROOTS", str(tmp_path))
    with pytest.raises(InputRefused, match="not under a root"):
        study_folder({"study_dir": str(study)}, tmp_path / "x")
    link = tmp_path / "link"                       # a link inside that leads outside: refused
    link.symlink_to(study)
    with pytest.raises(InputRefused, match="not under a root"):
        study_folder({"study_dir": str(link)}, tmp_path / "x")
    with pytest.raises(InputRefused, match="neither an archive nor a study_dir"):
        study_folder({"archive": float("nan"), "study_uid": "x"}, tmp_path / "x")


@pytest.mark.slow
def test_a_replica_proves_it_can_predict_before_serving_and_at_each_health_check(model_folder,
                                                                                 ray_local):
    import asyncio

    import torch

    from cspine_ray.serve.app import FractureService, ServeOptions

    service = FractureService(ServeOptions(model_path=str(model_folder),
                                           model_uri=str(model_folder)))
    asyncio.run(service.check_health())
    with torch.no_grad():  # a replica whose weights went bad: the check must notice
        for p in service.ensemble.models[0].parameters():
            p.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="probe study"):
        asyncio.run(service.check_health())


def shipped_serve_config(model: Path, port: int, **deployment) -> dict:
    """serve.yaml as shipped, pointed at `model` and `port`, with deployment settings changed."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["model"] = str(model)
    app["deployments"][0].update(deployment)
    return config


@pytest.mark.slow
def test_serve_deploy_of_the_shipped_config_answers_and_sheds_what_it_cannot_queue(
        model_folder, tiny_dataset, tmp_path):
    """`serve deploy serve.yaml` (the README's command) onto a running Ray: the application
    predicts; with one request running and one queued, a burst gets 503s at once, and the
    replica goes on serving."""
    import requests
    import yaml

    from fake_cluster import FakeCluster

    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(shipped_serve_config(
        model_folder, port, max_ongoing_requests=1, max_queued_requests=1,
        autoscaling_config={"min_replicas": 1, "max_replicas": 1})))
    cluster = FakeCluster(tmp_path, None, head_cpus=2).start()
    try:
        dashboard = f"http://127.0.0.1:{cluster.dashboard_port}"
        deployed = cluster.run(["serve", "deploy", str(config), "-a", dashboard], timeout=120)
        assert deployed.returncode == 0, deployed.stderr
        url = f"http://127.0.0.1:{port}"
        for _ in range(180):  # the replica loads the model and predicts its probe first
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not up yet, or still deploying
                pass
            time.sleep(1)
        study = study_archive(sorted((tiny_dataset / "test_images").iterdir())[0])
        first = post(url, study)
        assert first.status_code == 200 and first.json()["status"] == "ok", first.text
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(post(url, study)))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        codes = sorted(r.status_code for r in replies)
        assert codes.count(503) >= 4 and set(codes) <= {200, 503}, codes
        assert post(url, study).json()["probabilities"] == first.json()["probabilities"]
        status = cluster.run(["serve", "status", "-a", dashboard])
        assert "RUNNING" in status.stdout and "HEALTHY" in status.stdout, status.stdout
    finally:
        cluster.stop()


def test_the_registered_version_behind_a_models_uri(tmp_path):
    from mlflow.tracking import MlflowClient

    from cspine_ray.runtime import sqlite_uri
    from cspine_ray.serve.app import registered_version

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("cspine-fracture")
    for _ in range(3):
        client.create_model_version("cspine-fracture", source=str(tmp_path))
    client.set_registered_model_alias("cspine-fracture", "champion", "2")
    assert registered_version("models:/cspine-fracture@champion", uri) == "2"
    assert registered_version("models:/cspine-fracture/3", uri) == "3"
    assert registered_version(str(tmp_path), uri) == ""  # a local folder has no version
