"""MLflow for every stage: experiments the UI opens as model training, runs with redacted params."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from openllama import tracking


def test_a_new_experiment_is_tagged_as_model_training(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = tracking.start_run("openllama-train", params={"db": {"password": "hunter2"}, "steps": 3})
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("openllama-train")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_run(run_id).data.params == {"db.password": "***", "steps": "3"}


def test_an_experiment_made_elsewhere_is_tagged_when_first_used(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    made = client.create_experiment("eval")
    assert tracking.experiment_id("eval") == made
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"
