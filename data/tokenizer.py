"""LLaMA's SentencePiece tokenizer, trained on our corpus with LLaMA's settings.

Newlines and runs of spaces must survive (OpenLLaMA restarted training over a tokenizer that lost them),
so normalization is identity, extra whitespace is kept and documents are fed whole, not line by line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MAX_SENTENCE_BYTES = 16384

LLAMA_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "max_sentencepiece_length": 16,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "character_coverage": 0.99995,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "max_sentence_length": MAX_SENTENCE_BYTES,
}


def _chunks(documents: Iterable[str]) -> Iterable[str]:
    """Documents cut into pieces SentencePiece accepts, at newlines where possible, newlines kept."""
    for doc in documents:
        piece = ""
        for line in doc.splitlines(keepends=True):
            if piece and len((piece + line).encode()) > MAX_SENTENCE_BYTES - 16:
                yield piece
                piece = ""
            while len(line.encode()) > MAX_SENTENCE_BYTES - 16:
                yield line[: MAX_SENTENCE_BYTES // 4]
                line = line[MAX_SENTENCE_BYTES // 4 :]
            piece += line
        if piece:
            yield piece


def train_sentencepiece(documents: Iterable[str], out_dir: str | Path, vocab_size: int = 32000,
                        seed: int = 0) -> Path:
    """Train on `documents` with LLaMA's settings; writes tokenizer.model and tokenizer_settings.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(LLAMA_SETTINGS, vocab_size=vocab_size)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_chunks(documents)),
        model_prefix=str(out_dir / "tokenizer"),
        num_threads=2,
        minloglevel=2,
        **settings,
    )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (out_dir / "tokenizer_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    return out_dir / "tokenizer.model"
