"""LLaMA's SentencePiece tokenizer, trained on our corpus with LLaMA's settings.

Newlines and runs of spaces must survive (OpenLLaMA restarted training over a tokenizer that lost them),
so normalization is identity, extra whitespace is kept and documents are fed whole, not line by line.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from openllama import ray_jobs
from openllama.commands import BadInput
from openllama.data import mixture, redpajama

log = logging.getLogger(__name__)

MAX_SENTENCE_BYTES = 16384
DEFAULT_SAMPLE_DOCS = 100_000

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


def _sample_key(text: str, seed: int) -> int:
    """A seeded 56-bit hash (it travels through Arrow as int64)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=7, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def _smallest_keys(path: str, quota: int, seed: int) -> list[dict]:
    """The `quota` documents of one file with the smallest seeded hash: a sample that no file order changes."""
    heap: list[tuple[int, str]] = []  # max-heap of the kept keys, by negation
    for record in redpajama.read_records(path):
        if isinstance(record, redpajama.Document):
            key = _sample_key(record.text, seed)
            if len(heap) < quota:
                heapq.heappush(heap, (-key, record.text))
            elif key < -heap[0][0]:
                heapq.heapreplace(heap, (-key, record.text))
    return [{"key": -negated, "text": text} for negated, text in heap]


def sample_documents(inputs: list[str], sample_docs: int, seed: int = 0,
                     weights: dict[str, float] | None = None) -> tuple[list[str], dict[str, int]]:
    """About `sample_docs` valid documents drawn across subsets by mixture weight, with Ray Data.

    Each subset gets `sample_docs * weight` documents: those with the smallest seeded hash of their text,
    so the sample depends only on the corpus and the seed. Returns the documents and the count per subset.
    """
    import ray

    files = redpajama.expand_inputs([str(i) for i in inputs])
    present = sorted({redpajama.subset_of(f) for f in files})
    shares = mixture.normalize(weights or mixture.LLAMA_WEIGHTS, present)
    quota = {s: max(1, round(sample_docs * w)) for s, w in shares.items() if w > 0}
    units = [{"path": f, "subset": redpajama.subset_of(f)} for f in files if redpajama.subset_of(f) in quota]
    ray_jobs.connect(log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(units, override_num_blocks=max(1, len(units))).flat_map(
        lambda unit: [{"subset": unit["subset"], **doc}
                      for doc in _smallest_keys(unit["path"], quota[unit["subset"]], seed)],
        num_cpus=1,
    )
    kept: dict[str, list[tuple[int, str]]] = {s: [] for s in quota}
    for row in tqdm(dataset.iter_rows(), desc="sampling documents", unit="doc", file=sys.stderr):
        heap = kept[row["subset"]]
        if len(heap) < quota[row["subset"]]:
            heapq.heappush(heap, (-row["key"], row["text"]))
        elif row["key"] < -heap[0][0]:
            heapq.heapreplace(heap, (-row["key"], row["text"]))
    documents = [text for subset in sorted(kept) for _, text in sorted(kept[subset], reverse=True)]
    return documents, {s: len(kept[s]) for s in sorted(kept)}


def train_tokenizer(inputs: list[str], out_dir: str | Path, vocab_size: int = 32000,
                    sample_docs: int = DEFAULT_SAMPLE_DOCS, seed: int = 0,
                    weights: dict[str, float] | None = None) -> Path:
    """Sample RedPajama by mixture weight and train LLaMA's tokenizer; reuses a finished identical run."""
    out_dir = Path(out_dir)
    request = {"inputs": redpajama.expand_inputs([str(i) for i in inputs]), "vocab_size": vocab_size,
               "sample_docs": sample_docs, "seed": seed, "weights": weights}
    settings_path, model_path = out_dir / "tokenizer_settings.json", out_dir / "tokenizer.model"
    if settings_path.exists() and model_path.exists():
        if json.loads(settings_path.read_text()).get("request") == request:
            log.info("%s already holds this tokenizer; reusing it", model_path)
            return model_path
    documents, counts = sample_documents(inputs, sample_docs, seed, weights)
    log.info("training on %d documents: %s", len(documents), counts)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        train_sentencepiece(documents, tmp, vocab_size=vocab_size, seed=seed)
        settings = json.loads((Path(tmp) / "tokenizer_settings.json").read_text())
        settings.update(request=request, sampled_documents=counts)
        out_dir.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / "tokenizer.model", model_path)
        temporary = settings_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(temporary, settings_path)  # written last: its presence means the model beside it is complete
    return model_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama tokenizer", description="Train LLaMA's SentencePiece tokenizer.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="sample RedPajama by mixture weight and train a tokenizer")
    train.add_argument("inputs", nargs="+", metavar="INPUT", help="RedPajama folders, files or globs")
    train.add_argument("--out", required=True, help="folder for tokenizer.model and tokenizer_settings.json")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--sample-docs", type=int, default=DEFAULT_SAMPLE_DOCS,
                       help="documents to train on, split across subsets by weight")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--weights", type=mixture.parse_weights, default=None,
                       help="mixture weights like common_crawl=0.67,c4=0.15 (default: LLaMA's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        path = train_tokenizer(args.inputs, args.out, vocab_size=args.vocab_size, sample_docs=args.sample_docs,
                               seed=args.seed, weights=args.weights)
    except (ValueError, FileNotFoundError) as err:
        print(f"openllama tokenizer train: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def load_for_model(path: str | Path, vocab_size: int, bos_id: int, eos_id: int) -> spm.SentencePieceProcessor:
    """The SentencePiece model at `path`, checked to fit a model with these ids: the one vocabulary check.

    A tokenizer may have fewer pieces than the model's vocabulary (embeddings padded to a round size),
    never more, and its BOS/EOS must be the ids the model was trained with.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist; pass --tokenizer PATH/tokenizer.model")
    tokenizer = spm.SentencePieceProcessor(model_file=str(path))
    if tokenizer.get_piece_size() > vocab_size:
        raise BadInput(
            f"tokenizer {path} has {tokenizer.get_piece_size()} pieces but the model's vocab_size is "
            f"{vocab_size}: it is not the tokenizer this model was trained with (pass the right one with --tokenizer)"
        )
    if (tokenizer.bos_id(), tokenizer.eos_id()) != (bos_id, eos_id):
        raise BadInput(
            f"tokenizer {path} has bos/eos ids {tokenizer.bos_id()}/{tokenizer.eos_id()} but the model "
            f"expects {bos_id}/{eos_id} (pass the right one with --tokenizer)"
        )
    return tokenizer
