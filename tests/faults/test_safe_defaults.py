"""Safe defaults: credentials never reach MLflow or the logs in clear (through a real training run), and any
Ray cluster launcher YAML in the repository opens no port to the internet."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-pw-91c4"


@pytest.fixture(scope="module")
def run_with_credentials(packed, mlflow_server, tmp_path_factory):
    """A 2-step training run whose tracking URI carries a password (`http://alice:PASSWORD@host`), driven
    like `openllama train` drives it (MLflow run opened, trained, finished with its artifacts), minus Ray."""
    from openllama.train.config import load_config
    from openllama.train.launch import TrackingHook, finish_tracking_run, open_tracking_run
    from openllama.train.trainer import Trainer

    out = tmp_path_factory.mktemp("credentials")
    uri = mlflow_server.uri.replace("http://", f"http://alice:{SECRET}@")
    config = load_config("tiny-cpu", [
        f"data.path={packed.path}", f"output_dir={out}", "train.steps=2", "train.seq_len=32",
        "train.global_batch_size=8", "train.log_every=1", "optimizer.warmup_steps=1", "checkpoint.every_steps=2",
        "eval.every_steps=0", "device.peak_flops=1e11", f"tracking.uri={uri}",
    ])
    handler, root = _Collect(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        try:
            run_id = open_tracking_run(config)
            Trainer(config, [TrackingHook(run_id, config)]).fit()
            finish_tracking_run(config, run_id, succeeded=True)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
    return {"run_id": run_id, "logs": "\n".join(handler.lines), "out": out}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_a_password_in_the_tracking_uri_never_reaches_mlflow_params_or_tags(run_with_credentials, mlflow_server,
                                                                           fault_report):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.uri).get_run(run_with_credentials["run_id"])
    leaked = {k: v for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v}
    assert leaked == {}
    fault_report.fault = "safe default: password in tracking.uri"
    fault_report.happened = "MLflow params/tags, config artifact and logs hold no password"
    fault_report.lost = "n/a"


def test_a_password_in_the_tracking_uri_never_reaches_the_config_artifact(run_with_credentials, mlflow_server,
                                                                         tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    path = client.download_artifacts(run_with_credentials["run_id"], "config", str(tmp_path))
    texts = [p.read_text() for p in Path(path).rglob("*") if p.is_file()]
    assert texts and not any(SECRET in text for text in texts)


def test_a_password_in_the_tracking_uri_never_reaches_the_logs(run_with_credentials):
    assert run_with_credentials["logs"], "no log lines were captured"
    assert SECRET not in run_with_credentials["logs"]


# --- cluster launcher YAML -------------------------------------------------------------------------------


SKIP_DIRS = {".git", ".venv", ".demo", "runs", "outputs", "mlruns", "node_modules"}


def cluster_yamls() -> list[Path]:
    """Ray cluster launcher configs in the repository (YAML with `cluster_name` and `provider`)."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if not name.endswith((".yaml", ".yml")):
                continue
            path = Path(folder) / name
            try:
                loaded = yaml.safe_load(path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            if isinstance(loaded, dict) and "cluster_name" in loaded and "provider" in loaded:
                found.append(path)
    return sorted(found)


OPEN_TO_ALL = re.compile(r"0\.0\.0\.0/0|::/0")
PUBLIC_BIND = re.compile(r"--(dashboard-host|node-ip-address|ray-client-server-host|host)[= ]0\.0\.0\.0")


def node_configs(cluster: dict) -> list[dict]:
    return [t.get("node_config") or {} for t in (cluster.get("available_node_types") or {}).values()]


@pytest.mark.parametrize("path", cluster_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_cluster_yaml_opens_no_port_to_the_internet(path, fault_report):
    text = path.read_text()
    cluster = yaml.safe_load(text)
    assert not OPEN_TO_ALL.search(text), f"{path}: a firewall rule open to every address"
    assert not PUBLIC_BIND.search(text), f"{path}: a service bound to 0.0.0.0"
    assert cluster["provider"].get("use_internal_ips") is True, f"{path}: provider.use_internal_ips is not true"
    for node in node_configs(cluster):
        assert not any(i.get("accessConfigs") for i in node.get("networkInterfaces", [])), f"{path}: external IP"
        assert (node.get("networkConfig") or {}).get("enableExternalIps") is not True, f"{path}: external IPs"
    fault_report.fault = "safe default: cluster launcher YAML"
    fault_report.happened = f"{path.name}: internal IPs only, no 0.0.0.0/0 rule, no service on 0.0.0.0"
    fault_report.lost = "n/a"
