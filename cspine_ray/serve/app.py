"""The champion behind a Ray Serve HTTP endpoint: one study in, its eight probabilities out.

    POST /predict            body: a zip or tar (optionally compressed) of one study's DICOM files
    POST /predict            body: {"path": "/mnt/shared/rsna/test_images/<uid>"} (JSON), a folder
                             under a root the service was started with (--allow-root)
        ?report=1            also return the sagittal report as a base64 PNG
    GET  /healthz            the model it serves

It is a Ray Serve application: `build_app` is the builder that `serve run serve.yaml` and
`serve deploy serve.yaml` import (the config's `args:` are its settings, its `deployments:`
the replicas' queue, health check and autoscaling), and `python -m cspine_ray.serve` starts the
same application from flags. Requests beyond a replica's `max_ongoing_requests` wait in a queue
of `max_queued_requests` at most; more are answered 503 at once. Every replica proves it can
predict before it serves and at each health check: its ensemble predicts a tiny generated study
(`predict/example.py`) and must answer eight probabilities.

The answer is JSON: `probabilities` (C1..C7, patient_overall), `found` (per vertebra, whether
stage 1 saw it; null for a family without stage 1), `status`/`reason`/`warnings` as the batch
predictor gives them, and `model` (URI, registered version, run). Bad input is a 4xx with the
reason and the replica goes on serving: 400 not an archive or no DICOM inside, 403 a path outside
the allowed roots, 413 a body over the limit, 422 a series that cannot be read.

Each request's upload is spooled to disk as it arrives (never held whole in memory), unpacked
(`archive.extract_study`), sharded like training data in a worker thread, then queued for `serve.batch`: the studies of concurrent requests are predicted
together, in one pass of the fold models. Nothing of a study is kept after its answer (unless the
service was started with --keep), and no patient attribute is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspine_ray import TARGETS, VERTEBRAE
from cspine_ray.io.rsna import resolves_inside
from cspine_ray.serve.archive import ArchiveError, Limits, extract_study

log = logging.getLogger(__name__)


MAX_JSON_BYTES = 64 << 10  # a {"path": ...} body; anything larger is not one
DEPLOYMENT = "FractureService"
APP_ARGS = ("model", "tracking_uri", "allow_roots", "keep", "max_batch_size", "max_upload_mib")


@dataclass(frozen=True)
class ServeOptions:
    """What every replica is started with (plain data: it travels to the replicas)."""

    model_path: str                       # a local MLflow model folder ("" or absent on this
                                          # replica's node: it downloads model_uri itself)
    model_uri: str                        # what the user asked for (models:/...@champion)
    version: str = ""                     # the registered version behind the URI, when known
    tracking_uri: str | None = None       # where model_uri resolves
    allow_roots: tuple[str, ...] = ()     # folders a JSON {"path": ...} request may name
    keep: str | None = None               # keep each request's study and shard under here
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 4
    batch_wait_s: float = 0.05


class RequestError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def inside(path: Path, roots: tuple[str, ...]) -> bool:
    """Whether `path` (resolved, symlinks followed) lies inside one of `roots`."""
    return any(resolves_inside(path, r) for r in roots)


class FractureService:
    """A Serve replica: the ensemble loaded once; requests unpacked, sharded, batched, answered."""

    def __init__(self, options: ServeOptions):
        import mlflow.pyfunc

        self.options = options
        self.root = Path(tempfile.mkdtemp(prefix="cspine-serve-"))
        wrapper = mlflow.pyfunc.load_model(replica_model(options, self.root)).unwrap_python_model()
        self.ensemble, self.preprocess, self.info = wrapper.ensemble, wrapper.preprocess, wrapper.info
        self.counter = itertools.count()  # names each request's upload and shard
        self.probe = self._shard_probe()
        self._probe()  # a replica that cannot predict never serves

        from ray import serve

        # serve.batch wraps a bound method: set up per replica with this replica's settings
        self._batched = serve.batch(max_batch_size=options.max_batch_size,
                                    batch_wait_timeout_s=options.batch_wait_s)(self._predict_batch)

    # --- the HTTP surface --------------------------------------------------------------------
    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/healthz"):
            return JSONResponse({"status": "ok", "model": self.model_card()})
        if request.method != "POST" or not path.endswith("/predict"):
            return JSONResponse({"error": "POST /predict or GET /healthz"}, status_code=404)
        index = next(self.counter)
        work = self.root / f"request-{index}"
        row = None
        try:
            study_dir = await self._study_from(request, work)
            row = await asyncio.to_thread(self._shard, study_dir, work, index)
            if row["status"] != "ok":
                raise RequestError(422, f"the series cannot be read: {row['reason']}")
            answer, table = await self._batched(row)
            if request.query_params.get("report") in ("1", "true", "yes"):
                answer["report_png"] = await asyncio.to_thread(self._report, row, answer, table)
            return JSONResponse(answer)
        except RequestError as e:
            log.info("request refused (%d): %s", e.status, e.reason)
            return JSONResponse({"error": e.reason}, status_code=e.status)
        finally:
            self._clean(work, row)

    async def _study_from(self, request, work: Path) -> Path:
        """The folder of the request's study: an upload spooled to `work` and unpacked there, or
        an allowed path."""
        limits = self.options.limits
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise RequestError(413, f"the body is larger than {limits.max_request_bytes >> 20} MiB")
        if request.headers.get("content-type", "").startswith("application/json"):
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    raise RequestError(413, f"a JSON body is at most {MAX_JSON_BYTES >> 10} KiB")
            return self._allowed_path(bytes(body))
        work.mkdir(parents=True)
        spooled, size = work / "upload.bin", 0
        with open(spooled, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_request_bytes:
                    raise RequestError(413, f"the body is larger than {limits.max_request_bytes >> 20} MiB")
                out.write(chunk)
        try:
            return await asyncio.to_thread(extract_study, spooled, work / "upload", limits)
        except ArchiveError as e:
            raise RequestError(400, str(e)) from None
        finally:
            spooled.unlink(missing_ok=True)

    def _allowed_path(self, body: bytes) -> Path:
        try:
            path = Path(json.loads(body)["path"])
        except (ValueError, KeyError, TypeError):
            raise RequestError(400, 'a JSON body must be {"path": "<study folder>"}') from None
        if not self.options.allow_roots or not inside(path, self.options.allow_roots):
            raise RequestError(403, "the path is not under a folder this service may read "
                                    "(start it with --allow-root)")
        if not path.is_dir():
            raise RequestError(400, "the path is not a folder")
        return path

    def _shard(self, study_dir: Path, work: Path, index: int) -> dict:
        from cspine_ray.predict.inputs import shard_study

        item = {"study_uid": f"0.{index}", "study_dir": str(study_dir), "index": index}
        if not any(p.is_file() for p in study_dir.iterdir()):
            raise RequestError(400, "no files in the study")
        row = shard_study(item, self.preprocess, str(self.root))
        row["work"] = str(work)
        return row

    # --- the health probe --------------------------------------------------------------------
    def _shard_probe(self) -> str:
        from cspine_ray.predict.example import write_example_study
        from cspine_ray.predict.inputs import shard_study

        study = write_example_study(self.root / "probe-study")
        row = shard_study({"study_uid": "probe", "study_dir": str(study), "index": 0},
                          self.preprocess, str(self.root / "probe"))  # apart from the requests'
        shutil.rmtree(self.root / "probe-study", ignore_errors=True)
        if row["status"] != "ok":
            raise RuntimeError(f"the replica cannot shard its probe study: {row['reason']}")
        return row["shard"]

    def _probe(self) -> None:
        """Every model of the replica on the probe study (`Ensemble.probe`): raises if any
        answers something that is not a probability."""
        self.ensemble.probe(self.root / "probe", self.probe)

    async def check_health(self) -> None:
        """Serve's health check (every health_check_period_s): the replica still predicts.
        Raising marks it unhealthy, and Serve replaces it."""
        await asyncio.to_thread(self._probe)

    # --- batched prediction ------------------------------------------------------------------
    async def _predict_batch(self, rows: list[dict]) -> list[tuple[dict, np.ndarray | None]]:
        return await asyncio.to_thread(self._predict_rows, rows)

    def _predict_rows(self, rows: list[dict]) -> list[tuple[dict, np.ndarray | None]]:
        """(answer, the study's stage-1 table for its report) per row, in one pass."""
        probs, tables = self.ensemble.predict(self.root, [r["shard"] for r in rows])
        found = self.ensemble.found(tables)
        answers = []
        for r in rows:
            answers.append(({
                "probabilities": {t: float(probs.loc[r["shard"], t]) for t in TARGETS},
                "found": ({v: bool(f) for v, f in zip(VERTEBRAE, found[r["shard"]])}
                          if r["shard"] in found else None),
                "status": r["status"], "reason": r["reason"], "warnings": r.get("warnings", ""),
                "batched_with": len(rows), "model": self.model_card(),
            }, tables.get(r["shard"])))
        return answers

    def _report(self, row: dict, answer: dict, table: np.ndarray | None) -> str:
        from cspine_ray.predict.pyfunc import write_report
        from cspine_ray.preprocess.shards import study_path

        out = Path(row["work"]) / "report"
        probs = [answer["probabilities"][t] for t in TARGETS]
        png = write_report(study_path(self.root, row["shard"]), "study", probs, table, out)
        return base64.b64encode(png.read_bytes()).decode()

    def _clean(self, work: Path, row: dict | None) -> None:
        """Remove (or keep, with --keep) the request's upload and its shard."""
        from cspine_ray.preprocess.shards import study_path

        shard = study_path(self.root, row["shard"]) if row else None
        if self.options.keep:
            keep = Path(self.options.keep) / work.name
            keep.mkdir(parents=True, exist_ok=True)
            for part in (work, shard):
                if part is not None and part.exists():
                    shutil.move(str(part), keep / part.name)
        shutil.rmtree(work, ignore_errors=True)
        if shard is not None:
            shutil.rmtree(shard, ignore_errors=True)

    def model_card(self) -> dict:
        return {"uri": self.options.model_uri, "version": self.options.version,
                "run_id": self.info.get("run_id", ""), "family": self.info.get("family", ""),
                "cv_metric": self.info.get("cv_metric")}


def registered_version(model_uri: str, tracking_uri: str | None) -> str:
    """The version number behind models:/<name>@<alias> or models:/<name>/<version>; "" else."""
    if not model_uri.startswith("models:/"):
        return ""
    from mlflow.tracking import MlflowClient

    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if ref:
        return str(client.get_model_version_by_alias(name, ref).version)
    return name.rpartition("/")[2]


def replica_model(options: ServeOptions, work: Path) -> str:
    """The local model folder this replica loads: the given one where this node has it, else
    `model_uri` downloaded here (a replica on another node than the one that resolved it)."""
    if options.model_path and Path(options.model_path).is_dir():
        return options.model_path
    from cspine_ray.predict.cli import local_model

    return local_model(options.model_uri, options.tracking_uri, work)


def deployment(options: ServeOptions, replicas: int = 1, gpus: float = 0.0,
               max_queued_requests: int | None = None):
    """The Serve application: FractureService replicas, autoscaled from 1 to `replicas`; each
    runs up to 4 batches at once, and `max_queued_requests` more wait (default as many again),
    beyond which requests are answered 503. A serve config's `deployments:` overrides these."""
    from ray import serve

    ongoing = 4 * options.max_batch_size
    service = serve.deployment(
        FractureService, name=DEPLOYMENT,
        autoscaling_config={"min_replicas": 1, "max_replicas": max(1, replicas),
                            "target_ongoing_requests": options.max_batch_size},
        max_ongoing_requests=ongoing,
        max_queued_requests=ongoing if max_queued_requests is None else max_queued_requests,
        health_check_period_s=60, health_check_timeout_s=120,
        ray_actor_options={"num_cpus": 0 if gpus else 1, "num_gpus": gpus},
    )
    return service.bind(options)


def build_app(args: dict):
    """Ray Serve's application builder (`import_path: cspine_ray.serve.app:build_app`): the
    config's `args:` (APP_ARGS) -> the application. The model URI resolves with the tracking
    rule of every command (`tracking_uri`, else MLFLOW_TRACKING_URI, else runs/mlflow.db of the
    folder Serve runs in); each replica downloads the model on its own node."""
    from cspine_ray.predict.cli import registry_uri

    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise ValueError(f"unknown cspine-ray serve argument(s) {unknown}; known: {list(APP_ARGS)}")
    model = str(args.get("model") or "models:/cspine-fracture@champion")
    max_upload = int(args.get("max_upload_mib") or Limits().max_request_bytes >> 20)
    return deployment(serve_options(
        model, registry_uri(model, args.get("tracking_uri")),
        str(Path(model).resolve()) if Path(model).is_dir() else "",
        tuple(args.get("allow_roots") or ()), args.get("keep"),
        int(args.get("max_batch_size") or 4),
        Limits(max_request_bytes=max_upload << 20,
               max_expanded_bytes=max(3 * (max_upload << 20), Limits().max_expanded_bytes))))


def serve_options(model_uri: str, tracking_uri: str | None, model_path: str,
                  allow_roots: tuple[str, ...], keep: str | None, max_batch_size: int,
                  limits: Limits = Limits()) -> ServeOptions:
    """What the replicas start with, from a command's or a config's settings (roots resolved,
    the registered version looked up once)."""
    return ServeOptions(model_path=model_path, model_uri=model_uri,
                        version=registered_version(model_uri, tracking_uri),
                        tracking_uri=tracking_uri,
                        allow_roots=tuple(str(Path(r).resolve()) for r in allow_roots),
                        keep=keep, limits=limits, max_batch_size=max_batch_size)
