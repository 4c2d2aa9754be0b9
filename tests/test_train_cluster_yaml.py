"""ray_cluster.yaml is a real cluster-launcher config: Ray's own schema accepts it, and it opens nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_the_cluster_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # fills Ray's GCP defaults, then checks ray-schema.json


def test_cluster_has_tpu_v4_worker_types(cluster):
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert workers and all(t["node_config"]["acceleratorConfig"]["type"] == "V4" for t in workers)


def test_no_node_gets_an_external_ip(cluster):
    assert cluster["provider"]["use_internal_ips"] is True
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    assert all("accessConfigs" not in nic for nic in head["networkInterfaces"])
    for node_type in cluster["available_node_types"].values():
        if "acceleratorConfig" in node_type["node_config"]:
            assert node_type["node_config"]["networkConfig"]["enableExternalIps"] is False


def test_services_bind_to_loopback_only(cluster):
    commands = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    assert "mlflow server --host 127.0.0.1" in commands
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_setup_installs_the_project(cluster):
    assert any("pip install -e ~/openllama-ray" in c for c in cluster["setup_commands"])


PRESETS = ["openllama-3b", "openllama-7b", "openllama-13b"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_node_type_for_its_slice_that_agrees_with_it(cluster, preset):
    from openllama.train.config import load_config
    from openllama.train.tpu import slice_of

    config = load_config(preset)
    tpu = slice_of(config.scaling.accelerator_type, config.scaling.topology)
    types = [t for t in cluster["available_node_types"].values()
             if t["node_config"].get("acceleratorConfig", {}).get("topology") == config.scaling.topology]
    assert len(types) == 1, f"no node type with topology {config.scaling.topology} for {preset}"
    (node_type,) = types
    assert node_type["node_config"]["acceleratorConfig"]["type"] == config.scaling.accelerator_type.split("-")[1]
    assert node_type["resources"]["TPU"] == tpu.chips_per_host
    topology_chips = np.prod([int(n) for n in node_type["node_config"]["acceleratorConfig"]["topology"].split("x")])
    assert topology_chips == tpu.chips == tpu.hosts * tpu.chips_per_host
    assert config.scaling.num_workers == tpu.hosts


@pytest.mark.parametrize("preset", PRESETS)
def test_ray_train_accepts_every_presets_scaling(preset):
    from ray.train import ScalingConfig

    from openllama.train.config import load_config

    s = load_config(preset).scaling
    scaling = ScalingConfig(num_workers=s.num_workers, use_tpu=s.use_tpu, topology=s.topology,
                            accelerator_type=s.accelerator_type)
    assert scaling.resources_per_worker["TPU"] == 4


def test_a_worker_count_that_is_not_one_per_host_is_refused_before_ray_sees_it():
    from openllama.config import ConfigError
    from openllama.train.config import load_config

    with pytest.raises(ConfigError, match=r"scaling.num_workers=128 but topology 4x8x8 \(v4-512\) is 256 chips on "
                                          r"64 hosts of 4: set scaling.num_workers=64"):
        load_config("openllama-7b", ["scaling.num_workers=128"])
