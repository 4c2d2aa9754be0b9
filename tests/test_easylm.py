"""EasyLM checkpoints in and out: every load type EasyLM has, gated by the logits of the Hugging Face model
the files were made from; the architecture read from the tensors; one tensor in memory beyond the output;
and an export that EasyLM reads, byte for byte the file it came from.

The fixtures follow EasyLM's documented layout, never our own writer: a random `LlamaForCausalLM` has its
q/k rows put back in Meta's interleaved rotary order, its weights transposed to (in, out) kernels and named
as `EasyLM/models/llama/llama_model.py` names them, and the records written as `StreamingCheckpointer`
writes them, `(key, flax.serialization.to_bytes(array))` packed one after another.
"""

from __future__ import annotations

import copy
import os
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from openllama.cli import main as cli
from openllama.train.checkpoint import load_model, read_config
from openllama.train.convert import easylm
from openllama.train.convert.easylm import (
    ConversionError,
    export_easylm,
    import_easylm,
    interleaved_to_rotate_half,
    read_easylm,
)
from openllama.train.convert.hf import import_hf
from openllama.train.model import Llama, LlamaConfig, rotary, rotary_tables

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = LlamaConfig.preset("tiny")
IDS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))
# HF configs of the fixtures: `tiny`'s shapes, the same with grouped-query attention, and with a tied head
VARIANTS = {"mha": {}, "gqa": {"num_key_value_heads": 2}, "tied": {"tie_word_embeddings": True}}


# --- fixtures built from EasyLM's documented layout ---------------------------------------------------------


def hf_model(variant: str) -> transformers.LlamaForCausalLM:
    """A random float32 LlamaForCausalLM of `tiny`'s size, weights spread so that logits differ clearly."""
    fields = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    config = transformers.LlamaConfig(**{**fields, **VARIANTS[variant]})
    torch.manual_seed(len(variant))
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.normal_(0.0, 0.2)
            else:
                weight.copy_(1 + 0.1 * torch.randn_like(weight))
    return model


def meta_rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows (per head: the first coordinates of all pairs, then the second ones) in Meta's order,
    where each pair's two coordinates are neighbours (x0, y0, x1, y1, ...), as EasyLM holds them."""
    rows, fan_in = weight.shape
    pairs = rows // heads // 2
    return weight.reshape(heads, 2, pairs, fan_in).transpose(0, 2, 1, 3).reshape(rows, fan_in)


def easylm_tree(model: transformers.LlamaForCausalLM) -> dict:
    """The HF model's weights as EasyLM's LLaMA parameter tree: its names, (in, out) kernels, Meta's q/k order."""
    weights = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    config = model.config
    blocks = {}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        blocks[str(i)] = {
            "attention": {
                "wq": {"kernel": meta_rotary_order(weights[hf + "self_attn.q_proj.weight"],
                                                   config.num_attention_heads).T},
                "wk": {"kernel": meta_rotary_order(weights[hf + "self_attn.k_proj.weight"],
                                                   config.num_key_value_heads).T},
                "wv": {"kernel": weights[hf + "self_attn.v_proj.weight"].T},
                "wo": {"kernel": weights[hf + "self_attn.o_proj.weight"].T},
            },
            "feed_forward": {
                "w1": {"kernel": weights[hf + "mlp.gate_proj.weight"].T},
                "w2": {"kernel": weights[hf + "mlp.down_proj.weight"].T},
                "w3": {"kernel": weights[hf + "mlp.up_proj.weight"].T},
            },
            "attention_norm": {"kernel": weights[hf + "input_layernorm.weight"]},
            "ffn_norm": {"kernel": weights[hf + "post_attention_layernorm.weight"]},
        }
    tree = {"transformer": {"wte": {"embedding": weights["model.embed_tokens.weight"]}, "h": blocks,
                            "ln_f": {"kernel": weights["model.norm.weight"]}}}
    if not config.tie_word_embeddings:
        tree["lm_head"] = {"kernel": weights["lm_head.weight"].T}
    return tree


def training_order(tree: dict) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """The records of a tree in the order EasyLM's training saves them: its params come out of `jax.jit`,
    which sorts the keys of every dict, and `flatten_dict` walks them in that order."""
    return sorted(flatten_dict(tree).items())


def as_bfloat16(tree: dict) -> dict:
    return jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), tree)


def write_streaming(path: Path, records: list) -> Path:
    """`StreamingCheckpointer.save_train_state_to_file`: each (key, tensor) packed as (key, to_bytes(tensor))."""
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for key, value in records:
            f.write(packer.pack((key, serialization.to_bytes(value))))
    return path


def train_state_records(tree: dict) -> list:
    """A `streaming_train_state`: TrainState's fields in order (step, params, opt_state), adamw-like moments."""
    zeros = jax.tree.map(np.zeros_like, tree)
    state = {
        "step": np.array(1000, np.int32),
        "params": {"params": dict(sorted(tree.items()))},
        "opt_state": {"0": {"count": np.array(1000, np.int32)}, "1": {"0": {"mu": {"params": zeros},
                                                                           "nu": {"params": zeros}}}},
    }
    return list(flatten_dict(state).items())


@pytest.fixture(scope="module")
def models() -> dict:
    return {variant: hf_model(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def params_files(models, tmp_path_factory) -> dict[str, Path]:
    """A float32 `params::` file (`streaming_params`) for each variant."""
    root = tmp_path_factory.mktemp("easylm")
    return {v: write_streaming(root / f"{v}_streaming_params", training_order(easylm_tree(m)))
            for v, m in models.items()}


def hf_logits(model: transformers.LlamaForCausalLM, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(ckpt: Path, ids: np.ndarray = IDS) -> np.ndarray:
    config, params, _ = load_model(ckpt)
    return np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(ids))[0])


def max_difference(ckpt: Path, model: transformers.LlamaForCausalLM) -> float:
    return float(np.abs(our_logits(ckpt) - hf_logits(model)).max())


# --- every load type, gated by the Hugging Face model's logits ----------------------------------------------

HEADS = {"mha": {}, "gqa": {"num_heads": 4}, "tied": {}}  # gqa: no preset has its shapes, so heads are given


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_params_file_gives_the_logits_of_the_hf_model(variant, models, params_files, tmp_path):
    import_easylm(f"params::{params_files[variant]}", tmp_path / "ckpt", **HEADS[variant])
    config = read_config(tmp_path / "ckpt")
    assert (config.num_key_value_heads, config.tie_word_embeddings) == (
        models[variant].config.num_key_value_heads, variant == "tied")
    assert max_difference(tmp_path / "ckpt", models[variant]) <= 1e-4


@pytest.mark.parametrize("load_type", ["trainstate_params", "trainstate"])
def test_train_state_file_gives_the_logits_and_skips_the_optimizer_state(load_type, models, tmp_path):
    source = write_streaming(tmp_path / "streaming_train_state", train_state_records(easylm_tree(models["gqa"])))
    import_easylm(f"{load_type}::{source}", tmp_path / "ckpt", num_heads=4)
    assert max_difference(tmp_path / "ckpt", models["gqa"]) <= 1e-4


def test_flax_params_file_gives_the_logits_of_the_hf_model(models, tmp_path):
    source = tmp_path / "flax_params"  # what convert_checkpoint.py --streaming=False writes
    source.write_bytes(serialization.msgpack_serialize(easylm_tree(models["tied"])))
    import_easylm(f"flax_params::{source}", tmp_path / "ckpt")
    assert max_difference(tmp_path / "ckpt", models["tied"]) <= 1e-4


def test_bfloat16_file_gives_the_logits_of_the_bfloat16_rounded_model(models, tmp_path):
    source = write_streaming(tmp_path / "streaming_params", training_order(as_bfloat16(easylm_tree(models["gqa"]))))
    import_easylm(f"params::{source}", tmp_path / "ckpt", num_heads=4)
    _, params, _ = load_model(tmp_path / "ckpt")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
    rounded = copy.deepcopy(models["gqa"])  # its weights rounded, not its rotary frequencies (a buffer)
    with torch.no_grad():
        for weight in rounded.parameters():
            weight.copy_(weight.to(torch.bfloat16).to(torch.float32))
    assert max_difference(tmp_path / "ckpt", rounded) <= 1e-4


def test_a_tensor_flax_split_into_chunks_is_read(models, tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 4096)  # flax chunks arrays past this many bytes
    source = write_streaming(tmp_path / "streaming_params", training_order(easylm_tree(models["mha"])))
    monkeypatch.undo()
    import_easylm(f"params::{source}", tmp_path / "ckpt")
    assert max_difference(tmp_path / "ckpt", models["mha"]) <= 1e-4


@pytest.mark.parametrize("kind", ["params", "trainstate", "flax_params"])
def test_a_file_named_without_load_type_is_recognized(kind, models, tmp_path):
    tree = easylm_tree(models["mha"])
    source = tmp_path / kind
    if kind == "params":
        write_streaming(source, training_order(tree))
    elif kind == "trainstate":
        write_streaming(source, train_state_records(tree))
    else:
        source.write_bytes(serialization.msgpack_serialize(tree))
    import_easylm(str(source), tmp_path / "ckpt")
    assert max_difference(tmp_path / "ckpt", models["mha"]) <= 1e-4


def test_a_file_in_convert_hf_to_easylm_order_reads_the_same(models, tmp_path):
    """convert_hf_to_easylm.py writes its dict as built (wte, ln_f, h, lm_head), not sorted."""
    source = write_streaming(tmp_path / "streaming_params", list(flatten_dict(easylm_tree(models["mha"])).items()))
    import_easylm(str(source), tmp_path / "ckpt")
    assert max_difference(tmp_path / "ckpt", models["mha"]) <= 1e-4


# --- the architecture, from the tensors ---------------------------------------------------------------------


def test_the_architecture_is_read_from_the_tensors(params_files):
    config, _ = read_easylm(f"params::{params_files['gqa']}", num_heads=4)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        512, 64, 172, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (4, 2, False)


def test_the_head_count_comes_from_the_preset_with_the_same_shapes(params_files):
    config, _ = read_easylm(f"params::{params_files['tied']}")
    assert config.num_attention_heads == TINY.num_attention_heads and config.tie_word_embeddings


def test_without_a_preset_of_the_same_shapes_the_head_count_must_be_given(params_files, tmp_path):
    with pytest.raises(ConversionError, match=r"heads is in no tensor, and no preset has hidden size 64, "
                                              r"intermediate size 172 and key/value width 32; give --num-heads"):
        import_easylm(f"params::{params_files['gqa']}", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unseen_fields_are_the_presets_or_given(params_files):
    config, _ = read_easylm(f"params::{params_files['gqa']}", num_heads=4, rope_theta=5e5, rms_norm_eps=1e-5)
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (5e5, 1e-5, 2048)
    assert read_easylm(f"params::{params_files['mha']}", preset="tiny")[0].max_position_embeddings == 256


def test_a_key_value_head_count_that_does_not_fit_wk_is_named(params_files):
    with pytest.raises(ConversionError, match=r"transformer/h/0/attention/wk/kernel has 32 outputs, not 1 heads of 16"):
        read_easylm(f"params::{params_files['gqa']}", num_heads=4, num_kv_heads=1)


def test_a_preset_that_does_not_fit_names_the_tensor_and_both_shapes(params_files, tmp_path):
    expected = r"tensor transformer/wte/embedding has shape \(512, 64\), --preset 7b needs \(32000, 4096\)"
    with pytest.raises(ConversionError, match=expected):
        import_easylm(f"params::{params_files['mha']}", tmp_path / "ckpt", preset="7b")
    assert not (tmp_path / "ckpt").exists()


def test_a_tied_file_does_not_fit_an_untied_preset(params_files):
    with pytest.raises(ConversionError, match="tensor lm_head/kernel is missing"):
        read_easylm(f"params::{params_files['tied']}", preset="tiny")


def test_a_tensor_of_a_layer_the_preset_lacks_is_named(models, tmp_path):
    records = training_order(easylm_tree(models["mha"]))
    first_layer = [(key, value) for key, value in records if key[:3] == ("transformer", "h", "0")]
    extra = [(("transformer", "h", "2", *key[3:]), value) for key, value in first_layer]
    source = write_streaming(tmp_path / "streaming_params", records + extra)
    with pytest.raises(ConversionError, match=r"tensor transformer/h/2/attention/wk/kernel does not belong to a "
                                              r"2-layer model \(--preset tiny\)"):
        read_easylm(f"params::{source}", preset="tiny")


def test_a_missing_tensor_is_named_in_the_files_own_terms(models, tmp_path):
    records = [(k, v) for k, v in train_state_records(easylm_tree(models["mha"])) if k[-2:] != ("w3", "kernel")]
    source = write_streaming(tmp_path / "streaming_train_state", records)
    with pytest.raises(ConversionError, match="tensor params/params/transformer/h/0/feed_forward/w3/kernel is missing"):
        read_easylm(f"trainstate::{source}")


def test_a_tensor_that_is_not_easylm_llama_is_named(models, tmp_path):
    records = training_order(easylm_tree(models["mha"])) + [(("transformer", "h", "0", "attn", "q_proj", "kernel"),
                                                            np.zeros((2, 2), np.float32))]
    source = write_streaming(tmp_path / "streaming_params", records)
    with pytest.raises(ConversionError, match="transformer/h/0/attn/q_proj/kernel is not part of EasyLM's LLaMA"):
        read_easylm(f"params::{source}")


def test_unknown_preset_is_a_clear_error(params_files, tmp_path):
    with pytest.raises(ConversionError, match=r"--preset '5b' does not exist; allowed: \['13b'"):
        import_easylm(f"params::{params_files['mha']}", tmp_path / "ckpt", preset="5b")


# --- the file and its load type -------------------------------------------------------------------------------


def test_a_load_type_that_does_not_fit_the_file_says_which_fits(models, params_files, tmp_path):
    train_state = write_streaming(tmp_path / "streaming_train_state", train_state_records(easylm_tree(models["mha"])))
    flax_file = tmp_path / "flax_params"
    flax_file.write_bytes(serialization.msgpack_serialize(easylm_tree(models["mha"])))
    cases = [
        (f"params::{train_state}", "holds a train state .*; load it as trainstate_params::"),
        (f"trainstate_params::{params_files['mha']}", "holds no train state .*; load it as params::"),
        (f"flax_params::{params_files['mha']}", "is a streaming file, not one flax msgpack; load it as params::"),
        (f"params::{flax_file}", "is one flax msgpack, not a streaming file; load it as flax_params::"),
        (f"flax::{flax_file}", "EasyLM's docs name it so, its code .* flax_params::; use flax_params::"),
        (f"streaming::{flax_file}", r"load type 'streaming' .*; allowed: \['flax_params', 'params'"),
    ]
    for spec, message in cases:
        with pytest.raises(ConversionError, match=message):
            read_easylm(spec)


def test_a_truncated_file_names_the_cut_tensor(params_files, tmp_path):
    data = params_files["mha"].read_bytes()
    source = tmp_path / "streaming_params"
    source.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match=r"tensor transformer/wte/embedding is cut off.*truncated"):
        read_easylm(f"params::{source}")


def test_a_file_that_is_not_an_easylm_checkpoint_is_reported(tmp_path):
    source = tmp_path / "junk.bin"
    source.write_bytes(b"\x92\xc1" * 64)
    with pytest.raises(ConversionError, match="not a readable EasyLM streaming checkpoint at byte 0"):
        read_easylm(f"params::{source}")
    with pytest.raises(ConversionError, match="does not exist"):
        read_easylm(f"params::{tmp_path / 'absent'}")


# --- memory: the output and about one tensor ------------------------------------------------------------------


def random_easylm_tree(hidden: int, intermediate: int, vocab: int, layers: int) -> dict:
    rng = np.random.default_rng(0)

    def kernel(*shape: int) -> dict:
        return {"kernel": rng.standard_normal(shape, np.float32)}

    blocks = {str(i): {"attention": {name: kernel(hidden, hidden) for name in ("wq", "wk", "wv", "wo")},
                       "feed_forward": {"w1": kernel(hidden, intermediate), "w2": kernel(intermediate, hidden),
                                        "w3": kernel(hidden, intermediate)},
                       "attention_norm": {"kernel": np.ones(hidden, np.float32)},
                       "ffn_norm": {"kernel": np.ones(hidden, np.float32)}} for i in range(layers)}
    return {"transformer": {"wte": {"embedding": rng.standard_normal((vocab, hidden), np.float32)}, "h": blocks,
                            "ln_f": {"kernel": np.ones(hidden, np.float32)}},
            "lm_head": kernel(hidden, vocab)}


@pytest.mark.parametrize("load_type", ["params", "trainstate"])
def test_reading_needs_the_output_and_about_one_tensor(load_type, tmp_path):
    """A file of many tensors of one size: holding it whole beside the output would take twice its size (a
    train state's, four times); the reader's peak is the output plus about one tensor (a q/k permutation)."""
    tree = random_easylm_tree(hidden=512, intermediate=512, vocab=512, layers=6)
    records = training_order(tree) if load_type == "params" else train_state_records(tree)
    source = write_streaming(tmp_path / "easylm", records)
    largest = max(a.nbytes for a in jax.tree.leaves(tree))
    del tree, records
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        _, params = read_easylm(f"{load_type}::{source}", num_heads=4)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    output = sum(a.nbytes for a in jax.tree.leaves(params))
    file_size = source.stat().st_size
    print(f"{load_type}: file {file_size / 2**20:.1f} MiB, output {output / 2**20:.1f} MiB, "
          f"peak {peak / 2**20:.2f} MiB, largest tensor {largest / 2**20:.2f} MiB")
    assert file_size >= output > 40 * largest
    assert peak <= output + 1.25 * largest


# --- export ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "bfloat16"), [("mha", False), ("gqa", False), ("gqa", True)])
def test_easylm_to_ours_to_easylm_is_byte_identical(variant, bfloat16, models, tmp_path):
    tree = easylm_tree(models[variant])
    source = write_streaming(tmp_path / "streaming_params", training_order(as_bfloat16(tree) if bfloat16 else tree))
    import_easylm(f"params::{source}", tmp_path / "ckpt", num_heads=4)
    export_easylm(tmp_path / "ckpt", tmp_path / "again")
    assert (tmp_path / "again").read_bytes() == source.read_bytes()


def test_a_tensor_past_flax_chunk_size_writes_as_flax_does(models, tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 4096)
    source = write_streaming(tmp_path / "streaming_params", training_order(easylm_tree(models["mha"])))
    import_easylm(f"params::{source}", tmp_path / "ckpt")
    export_easylm(tmp_path / "ckpt", tmp_path / "again")
    assert (tmp_path / "again").read_bytes() == source.read_bytes()


def load_like_easylm(path: Path) -> dict:
    """`StreamingCheckpointer.load_checkpoint(path)` without a target: unpack records, `from_bytes` each."""
    flat = {}
    with open(path, "rb") as f:
        for key, value in msgpack.Unpacker(f, read_size=83886080, max_buffer_size=0):
            flat[tuple(key)] = serialization.from_bytes(None, value)
    return unflatten_dict(flat)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_of_an_hf_model_is_the_tree_easylm_loads(variant, models, tmp_path):
    """HF → import-hf → export-easylm gives EasyLM's parameter tree of that model, read as EasyLM reads it."""
    model = models[variant]
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    export_easylm(tmp_path / "ckpt", tmp_path / "streaming_params")
    expected = easylm_tree(model)
    if variant == "tied":  # EasyLM's LLaMA always has an lm_head; a tied one is the embedding, transposed
        expected["lm_head"] = {"kernel": expected["transformer"]["wte"]["embedding"].T}
    loaded = flatten_dict(load_like_easylm(tmp_path / "streaming_params"))
    assert sorted(loaded) == sorted(flatten_dict(expected))
    for key, value in flatten_dict(expected).items():
        assert loaded[key].dtype == np.float32 and np.array_equal(loaded[key], value), key


def test_export_in_bfloat16_casts_every_tensor(params_files, tmp_path):
    import_easylm(f"params::{params_files['mha']}", tmp_path / "ckpt")
    export_easylm(tmp_path / "ckpt", tmp_path / "bf16", dtype="bfloat16")
    loaded = flatten_dict(load_like_easylm(tmp_path / "bf16"))
    assert {value.dtype for value in loaded.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_a_failed_export_leaves_no_file(params_files, tmp_path, monkeypatch):
    import_easylm(f"params::{params_files['mha']}", tmp_path / "ckpt")
    calls = []

    def fail_after_three(array: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return array.reshape(-1).view(np.uint8)

    monkeypatch.setattr(easylm, "raw_bytes", fail_after_three)
    with pytest.raises(OSError, match="disk full"):
        export_easylm(tmp_path / "ckpt", tmp_path / "out" / "streaming_params")
    assert list((tmp_path / "out").iterdir()) == []


def test_import_refuses_an_existing_checkpoint_before_reading(params_files, tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.setattr(easylm, "EasylmFile", None)  # reading would fail differently
    with pytest.raises(FileExistsError, match="already exists"):
        import_easylm(f"params::{params_files['mha']}", tmp_path / "ckpt")


def test_export_refuses_an_existing_file(params_files, tmp_path):
    import_easylm(f"params::{params_files['mha']}", tmp_path / "ckpt")
    (tmp_path / "taken").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="exists; choose a new path"):
        export_easylm(tmp_path / "ckpt", tmp_path / "taken")


# --- the commands ---------------------------------------------------------------------------------------------


def test_cli_imports_with_a_tokenizer_and_exports_back(params_files, tmp_path, sp_model, capsys):
    code = cli(["import-easylm", f"params::{params_files['mha']}", str(tmp_path / "ckpt"), "--tokenizer",
                str(sp_model)])
    assert code == 0 and (tmp_path / "ckpt" / "tokenizer.model").is_file()
    assert "2 layers, hidden 64, 4 heads (4 key/value), vocab 512, untied head" in capsys.readouterr().out
    assert cli(["export-easylm", str(tmp_path / "ckpt"), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again").read_bytes() == params_files["mha"].read_bytes()


def test_cli_import_error_is_one_line_naming_the_tensor(params_files, tmp_path, capsys):
    code = cli(["import-easylm", f"params::{params_files['mha']}", str(tmp_path / "ckpt"), "--preset", "7b"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "transformer/wte/embedding has shape (512, 64)" in err


def test_cli_gives_the_head_count_and_other_settings(params_files, tmp_path):
    code = cli(["import-easylm", f"params::{params_files['gqa']}", str(tmp_path / "ckpt"), "--num-heads", "4",
                "--set", "rope_theta=500000"])
    assert code == 0 and read_config(tmp_path / "ckpt").rope_theta == 5e5


# --- the rotary permutation -----------------------------------------------------------------------------------


def interleaved_rotary(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Meta/EasyLM rotary: rotate consecutive pairs (x[2i], x[2i+1]) as complex numbers."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    angles = positions[:, None, None] * inv_freq  # [seq, 1, dim/2]
    pairs = x.reshape(*x.shape[:-1], dim // 2, 2)
    rotated = (pairs[..., 0] + 1j * pairs[..., 1]) * np.exp(1j * angles)
    return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)


def test_q_k_permutation_preserves_attention_scores_of_interleaved_rotary():
    """EasyLM scores (interleaved rotary on its wq/wk) equal ours (rotate-half on the imported wq/wk)."""
    heads, head_dim = TINY.num_attention_heads, TINY.head_dim
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, TINY.hidden_size))
    positions = np.arange(9)
    wq, wk = rng.normal(size=(2, TINY.hidden_size, TINY.hidden_size))
    q = interleaved_rotary((x @ wq).reshape(9, heads, head_dim), positions, TINY.rope_theta)
    k = interleaved_rotary((x @ wk).reshape(9, heads, head_dim), positions, TINY.rope_theta)
    theirs = np.einsum("qhd,khd->hqk", q, k)
    ours_q = x @ interleaved_to_rotate_half(wq, heads)
    ours_k = x @ interleaved_to_rotate_half(wk, heads)
    tables = rotary_tables(jnp.asarray(positions)[None], head_dim, TINY.rope_theta, jnp.float32)
    q = rotary(jnp.asarray(ours_q.reshape(1, 9, heads, head_dim), jnp.float32), *tables)[0]
    k = rotary(jnp.asarray(ours_k.reshape(1, 9, heads, head_dim), jnp.float32), *tables)[0]
    ours = np.einsum("qhd,khd->hqk", np.asarray(q), np.asarray(k))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
