"""Buckets end to end against a real S3-protocol server on 127.0.0.1 (moto), reached through the standard
AWS environment: tokenizer and dataset built from s3:// into s3://, training reading its shards and
tokenizer from s3://, rows read one by one, and the secret key seen nowhere it could leak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import harness
from object_store import SECRET_KEY
from openllama import files
from openllama.data.shards import PackedDataset
from openllama.train.checkpoint import RunDir
from openllama.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
OPENLLAMA = str(Path(sys.executable).parent / "openllama")
SEQ_LEN = 32


def cli(s3_server, *args: str, tracking_uri: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """An `openllama` command with its own in-process Ray, the S3 settings in its environment only."""
    env = harness.clean_env(**s3_server.env, **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}))
    return harness.run([OPENLLAMA, *args], env, timeout=timeout, cwd=REPO)


def valid_documents(folder: Path) -> int:
    """Lines of the corpus that are JSON objects with a non-blank string `text`, counted without our reader."""
    count = 0
    for path in folder.glob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            count += isinstance(record, dict) and isinstance(record.get("text"), str) and bool(record["text"].strip())
    return count


@pytest.fixture(scope="module")
def built(s3_server, mlflow_server) -> dict:
    """The sample corpus uploaded to a bucket, then tokenizer and dataset built bucket to bucket by the CLI."""
    root = f"s3://{s3_server.new_bucket()}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        for path in sorted(SAMPLE.glob("*.jsonl")):
            files.copy_file(path, f"{root}/redpajama/{path.name}")
    tokenizer = cli(s3_server, "tokenizer", "train", f"{root}/redpajama", "--out", f"{root}/tokenizer",
                    "--vocab-size", "512", "--sample-docs", "300", tracking_uri=mlflow_server.uri)
    assert tokenizer.returncode == 0, tokenizer.stderr[-3000:]
    data = cli(s3_server, "data", "tokenize", f"{root}/redpajama", "--tokenizer", f"{root}/tokenizer/tokenizer.model",
               "--out", f"{root}/dataset", "--seq-len", str(SEQ_LEN), "--val-fraction", "0.2",
               "--span-bytes", "200000", tracking_uri=mlflow_server.uri)
    assert data.returncode == 0, data.stderr[-3000:]
    return {"root": root, "outputs": [tokenizer, data]}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)


def test_a_dataset_built_bucket_to_bucket_holds_every_document_once(built, s3_env):
    manifest = files.read_json(f"{built['root']}/dataset/manifest.json")
    assert manifest["finished"] is True
    assert manifest["stats"]["total"]["documents"] == valid_documents(SAMPLE)
    units = files.files_under(f"{built['root']}/dataset/units")
    assert len([u for u in units if u.endswith(".json")]) > len(list(SAMPLE.glob("*.jsonl")))  # files were split
    assert files.is_file(f"{built['root']}/tokenizer/tokenizer_settings.json")


def test_rows_read_from_the_bucket_equal_the_same_rows_read_from_a_local_copy(built, s3_env, tmp_path):
    remote_root = f"{built['root']}/dataset"
    for location in files.files_under(remote_root):
        files.copy_file(location, tmp_path / location.removeprefix(remote_root + "/"))
    remote, local = PackedDataset.open(remote_root, "train"), PackedDataset.open(tmp_path, "train")
    rng = np.random.default_rng(0)
    for subset in remote.subsets:
        indices = rng.integers(0, remote.rows(subset), size=16)
        np.testing.assert_array_equal(remote.read(subset, indices), local.read(subset, indices))


def test_training_reads_its_shards_and_tokenizer_from_the_bucket(built, s3_server, s3_env, tmp_path, mlflow_server):
    overrides = [*harness.short_run(f"{built['root']}/dataset", SEQ_LEN, 4, tmp_path / "jax_cache"),
                 f"data.tokenizer={built['root']}/tokenizer/tokenizer.model", f"output_dir={tmp_path}",
                 "scaling.num_workers=1"]
    done = cli(s3_server, "train", "tiny-cpu", *overrides, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stderr[-4000:]
    built["outputs"].append(done)
    step, checkpoint = RunDir(load_config("tiny-cpu", overrides).run_dir).latest()
    assert step == 4
    assert (Path(checkpoint) / "tokenizer.model").read_bytes() == \
        files.read_bytes(f"{built['root']}/tokenizer/tokenizer.model")


def test_the_secret_key_reaches_no_output_manifest_or_mlflow(built, s3_env, mlflow_server):
    from mlflow.tracking import MlflowClient

    for done in built["outputs"]:
        assert SECRET_KEY not in done.stdout + done.stderr
    for location in files.files_under(built["root"]):
        if location.endswith((".json", ".txt", ".yaml")):
            assert SECRET_KEY not in files.read_bytes(location).decode("utf-8", "replace"), location
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(run.data.params.get("out_dir", "").startswith("s3://") for run in runs)
    for run in runs:
        assert SECRET_KEY not in json.dumps([run.data.params, run.data.tags])


def test_a_location_with_credentials_in_it_is_refused_without_echoing_them(s3_server, sp_model, tmp_path):
    done = cli(s3_server, "data", "tokenize", f"s3://key:{SECRET_KEY}@bucket/redpajama", "--tokenizer", str(sp_model),
               "--out", str(tmp_path / "out"), "--no-track")
    assert done.returncode == 2
    assert "environment" in done.stderr and SECRET_KEY not in done.stdout + done.stderr


def test_a_missing_input_in_a_bucket_is_one_line_naming_it(s3_server, sp_model, tmp_path):
    bucket = s3_server.new_bucket()
    done = cli(s3_server, "data", "tokenize", f"s3://{bucket}/nothing-here", "--tokenizer", str(sp_model),
               "--out", str(tmp_path / "out"), "--no-track")
    assert done.returncode == 2
    assert f"s3://{bucket}/nothing-here" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
