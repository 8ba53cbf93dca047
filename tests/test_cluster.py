"""cluster/: every launcher YAML passes Ray's own cluster-config schema, opens no Ray port to the
internet, and starts every node with token authentication on (issue 6, item 6)."""

import copy
import ipaddress
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if p.name != "runtime_env.yaml")
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

# GCS, dashboard, Ray client, object manager, dashboard agent, metrics, and the default worker range.
RAY_PORTS = {6379, 8265, 10001, 8076, 8077, 52365, 52366, 8080} | set(range(10002, 20000))
WORLD = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_three_launcher_configs_exist():
    assert [p.name for p in LAUNCHER_YAMLS] == ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]
    assert {load(p)["provider"]["type"] for p in LAUNCHER_YAMLS} == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_passes_rays_cluster_schema(path):
    raw = load(path)
    jsonschema.validate(raw, SCHEMA)  # the file as written (no unknown top-level keys)
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks after filling defaults


def test_schema_check_can_fail():
    raw = load(LAUNCHER_YAMLS[0])
    raw["head_start_ray_comands"] = raw.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, SCHEMA)


# ----------------------------------------------------------------------------- port exposure

def _is_world(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr, strict=False) in WORLD
    except ValueError:
        return False


def _ports(from_port, to_port, protocol) -> set[int] | None:
    """The ports a rule opens; None means every port."""
    if str(protocol) in ("-1", "all") or from_port in (None, -1):
        return None
    return set(range(int(from_port), int(to_port) + 1))


def aws_world_exposures(config: dict) -> list[str]:
    problems = []
    rules = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
        if not any(_is_world(c) for c in cidrs):
            continue
        ports = _ports(rule.get("FromPort"), rule.get("ToPort"), rule.get("IpProtocol"))
        if ports is None or ports & RAY_PORTS:
            problems.append(f"IpPermissions rule {rule} opens Ray ports to the internet")
    for name, node_type in config.get("available_node_types", {}).items():
        if "SecurityGroupIds" in node_type.get("node_config", {}):
            problems.append(f"{name}: SecurityGroupIds bypasses the checked security group")
    return problems


def gcp_firewall_exposures(script: str) -> list[str]:
    problems = []
    for command in re.split(r"\n(?=gcloud )", script.replace("\\\n", " ")):
        if "firewall-rules create" not in command:
            continue
        sources = re.search(r"--source-ranges\s+\"?([^\s\"]+)", command)
        allow = re.search(r"--allow\s+\"?([^\s\"]+)", command)
        source_list = sources.group(1).split(",") if sources else ["0.0.0.0/0"]  # gcloud's default
        if not any(_is_world(s) for s in source_list):
            continue
        for item in (allow.group(1) if allow else "all").split(","):
            proto, _, spec = item.partition(":")
            if proto == "all" or not spec:
                problems.append(f"{command.split()[4]} opens all {proto} ports to the internet")
                continue
            lo, _, hi = spec.partition("-")
            if set(range(int(lo), int(hi or lo) + 1)) & RAY_PORTS:
                problems.append(f"{command.split()[4]} opens {item} to the internet")
    return problems


def _dashboard_on_all_interfaces(config: dict) -> bool:
    text = " ".join(config.get("head_start_ray_commands", []))
    return bool(re.search(r"--dashboard-host[= ]+(0\.0\.0\.0|::)", text))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_no_ray_port_open_to_the_internet(path):
    config = load(path)
    assert aws_world_exposures(config) == []
    assert not _dashboard_on_all_interfaces(config), "dashboard must stay on localhost (use `ray dashboard`)"
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0]
        assert "0.0.0.0/0" not in code and "::/0" not in code, f"{path.name}: {line.strip()}"


def test_gcp_network_is_private():
    script = (CLUSTER / "gcp-firewall.sh").read_text()
    assert gcp_firewall_exposures(script) == []
    assert "--source-ranges \"$ADMIN_CIDR\"" in script and "tcp:22" in script
    config = load(CLUSTER / "gcp-gpu.yaml")
    for name, node_type in config["available_node_types"].items():
        interfaces = node_type["node_config"]["networkInterfaces"]
        assert [i["subnetwork"].rsplit("/", 1)[1] for i in interfaces] == ["alexnet-ray-subnet"], name


def test_exposure_checks_can_fail():
    bad_aws = {"provider": {"security_group": {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
    ]}}}
    assert len(aws_world_exposures(bad_aws)) == 2  # the dashboard rule and the all-ports rule
    bad_gcp = (
        "gcloud compute firewall-rules create open-dash --network n --allow tcp:8265 --source-ranges 0.0.0.0/0\n"
        "gcloud compute firewall-rules create open-all --network n --allow tcp \\\n    --source-ranges ::/0\n"
        "gcloud compute firewall-rules create ssh --network n --allow tcp:22 --source-ranges 0.0.0.0/0\n"
        "gcloud compute firewall-rules create gcs --network n --allow tcp:6000-7000\n"
    )
    assert len(gcp_firewall_exposures(bad_gcp)) == 3
    assert _dashboard_on_all_interfaces({"head_start_ray_commands": ["ray start --head --dashboard-host=0.0.0.0"]})


# ----------------------------------------------------------------------------- token auth

def token_auth_problems(config: dict) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if not starts:
            problems.append(f"{key}: no `ray start`")
        for command in starts:
            before = command.split("ray start", 1)[0]
            if not re.search(r"\bRAY_AUTH_MODE=token\b", before):
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token before it")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("file_mounts: the token (~/.ray/auth_token) is not copied to the nodes")
    if re.search(r"RAY_AUTH_MODE=(?!token)", yaml.safe_dump(config)):
        problems.append("RAY_AUTH_MODE set to something other than token")
    return problems


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_token_authentication_is_on(path):
    assert token_auth_problems(load(path)) == []


def test_token_check_can_fail():
    config = load(LAUNCHER_YAMLS[0])
    config["worker_start_ray_commands"] = ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
    config["file_mounts"] = {}
    assert len(token_auth_problems(config)) == 2
    config = load(LAUNCHER_YAMLS[0])
    config["setup_commands"].append("export RAY_AUTH_MODE=disabled")
    assert token_auth_problems(config) == ["RAY_AUTH_MODE set to something other than token"]


def test_runtime_env_keeps_the_upload_small():
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches working_dir excludes with

    env = load(CLUSTER / "runtime_env.yaml")
    excluded = PathSpec.from_lines("gitwildmatch", env["excludes"]).match_file
    for heavy in (".git/HEAD", ".venv/bin/python", "runs/demo/checkpoint.pt", "data/imagenet/manifest.json"):
        assert excluded(heavy), heavy
    # the package itself must travel: an unanchored "data/" once dropped alexnet_ray/data from jobs
    package = [str(p.relative_to(CLUSTER.parent)) for p in (CLUSTER.parent / "alexnet_ray").rglob("*.py")]
    assert package and not [p for p in package if excluded(p)]
    gitignore = (CLUSTER.parent / ".gitignore").read_text().splitlines()
    assert not [p for p in package if PathSpec.from_lines("gitwildmatch", gitignore).match_file(p)]
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert "working_dir" not in env  # given on the command line: --working-dir .
