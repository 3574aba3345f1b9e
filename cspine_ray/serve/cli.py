"""`python -m cspine_ray.serve`: serve the champion over HTTP (Ray Serve) until interrupted.

    python -m cspine_ray.serve                                  # models:/cspine-fracture@champion
    curl -s --data-binary @study.zip http://127.0.0.1:8000/predict

It binds to 127.0.0.1 by default: on a cluster, reach it through the SSH tunnel
(`ray attach cluster.yaml -p 8000`), never by opening the port to the world.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from cspine_ray.runtime import TRACKING_HELP

log = logging.getLogger(__name__)

APP = "cspine-fracture"


def start(model_uri: str, tracking_uri: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, replicas: int | None = None, gpus_per_replica: float | None = None,
          allow_roots: tuple[str, ...] = (), keep: str | None = None, max_batch_size: int = 4,
          work_dir: str | None = None, address: str | None = None,
          max_queued_requests: int | None = None, request_timeout_s: float | None = None):
    """Start Serve and deploy the service; returns the application's handle."""
    from ray import serve

    from cspine_ray.predict.cli import local_model, replica_plan
    from cspine_ray.runtime import init_ray
    from cspine_ray.serve.app import deployment, serve_options
    from cspine_ray.train.placement import current_cluster

    work = Path(work_dir or tempfile.mkdtemp(prefix="cspine-serve-model-"))
    model_path = local_model(model_uri, tracking_uri, work)
    init_ray(address=address)
    replicas, gpus = replica_plan(current_cluster(), 1 << 20, 1, replicas, gpus_per_replica)
    options = serve_options(model_uri, tracking_uri, model_path, allow_roots, keep, max_batch_size)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    handle = serve.run(deployment(options, replicas, gpus, max_queued_requests), name=APP,
                       route_prefix="/")
    log.info("serving %s (version %s) at http://%s:%d/predict with up to %d replica(s)",
             model_uri, options.version or "-", host, port, replicas)
    return handle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models:/cspine-fracture@champion",
                        help="MLflow model URI or a local model folder (default: the champion)")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: reach it through an SSH tunnel)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int,
                        help="replicas at most (default: one per GPU the cluster can grow to, else 1)")
    parser.add_argument("--gpus-per-replica", type=float,
                        help="default 1 when the cluster has or can add GPUs, else 0")
    parser.add_argument("--max-batch-size", type=int, default=4,
                        help="studies of concurrent requests predicted together")
    parser.add_argument("--allow-root", action="append", default=[],
                        help='folder that JSON {"path": ...} requests may name (repeatable)')
    parser.add_argument("--keep", help="keep each request's study and shard under this folder")
    parser.add_argument("--max-queued", type=int,
                        help="requests waiting per replica beyond those it runs, after which "
                             "new ones are answered 503 (default: as many as it runs, 4 batches)")
    parser.add_argument("--request-timeout", type=float,
                        help="seconds before a request is given up on (default: none)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from cspine_ray.predict.cli import registry_uri

    tracking = registry_uri(args.model, args.tracking_uri)
    start(args.model, tracking, args.host, args.port, args.replicas, args.gpus_per_replica,
          tuple(args.allow_root), args.keep, args.max_batch_size, address=args.address,
          max_queued_requests=args.max_queued, request_timeout_s=args.request_timeout)
    print(f"serving {args.model} at http://{args.host}:{args.port}/predict (Ctrl-C to stop)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP)
    return 0
