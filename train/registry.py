"""MLflow's model registry: a training run's model as a transformers-flavor MLflow model, one version per
registration, linked to the run that trained it.

`mlflow.transformers.load_model("models:/NAME/VERSION")` then gives a text-generation pipeline (with
`return_type="components"`, the model and tokenizer) that computes what the Hugging Face export it was
logged from computes. The model is logged from the export loaded into transformers: MLflow 3.17's other
form, a checkpoint folder's path, fails under transformers 5 (it reads a pipeline class that transformers 5
names by a string). The logged model belongs to the training run's experiment, with the run as its source,
so the version's `run_id` is the training run's id.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from openllama import tracking
from openllama.commands import BadInput, WorkFailed
from openllama.train.checkpoint import DEFAULT_STAGING, RunDir, checkpoint_step, resolve

TASK = "text-generation"
TRACKING_URI = "MLFLOW_TRACKING_URI"
# What loading the model needs, pinned to this environment. MLflow's own default list adds torchvision,
# which a text model does not use and whose absence makes that list fail.
REQUIREMENTS = ("transformers", "torch", "tokenizers", "safetensors", "sentencepiece")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: `uri` is what `mlflow.transformers.load_model` takes."""

    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def one_line(error: BaseException) -> str:
    """An MLflow or HTTP error as one line (some carry a server's whole response)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:400] + "..."


def training_run(ckpt: str | Path) -> tuple[Path, RunDir, str]:
    """(checkpoint, its run directory, the run's MLflow id) for a checkpoint that can be registered.

    A version is linked to the run that trained the weights, so only a training run's checkpoint (or the
    run directory, meaning its newest) qualifies, on the tracking server that has that run.
    """
    if not os.environ.get(TRACKING_URI):
        raise BadInput(f"registering a model needs {TRACKING_URI}: set it to the tracking server of the "
                       "training run (the registry lives there)")
    checkpoint = resolve(ckpt)
    run = RunDir.of_checkpoint(checkpoint)
    run_id = run.tracking_run_id() if run is not None else None
    if run is None or run_id is None:
        raise BadInput(f"{checkpoint} is not a checkpoint of a tracked training run (its run directory records no "
                       f"{RunDir.RUN_ID_FILE}); a registered version is linked to the run that trained it")
    found = tracking.run_exists(run_id)
    if found is None:
        raise WorkFailed(f"the tracking server {os.environ[TRACKING_URI]} cannot be reached; nothing was written, "
                         "rerun when it is up")
    if not found:
        raise BadInput(f"the tracking server {os.environ[TRACKING_URI]} has no MLflow run {run_id}, which {run.path} "
                       f"records; set {TRACKING_URI} to the server that tracked the training")
    return checkpoint, run, run_id


def pinned_requirements() -> list[str]:
    """REQUIREMENTS at their installed versions; a local label (torch's +cpu) is dropped, PyPI has none."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def register_export(hf_dir: str | Path, name: str, run_id: str, checkpoint: Path) -> ModelVersion:
    """Log the Hugging Face folder `hf_dir` (as `export-hf` writes it) as a model of MLflow run `run_id` and
    register it as the next version of `name`, tagged with the checkpoint (and step) it was exported from.

    Raises WorkFailed, one line, when MLflow does not take it (the server is down, the name is refused).
    """
    try:
        # the flavor's packages (torch among them), imported (seconds) only when registering
        import mlflow.transformers
        import transformers
    except ImportError as error:
        raise BadInput(f"registering a model needs transformers and torch ({error}): "
                       "pip install 'transformers>=5,<6' torch") from None
    # an absolute path: MLflow looks a model's name up on the Hugging Face hub, and a path is no hub name
    hf_dir = Path(hf_dir).absolute()
    step = checkpoint_step(checkpoint)
    tags = {"checkpoint": str(checkpoint), **({"checkpoint_step": str(step)} if step is not None else {})}
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    try:
        client = tracking.client()
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name,
                                            source_run_id=run_id, tags=tags)
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, task=TASK, torch_dtype=model.dtype, model_id=logged.model_id,
            run_id=run_id, step=step or 0, tags=tags, registered_model_name=name,
            pip_requirements=pinned_requirements(),
        )
    except Exception as error:
        raise WorkFailed(f"registering {checkpoint} as model {name!r} on {tracking.tracking_uri()} failed: "
                         f"{one_line(error)}") from error
    return ModelVersion(name, str(info.registered_model_version))


MODEL_URI = re.compile(r"^models:/(?P<name>[^/]+)/(?P<version>\d+)$")


def parse_model_uri(uri: str) -> ModelVersion | None:
    """`models:/NAME/VERSION` as the version it names; None for anything else (a path)."""
    match = MODEL_URI.match(uri)
    return ModelVersion(match["name"], match["version"]) if match else None


def checkpoint_of(version: ModelVersion, staging: Path = DEFAULT_STAGING) -> Path:
    """A checkpoint of this machine holding `version`'s weights, for serving and evaluating a registered model.

    That is the checkpoint it was exported from (its `checkpoint` tag) wherever that can still be read from
    here (a bucket, a shared folder), which keeps its SentencePiece tokenizer. Otherwise the logged Hugging Face
    weights are downloaded and imported (`convert.hf.import_hf`) into `staging`, once per version; the flavor
    logs the tokenizer as tokenizer.json only, so such a checkpoint has no tokenizer.model of its own.
    """
    try:
        registered = tracking.client().get_model_version(version.name, version.version)
    except Exception as error:
        raise BadInput(f"{version.uri}: no such version in the registry of {tracking.tracking_uri()} "
                       f"({one_line(error)})") from None
    exported_from = registered.tags.get("checkpoint")
    if exported_from:
        try:
            return resolve(exported_from)
        except FileNotFoundError:
            pass  # the checkpoint is gone or on another machine: the logged weights remain
    imported = staging / "registry" / version.name / version.version
    if imported.is_dir():
        return imported
    import mlflow.artifacts  # here: MLflow's artifact client (a second or two), only when weights are downloaded

    from openllama.train.convert.hf import import_hf  # here: convert.hf imports this module (export --register)

    with tempfile.TemporaryDirectory(prefix="openllama-registry-") as folder:
        try:
            logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=folder))
        except Exception as error:
            raise WorkFailed(f"downloading {version.uri} from {tracking.tracking_uri()} failed: "
                             f"{one_line(error)}") from error
        imported.parent.mkdir(parents=True, exist_ok=True)
        try:
            return import_hf(logged / "model", imported)
        except FileExistsError:  # another replica on this machine imported it first
            return imported
