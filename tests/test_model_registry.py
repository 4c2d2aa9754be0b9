"""MLflow's model registry: a training run's final model (and `export-hf --register`) becomes the next version of
the run's name, linked to the training run, and `mlflow.transformers.load_model("models:/NAME/VERSION")` gives
back a model and tokenizer that generate what the Hugging Face export generates, token for token.

One real `openllama train` (2 steps, registering) as a client of the session's Ray head, against the session's
real MLflow server; everything after reads or registers what it left.
"""

from __future__ import annotations

import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness
from openllama.cli import main as cli
from openllama.services import free_port
from openllama.train.checkpoint import RunDir, save_model
from openllama.train.config import TrainConfig, load_config
from openllama.train.convert.hf import export_hf
from openllama.train.model import LlamaConfig, init_params
from openllama.training import register_final_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
PROMPTS = ["Q: What is the largest animal?\nA:", " one leading space", "def f(x):\n    return x + 1\n"]


@dataclass
class Trained:
    config: TrainConfig
    run_id: str
    checkpoint: Path
    output: str  # what `openllama train` printed and logged

    @property
    def name(self) -> str:
        return self.config.name


@pytest.fixture(scope="module")
def trained(ray_head, mlflow_server, sp_model, tmp_path_factory) -> Trained:
    """`openllama train tiny-cpu` for 2 steps with tracking.register_model=true, on a few sample documents."""
    root = tmp_path_factory.mktemp("registry")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(SAMPLE.glob("*.jsonl")):
        corpus.joinpath(path.name).write_text("".join(path.read_text().splitlines(keepends=True)[:8]))
    overrides = [
        f"name=registry-{uuid.uuid4().hex[:8]}", f"output_dir={root / 'runs'}", f"data.path={root / 'data'}",
        f"data.tokenizer={sp_model}", f"data.build_from={corpus}", "train.steps=2", "train.seq_len=32",
        "train.global_batch_size=4", "train.log_every=1", "optimizer.warmup_steps=1", "checkpoint.every_steps=2",
        "eval.every_steps=0", "eval.tasks=[]", "tracking.system_metrics_every_s=0", "tracking.register_model=true",
        "device.peak_flops=1e11",
    ]
    env = harness.clean_env(**ray_head.env, MLFLOW_TRACKING_URI=mlflow_server.uri)
    done = harness.run([sys.executable, "-m", "openllama.cli", "train", "tiny-cpu", *overrides], env, timeout=600,
                       cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    config = load_config("tiny-cpu", overrides)
    run = RunDir(config.run_dir)
    return Trained(config, run.tracking_run_id(), run.latest()[1], done.stdout + done.stderr)


@pytest.fixture(autouse=True)
def tracking_server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


def server_that_is_down(monkeypatch) -> str:
    """A tracking URI nothing listens on, asked once (MLflow's own retries would wait minutes)."""
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return uri


def test_training_registers_its_final_model_as_version_1_of_the_run_name_linked_to_the_run(trained, client):
    version = client.get_model_version(trained.name, "1")
    assert version.run_id == trained.run_id
    assert version.tags["checkpoint"] == str(trained.checkpoint) and version.tags["checkpoint_step"] == "2"
    assert f"registered models:/{trained.name}/1" in trained.output
    assert not list(trained.config.run_dir.glob(".register-*"))  # the temporary export is gone


def test_the_registered_model_generates_what_the_export_generates_token_for_token(trained, tmp_path):
    import mlflow.transformers

    hf_dir = export_hf(trained.checkpoint, tmp_path / "hf")
    direct = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    direct_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    registered = mlflow.transformers.load_model(f"models:/{trained.name}/1", return_type="components")
    for prompt in PROMPTS:
        ids = direct_tokenizer(prompt, return_tensors="pt").input_ids
        assert registered["tokenizer"](prompt, return_tensors="pt").input_ids.tolist() == ids.tolist(), prompt
        with torch.no_grad():
            theirs = direct.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
            ours = registered["model"].generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert ours.tolist() == theirs.tolist(), prompt

    pipeline = mlflow.transformers.load_model(f"models:/{trained.name}/1")
    text = pipeline(PROMPTS[0], max_new_tokens=16, do_sample=False)[0]["generated_text"]
    ids = direct_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    expected = direct.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0]
    assert text == direct_tokenizer.decode(expected, skip_special_tokens=True)


def test_export_hf_register_makes_version_2_linked_to_the_training_run(trained, client, tmp_path, capsys):
    assert cli(["export-hf", str(trained.config.run_dir), str(tmp_path / "hf"), "--register"]) == 0
    assert f"registered models:/{trained.name}/2 " in capsys.readouterr().out
    assert client.get_model_version(trained.name, "2").run_id == trained.run_id
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_register_without_a_tracking_uri_is_bad_input_naming_it(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert cli(["export-hf", str(trained.config.run_dir), str(tmp_path / "hf"), "--register"]) == 2
    err = capsys.readouterr().err.strip()
    assert "MLFLOW_TRACKING_URI" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_register_against_a_server_that_is_down_fails_in_one_line_and_writes_nothing(trained, tmp_path,
                                                                                       monkeypatch, capsys):
    uri = server_that_is_down(monkeypatch)
    assert cli(["export-hf", str(trained.config.run_dir), str(tmp_path / "hf"), "--register", "other"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{uri} cannot be reached" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_register_refuses_a_checkpoint_that_no_training_run_made(tmp_path, capsys):
    config = LlamaConfig.preset("tiny")
    ckpt = save_model(tmp_path / "ckpt", init_params(config, seed=0), config)
    assert cli(["export-hf", str(ckpt), str(tmp_path / "hf"), "--register", "imported"]) == 2
    assert "not a checkpoint of a tracked training run" in capsys.readouterr().err


def test_a_registration_that_fails_after_training_is_one_logged_line_and_keeps_the_checkpoint(trained, monkeypatch,
                                                                                               caplog):
    server_that_is_down(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="openllama.train"):
        assert register_final_model(trained.config, trained.run_id, trained.checkpoint) is None
    errors = [r.getMessage() for r in caplog.records if r.name == "openllama.train"]
    assert len(errors) == 1 and "is not registered" in errors[0] and "--register" in errors[0]
    assert "\n" not in errors[0]
    assert RunDir(trained.config.run_dir).latest()[1] == trained.checkpoint and trained.checkpoint.is_dir()
    assert not list(trained.config.run_dir.glob(".register-*"))

