"""Starting or joining Ray the same way from every step, and where every step tracks (MLflow)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; no-op if running.

    Keep the dashboard for anything that runs Tune: without it, a trial that ASHA stops early
    can leak its placement group. A preprocessing-only run can spare its CPU.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        log.info("joined Ray cluster at %s", address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=dashboard, log_to_driver=True)
    log.info("started local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def sqlite_uri(path: str | Path) -> str:
    """The MLflow tracking URI of a local sqlite store (tune writes it; promote and predict read it)."""
    return f"sqlite:///{Path(path).resolve()}"


DEFAULT_STORAGE = Path("runs")
# written by `tune` in the folder it runs from: the store and experiment of the last search, so
# that promote, predict and serve started from the same folder find them with no flags
LAST_SEARCH = DEFAULT_STORAGE / "last-search.json"


# --tracking-uri's help in every command that reads a store (resolve_tracking's rule)
TRACKING_HELP = ("MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else the last search "
                 "started from this folder, else sqlite:///runs/mlflow.db)")


@dataclass(frozen=True)
class Tracking:
    uri: str
    source: str                     # the rule that chose it, for the one line a command prints
    experiment: str | None = None   # the last search's, where its store is the one chosen


def resolve_tracking(flag: str | None, storage: str | Path | None = None) -> Tracking:
    """The MLflow store of every command, by one rule: `--tracking-uri`; else the environment's
    MLFLOW_TRACKING_URI; else, for tune (which has a storage folder), <storage>/mlflow.db; for
    the others, the store of the last search started from this folder (LAST_SEARCH); else
    runs/mlflow.db."""
    last = _last_search()
    if flag:
        found = Tracking(flag, "--tracking-uri")
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        found = Tracking(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    elif storage is not None:
        found = Tracking(sqlite_uri(Path(storage) / "mlflow.db"), "the search's --storage")
    elif last:
        found = Tracking(last["tracking_uri"], f"the last search from this folder ({LAST_SEARCH})")
    else:
        found = Tracking(sqlite_uri(DEFAULT_STORAGE / "mlflow.db"), "the default")
    if last and last["tracking_uri"] == found.uri:
        found = Tracking(found.uri, found.source, last.get("experiment"))
    return found


def record_search(tracking_uri: str, experiment: str) -> None:
    """Remember where a search started from this folder tracks (see resolve_tracking)."""
    from cspine_ray.preprocess.shards import write_json_atomic

    LAST_SEARCH.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(LAST_SEARCH, {"tracking_uri": tracking_uri, "experiment": experiment})


def _last_search() -> dict | None:
    try:
        data = json.loads(LAST_SEARCH.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("tracking_uri"), str) else None


_MLFLOW_STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def mlflow_store(uri: str) -> Iterator[None]:
    """MLflow's own functions (start_run, log_model, register_model, download_artifacts) pointed
    at `uri` for the block only. mlflow.set_tracking_uri / set_registry_uri also write
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, which resolve_tracking reads
    first: left there, one command's store would become every later command's in the process."""
    import mlflow

    saved = {name: os.environ.get(name) for name in _MLFLOW_STORE_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: MLflow's own default again
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():  # set_registry_uri(None) leaves its variable behind
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
