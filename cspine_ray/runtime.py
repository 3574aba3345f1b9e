"""Starting or joining Ray the same way from every step, and naming the local MLflow store."""

from __future__ import annotations

import logging
import os
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
