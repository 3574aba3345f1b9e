"""Fitting a job's fold workers to the cluster it runs on, or can grow to.

A training job runs W Ray Train workers; worker r trains folds r, r + W, r + 2W, ... in turn
(train/loop.py), so any W from 1 to the number of folds gives the same fold models. W and each
worker's resources are chosen so the request can always be placed:

- CPU only: as many folds at once as the cluster's nodes hold workers of `cpus_per_worker`
  (a 2-core laptop runs 5 folds on 2 workers: folds 0, 2, 4 and 1, 3).
- `gpus >= 1`: whole GPUs, one worker each, min(folds, floor(gpus)) workers. Ray places a
  fractional GPU request inside one GPU, so 5 x 0.8 never fit on 4 GPUs; 4 workers of one GPU
  do, one of them training two folds, which takes as long as two folds sharing a GPU would.
- `0 < gpus < 1`: the job shares one GPU with others: one worker of that fraction trains
  every fold in turn.

"The cluster" is what it can grow to: the autoscaler's node types with their maximum counts
(a cluster launched with `ray up`, or Ray's fake autoscaling cluster), else the nodes that are
up. A request no node type can ever hold fails at once, naming what was asked and what exists,
instead of waiting for resources that will never come.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

UNBOUNDED = 10_000  # an autoscaler node type without a maximum count


class PlacementError(ValueError):
    """A job asks for resources the cluster can never provide."""


@dataclass(frozen=True)
class NodeShape:
    """One kind of node: its resources and how many of them the cluster has or can start."""

    name: str
    cpus: float
    gpus: float
    count: int
    head: bool = False  # the head node is always there, outside the autoscaler's worker cap

    def holds(self, cpus: float, gpus: float) -> int:
        """Workers of (cpus, gpus) one such node holds."""
        fits = [math.floor(self.cpus / cpus + 1e-9)] if cpus > 0 else []
        if gpus > 0:
            # fractional requests pack inside a GPU: 1/gpus of them per GPU, whole GPUs only
            per_gpu = math.floor(1 / gpus + 1e-9) if gpus < 1 else 1
            fits.append(math.floor(self.gpus / max(gpus, 1) + 1e-9) * per_gpu)
        return max(0, min(fits)) if fits else 0


@dataclass(frozen=True)
class Cluster:
    """The node types of a cluster and its global caps (the autoscaler's max_workers)."""

    shapes: tuple[NodeShape, ...]
    max_cpus: float = math.inf
    max_gpus: float = math.inf
    max_worker_nodes: int | None = None  # the autoscaler's max_workers over all worker types
    autoscaling: bool = False

    def slots(self, cpus: float, gpus: float) -> int:
        """Workers of (cpus, gpus) the whole cluster holds at once at its largest."""
        total = sum(s.count * s.holds(cpus, gpus) for s in self.shapes if s.head)
        budget = math.inf if self.max_worker_nodes is None else self.max_worker_nodes
        # within the global node cap, the node types that hold the most such workers first
        for shape in sorted((s for s in self.shapes if not s.head),
                            key=lambda s: -s.holds(cpus, gpus)):
            nodes = min(shape.count, budget)
            total += nodes * shape.holds(cpus, gpus)
            budget -= nodes
        for need, cap in ((cpus, self.max_cpus), (gpus, self.max_gpus)):
            if need > 0 and math.isfinite(cap):
                total = min(total, math.floor(cap / need + 1e-9))
        return int(total)

    def describe(self) -> str:
        kinds = ", ".join(f"{s.count if s.count < UNBOUNDED else 'any number'} x {s.name} "
                          f"{{CPU: {s.cpus:g}, GPU: {s.gpus:g}}}" for s in self.shapes)
        cap = (f" (at most {self.max_worker_nodes} worker nodes in all)"
               if self.max_worker_nodes is not None else "")
        return (f"{'an autoscaling cluster of up to ' if self.autoscaling else ''}"
                f"{kinds or 'no nodes'}{cap}")


@dataclass(frozen=True)
class FoldLayout:
    """How one job's folds are spread over its Ray Train workers."""

    n_folds: int
    num_workers: int        # 0 = every fold in the driver's process (no Ray Train workers)
    cpus_per_worker: float
    gpus_per_worker: float

    def folds_of(self, rank: int) -> list[int]:
        return list(range(rank, self.n_folds, max(self.num_workers, 1)))

    @property
    def resources_per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}

    def describe(self) -> str:
        if self.num_workers == 0:
            return f"{self.n_folds} folds in this process, one after another"
        workers = "; ".join(f"worker {r}: fold{'s' if len(self.folds_of(r)) > 1 else ''} "
                            f"{', '.join(map(str, self.folds_of(r)))}"
                            for r in range(self.num_workers))
        return (f"{self.n_folds} folds on {self.num_workers} worker(s) of "
                f"{{CPU: {self.cpus_per_worker:g}, GPU: {self.gpus_per_worker:g}}} ({workers})")


def fold_layout(n_folds: int, cluster: Cluster, cpus_per_worker: float = 1.0, gpus: float = 0.0,
                num_workers: int | None = None) -> FoldLayout:
    """The layout of a job of `n_folds` folds asking `gpus` GPUs in all (see the module doc).

    `num_workers` forces the worker count (0 = in-process); it must still fit the cluster.
    """
    if n_folds < 1:
        raise ValueError("a job needs at least one fold")
    if cpus_per_worker < 0 or gpus < 0:
        raise ValueError("cpus_per_worker and gpus must be >= 0")
    if num_workers == 0:
        return FoldLayout(n_folds, 0, cpus_per_worker, 0.0)
    gpus_per_worker = 0.0 if gpus == 0 else (1.0 if gpus >= 1 else gpus)
    wanted = n_folds if gpus == 0 else (min(n_folds, math.floor(gpus)) if gpus >= 1 else 1)
    if num_workers is not None:
        wanted = num_workers
    fits = cluster.slots(cpus_per_worker, gpus_per_worker)
    request = f"{{CPU: {cpus_per_worker:g}, GPU: {gpus_per_worker:g}}}"
    if fits < 1:
        raise PlacementError(
            f"a fold worker asks {request} (from {gpus:g} GPU(s) for the job and "
            f"{cpus_per_worker:g} CPU(s) per worker), but no node of the cluster can ever hold "
            f"one: {cluster.describe()}")
    if num_workers is not None and num_workers > fits:
        raise PlacementError(
            f"{num_workers} workers of {request} were asked, but the cluster holds at most "
            f"{fits} at once: {cluster.describe()}")
    return FoldLayout(n_folds, min(wanted, fits, n_folds), cpus_per_worker, gpus_per_worker)


def jobs_at_once(layout: FoldLayout, cluster: Cluster) -> int:
    """How many jobs of this layout the cluster holds at once at its largest (at least 1)."""
    if layout.num_workers == 0:
        return 1
    fits = cluster.slots(layout.cpus_per_worker, layout.gpus_per_worker)
    return max(1, fits // layout.num_workers)


def current_cluster() -> Cluster:
    """The connected Ray cluster at its largest.

    From the autoscaler's node types and limits: reported to the GCS by autoscaler v2, or read
    from the config file of the connected cluster's v1 autoscaler (`ray up`'s
    ~/ray_bootstrap_config.yaml on the head, where the drivers run; CSPINE_AUTOSCALER_CONFIG
    names it elsewhere). Without an autoscaler: the nodes that are up.
    """
    import ray

    cluster = _from_gcs_cluster_config() or _from_autoscaler_file()
    if cluster is not None:
        return cluster
    shapes = tuple(NodeShape(f"node {n['NodeID'][:8]}", float(n["Resources"].get("CPU", 0)),
                             float(n["Resources"].get("GPU", 0)), 1)
                   for n in ray.nodes() if n.get("Alive"))
    return Cluster(shapes)


def _from_gcs_cluster_config() -> Cluster | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # no autoscaler state in this Ray
        return None
    if config is None or not config.node_group_configs:
        return None
    shapes = tuple(
        NodeShape(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                  UNBOUNDED if g.max_count < 0 else int(g.max_count))
        for g in config.node_group_configs)
    caps = config.max_resources
    return Cluster(shapes, max_cpus=float(caps.get("CPU", math.inf)),
                   max_gpus=float(caps.get("GPU", math.inf)), autoscaling=True)


def _from_autoscaler_file() -> Cluster | None:
    path = os.environ.get("CSPINE_AUTOSCALER_CONFIG") or _monitor_config_path()
    if not path or not Path(path).is_file():
        return None
    try:
        return cluster_from_config(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        log.warning("could not read the autoscaler config %s (%s): sizing from the nodes up now",
                    path, e)
        return None


def cluster_from_config(config: dict) -> Cluster:
    """A Cluster from an autoscaler config (cluster.yaml's schema)."""
    head_type = config["head_node_type"]
    shapes = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources") or {}
        count = int(node_type.get("max_workers", 0))
        shape = NodeShape(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)),
                          count)
        if name == head_type:  # the head itself, plus any workers of its type
            shapes.append(NodeShape(name, shape.cpus, shape.gpus, 1, head=True))
        if count > 0:
            shapes.append(shape)
    cap = config.get("max_workers")
    return Cluster(tuple(shapes), max_worker_nodes=None if cap is None else int(cap),
                   autoscaling=True)


def _monitor_config_path() -> str | None:
    """--autoscaling-config of the v1 autoscaler (monitor.py) serving the connected GCS, if it
    runs on this machine (the head)."""
    import psutil
    import ray

    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:
        return None
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or []
            if not any(a.endswith("monitor.py") for a in args[:3]):
                continue
            options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
            if options.get("gcs-address") != gcs or "autoscaling-config" not in options:
                continue
            return str(Path(proc.cwd()) / os.path.expanduser(options["autoscaling-config"]))
        except (psutil.Error, OSError):
            continue
    return None
