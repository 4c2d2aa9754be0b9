"""Request packing: each context once, every request scored once, few shapes, a mask that keeps branches apart."""

from __future__ import annotations

import numpy as np

from openllama.eval.packing import bucket_length, make_batches, pack_rows, packed_attention_mask


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


def test_a_question_too_long_for_one_row_is_split_with_a_copy_of_its_context():
    pairs = [([1, 2, 3], [4] * 10), ([1, 2, 3], [5] * 10)]
    rows = pack_rows(pairs, max_length=16)
    assert sorted(row.tokens for row in rows) == [[1, 2, 3] + [4] * 9, [1, 2, 3] + [5] * 9]
