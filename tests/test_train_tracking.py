"""A training run's MLflow record: one per run directory, replaced when the tracking server does not have it."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from openllama import tracking
from openllama.train.checkpoint import RunDir
from openllama.train.config import load_config
from openllama.train.launch import open_tracking_run


def test_a_recorded_run_that_the_server_does_not_have_is_replaced_once_and_tagged(tmp_path, monkeypatch, caplog):
    config = load_config("tiny-cpu", [f"output_dir={tmp_path / 'runs'}"])
    first_store = f"sqlite:///{tmp_path / 'first.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first_store)
    first = open_tracking_run(config)
    assert open_tracking_run(config) == first  # the same server: the same run, resumed

    second_store = f"sqlite:///{tmp_path / 'second.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", second_store)
    second = open_tracking_run(config)
    assert second != first and RunDir(config.run_dir).tracking_run_id() == second
    tags = MlflowClient(second_store).get_run(second).data.tags
    assert tags["openllama.run_dir"] == str(config.run_dir) and tags["openllama.replaces_run"] == first
    assert sum(f"has no run {first}" in r.getMessage() for r in caplog.records) == 1


def test_metrics_for_a_run_the_server_refuses_are_dropped_at_once_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    tracking.experiment_id("openllama-train")
    logger = tracking.MetricsLogger("0123456789abcdef0123456789abcdef", flush_every=100)
    logger.log(1, {"loss": 2.0})
    started = time.perf_counter()
    assert logger.flush(retries=30, wait_s=10.0) is False
    assert time.perf_counter() - started < 5 and logger.pending == []
