"""Ray's own autoscaling cluster on this machine, for the multi-node tests.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=CFG` with the `fake_multinode`
provider: the head runs a real v1 autoscaler that starts "nodes" (raylets on this machine) of
the declared types, from zero, as work asks for them. Fake GPUs have no CUDA behind them.
Everything lives under its own --temp-dir, so stopping it never touches another Ray (the test
session's own local Ray keeps running).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import yaml

PORT = 6379  # the fake provider's nodes join the head on this port


def autoscaling_config(node_types: dict, max_workers: int) -> dict:
    """A fake_multinode autoscaler config: a CPU-0 head plus `node_types`, from zero."""
    config = {
        "cluster_name": "cspine-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **spec}
               for name, spec in node_types.items()}},
        "head_node_type": "ray.head.default",
    }
    # the keys the v1 autoscaler reads even when it has nothing to sync or run
    config.update(file_mounts={}, file_mounts_sync_continuously=False, **{key: [] for key in (
        "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
        "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands")})
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeCluster:
    """node_types=None: one plain node (head_cpus, head_gpus), no autoscaler."""

    def __init__(self, folder: Path, node_types: dict | None, max_workers: int = 0,
                 head_cpus: int = 0, head_gpus: int = 0):
        self.folder = folder
        self.autoscaling = node_types is not None
        self.head = [f"--num-cpus={head_cpus}", f"--num-gpus={head_gpus}"]
        self.temp_dir = Path("/tmp") / f"cfk{os.getpid()}"  # short: Ray's socket paths
        self.config = folder / "autoscaler.yaml"
        if self.autoscaling:
            self.config.write_text(yaml.safe_dump(autoscaling_config(node_types, max_workers)))
        self.address = f"127.0.0.1:{PORT}"
        self.env = dict(os.environ, RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="disabled",
                        RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=self.address)

    def start(self) -> "FakeCluster":
        # its own dashboard ports: the test session's local Ray holds the default ones
        dashboard, agent = _free_port(), _free_port()
        self.dashboard_port = dashboard
        autoscaler = [f"--autoscaling-config={self.config}"] if self.autoscaling else []
        subprocess.run(["ray", "start", "--head", f"--port={PORT}", *self.head, *autoscaler,
                        f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                        "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=120)
        return self

    def run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """A command (a driver) connected to this cluster."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir or port, and all their
        descendants (the fake nodes' agents rename themselves, e.g. ray::DashboardAgent)."""
        mine = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp_dir) in a or f":{PORT}" in a
                       for a in proc.info["cmdline"] or []):
                    mine[proc.pid] = proc
                    mine.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.Error:
                continue
        mine.pop(os.getpid(), None)
        return list(mine.values())

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = self.processes()
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5)
            if not self.processes():
                break
        time.sleep(1)
