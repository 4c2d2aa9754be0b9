"""Shared fixtures: a small LLaMA-style tokenizer and tiny model configs, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"


def sample_documents(limit: int = 400) -> list[str]:
    """Real text for training a test tokenizer: the shipped sample corpus, else the stdlib's sources."""
    import json

    docs: list[str] = []
    for path in sorted(SAMPLE.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    if not docs:
        import sysconfig

        stdlib = Path(sysconfig.get_path("stdlib"))
        docs = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:60]]
    return docs[:limit]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-settings SentencePiece model with vocab 512 (the `tiny` preset's vocab size)."""
    from openllama.data.tokenizer import train_sentencepiece

    return train_sentencepiece(sample_documents(), tmp_path_factory.mktemp("tokenizer"), vocab_size=512)
