"""Generation: cached decoding equals naive greedy decoding, batching, sampling, stopping, streaming CLI."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from openllama.cli import main as cli
from openllama.eval.decode import TextStream, generate, unescape
from openllama.train.checkpoint import save_model
from openllama.train.model import Llama, LlamaConfig, init_params

TINY = LlamaConfig.preset("tiny")


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda x: x * 8, init_params(TINY, seed=3))


def naive_greedy(params: dict, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the full forward pass each step, no cache.

    The sequence is right-padded to one length so it compiles once; causal attention keeps the padding
    from reaching earlier positions.
    """
    apply = jax.jit(Llama(TINY).apply)
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, len(prompt) + steps), np.int32)
        padded[0, : len(ids)] = ids
        logits = apply({"params": params}, jnp.asarray(padded))[0]
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_generation_with_the_cache_equals_naive_decoding(params):
    prompt = [1, 20, 310, 41, 7]
    assert generate(params, TINY, prompt, 12, stop_ids=()) == naive_greedy(params, prompt, 12)


def test_a_batch_of_different_length_prompts_equals_each_prompt_alone(params):
    prompts = [[1, 20, 310], [1, 5, 6, 7, 8, 9], [1, 77, 78]]
    batched = generate(params, TINY, prompts, 8, stop_ids=())
    assert batched == [generate(params, TINY, p, 8, stop_ids=()) for p in prompts]


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(params):
    prompt = [1, 20, 310]
    first = generate(params, TINY, prompt, 16, temperature=1.0, seed=11, stop_ids=())
    again = generate(params, TINY, prompt, 16, temperature=1.0, seed=11, stop_ids=())
    others = [generate(params, TINY, prompt, 16, temperature=1.0, seed=s, stop_ids=()) for s in (12, 13)]
    assert first == again
    assert any(other != first for other in others)


def test_a_tiny_top_p_keeps_only_the_most_likely_token(params):
    prompt = [1, 20, 310]
    sampled = generate(params, TINY, prompt, 10, temperature=1.0, top_p=1e-6, seed=4, stop_ids=())
    assert sampled == generate(params, TINY, prompt, 10, stop_ids=())


def test_generation_stops_before_the_first_stop_token(params):
    prompt = [1, 20, 310, 41, 7]
    free = generate(params, TINY, prompt, 12, stop_ids=())
    stop = free[4]
    assert generate(params, TINY, prompt, 12, stop_ids=[stop]) == free[: free.index(stop)]


def test_a_streaming_callback_stops_the_generation_by_returning_true(params):
    prompt = [1, 20, 310, 41, 7]
    free = generate(params, TINY, prompt, 12, stop_ids=())
    seen: list[int] = []
    stopped = generate(params, TINY, prompt, 12, stop_ids=(), on_token=lambda t: seen.append(t) or len(seen) == 3)
    assert stopped == seen == free[:3]


def test_invalid_sampling_arguments_name_the_argument(params):
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(params, TINY, [1, 2], 4, top_p=1.5)


def test_a_token_id_outside_the_vocabulary_is_refused(params):
    with pytest.raises(ValueError, match="vocab_size=512"):
        generate(params, TINY, [1, 512], 4)


def test_stream_holds_back_an_incomplete_utf8_character(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    out = io.StringIO()
    stream = TextStream(sp, [1, *sp.encode("café")], out)
    first, second = sp.piece_to_id("<0xC3>"), sp.piece_to_id("<0xA9>")
    stream(first)
    held = out.getvalue()
    stream(second)
    assert held == "" and out.getvalue() == "é"


def test_unescape_turns_typed_escapes_into_characters():
    assert unescape(r"Q: a?\nA:\tb \\n") == "Q: a?\nA:\tb \\n"


def test_cli_streams_the_prompt_and_its_continuation(params, sp_model, tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", params, TINY, sp_model)
    code = cli(["generate", str(ckpt), "--prompt", r"Q: What is the largest animal?\nA:", "--max-new-tokens", "8"])
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    prompt = [1, *sp.encode("Q: What is the largest animal?\nA:")]
    expected = sp.decode(prompt + generate(params, TINY, prompt, 8))
    assert code == 0 and capsys.readouterr().out == expected + "\n"


def test_cli_output_file_holds_exactly_what_was_streamed(params, sp_model, tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", params, TINY, sp_model)
    out = tmp_path / "generated" / "output.txt"
    assert cli(["generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "6", "--output", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out
    assert not list(out.parent.glob(".*tmp*"))


def test_cli_without_a_tokenizer_asks_for_one(params, tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", params, TINY)
    assert cli(["generate", str(ckpt), "--prompt", "hi"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_cli_refuses_a_bad_setting_with_one_line_naming_it(params, sp_model, tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", params, TINY, sp_model)
    assert cli(["generate", str(ckpt), "--prompt", "hi", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["openllama generate: top_p=1.5 must be in (0, 1]"]
