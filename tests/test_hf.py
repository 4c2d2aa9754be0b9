"""Hugging Face export/import: transformers loads what we write, computes the same logits and text,
tokenizes exactly like SentencePiece, and bad input fails with a clear message and no partial output."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from safetensors.numpy import load_file
from sentencepiece import sentencepiece_model_pb2

from openllama.cli import main as cli
from openllama.data.tokenizer import write_tokenizer
from openllama.eval.decode import generate
from openllama.train.checkpoint import load_model, save_model
from openllama.train.convert.hf import ConversionError, export_hf, import_hf
from openllama.train.model import Llama, LlamaConfig, init_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "tiny": {},
    "gqa": {"num_key_value_heads": 2},
    "tied_rope_theta": {"tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
}
TEXTS = [
    "Hello world",
    " one leading space",
    "   three leading spaces",
    "runs  of   spaces    here",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand\t\tmore tabs",
    "def f(x):\n    if x:\n        return x + 1\n    return 0\n",
    "digits 1234567890 and 3.14159",
    "emoji 😀🎉 and a flag 🇫🇷",
    "中文字符和日本語のテキスト",
    "",
    " ",
    "\n",
    "trailing spaces   ",
]


def spread(params: dict) -> dict:
    """Random weights with larger scale than the init, so logits differ clearly between tokens."""
    keys = iter(jax.random.split(jax.random.PRNGKey(7), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda x: x * 8 if x.ndim == 2 else 1 + 0.1 * jax.random.normal(next(keys), x.shape),
                        params)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory, sp_model):
    """(config, params, HF dir, transformers model) for each test config."""
    config = LlamaConfig.preset("tiny", **CONFIGS[request.param])
    params = spread(init_params(config, seed=0))
    root = tmp_path_factory.mktemp(request.param)
    save_model(root / "ckpt", params, config, sp_model)
    hf_dir = export_hf(root / "ckpt", root / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return config, params, hf_dir, model


@pytest.mark.parametrize(("batch", "length"), [(1, 5), (2, 37), (3, 64)])
def test_logits_match_transformers_within_1e_4(exported, batch, length):
    config, params, _, model = exported
    ids = np.random.default_rng(length).integers(0, config.vocab_size, (batch, length))
    ours = np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(ids))[0])
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_32_greedy_tokens_match_transformers_generate(exported):
    config, params, _, model = exported
    prompt = [1, 45, 300, 12, 99, 7]
    ours = generate(params, config, prompt, max_new_tokens=32, stop_ids=())
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()


def test_import_then_export_is_bit_exact(exported, tmp_path):
    _, _, hf_dir, _ = exported
    import_hf(hf_dir, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "again")
    original, again = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(original) == sorted(again)
    for name, array in original.items():
        assert again[name].dtype == array.dtype and again[name].tobytes() == array.tobytes(), name


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, sp_model) -> tuple[Path, dict]:
    config = LlamaConfig.preset("tiny")
    params = spread(init_params(config, seed=1))
    path = save_model(tmp_path_factory.mktemp("tiny") / "ckpt", params, config, sp_model)
    return path, params


def test_sharded_export_writes_an_index_that_transformers_loads(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    out = export_hf(ckpt, tmp_path / "hf", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    embed = load_model(ckpt)[1]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), np.asarray(embed))


def test_sharded_import_then_export_is_bit_exact(tiny_ckpt, tmp_path):
    ckpt, params = tiny_ckpt
    export_hf(ckpt, tmp_path / "hf", max_shard_bytes=60_000)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    _, imported, _ = load_model(tmp_path / "ckpt")
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_bfloat16_export_loads_with_bfloat16_dtype(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    out = export_hf(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_tokenizer_config_adds_bos_and_not_eos(tiny_ckpt, tmp_path):
    out = export_hf(tiny_ckpt[0], tmp_path / "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    ids = transformers.AutoTokenizer.from_pretrained(out)("hello")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2


def test_llama_tokenizer_class_loads_the_export(tiny_ckpt, tmp_path, sp_model):
    out = export_hf(tiny_ckpt[0], tmp_path / "hf")
    tokenizer = transformers.LlamaTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tokenizer("Hello world")["input_ids"] == [1, *sp.encode("Hello world")]


def assert_tokenizes_like_sentencepiece(sp_model: Path, hf_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        expected = [1, *sp.encode(text)]
        ids = tokenizer(text)["input_ids"]
        assert ids == expected, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(expected) == text, text


def test_autotokenizer_tokenizes_exactly_like_sentencepiece(tiny_ckpt, tmp_path, sp_model):
    out = export_hf(tiny_ckpt[0], tmp_path / "hf")
    assert_tokenizes_like_sentencepiece(sp_model, out)


def test_autotokenizer_matches_a_published_llama_tokenizer(tmp_path):
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common (which ships a LLaMA-style tokenizer.model) is not installed")
    real = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    write_tokenizer(real, tmp_path, max_length=2048)
    assert_tokenizes_like_sentencepiece(real, tmp_path)


# LlamaTokenizer (what OpenLLaMA's README loads) rebuilds its pre-tokenizer whatever the files say: no key of
# tokenizer_config.json (legacy, add_prefix_space, from_slow, tokenizer_class, backend) changes it.
LEADING_SPACE_TEXTS = [*TEXTS, "  two leading spaces", " leading space"]


def published_llama_tokenizer() -> Path | None:
    spec = importlib.util.find_spec("mistral_common")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def without_dummy_prefix(sp_model: Path) -> spm.SentencePieceProcessor:
    """The same SentencePiece model, but not prepending its "▁" to every text."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@pytest.mark.parametrize("which", ["test tokenizer", "published LLaMA tokenizer"])
def test_llama_tokenizer_drops_the_dummy_prefix_of_a_text_that_starts_with_a_space(which, tmp_path, sp_model):
    """The known difference, pinned so that a transformers release that changes it is noticed: LlamaTokenizer
    gives SentencePiece's ids except that a text starting with a space gets no dummy-prefix "▁" (" a" is read
    as "▁a", SentencePiece reads "▁▁a"). AutoTokenizer on the same directory is exact (tests above)."""
    model = sp_model if which == "test tokenizer" else published_llama_tokenizer()
    if model is None:
        pytest.skip("mistral-common (which ships a LLaMA-style tokenizer.model) is not installed")
    write_tokenizer(model, tmp_path, max_length=2048)
    tokenizer = transformers.LlamaTokenizer.from_pretrained(tmp_path)
    sp, bare = spm.SentencePieceProcessor(model_file=str(model)), without_dummy_prefix(model)
    for text in LEADING_SPACE_TEXTS:
        expected = [1, *(bare if text.startswith(" ") else sp).encode(text)]
        assert tokenizer(text)["input_ids"] == expected, text
    assert tokenizer(" leading space")["input_ids"] != [1, *sp.encode(" leading space")]


def test_llama_tokenizer_decodes_exactly_like_sentencepiece(tiny_ckpt, tmp_path, sp_model):
    out = export_hf(tiny_ckpt[0], tmp_path / "hf")
    tokenizer = transformers.LlamaTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in LEADING_SPACE_TEXTS:
        assert tokenizer.decode([1, *sp.encode(text)], skip_special_tokens=True) == sp.decode(sp.encode(text)), text


def test_openllama_readme_snippet_runs_on_the_export(tiny_ckpt, tmp_path, sp_model):
    """OpenLLaMA's README usage, verbatim but for model_path; its prompt starts with no space, so its ids
    are SentencePiece's."""
    model_path = str(export_hf(tiny_ckpt[0], tmp_path / "hf"))
    from transformers import LlamaForCausalLM, LlamaTokenizer  # the snippet's own import (transformers may be absent)

    tokenizer = LlamaTokenizer.from_pretrained(model_path)
    model = LlamaForCausalLM.from_pretrained(
        model_path, torch_dtype=torch.float16, device_map='auto',
    )

    prompt = 'Q: What is the largest animal?\nA:'
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids

    generation_output = model.generate(
        input_ids=input_ids, max_new_tokens=32
    )
    print(tokenizer.decode(generation_output[0]))

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert input_ids[0].tolist() == [1, *sp.encode(prompt)]
    assert generation_output.shape[1] > input_ids.shape[1]


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def hf_copy(tiny_ckpt, tmp_path) -> Path:
    return export_hf(tiny_ckpt[0], tmp_path / "hf")


def test_import_refuses_a_non_llama_model_type(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ConversionError, match="model_type='gpt2' is not a LLaMA"):
        import_hf(hf_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_names_a_missing_tensor(hf_copy, tmp_path):
    from safetensors.numpy import save_file

    tensors = load_file(hf_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        import_hf(hf_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_names_a_tensor_whose_shape_does_not_fit_the_config(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    expected = r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(172, 64\).*\(128, 64\)"
    with pytest.raises(ConversionError, match=expected):
        import_hf(hf_copy, tmp_path / "ckpt")


def test_import_reports_a_truncated_safetensors_file(hf_copy, tmp_path):
    weights = hf_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors: not a readable safetensors file"):
        import_hf(hf_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_failed_export_leaves_no_output_directory(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError):
        export_hf(tiny_ckpt[0], tmp_path / "hf", tokenizer=tmp_path / "missing.model")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_tokenizer_larger_than_the_model_vocabulary(tiny_ckpt, tmp_path, sp_model):
    import sysconfig

    from openllama.data.tokenizer import train_sentencepiece

    sources = [p.read_text(encoding="utf-8") for p in sorted(Path(sysconfig.get_path("stdlib")).glob("*.py"))[:20]]
    bigger = train_sentencepiece(sources, tmp_path / "tok", vocab_size=600)
    with pytest.raises(ConversionError, match="has 600 pieces but the model's vocab_size is 512"):
        export_hf(tiny_ckpt[0], tmp_path / "hf", tokenizer=bigger)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_non_empty_output_directory(tiny_ckpt, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(tiny_ckpt[0], tmp_path / "hf")


def test_cli_export_then_import_round_trip(tiny_ckpt, tmp_path):
    assert cli(["export-hf", str(tiny_ckpt[0]), str(tmp_path / "hf")]) == 0
    assert cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.model").is_file()


def test_cli_import_error_is_one_line_naming_the_problem(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2
    assert "model_type='gpt2'" in capsys.readouterr().err


def test_import_upcasts_a_file_that_mixes_dtypes_to_float32(hf_copy, tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    tensors = load_file(hf_copy / "model.safetensors")
    mixed = {n: a.astype(ml_dtypes.bfloat16) if a.ndim == 2 else a for n, a in tensors.items()}
    save_file(mixed, str(hf_copy / "model.safetensors"), metadata={"format": "pt"})
    import_hf(hf_copy, tmp_path / "ckpt")
    _, params, _ = load_model(tmp_path / "ckpt")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    expected = tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"]), expected)
