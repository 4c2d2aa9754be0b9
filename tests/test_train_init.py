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
from openllama.train.checkpoint import RunDir, load_model
from openllama.train.config import load_config
from openllama.train.convert.easylm import export_easylm
from openllama.train.convert.hf import import_hf
from openllama.train.model import Llama
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
