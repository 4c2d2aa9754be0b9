"""LLaMA's SentencePiece tokenizer, trained on our corpus with LLaMA's settings, and its exact tokenizer.json.

Newlines and runs of spaces must survive (OpenLLaMA restarted training over a tokenizer that lost them),
so normalization is identity, extra whitespace is kept and documents are fed whole, not line by line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from tqdm import tqdm

from openllama import commands, files, ray_jobs
from openllama.commands import BadInput
from openllama.config import METAVAR, PARSE, POSITIONAL, ConfigError
from openllama.data import mixture, redpajama

log = logging.getLogger(__name__)

MAX_SENTENCE_BYTES = 16384
BYTE_FALLBACK_PIECES = 256 + 3  # one piece per byte, plus unk, bos and eos

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


@dataclasses.dataclass
class TokenizerTrainConfig:
    """Everything `openllama tokenizer train` runs with."""

    # RedPajama folders, .jsonl/.jsonl.zst files or globs (local or gs://, s3://)
    inputs: list[str] = dataclasses.field(metadata={POSITIONAL: True, METAVAR: "INPUT"})
    out: str  # folder for tokenizer.model and tokenizer_settings.json (local or URI)
    vocab_size: int = 32000  # pieces in the vocabulary, byte fallback's 259 included
    sample_docs: int = 100_000  # documents to train on, split across subsets by weight
    seed: int = 0  # seed of the document sample and of training
    # subset -> mixture weight, e.g. common_crawl=0.67,c4=0.15; None: LLaMA's
    weights: dict[str, float] | None = dataclasses.field(
        default=None, metadata={PARSE: mixture.parse_weights, METAVAR: "SUBSET=WEIGHT,..."})

    def __post_init__(self) -> None:
        if self.vocab_size <= BYTE_FALLBACK_PIECES:
            raise ConfigError(f"vocab_size={self.vocab_size} must be > {BYTE_FALLBACK_PIECES} "
                              "(byte fallback alone takes 256 pieces, plus unk, bos and eos)")
        if self.sample_docs < 1:
            raise ConfigError(f"sample_docs={self.sample_docs} must be >= 1")
        for subset, weight in (self.weights or {}).items():
            if weight < 0:
                raise ConfigError(f"weights.{subset}={weight} must be >= 0")


DEFAULT_SAMPLE_DOCS = TokenizerTrainConfig.sample_docs


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
    files.write_json(out_dir / "tokenizer_settings.json", settings)
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
    paths = redpajama.expand_inputs([str(i) for i in inputs])
    present = sorted({redpajama.subset_of(f) for f in paths})
    shares = mixture.normalize(weights or mixture.LLAMA_WEIGHTS, present)
    quota = {s: max(1, round(sample_docs * w)) for s, w in shares.items() if w > 0}
    units = [{"path": f, "subset": redpajama.subset_of(f)} for f in paths if redpajama.subset_of(f) in quota]
    ray_jobs.connect(log_to_driver=False, configure_logging=False)
    import ray  # after ray_jobs.connect, which sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER before ray's first import

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
                    weights: dict[str, float] | None = None) -> str:
    """Sample RedPajama by mixture weight and train LLaMA's tokenizer; reuses a finished identical run."""
    return build_tokenizer(TokenizerTrainConfig(inputs=[str(i) for i in inputs], out=str(out_dir),
                                                vocab_size=vocab_size, sample_docs=sample_docs, seed=seed,
                                                weights=weights))


def build_tokenizer(config: TokenizerTrainConfig) -> str:
    """`train_tokenizer` from a config: the model is published first, its settings last, each whole."""
    out_dir = config.out.rstrip("/") if files.is_uri(config.out) else str(Path(config.out).absolute())
    request = {"inputs": redpajama.expand_inputs(config.inputs), "vocab_size": config.vocab_size,
               "sample_docs": config.sample_docs, "seed": config.seed, "weights": config.weights}
    settings_path, model_path = files.join(out_dir, "tokenizer_settings.json"), files.join(out_dir, "tokenizer.model")
    if files.is_file(settings_path) and files.is_file(model_path):
        if files.read_json(settings_path).get("request") == request:
            log.info("%s already holds this tokenizer; reusing it", model_path)
            return model_path
    documents, counts = sample_documents(config.inputs, config.sample_docs, config.seed, config.weights)
    log.info("training on %d documents: %s", len(documents), counts)
    with tempfile.TemporaryDirectory() as tmp:
        train_sentencepiece(documents, tmp, vocab_size=config.vocab_size, seed=config.seed)
        settings = files.read_json(Path(tmp) / "tokenizer_settings.json")
        settings.update(request=request, sampled_documents=counts)
        files.copy_file(Path(tmp) / "tokenizer.model", model_path)
        files.write_json(settings_path, settings)  # written last: its presence means the model beside it is complete
    return model_path


def train_command(config: TokenizerTrainConfig) -> None:
    """Sample RedPajama by mixture weight (on Ray Data) and train a SentencePiece tokenizer with LLaMA's
    settings; prints the tokenizer.model written. A rerun with the same inputs and settings reuses the
    finished one."""
    commands.quiet_libraries()
    print(build_tokenizer(config))


def load_for_model(path: str | Path, vocab_size: int, bos_id: int, eos_id: int) -> spm.SentencePieceProcessor:
    """The SentencePiece model at `path`, checked to fit a model with these ids: the one vocabulary check.

    A tokenizer may have fewer pieces than the model's vocabulary (embeddings padded to a round size),
    never more, and its BOS/EOS must be the ids the model was trained with.
    """
    if not files.is_file(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist; pass --tokenizer PATH/tokenizer.model")
    tokenizer = spm.SentencePieceProcessor(model_proto=files.read_bytes(path))
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


# --- tokenizer.json, for Hugging Face ----------------------------------------------------------------
# Built here from the SentencePiece model rather than left to transformers' conversion, which drops
# SentencePiece's dummy-prefix space when a text starts with a space (" a" -> "▁a" instead of "▁▁a");
# see docs/model.md.


def sentencepiece_tokenizer_json(sp_model: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like the SentencePiece BPE model.

    SentencePiece prepends one "▁" (dummy prefix) to every text, even one that starts with a space, then
    turns spaces into "▁" and merges symbol pairs by the score of the merged piece. Prepend + Replace
    normalizers do the first part without Metaspace's skip-if-already-"▁" rule; BPE merges ranked by
    the merged piece's score do the second.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise BadInput(f"{sp_model}: only SentencePiece BPE models (LLaMA's kind) can be exported")
    spec = proto.normalizer_spec
    if spec.precompiled_charsmap or spec.remove_extra_whitespaces or not spec.add_dummy_prefix:
        raise BadInput(
            f"{sp_model}: normalizer_spec must be LLaMA's (identity, keep whitespace, dummy prefix)"
        )
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    ranked = []
    for piece, (score, piece_id) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, cut, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [p.piece for p in proto.pieces if p.type in (p.UNKNOWN, p.CONTROL)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = proto.pieces[proto.trainer_spec.bos_id].piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)]
    )
    return tokenizer


def write_tokenizer(sp_model: str | Path, out_dir: Path, max_length: int) -> None:
    """tokenizer.model, an exact tokenizer.json and a tokenizer_config.json that adds BOS, not EOS.

    tokenizer_class is TokenizersBackend so AutoTokenizer loads tokenizer.json as written;
    `LlamaTokenizer` would rebuild the pre-tokenizer and lose the leading-space fix.
    """
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    sentencepiece_tokenizer_json(sp_model).save(str(out_dir / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer_config = {
        "tokenizer_class": "TokenizersBackend",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": max_length,
        "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
