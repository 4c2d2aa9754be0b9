"""EasyLM streaming checkpoints: read fp32/bf16, params and train-state files, and permute rotary right."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from flax.serialization import to_bytes

from openllama.cli import main as cli
from openllama.train.checkpoint import load_model, save_model
from openllama.train.convert.easylm import import_easylm, rotate_half_to_interleaved
from openllama.train.convert.hf import ConversionError, export_hf, import_hf
from openllama.train.model import Llama, LlamaConfig, init_params, rotary, rotary_tables

TINY = LlamaConfig.preset("tiny")


def easylm_tree(params: dict, config: LlamaConfig) -> dict:
    """Our parameters under EasyLM's LLaMA names, q/k in EasyLM's interleaved rotary layout."""
    layers = {}
    for i in range(config.num_hidden_layers):
        layer = params[f"layers_{i}"]
        attn, mlp = layer["self_attn"], layer["mlp"]
        layers[str(i)] = {
            "attention": {
                "wq": {"kernel": rotate_half_to_interleaved(np.asarray(attn["q_proj"]["kernel"]),
                                                            config.num_attention_heads)},
                "wk": {"kernel": rotate_half_to_interleaved(np.asarray(attn["k_proj"]["kernel"]),
                                                            config.num_key_value_heads)},
                "wv": {"kernel": attn["v_proj"]["kernel"]},
                "wo": {"kernel": attn["o_proj"]["kernel"]},
            },
            "feed_forward": {"w1": {"kernel": mlp["gate_proj"]["kernel"]},
                             "w2": {"kernel": mlp["down_proj"]["kernel"]},
                             "w3": {"kernel": mlp["up_proj"]["kernel"]}},
            "attention_norm": {"kernel": layer["input_layernorm"]["weight"]},
            "ffn_norm": {"kernel": layer["post_attention_layernorm"]["weight"]},
        }
    return {
        "transformer": {"wte": {"embedding": params["embed_tokens"]["embedding"]}, "h": layers,
                        "ln_f": {"kernel": params["norm"]["weight"]}},
        "lm_head": {"kernel": params["lm_head"]["kernel"]},
    }


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], np.ndarray]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += flatten(value, (*prefix, key))
        else:
            items.append(((*prefix, key), np.asarray(value)))
    return items


def write_streaming(path: Path, records: list[tuple[tuple[str, ...], np.ndarray]]) -> Path:
    """EasyLM's streaming format: msgpack (key, flax-serialized tensor) pairs, one after another."""
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for key, value in records:
            f.write(packer.pack((key, to_bytes(value))))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory, sp_model):
    """Random tiny weights, their HF-imported checkpoint and a directory for EasyLM files."""
    params = jax.tree.map(lambda x: x * 8, init_params(TINY, seed=5))
    root = tmp_path_factory.mktemp("easylm")
    save_model(root / "ours", params, TINY, sp_model)
    export_hf(root / "ours", root / "hf")
    import_hf(root / "hf", root / "from_hf")
    return params, root


def logits(ckpt: Path, ids: np.ndarray) -> np.ndarray:
    _, params, _ = load_model(ckpt)
    return np.asarray(jax.jit(Llama(TINY).apply)({"params": params}, jnp.asarray(ids))[0])


IDS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))


def test_easylm_params_file_gives_the_same_logits_as_the_hf_import(weights, tmp_path):
    params, root = weights
    records = [(("params", *key), value) for key, value in flatten(easylm_tree(params, TINY))]
    source = write_streaming(tmp_path / "streaming_params", records)
    import_easylm(f"params::{source}", tmp_path / "ckpt", preset="tiny")
    np.testing.assert_allclose(logits(tmp_path / "ckpt", IDS), logits(root / "from_hf", IDS), atol=1e-5)


def test_bfloat16_easylm_file_imports_as_bfloat16_with_the_same_values(weights, tmp_path):
    params, _ = weights
    tree = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), easylm_tree(params, TINY))
    source = write_streaming(tmp_path / "streaming_params", [(("params", *k), v) for k, v in flatten(tree)])
    import_easylm(str(source), tmp_path / "ckpt", preset="tiny")
    config, imported, _ = load_model(tmp_path / "ckpt")
    assert config.param_dtype == "bfloat16"
    embed = imported["embed_tokens"]["embedding"]
    assert embed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(embed), np.asarray(params["embed_tokens"]["embedding"]).astype(
        ml_dtypes.bfloat16))


def test_trainstate_file_loads_the_weights_and_skips_optimizer_state(weights, tmp_path):
    params, root = weights
    weights_records = [(("params", "params", *k), v) for k, v in flatten(easylm_tree(params, TINY))]
    optimizer = [(("opt_state", "1", "0", "mu", "params", *k), np.zeros_like(v))
                 for k, v in flatten(easylm_tree(params, TINY))]
    source = write_streaming(tmp_path / "streaming_train_state",
                             [(("step",), np.array(1000))] + optimizer + weights_records)
    import_easylm(f"trainstate_params::{source}", tmp_path / "ckpt", preset="tiny")
    np.testing.assert_allclose(logits(tmp_path / "ckpt", IDS), logits(root / "from_hf", IDS), atol=1e-5)


def interleaved_rotary(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Meta/EasyLM rotary: rotate consecutive pairs (x[2i], x[2i+1]) as complex numbers."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    angles = positions[:, None, None] * inv_freq  # [seq, 1, dim/2]
    pairs = x.reshape(*x.shape[:-1], dim // 2, 2)
    rotated = (pairs[..., 0] + 1j * pairs[..., 1]) * np.exp(1j * angles)
    return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)


def test_q_k_permutation_preserves_attention_scores_of_interleaved_rotary(weights):
    """EasyLM scores (interleaved rotary on its wq/wk) equal ours (rotate-half on the imported wq/wk)."""
    from openllama.train.convert.easylm import interleaved_to_rotate_half

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


def test_unknown_preset_is_a_clear_error(weights, tmp_path):
    with pytest.raises(ConversionError, match=r"--preset '5b' does not exist; allowed: \['13b'"):
        import_easylm(str(tmp_path / "x"), tmp_path / "ckpt", preset="5b")


def test_wrong_preset_names_the_tensor_and_both_shapes(weights, tmp_path):
    params, _ = weights
    records = [(("params", *k), v) for k, v in flatten(easylm_tree(params, TINY))]
    source = write_streaming(tmp_path / "streaming_params", records)
    expected = r"params/transformer/wte/embedding has shape \(512, 64\).*\(32000, 4096\)"
    with pytest.raises(ConversionError, match=expected):
        import_easylm(str(source), tmp_path / "ckpt", preset="7b")
    assert not (tmp_path / "ckpt").exists()


def test_a_tensor_of_a_layer_the_preset_lacks_is_named(weights, tmp_path):
    params, _ = weights
    records = [(("params", *k), v) for k, v in flatten(easylm_tree(params, TINY))]
    extra = [(("params", "transformer", "h", "2", *k[4:]), v) for k, v in records if k[2:4] == ("h", "0")]
    source = write_streaming(tmp_path / "streaming_params", records + extra)
    with pytest.raises(ConversionError, match=r"transformer/h/2/attention/wq/kernel does not belong to a 2-layer"):
        import_easylm(str(source), tmp_path / "ckpt", preset="tiny")


def test_a_missing_tensor_is_named(weights, tmp_path):
    params, _ = weights
    records = [(("params", *k), v) for k, v in flatten(easylm_tree(params, TINY)) if k[-2] != "ln_f"]
    source = write_streaming(tmp_path / "streaming_params", records)
    with pytest.raises(ConversionError, match="norm/weight is missing"):
        import_easylm(str(source), tmp_path / "ckpt", preset="tiny")


def test_a_file_that_is_not_a_streaming_checkpoint_is_reported(tmp_path):
    source = tmp_path / "junk.bin"
    source.write_bytes(b"\xc1" * 64)
    with pytest.raises(ConversionError, match="not a readable EasyLM streaming checkpoint"):
        import_easylm(str(source), tmp_path / "ckpt", preset="tiny")


def test_cli_imports_with_a_tokenizer(weights, tmp_path, sp_model):
    params, _ = weights
    records = [(("params", *k), v) for k, v in flatten(easylm_tree(params, TINY))]
    source = write_streaming(tmp_path / "streaming_params", records)
    code = cli(["import-easylm", f"params::{source}", str(tmp_path / "ckpt"), "--preset", "tiny",
                "--tokenizer", str(sp_model)])
    assert code == 0 and (tmp_path / "ckpt" / "tokenizer.model").is_file()
