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
where Ray exposes them (a cluster launched with `ray up`, or Ray's fake autoscaling cluster),
else the nodes that are up. A request no node type can ever hold fails at once, naming what was
asked and what exists, instead of waiting for resources that will never come.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

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
    autoscaling: bool = False

    def slots(self, cpus: float, gpus: float) -> int:
        """Workers of (cpus, gpus) the whole cluster holds at once at its largest."""
        total = sum(s.count * s.holds(cpus, gpus) for s in self.shapes)
        for need, cap in ((cpus, self.max_cpus), (gpus, self.max_gpus)):
            if need > 0 and math.isfinite(cap):
                total = min(total, math.floor(cap / need + 1e-9))
        return int(total)

    def describe(self) -> str:
        kinds = ", ".join(f"{s.count if s.count < UNBOUNDED else 'any number'} x {s.name} "
                          f"{{CPU: {s.cpus:g}, GPU: {s.gpus:g}}}" for s in self.shapes)
        return f"{'an autoscaling cluster of up to ' if self.autoscaling else ''}{kinds or 'no nodes'}"


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
    """The connected Ray cluster at its largest: autoscaler node types, else the live nodes."""
    import ray

    config = None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # no autoscaler state in this Ray: fall back to the live nodes
        config = None
    if config is not None and config.node_group_configs:
        shapes = tuple(
            NodeShape(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                      UNBOUNDED if g.max_count < 0 else int(g.max_count))
            for g in config.node_group_configs)
        caps = config.max_resources
        return Cluster(shapes, max_cpus=float(caps.get("CPU", math.inf)),
                       max_gpus=float(caps.get("GPU", math.inf)), autoscaling=True)
    shapes = tuple(NodeShape(f"node {n['NodeID'][:8]}", float(n["Resources"].get("CPU", 0)),
                             float(n["Resources"].get("GPU", 0)), 1)
                   for n in ray.nodes() if n.get("Alive"))
    return Cluster(shapes)
