"""gs:// end to end against a GCS JSON-API server on 127.0.0.1 (gcp-storage-emulator), reached through
STORAGE_EMULATOR_HOST as Google's client libraries reach an emulator (and TensorStore's GCS driver through
the relay that adds the generation header the emulator omits): the filesystem layer's operations, a dataset
tokenized bucket to bucket, and a training run whose output_dir is a gs:// bucket resumed from it, whose
weights are then read without the optimizer state."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow.fs as pafs
import pytest

import harness
from openllama import commands, files
from openllama.config import ConfigError
from openllama.data import pack
from openllama.data.shards import PackedDataset, write_dataset
from openllama.train import init_from
from openllama.train.checkpoint import RunDir, load_model
from openllama.train.config import load_config
from openllama.train.trainer import Hook, Trainer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
OPENLLAMA = str(Path(sys.executable).parent / "openllama")


def test_the_filesystem_layer_writes_reads_lists_and_removes_in_a_gcs_bucket(gcs_bucket, tmp_path):
    files.write_bytes(f"{gcs_bucket}/a/one.bin", bytes(range(256)))
    files.write_json(f"{gcs_bucket}/a/b/two.json", {"x": 1})
    assert files.read_bytes(f"{gcs_bucket}/a/one.bin") == bytes(range(256))
    with files.open_input(f"{gcs_bucket}/a/one.bin") as reader:  # a ranged read, as the loader makes them
        assert reader.read_at(4, 100) == bytes(range(100, 104))
    assert files.files_under(f"{gcs_bucket}/a") == [f"{gcs_bucket}/a/b/two.json", f"{gcs_bucket}/a/one.bin"]
    assert files.glob_files(f"{gcs_bucket}/a/*.bin") == [f"{gcs_bucket}/a/one.bin"]
    assert files.names_in(f"{gcs_bucket}/a") == ["b", "one.bin"]
    assert [files.kind(f"{gcs_bucket}/a/{n}") for n in ("one.bin", "b", "none")] == [
        pafs.FileType.File, pafs.FileType.Directory, pafs.FileType.NotFound]
    files.copy_tree(f"{gcs_bucket}/a", tmp_path / "down")
    assert files.read_json(tmp_path / "down" / "b" / "two.json") == {"x": 1}
    files.remove_tree(f"{gcs_bucket}/a")  # uploaded objects only: no folder marker to delete
    assert files.files_under(f"{gcs_bucket}/a") == [] and files.kind(f"{gcs_bucket}/a") == pafs.FileType.NotFound
    files.check_bucket(f"{gcs_bucket}/runs")
    with pytest.raises(commands.BadInput, match="does not exist"):
        files.check_bucket("gs://no-such-bucket-here/runs")


def test_a_dataset_tokenized_bucket_to_bucket_equals_a_local_build(gcs_server, gcs_bucket, sp_model, tmp_path):
    inputs = [SAMPLE / "stackexchange_sample.jsonl", SAMPLE / "book_sample.jsonl"]  # two subsets, 0.4 MB
    for path in inputs:
        files.copy_file(path, f"{gcs_bucket}/redpajama/{path.name}")
    done = harness.run([OPENLLAMA, "data", "tokenize", f"{gcs_bucket}/redpajama", "--out", f"{gcs_bucket}/dataset",
                        "--tokenizer", str(sp_model), "--seq-len", "32", "--val-fraction", "0.2", "--no-track"],
                       harness.clean_env(**gcs_server.env), timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    pack.tokenize_dataset([str(p) for p in inputs], sp_model, tmp_path, seq_len=32, val_fraction=0.2,
                              track=False)
    remote, local = PackedDataset.open(f"{gcs_bucket}/dataset", "train"), PackedDataset.open(str(tmp_path), "train")
    assert remote.subsets == local.subsets == ["book", "stackexchange"]
    for subset in local.subsets:
        assert remote.rows(subset) == local.rows(subset) > 0
        indices = np.arange(local.rows(subset))
        np.testing.assert_array_equal(remote.read(subset, indices), local.read(subset, indices))


class Losses(Hook):
    def __init__(self):
        self.by_step: dict[int, float] = {}

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.by_step[step] = metrics["loss"]


def test_a_run_in_a_gcs_bucket_resumes_from_its_newest_checkpoint(gcs_server, gcs_bucket, tmp_path):
    rows = np.random.default_rng(0).integers(2, 512, size=(32, 17))
    write_dataset(str(tmp_path / "data"), {("train", "c4"): rows, ("validation", "c4"): rows[:8]}, seq_len=16,
                  vocab_size=512)
    base = [*harness.short_run(tmp_path / "data", 16, 6, tmp_path / "jax_cache"), "checkpoint.every_steps=3",
            "optimizer.decay_steps=6", "tracking.enabled=false", f"checkpoint.staging_dir={tmp_path / 'staging'}"]

    def fit(*overrides: str) -> dict[int, float]:
        losses = Losses()
        Trainer(load_config("tiny-cpu", [*base, *overrides]), [losses]).fit()
        return losses.by_step

    reference = fit(f"output_dir={tmp_path / 'local'}")
    first = fit(f"output_dir={gcs_bucket}/runs", "train.steps=3")
    second = fit(f"output_dir={gcs_bucket}/runs")  # resumes from step 3 in the bucket
    assert sorted(second) == [4, 5, 6]
    assert {**first, **second} == pytest.approx(reference, abs=1e-5)
    run = RunDir(f"{gcs_bucket}/runs/tiny-cpu")
    assert [step for step, _ in run.complete_checkpoints()] == [3, 6]
    gcs_server.relay.reset()
    _, params, _ = load_model(f"{gcs_bucket}/runs/tiny-cpu")  # read from the bucket, as eval and export do
    weights = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(params))
    # the weights (and the database's index nodes, whose reads vary), not the optimizer state: that is twice more
    assert weights <= gcs_server.relay.response_bytes <= 1.5 * weights
    _, expected, _ = load_model(RunDir(tmp_path / "local" / "tiny-cpu").latest()[1])
    # and as a new run starting from it reads it (train.init_from=gs://...)
    run_config = load_config("tiny-cpu", base)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), expected)
    assert init_from.kind_of(f"{gcs_bucket}/runs/tiny-cpu") == "ours"
    start = init_from.load_params(f"{gcs_bucket}/runs/tiny-cpu", run_config.llama(), run_config.runtime(), target)
    for x, y, z in zip(jax.tree.leaves(params), jax.tree.leaves(start), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(z), atol=1e-5)
        np.testing.assert_allclose(np.asarray(y), np.asarray(z), atol=1e-5)
    with pytest.raises(ConfigError, match="copy a Hugging Face directory"):
        init_from.kind_of(f"{gcs_bucket}/hf-model")
