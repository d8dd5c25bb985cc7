"""cluster.yaml: Ray's own autoscaler schema, Ray version pins, localhost dashboard, spot GPU workers, no credentials.

Fast and offline (no Ray cluster, no AWS calls). Run: python -m pytest -q tests/test_cluster_yaml.py
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"
NON_CUSTOM = {"CPU", "GPU", "memory", "object_store_memory"}


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def gpu_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def pinned_ray_version() -> str:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==(\S+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"expected one ray==X.Y.Z pin in pyproject.toml, got {deps}"
    return pins[0]


def test_passes_ray_autoscaler_validation(config):
    """What `ray up` does before it calls AWS: prepare_config (defaults, docker, min/max), then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_validation_rejects_a_schema_violation(config):
    """The check above has teeth: ray-schema.json refuses unknown keys and wrong types."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(config)
    bad["available_node_types"][bad["head_node_type"]]["resources"]["driver"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(config)
    bad["docker"]["imagee"] = bad["docker"]["image"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_docker_image_pins_the_project_ray_version(config):
    import ray

    pin = pinned_ray_version()
    assert ray.__version__ == pin, f"installed ray {ray.__version__}, pyproject.toml pins {pin}"
    docker = config["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    assert images and docker.get("pull_before_run") is True and docker.get("container_name")
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", image)
        assert m, f"{image}: expected a pinned rayproject/ray:X.Y.Z-pyNN-gpu image (not ray-ml, not latest)"
        assert m.group(1) == pin, f"{image} runs Ray {m.group(1)}, pyproject.toml pins {pin}"
        assert (m.group(2), m.group(3)) == ("3", "11"), f"{image}: the project runs on Python 3.11"
    assert any(f"ray.__version__ == '{pin}'" in c for c in config["setup_commands"]), \
        "setup_commands should refuse an image whose Ray differs from the pin"


def test_project_is_mounted_and_installed(config):
    assert config["file_mounts"]["~/raypatch"] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = config[key]
        install = next(i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/raypatch" in c)
        torch = next(i for i, c in enumerate(cmds) if re.search(r"pip install .*\btorch==", c))
        assert torch < install, f"{key}: install torch before the project so pip does not pull another build"


def test_dashboard_binds_to_localhost_and_token_auth_is_on(config):
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head)
    assert "0.0.0.0" not in head
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmds
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_gpu_workers_are_spot_with_bounded_counts(config):
    workers = gpu_types(config)
    assert len({w["node_config"]["InstanceType"] for w in workers.values()}) >= 2, "several spot instance types"
    for name, w in workers.items():
        assert w["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name
        lo, hi = w.get("min_workers"), w.get("max_workers")
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, f"{name}: min/max_workers {lo}/{hi}"
        assert hi <= config["max_workers"], name
    assert "InstanceMarketOptions" not in head_type(config)["node_config"], "the head must be on demand"
    assert config["provider"]["cache_stopped_nodes"] is False, "spot nodes cannot be stopped and restarted"


def test_head_alone_carries_the_driver_resource(config):
    head = head_type(config)["resources"]
    custom = {k: v for k, v in head.items() if k not in NON_CUSTOM}
    assert custom and all(isinstance(v, int) and v >= 1 for v in custom.values()), head
    for name, w in gpu_types(config).items():
        assert not set(custom) & set(w.get("resources", {})), f"{name} must not offer {sorted(custom)}"


def test_spot_watcher_drains_with_a_valid_reason(config):
    from ray.core.generated import autoscaler_pb2

    watcher = [c for c in config["worker_start_ray_commands"] if "ray drain-node" in c]
    assert len(watcher) == 1 and "spot/instance-action" in watcher[0]
    reason = re.search(r"--reason[= ](\w+)", watcher[0]).group(1)
    assert reason == "DRAIN_NODE_REASON_PREEMPTION" and reason in autoscaler_pb2.DrainNodeReason.keys()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash(config):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in config.get(key, []):
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {cmd!r}: {r.stderr}"


def test_no_credentials(text, config):
    lowered = text.lower()
    for needle in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_credentials"):
        assert needle not in lowered, needle
    assert "AKIA" not in text and "ASIA" not in text
    assert "ssh_private_key" not in config.get("auth", {})
    for name, t in config["available_node_types"].items():
        assert "IamInstanceProfile" in t["node_config"], f"{name}: AWS access goes through an instance profile"
