"""MLflow for every stage: where runs go, and a metrics logger that never stops training.

Without `MLFLOW_TRACKING_URI` runs go to a local sqlite file (`./mlruns.db`, artifacts in `./mlartifacts`),
so every command works with no server; with it, they go to that tracking server. Training logs through
`MetricsLogger`, which buffers, batches and retries, because a tracking server that is down for a minute
must not cost a week-long run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient

from openllama.config import flatten, hide_credentials, redact

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
# MLflow 3's UI opens an experiment in its GenAI view unless it is tagged as model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded default: a sqlite file in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(name: str, mlflow_client: MlflowClient | None = None) -> str:
    """The id of experiment `name`, created on first use (artifacts beside the sqlite file by default),
    tagged so that the MLflow UI shows it as model training."""
    mlflow_client = mlflow_client or client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        location = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created by a concurrent process in the meantime
        return mlflow_client.get_experiment_by_name(name).experiment_id


def params_of(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as MLflow params: flattened, secrets redacted, values cut to MLflow's limit."""
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in redact(flatten(config)).items()}


def start_run(
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> str:
    """Create a run, log its params and tags in one batch, and return its id."""
    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(experiment, mlflow_client), run_name=run_name, tags=tags or {})
    if params:
        mlflow_client.log_batch(
            run.info.run_id, params=[Param(k, v) for k, v in params_of(params).items()]
        )
    return run.info.run_id


@contextmanager
def run(
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> Iterator[str]:
    """A run for a short stage (data, eval): FINISHED on success, FAILED on an exception."""
    run_id = start_run(experiment, run_name, tags, params)
    try:
        yield run_id
    except BaseException:
        client().set_terminated(run_id, "FAILED")
        raise
    client().set_terminated(run_id, "FINISHED")


def log_summary(experiment: str, run_name: str | None, params: dict[str, Any], metrics: dict[str, float],
                tags: dict[str, str] | None = None, artifacts: tuple[Path, ...] = ()) -> str:
    """A finished run holding a stage's params, final figures (at step 0) and files, for stages that have no
    steps (data tokenize, data dedup, eval); returns its id."""
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    with run(experiment, run_name=run_name, tags=tags, params=params) as run_id:
        for start in range(0, len(values), 1000):  # MLflow's batch limit
            client().log_batch(run_id, metrics=values[start:start + 1000])
        for artifact in artifacts:
            client().log_artifact(run_id, str(artifact))
    return run_id


def log_dataset(run_id: str, name: str, source: str, digest: str, context: str,
                profile: dict[str, Any] | None = None) -> None:
    """Record that run `run_id` read a dataset, as an MLflow dataset input (the runs table's Dataset column).

    `source` is where it lives (a local path or a URI); `digest`, its content hash, is cut to the 36 characters
    MLflow keeps; `context` is MLflow's `training`, `evaluation`, ...; `profile` is shown with the dataset.
    """
    scheme = source.split("://", 1)[0] if "://" in source else "local"
    dataset = Dataset(name=name, digest=digest[:36], source_type={"gs": "gcs"}.get(scheme, scheme),
                      source=json.dumps({"uri": hide_credentials(source)}),
                      profile=json.dumps(profile) if profile is not None else None)
    client().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


# MLflow 3's UI opens an experiment in its GenAI view whatever the experiment's kind tag says; this query opens the
# Model training view (runs, metric charts, datasets), which is what this project's runs are
TRAINING_VIEW = "workflowType=machine_learning"


def ui_base() -> str | None:
    """The MLflow UI's address when the tracking store is a server (a sqlite file or folder has no UI)."""
    uri = tracking_uri()
    return hide_credentials(uri.rstrip("/")) if uri.startswith(("http://", "https://")) else None


def run_link(run_id: str) -> str | None:
    """The page of run `run_id` in the Model training view, or None without a server."""
    base = ui_base()
    if base is None:
        return None
    experiment = client().get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}?{TRAINING_VIEW}"


def experiment_link(name: str) -> str | None:
    """The runs table of experiment `name` in the Model training view, or None without a server or experiment."""
    base = ui_base()
    found = client().get_experiment_by_name(name) if base is not None else None
    return f"{base}/#/experiments/{found.experiment_id}?{TRAINING_VIEW}" if found is not None else None


def model_link(name: str, version: str) -> str | None:
    """The page of a registered model's version, or None without a server."""
    base = ui_base()
    return f"{base}/#/models/{name}/versions/{version}?{TRAINING_VIEW}" if base is not None else None


def is_permanent(error: Exception) -> bool:
    """An answer from the server that no retry changes (the run does not exist, the request is invalid),
    as opposed to the server being unreachable or overloaded."""
    code = getattr(error, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED", "BAD_REQUEST")


def run_exists(run_id: str) -> bool | None:
    """Whether the current tracking server has run `run_id`; None when it cannot be reached to ask."""
    try:
        client().get_run(run_id)
        return True
    except Exception as error:
        return False if is_permanent(error) else None


class MetricsLogger:
    """Per-step metrics for one run, logged in batches; kept in memory and retried while MLflow is down.

    Steps at or below `skip_through` are dropped: after a restart they were already logged by the attempt
    that crashed, so a resumed run has each step exactly once.
    """

    def __init__(self, run_id: str, flush_every: int = 10, skip_through: int = -1):
        self.run_id = run_id
        self.flush_every = flush_every
        self.skip_through = skip_through
        self.pending: list[Metric] = []
        self.steps_pending = 0

    @classmethod
    def resume(cls, run_id: str, key: str = "loss", flush_every: int = 10) -> MetricsLogger:
        """A logger that skips the steps MLflow already has for `key` (the newest logged step and before)."""
        try:
            history = client().get_metric_history(run_id, key)
            last = max((m.step for m in history), default=-1)
        except Exception as error:  # server down at restart: log everything, MLflow keeps the newest value
            log.warning("MLflow unreachable while resuming run %s (%s); not deduplicating steps", run_id, error)
            last = -1
        return cls(run_id, flush_every, skip_through=last)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.steps_pending += 1
        if self.steps_pending >= self.flush_every:
            self.flush()

    def flush(self, retries: int = 0, wait_s: float = 2.0) -> bool:
        """Send what is pending; on failure keep it for the next flush. True when nothing is left pending."""
        for attempt in range(retries + 1):
            try:
                mlflow_client = client()
                while self.pending:  # in MLflow's batch size; what went through leaves the buffer at once
                    mlflow_client.log_batch(self.run_id, metrics=self.pending[:1000])
                    self.pending = self.pending[1000:]
                self.steps_pending = 0
                return True
            except Exception as error:
                if is_permanent(error):  # no retry changes this answer: say it once, drop what cannot be sent
                    log.error("MLflow refused the metrics of run %s (%s); %d metrics dropped", self.run_id, error,
                              len(self.pending))
                    self.pending, self.steps_pending = [], 0
                    return False
                log.warning("MLflow log_batch failed (%s); %d metrics buffered", error, len(self.pending))
                if attempt < retries:
                    time.sleep(wait_s)
        return False
