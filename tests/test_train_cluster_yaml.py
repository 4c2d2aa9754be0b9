"""ray_cluster.yaml is a real cluster-launcher config: Ray's own schema accepts it, and it opens nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_the_cluster_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # fills Ray's GCP defaults, then checks ray-schema.json


def test_cluster_has_a_tpu_v4_worker_type(cluster):
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert any(t["node_config"]["acceleratorType"].startswith("v4-") for t in workers)


def test_no_node_gets_an_external_ip(cluster):
    assert cluster["provider"]["use_internal_ips"] is True
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    assert all("accessConfigs" not in nic for nic in head["networkInterfaces"])
    for node_type in cluster["available_node_types"].values():
        if "acceleratorType" in node_type["node_config"]:
            assert node_type["node_config"]["networkConfig"]["enableExternalIps"] is False


def test_services_bind_to_loopback_only(cluster):
    commands = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    assert "mlflow server --host 127.0.0.1" in commands
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_setup_installs_the_project(cluster):
    assert any("pip install -e ~/openllama-ray" in c for c in cluster["setup_commands"])
