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
import os
import re
import shutil
import socket
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
    assert "127.0.0.1:/ /mnt/shared" in mount  # through the TLS tunnel, never to EFS directly
    assert 'EFS_HOST="$EFS_ID.efs.$EFS_REGION.amazonaws.com"' in mount
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


# --- Locked down (nothing reachable but SSH from the admin range; no account-wide rights) ---

AWS_DIR = REPO / "aws"
WORLD = ("0.0.0.0/0", "::/0")


def security_problems(config: dict) -> list[str]:
    """What `ray up` would open or grant beyond the locked-down shape; empty when none."""
    problems = []
    text = json.dumps(config)
    problems += [f"world-open range {w} in cluster.yaml" for w in WORLD if w in text]
    head_type = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        if not node.get("SecurityGroupIds"):
            problems.append(f"{name}: no SecurityGroupIds (Ray would create a group with SSH "
                            "open to 0.0.0.0/0)")
        if node.get("MetadataOptions", {}).get("HttpTokens") != "required":
            problems.append(f"{name}: IMDSv2 not required")
        profile = node.get("IamInstanceProfile")
        if name == head_type:
            arn = (profile or {}).get("Arn", "")
            if not arn.endswith(":instance-profile/cspine-ray-head"):
                problems.append(f"{name}: head without the scoped cspine-ray-head profile "
                                "(Ray would attach EC2 and S3 full access)")
        elif profile:
            problems.append(f"{name}: a worker holds an instance profile ({profile})")
    if len({tuple(t["node_config"].get("SecurityGroupIds", ()))
            for t in config["available_node_types"].values()}) != 1:
        problems.append("node types in different security groups")
    if config["provider"].get("security_group"):
        problems.append("provider.security_group asks Ray to create a group")
    return problems


def test_cluster_yaml_is_locked_down() -> None:
    assert security_problems(load_raw()) == []


def _world_ssh(c: dict) -> None:
    c["provider"]["security_group"] = {"GroupName": "open", "IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}


def _worker_without_group(c: dict) -> None:
    del c["available_node_types"]["gpu_worker"]["node_config"]["SecurityGroupIds"]


def _head_without_profile(c: dict) -> None:
    del c["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]


def _worker_with_head_profile(c: dict) -> None:
    nodes = c["available_node_types"]
    nodes["cpu_worker"]["node_config"]["IamInstanceProfile"] = nodes["head"]["node_config"][
        "IamInstanceProfile"]


def _imds_v1(c: dict) -> None:
    c["available_node_types"]["cpu_worker"]["node_config"]["MetadataOptions"]["HttpTokens"] = (
        "optional")


@pytest.mark.parametrize("break_it", [_world_ssh, _worker_without_group, _head_without_profile,
                                      _worker_with_head_profile, _imds_v1])
def test_security_check_catches_each_opening(break_it) -> None:
    config = load_raw()
    break_it(config)
    assert security_problems(config)


def test_ray_up_creates_no_security_group_and_no_role(monkeypatch) -> None:
    # Ray's own AWS bootstrap steps, offline: any call to AWS would mean `ray up` creates a
    # security group (SSH from 0.0.0.0/0) or the ray-autoscaler-v1 role (EC2/S3 full access).
    from ray.autoscaler._private.aws import config as aws_config

    def no_aws(*args, **kwargs):
        raise AssertionError("ray up would call AWS to create a default group or role")

    monkeypatch.setattr(aws_config, "_client", no_aws)
    monkeypatch.setattr(aws_config, "_resource", no_aws)
    monkeypatch.setattr(aws_config, "_upsert_security_groups", no_aws)
    config = prepare_config(load_raw())
    config["head_node"] = {}
    aws_config._configure_iam_role(config)
    aws_config._configure_security_group(config)
    assert config["head_node"] == {}  # no default profile added for the head
    for broken in (_worker_without_group, _head_without_profile):
        config = prepare_config(load_raw())
        config["head_node"] = {}
        broken(config)
        with pytest.raises(AssertionError, match="would call AWS"):
            aws_config._configure_iam_role(config)
            aws_config._configure_security_group(config)


def _template(name: str):
    return json.loads((AWS_DIR / name).read_text())


def test_ingress_rules_open_ssh_to_the_admin_range_only() -> None:
    nodes, efs = _template("nodes-ingress.json"), _template("efs-ingress.json")
    for rules in (nodes, efs):
        assert not any(w in json.dumps(rules) for w in WORLD)
    ssh = [r for r in nodes if r.get("IpRanges")]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in ssh] == [(22, 22, "tcp")]
    assert [ip["CidrIp"] for ip in ssh[0]["IpRanges"]] == ["${ADMIN_CIDR}"]
    # everything else comes from the cluster's own group, never from an address range
    others = [r for r in nodes if not r.get("IpRanges")] + efs
    assert all(r["UserIdGroupPairs"] == [{"GroupId": "${CLUSTER_SG}", "Description": ANY}]
               for r in others)
    assert [(r["FromPort"], r["ToPort"]) for r in efs] == [(2049, 2049)]
    assert not any(r.get("Ipv6Ranges") or r.get("PrefixListIds") for r in nodes + efs)


class _Any:
    def __eq__(self, other):
        return True


ANY = _Any()

MUTATING_EC2 = {"ec2:RunInstances", "ec2:CreateTags", "ec2:StartInstances", "ec2:StopInstances",
                "ec2:TerminateInstances"}


def head_policy_problems(policy: dict) -> list[str]:
    problems = []
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] != "Allow":
            continue
        for action in actions:
            service, _, verb = action.partition(":")
            if "*" in action:
                problems.append(f"wildcard action {action}")
            elif service == "ec2" and not verb.startswith("Describe") and action not in MUTATING_EC2:
                problems.append(f"unexpected EC2 right {action}")
            elif service not in ("ec2",):
                problems.append(f"right outside EC2: {action}")
        mutating = [a for a in actions if a in MUTATING_EC2]
        instance = any(":instance/" in r for r in resources)
        if mutating and instance and not st.get("Condition"):
            problems.append(f"{mutating} on any instance (no cluster tag condition)")
        if mutating and any(r == "*" for r in resources):
            problems.append(f"{mutating} on Resource *")
        if "ec2:RunInstances" in actions and any(":security-group/" in r for r in resources):
            if any(not r.endswith("security-group/${CLUSTER_SG}") for r in resources
                   if ":security-group/" in r):
                problems.append("instances may launch in other security groups")
    return problems


def test_head_policy_is_scoped_to_this_cluster() -> None:
    policy = _template("head-policy.json")
    assert head_policy_problems(policy) == []
    conditions = [st["Condition"] for st in policy["Statement"] if "Condition" in st]
    assert {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": load_raw()["cluster_name"]}} \
        in conditions
    # no IAM rights at all, so not even iam:PassRole: workers get no instance profile
    assert "iam:" not in json.dumps(policy)


@pytest.mark.parametrize("widen", [
    lambda p: p["Statement"].append({"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}),
    lambda p: p["Statement"].append({"Effect": "Allow", "Action": "s3:*", "Resource": "*"}),
    lambda p: p["Statement"][-1].pop("Condition"),
    lambda p: p["Statement"][2]["Resource"].append(
        "arn:aws:ec2:${REGION}:${ACCOUNT_ID}:security-group/*"),
    lambda p: p["Statement"].append({"Effect": "Allow", "Action": "iam:PassRole", "Resource": "*"}),
])
def test_head_policy_check_catches_widening(widen) -> None:
    policy = _template("head-policy.json")
    widen(policy)
    assert head_policy_problems(policy)


def test_efs_refuses_plain_text_nfs() -> None:
    policy = _template("efs-policy.json")
    deny = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert deny[0]["Action"] == "*"


def test_setup_script_refuses_world_open_ssh() -> None:
    script = AWS_DIR / "setup.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    cases = {"0.0.0.0/0": "refusing a world-open SSH range", "::/0": "refusing a world-open",
             "10.0.0.0/0": "refusing a world-open", "203.0.113.7": "must be a CIDR"}
    for cidr, message in cases.items():
        # refused before any AWS call: no aws CLI on this PATH, so a call would fail differently
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "ADMIN_CIDR": cidr, "EFS_ID": "fs-1"})
        assert done.returncode == 1 and message in done.stderr, (cidr, done.stderr)
    # every template placeholder is one the script fills in
    rendered = set(re.findall(r"-e \"s\|\\\$\{(\w+)\}", script.read_text()))
    used = {v for f in AWS_DIR.glob("*.json") for v in re.findall(r"\$\{(\w+)\}", f.read_text())}
    assert used and used <= rendered, used - rendered


def _efs_tls_config() -> str:
    """The stunnel configuration the initialization command writes, with a sample EFS id."""
    mount = " ".join(load_raw()["initialization_commands"])
    printf = mount[mount.index("printf '%s\\n'"):mount.index("| sudo tee")]
    env = {"PATH": "/usr/bin:/bin", "EFS_HOST": "fs-0123.efs.us-west-2.amazonaws.com"}
    return subprocess.run(["bash", "-c", printf], capture_output=True, text=True, env=env,
                          check=True).stdout


def test_efs_tunnel_verifies_the_server() -> None:
    conf = _efs_tls_config()
    lines = set(conf.splitlines())
    assert "connect = fs-0123.efs.us-west-2.amazonaws.com:2049" in lines
    assert "checkHost = fs-0123.efs.us-west-2.amazonaws.com" in lines
    assert {"client = yes", "verifyChain = yes", "accept = 127.0.0.1:20049"} <= lines
    mount = " ".join(load_raw()["initialization_commands"])
    assert "port=20049" in mount and "-p Restart=always stunnel /etc/cspine-efs-tls.conf" in mount


@pytest.mark.skipif(shutil.which("stunnel") is None and not os.environ.get("CI"),
                    reason="stunnel not installed (.ci/run installs it)")
def test_efs_tunnel_configuration_is_accepted_by_stunnel(tmp_path) -> None:
    conf = tmp_path / "efs.conf"
    # a free local port so the check never collides with anything listening on 20049
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf.write_text(_efs_tls_config().replace("127.0.0.1:20049", f"127.0.0.1:{port}"))
    proc = subprocess.Popen(["stunnel", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for line in proc.stdout:
            out += line
            if "Configuration successful" in line or "Configuration failed" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "Configuration successful" in out, out
