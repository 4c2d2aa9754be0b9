"""The `openllama` lm-eval model against direct computations with the Flax model."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from openllama.eval.backend import OpenLlamaLM
from openllama.eval.decode import generate
from openllama.train.checkpoint import load_model, save_model
from openllama.train.model import Llama, LlamaConfig, init_params

TEXT = "The river runs past the old mill and under the stone bridge before it reaches the sea."


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    config = LlamaConfig.preset("tiny")
    return save_model(tmp_path_factory.mktemp("eval") / "ckpt", init_params(config, seed=3), config, sp_model)


@pytest.fixture(scope="module")
def lm(tiny_checkpoint: Path) -> OpenLlamaLM:
    return OpenLlamaLM(str(tiny_checkpoint), batch_size=4)


def direct_logprob(checkpoint: Path, tokens: list[int], n_scored: int) -> float:
    """log p(last n_scored tokens | the ones before) from one unpadded forward pass."""
    config, params, _ = load_model(checkpoint)
    logits, _ = Llama(config).apply({"params": params}, np.array([tokens[:-1]], np.int32))
    logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    targets = tokens[1:]
    return float(sum(logprobs[i, targets[i]] for i in range(len(targets) - n_scored, len(targets))))


def loglikelihood_request(context: str, continuation: str) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0)


def test_an_empty_continuation_scores_zero_and_is_greedy(lm):
    assert lm._loglikelihood_tokens([(None, [1, 5, 6], [])]) == [(0.0, True)]


def test_loglikelihood_equals_the_model_on_bos_context_and_continuation(lm, tiny_checkpoint):
    context, continuation = "Question: where does the river go?\nAnswer:", " to the sea"
    (logprob, _), = lm.loglikelihood([loglikelihood_request(context, continuation)])
    whole = lm.tokenizer.encode(context + continuation)
    n_context = len(lm.tokenizer.encode(context))
    expected = direct_logprob(tiny_checkpoint, [lm.tokenizer.bos_id(), *whole], len(whole) - n_context)
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_batched_requests_score_like_requests_alone(lm):
    requests = [loglikelihood_request(TEXT[:n], " bridge") for n in (5, 20, 40, 60, 80)]
    together = lm.loglikelihood(requests)
    alone = [lm.loglikelihood([r])[0] for r in requests]
    np.testing.assert_allclose([t[0] for t in together], [a[0] for a in alone], atol=1e-5)


def test_contexts_longer_than_the_model_are_cut_from_the_left(tiny_checkpoint):
    short_lm = OpenLlamaLM(str(tiny_checkpoint), batch_size=2, max_length=16)
    context, continuation = TEXT * 2, " The end"
    (logprob, _), = short_lm.loglikelihood([loglikelihood_request(context, continuation)])
    whole = [short_lm.tokenizer.bos_id(), *short_lm.tokenizer.encode(context + continuation)]
    n_continuation = len(whole) - 1 - len(short_lm.tokenizer.encode(context))
    assert logprob == pytest.approx(direct_logprob(tiny_checkpoint, whole[-17:], n_continuation), abs=1e-4)


def test_rolling_loglikelihood_scores_disjoint_windows_after_bos(tiny_checkpoint):
    window = 8
    short_lm = OpenLlamaLM(str(tiny_checkpoint), batch_size=4, max_length=window)
    tokens = short_lm.tokenizer.encode(TEXT)
    (total,) = short_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)])
    with_bos = [short_lm.tokenizer.bos_id(), *tokens]
    expected = 0.0
    for start in range(0, len(tokens), window):  # windows of `window` new tokens; a full context for each
        end = min(start + window, len(tokens))
        expected += direct_logprob(tiny_checkpoint, with_bos[max(0, end - window) : end + 1], end - start)
    assert total == pytest.approx(expected, abs=1e-4)


def test_generation_is_greedy_decoding_with_the_kv_cache(lm, tiny_checkpoint):
    config, params, _ = load_model(tiny_checkpoint)
    prompt = "Question: What is 2 plus 3?\nAnswer:"
    reference = generate(params, config, [lm.tokenizer.bos_id(), *lm.tokenizer.encode(prompt)], 12, stop_ids=())
    request = Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request]) == [lm.tokenizer.decode(reference)]


def test_generation_stops_before_the_first_until_string(lm):
    prompt = "Once upon a time"
    free = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 16}), 0)])[0]
    stop = next(free[i : i + 2] for i in range(3, len(free) - 1) if free[i : i + 2].strip())
    request = Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 16}), 0)
    assert lm.generate_until([request]) == [free.split(stop)[0]]


def test_two_ray_workers_give_the_results_of_one(lm, tiny_checkpoint, monkeypatch):
    from openllama.ray_jobs import connect

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    requests = [loglikelihood_request(TEXT[:n], " the sea") for n in range(4, 80, 6)]
    rolling = [Instance("loglikelihood_rolling", {}, (TEXT[n:],), 0) for n in (0, 30)]
    generation = [Instance("generate_until", {}, (TEXT[:n], {"until": ["\n"], "max_gen_toks": 6}), 0)
                  for n in (10, 30, 50)]
    connect(num_cpus=2, log_to_driver=False)  # an in-process Ray; reused if an earlier test started one
    sharded = OpenLlamaLM(str(tiny_checkpoint), batch_size=4, workers=2)
    assert sharded.loglikelihood(requests) == lm.loglikelihood(requests)
    assert sharded.loglikelihood_rolling(rolling) == lm.loglikelihood_rolling(rolling)
    assert sharded.generate_until(generation) == lm.generate_until(generation)
