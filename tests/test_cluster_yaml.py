"""cluster.yaml: validated the way `ray up` validates it, plus the promises the README makes.

`ray up` loads the YAML with `yaml.safe_load`, runs `prepare_config` (merges the AWS
defaults, setup commands and per-type worker limits; no network), asks AWS to fill in
missing node resources (skipped here: every node type declares its resources), then runs
`validate_config` (Ray's ray-schema.json plus cross-field checks). These tests run the two
offline steps from the installed Ray, so no AWS credentials or network are needed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
GPU_FAMILY = re.compile(r"^(g\d|p\d|inf\d|trn\d|dl\d)")


def load_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validate(config: dict) -> dict:
    """The offline part of `ray up`'s _bootstrap_config; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict:
    return ray_up_validate(load_raw())


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def ray_start_command(commands: list[str]) -> str:
    found = [cmd for cmd in commands if "ray start" in cmd]
    assert len(found) == 1, found
    return found[0]


# --- Ray's own validation -------------------------------------------------------------

def test_file_matches_ray_schema_as_written() -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load_raw(), json.loads(schema_path.read_text()))


def test_ray_up_validation_passes(prepared: dict) -> None:
    assert prepared["cluster_name"] == "cspine-ray"
    assert prepared["provider"]["type"] == "aws"


def _unknown_top_level_key(c: dict) -> None:
    c["head_nodes_type"] = "head"


def _node_type_without_node_config(c: dict) -> None:
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _fractional_gpu_resource(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _head_type_not_declared(c: dict) -> None:
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_max(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_node_type_without_node_config, jsonschema.ValidationError),
        (_fractional_gpu_resource, jsonschema.ValidationError),
        (_head_type_not_declared, ValueError),
        (_min_workers_above_global_max, ValueError),
    ],
)
def test_broken_variants_fail_validation(break_it, error) -> None:
    config = load_raw()
    break_it(config)
    with pytest.raises(error):
        ray_up_validate(config)


# --- Project promises -------------------------------------------------------------------

def test_gpu_workers_scale_from_zero(prepared: dict) -> None:
    gpu_types = {name: t for name, t in prepared["available_node_types"].items()
                 if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type declares GPUs"
    for name, node_type in gpu_types.items():
        assert name != prepared["head_node_type"]
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["resources"]["CPU"] > 0, name


def test_head_is_cpu_only_and_takes_no_ray_work(prepared: dict) -> None:
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"])


def test_image_is_plain_ray_matching_installed_ray_and_python_311(prepared: dict) -> None:
    docker = prepared["docker"]
    images = [docker["image"], docker.get("head_image", ""), docker.get("worker_image", "")]
    images += [t.get("docker", {}).get("worker_image", "")
               for t in prepared["available_node_types"].values()]
    assert not any("ray-ml" in image for image in images), images
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py311-cu(?P<cuda>\d+)", docker["image"])
    assert match, docker["image"]
    # The laptop's Ray (which runs `ray up` and `ray job submit`) must match the cluster's.
    assert match["ray"] == ray.__version__
    # The image has no torch: it is installed from the wheel index of the image's CUDA.
    torch_installs = [c for c in prepared["setup_commands"] if "torch==" in c]
    assert len(torch_installs) == 1
    assert f"download.pytorch.org/whl/cu{match['cuda']}" in torch_installs[0]


def test_token_auth_on_every_node(prepared: dict) -> None:
    export = f"export {AUTH_MODE_ENV_VAR}=token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = ray_start_command(prepared[key])
        assert export in start, key
        assert start.index(export) < start.index("ray start"), key
    # The token reaches every node through a synced directory and lands at Ray's default path.
    secrets_remote = [remote for remote, local in prepared["file_mounts"].items()
                      if "secrets" in remote]
    assert len(secrets_remote) == 1
    setup = " ".join(prepared["setup_commands"])
    assert f"{secrets_remote[0]}/auth_token ~/.ray/auth_token" in setup
    assert f"echo '{export}' >> ~/.bashrc" in setup


def test_dashboard_kept_on_and_bound_to_localhost(prepared: dict) -> None:
    start = ray_start_command(prepared["head_start_ray_commands"])
    assert "--head" in start
    assert "--dashboard-host=127.0.0.1" in start
    assert "--include-dashboard" not in start


def test_mlflow_server_on_localhost_with_state_on_shared_storage(prepared: dict) -> None:
    servers = [c for c in prepared["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1
    server = servers[0]
    assert "nohup mlflow server" in server
    assert "--host 127.0.0.1 --port 5000" in server
    assert "--backend-store-uri sqlite:////mnt/shared/" in server
    assert "--artifacts-destination /mnt/shared/" in server
    assert not any("0.0.0.0" in c for c in all_commands(prepared))


def test_shared_storage_mounted_on_every_node(prepared: dict) -> None:
    # initialization_commands run on the host of every node, before the container starts.
    mount = " ".join(prepared["initialization_commands"])
    assert "mount -t nfs4" in mount
    assert re.search(r'amazonaws\.com:/"? /mnt/shared\)', mount)
    region = prepared["provider"]["region"]
    assert f"EFS_REGION={region};" in mount
    zones = prepared["provider"]["availability_zone"].split(",")
    assert all(zone.startswith(region) for zone in zones), zones
    assert "-v /mnt/shared:/mnt/shared" in prepared["docker"]["run_options"]


def test_this_checkout_is_installed_on_every_node(prepared: dict) -> None:
    assert prepared["file_mounts"]["~/cspine-ray"] == "."
    assert (REPO / "pyproject.toml").is_file()
    # prepare_config prepends setup_commands to the head's and the workers' lists.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "-e ~/cspine-ray" in c for c in prepared[key]), key


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash() -> None:
    for cmd in all_commands(load_raw()):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, (cmd, result.stderr)
