"""`train.init_from`: a run starts from existing weights (ours, Hugging Face, EasyLM), and resumes from its own.

With a learning rate of 0 the weights come back unchanged, so a trained-for-two-steps checkpoint must hold
exactly the source's parameters and give the source model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from openllama.config import ConfigError
from openllama.train.checkpoint import MODEL_JSON, RunDir, load_model, read_config
from openllama.train.config import load_config
from openllama.train.convert.easylm import export_easylm
from openllama.train.convert.hf import import_hf
from openllama.train.model import Llama, LlamaConfig, unstack_layers
from openllama.train.trainer import Hook, Trainer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
FROZEN = ["optimizer.peak_lr=0", "optimizer.end_lr=0", "optimizer.warmup_steps=1", "train.steps=2",
          "train.global_batch_size=4", "train.seq_len=32", "checkpoint.every_steps=2", "eval.every_steps=0",
          "tracking.enabled=false", "device.peak_flops=1e11"]


@pytest.fixture(scope="module")
def dataset(sp_model, tmp_path_factory) -> Path:
    from openllama.data.pack import tokenize_dataset

    out = tmp_path_factory.mktemp("init") / "data"
    tokenize_dataset([str(SAMPLE / "wikipedia_sample.jsonl")], str(sp_model), str(out), seq_len=32, track=False)
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    """A random LlamaForCausalLM of the tiny preset's shape (vocab 512, hidden 64, 2 layers, 4 heads)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def train(dataset: Path, out: Path, source: str, *extra: str, hooks=()) -> Path:
    config = load_config("tiny-cpu", [f"data.path={dataset}", f"output_dir={out}", f"train.init_from={source}",
                                      *FROZEN, *extra])
    Trainer(config, hooks).fit()
    return RunDir(config.run_dir).latest()[1]


def test_a_run_from_a_hugging_face_model_keeps_its_logits_with_a_zero_learning_rate(dataset, hf_model, tmp_path):
    hf_dir, model = hf_model
    trained = train(dataset, tmp_path, str(hf_dir))
    config, params, _ = load_model(trained)
    ids = np.random.default_rng(0).integers(3, 512, (2, 16))
    ours = np.asarray(Llama(config).apply({"params": params}, jax.numpy.asarray(ids))[0])
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_a_run_from_our_checkpoint_and_from_an_easylm_file_holds_their_exact_parameters(dataset, hf_model,
                                                                                          tmp_path):
    source = import_hf(hf_model[0], tmp_path / "imported")
    easylm_file = export_easylm(source, tmp_path / "easylm.stream")
    _, expected, _ = load_model(source)
    for name, spec in (("ours", str(source)), ("easylm", f"params::{easylm_file}")):
        _, params, _ = load_model(train(dataset, tmp_path / name, spec))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_a_restarted_run_resumes_from_its_own_checkpoint_not_from_the_weights(dataset, hf_model, tmp_path):
    class FirstStep(Hook):
        def on_start(self, step: int) -> None:
            self.step = step

    learning = ["optimizer.peak_lr=1e-2", "optimizer.end_lr=1e-3"]
    train(dataset, tmp_path, str(hf_model[0]), *learning)
    first = FirstStep()
    resumed = train(dataset, tmp_path, str(hf_model[0]), *learning, "train.steps=4", hooks=[first])
    assert first.step == 2 and json.loads((resumed / "state.json").read_text())["step"] == 4


def test_weights_of_another_architecture_are_refused_naming_the_field(dataset, hf_model, tmp_path):
    config = load_config("tiny-cpu", [f"data.path={dataset}", f"output_dir={tmp_path}",
                                      f"train.init_from={hf_model[0]}", "model.overrides={num_hidden_layers: 3}",
                                      *FROZEN])
    with pytest.raises(ConfigError, match=r"has num_hidden_layers=2 but the run's model has num_hidden_layers=3"):
        Trainer(config)


def test_a_source_that_is_no_model_is_refused(dataset, tmp_path):
    config = load_config("tiny-cpu", [f"data.path={dataset}", f"output_dir={tmp_path}",
                                      f"train.init_from={tmp_path}", *FROZEN])
    with pytest.raises(ConfigError, match="neither one of our checkpoints"):
        Trainer(config)


def test_a_run_that_scans_its_blocks_starts_from_weights_and_saves_them_per_layer(dataset, hf_model, tmp_path):
    hf_dir, model = hf_model
    config, params, _ = load_model(train(dataset, tmp_path, str(hf_dir), "model.scan_layers=true"))
    assert "layers_1" in params and "layers" not in params  # a checkpoint's tree, whatever the run's layout
    ids = np.random.default_rng(0).integers(3, 512, (2, 16))
    ours = np.asarray(Llama(config).apply({"params": params}, jax.numpy.asarray(ids))[0])
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_a_step_a_scanning_run_saved_restores_into_either_layout_exactly(dataset, hf_model, tmp_path):
    learning = ["optimizer.peak_lr=1e-2", "optimizer.end_lr=1e-3"]
    saved = train(dataset, tmp_path, str(hf_model[0]), "model.scan_layers=true", *learning)
    _, expected, _ = load_model(saved)

    def restored(scan: bool) -> tuple[dict, dict]:
        """(params, Adam's first moment) that a run of this layout resumes with, one tree per layer."""
        config = load_config("tiny-cpu", [f"data.path={dataset}", f"output_dir={tmp_path}", *FROZEN, *learning,
                                          f"model.scan_layers={str(scan).lower()}"])
        state = Trainer(config).start()
        assert int(state["step"]) == 2
        params, mu = state["params"], state["opt_state"][1][0].mu
        return (unstack_layers(params), unstack_layers(mu)) if scan else (params, mu)

    (unrolled, unrolled_mu), (scanned, scanned_mu) = restored(scan=False), restored(scan=True)
    for a, b, c in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    for a, b in zip(jax.tree.leaves(unrolled_mu), jax.tree.leaves(scanned_mu), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_json_of_before_the_runtime_split_loads_and_another_unknown_key_is_named(hf_model, tmp_path):
    checkpoint = import_hf(hf_model[0], tmp_path / "ckpt")
    fields = json.loads((checkpoint / MODEL_JSON).read_text())
    earlier = {**fields, "param_dtype": "float32", "dtype": "bfloat16", "remat_policy": "kv", "kernels": "auto",
               "scan_layers": True}
    (checkpoint / MODEL_JSON).write_text(json.dumps(earlier))
    assert read_config(checkpoint) == LlamaConfig(**fields)
    (checkpoint / MODEL_JSON).write_text(json.dumps({**earlier, "rope_scaling": 2.0}))
    with pytest.raises(ValueError, match=r"unknown model config fields \['rope_scaling'\]"):
        read_config(checkpoint)
