"""The `openllama` lm-eval model against direct computations with the Flax model."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from openllama.eval.backend import OpenLlamaLM, bucket_length, make_batches, pack_rows, packed_attention_mask
from openllama.train.checkpoint import load_model, save_model
from openllama.eval.decode import generate
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


def test_buckets_grow_by_half_and_a_third_capped_at_the_context():
    assert [bucket_length(n, 256) for n in (1, 33, 49, 65, 100, 129, 200, 256)] == [
        32, 48, 64, 96, 128, 192, 256, 256,
    ]
    assert bucket_length(150, 160) == 160


def test_choices_of_a_question_share_one_copy_of_its_context():
    pairs = [([1, 5, 6], [8]), ([1, 5, 6], [9]), ([1, 5, 6], [8, 9]), ([1, 7], [3, 4, 5])]
    (row,) = pack_rows(pairs, max_length=64)
    assert row.tokens == [1, 5, 6, 8, 1, 7, 3, 4]
    assert row.positions == [0, 1, 2, 3, 0, 1, 2, 3]
    assert row.questions == [1, 1, 1, 1, 2, 2, 2, 2]
    assert row.branches == [0, 0, 0, 3, 0, 0, 1, 1]
    # (index of the predicting token, target, request): one-token choices read the context's last token
    assert row.slots == [(2, 8, 0), (2, 9, 1), (2, 8, 2), (3, 9, 2), (5, 3, 3), (6, 4, 3), (7, 5, 3)]


def test_a_branch_sees_its_context_and_itself_but_not_other_branches_or_questions():
    (row,) = pack_rows([([1, 5], [6, 7, 8]), ([1, 5], [9, 10]), ([1, 3], [4, 4])], max_length=64)
    mask = np.asarray(packed_attention_mask(np.array([row.questions]), np.array([row.branches])))[0, 0]
    visible = {i: [j for j in range(len(row.tokens)) if mask[i, j]] for i in range(len(row.tokens))}
    assert row.tokens == [1, 5, 6, 7, 9, 1, 3, 4]
    assert visible[3] == [0, 1, 2, 3]  # second token of the first choice
    assert visible[4] == [0, 1, 4]  # the second choice skips the first
    assert visible[7] == [5, 6, 7]  # the next question sees nothing of the first


def test_every_request_is_scored_once_in_rows_no_wider_than_the_context():
    pairs = [([1] + [5] * n, [7] * (1 + n % 5)) for n in range(1, 120)]
    rows = pack_rows(pairs, max_length=64)
    assert max(len(row.tokens) for row in rows) <= 64
    scored = sorted(request for row in rows for _, _, request in row.slots)
    assert scored == sorted(i for i, (_, continuation) in enumerate(pairs) for _ in continuation)
    batches = make_batches(pairs, batch_size=8, max_length=64)
    assert {tokens.shape for (tokens, *_), _ in batches} == {(8, 64)}
    assert sum(int((owners >= 0).sum()) for _, owners in batches) == len(scored)


def test_a_small_evaluation_is_one_batch_of_a_power_of_two_rows():
    pairs = [([1] + [token] * 19, [7, 8]) for token in (4, 5, 6)] + [([1, 6], [7])]  # rows of 21, 21, 21+2
    ((tokens, *_), _), = make_batches(pairs, batch_size=16, max_length=64)
    assert tokens.shape == (4, 32)


def test_an_empty_continuation_scores_zero_and_is_greedy(lm):
    assert lm._loglikelihood_tokens([(None, [1, 5, 6], [])]) == [(0.0, True)]


def test_a_question_too_long_for_one_row_is_split_with_a_copy_of_its_context():
    pairs = [([1, 2, 3], [4] * 10), ([1, 2, 3], [5] * 10)]
    rows = pack_rows(pairs, max_length=16)
    assert sorted(row.tokens for row in rows) == [[1, 2, 3] + [4] * 9, [1, 2, 3] + [5] * 9]


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
