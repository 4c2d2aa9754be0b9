"""The mixture: LLaMA's weights and epochs per subset for a token budget."""

from __future__ import annotations

import pytest

from openllama.data import mixture


def test_llama_weights_sum_to_one():
    assert sum(mixture.LLAMA_WEIGHTS.values()) == pytest.approx(1.0)


def test_wikipedia_and_books_are_read_more_than_twice_for_llamas_1_4t_tokens():
    epochs = mixture.epochs(1_400_000_000_000, mixture.REDPAJAMA_TOKENS)
    assert 2.2 < epochs["wikipedia"] < 2.7 and 2.2 < epochs["book"] < 2.7


def test_common_crawl_is_read_less_than_once_for_1t_tokens():
    epochs = mixture.epochs(1_000_000_000_000, mixture.REDPAJAMA_TOKENS)
    assert epochs["common_crawl"] == pytest.approx(0.67e12 / 878e9)


def test_weights_are_renormalized_over_the_subsets_present():
    shares = mixture.normalize(mixture.LLAMA_WEIGHTS, ["book", "wikipedia"])
    assert shares == {"wikipedia": 0.5, "book": 0.5}


def test_a_weighted_subset_without_tokens_is_an_error_naming_it():
    with pytest.raises(ValueError, match="arxiv"):
        mixture.epochs(100, {"arxiv": 0, "c4": 10})


def test_weights_parse_from_the_command_line_form():
    assert mixture.parse_weights("c4=0.5, book=0.25") == {"c4": 0.5, "book": 0.25}


def test_a_malformed_weight_is_an_error_naming_the_item():
    with pytest.raises(ValueError, match="c4:0.5"):
        mixture.parse_weights("c4:0.5")
