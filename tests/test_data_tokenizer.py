"""The tokenizer: LLaMA's settings keep whitespace and bytes; training samples RedPajama by weight on Ray Data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from openllama.cli import main as cli
from openllama.data import tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "redpajama"


@pytest.fixture(scope="module")
def processor(sp_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_model))


@pytest.mark.parametrize("text", [
    "first line\nsecond line\n\n\nafter blank lines",
    "column\tseparated\tvalues",
    "runs  of   spaces    here",
    "def f(x):\n    if x:\n        return x\n\treturn None\n",
    " leading space and trailing spaces  ",
])
def test_whitespace_survives_a_round_trip(processor, text):
    assert processor.decode(processor.encode(text)) == text


def test_newlines_are_tokens_not_dropped(processor):
    assert any("\n" in piece for piece in processor.encode("a\nb", out_type=str))


def test_digits_are_split_one_per_token(processor):
    pieces = [p.lstrip("▁") for p in processor.encode("year 20231 ok", out_type=str)]
    assert {"2", "0", "3", "1"} <= set(pieces) and not any(len(p) > 1 and p.isdigit() for p in pieces)


@pytest.mark.parametrize("text", ["emoji 😀🦙 here", "中文和日本語のテキスト", "Ελληνικά και русский"])
def test_unseen_characters_fall_back_to_bytes_and_round_trip(processor, text):
    ids = processor.encode(text)
    assert processor.unk_id() not in ids and processor.decode(ids) == text


def test_every_document_of_the_sample_corpus_round_trips_exactly(processor):
    texts = [json.loads(line)["text"] for path in sorted(SAMPLE.glob("*.jsonl")) for line in open(path)]
    assert len(texts) > 100
    assert [t for t in texts if processor.decode(processor.encode(t)) != t] == []


def test_long_documents_are_fed_in_pieces_that_keep_every_character():
    document = ("x" * 100 + "\n") * 1000 + "y" * 50_000
    pieces = list(tokenizer._chunks([document]))
    assert "".join(pieces) == document
    assert max(len(p.encode()) for p in pieces) < tokenizer.MAX_SENTENCE_BYTES


def test_the_sample_is_deterministic_for_a_seed_and_changes_with_it():
    first, _ = tokenizer.sample_documents([str(SAMPLE)], sample_docs=60, seed=1)
    again, _ = tokenizer.sample_documents([str(SAMPLE)], sample_docs=60, seed=1)
    other, _ = tokenizer.sample_documents([str(SAMPLE)], sample_docs=60, seed=2)
    assert first == again and first != other


def test_the_sample_follows_the_mixture_weights():
    _, counts = tokenizer.sample_documents([str(SAMPLE)], sample_docs=40, weights={"c4": 3, "github": 1})
    assert counts == {"c4": 30, "github": 10}


def test_training_writes_the_model_and_its_settings_and_reuses_an_identical_run(tmp_path, monkeypatch):
    model = tokenizer.train_tokenizer([str(SAMPLE)], tmp_path, vocab_size=400, sample_docs=50)
    settings = json.loads((tmp_path / "tokenizer_settings.json").read_text())
    assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == 400
    assert settings["byte_fallback"] and settings["request"]["sample_docs"] == 50
    monkeypatch.setattr(tokenizer, "sample_documents", lambda *a: pytest.fail("trained again"))
    assert tokenizer.train_tokenizer([str(SAMPLE)], tmp_path, vocab_size=400, sample_docs=50) == model


def test_the_command_line_trains_a_tokenizer(tmp_path, capsys):
    code = cli(["tokenizer", "train", str(SAMPLE / "book_sample.jsonl"), str(SAMPLE / "github_sample.jsonl"),
                "--out", str(tmp_path), "--vocab-size", "600", "--sample-docs", "20", "--weights", "book=1,github=1"])
    assert code == 0 and (tmp_path / "tokenizer.model").exists()
