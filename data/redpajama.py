"""Reading RedPajama jsonl files (full 1T layout and 1T-Sample layout) with per-record validation.

Every line of an input becomes either a `Document` or a `Rejected` record that says why and where, so a bad
line is quarantined and counted instead of stopping a multi-terabyte run, and no valid document is dropped.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import zstandard

from openllama.commands import BadInput

SUBSETS = ("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia")
REJECTION_REASONS = (
    "not_json", "not_object", "no_text", "text_not_string", "empty_text", "invalid_utf8", "too_large", "truncated",
)
DEFAULT_MAX_DOC_BYTES = 16 * 1024 * 1024
INPUT_SUFFIXES = (".jsonl", ".jsonl.zst")
BOM = b"\xef\xbb\xbf"
READ_CHUNK = 1 << 22

# file-name patterns of both layouts, checked before folder names
_FILE_PATTERNS = [
    (re.compile(r"^cc_.*_sample\.jsonl(\.zst)?$"), "common_crawl"),
    (re.compile(r"^(arxiv|book|c4|github|stackexchange|wikipedia)_sample\.jsonl(\.zst)?$"), None),
    (re.compile(r"^arxiv_.*\.jsonl(\.zst)?$"), "arxiv"),
    (re.compile(r"^book\.jsonl(\.zst)?$"), "book"),
    (re.compile(r"^c4-train\..*\.jsonl(\.zst)?$"), "c4"),
    (re.compile(r"^filtered_.*\.sampled\.jsonl(\.zst)?$"), "github"),
    (re.compile(r"^stackexchange\.jsonl(\.zst)?$"), "stackexchange"),
    (re.compile(r"^wiki\.jsonl(\.zst)?$"), "wikipedia"),
]
_FOLDER_NAMES = {**{s: s for s in SUBSETS}, "books": "book", "wiki": "wikipedia", "cc": "common_crawl"}


@dataclass(frozen=True)
class Document:
    text: str
    meta: str  # the record's `meta` (or, for flat common_crawl records, every non-text field) as JSON
    line: int
    nbytes: int


@dataclass(frozen=True)
class Rejected:
    reason: str
    line: int
    excerpt: str


def subset_of(path: str) -> str:
    """The normalized RedPajama subset a file belongs to, from its name or the folders above it."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for pattern, subset in _FILE_PATTERNS:
        match = pattern.match(name)
        if match:
            return subset or match.group(1)
    for folder in reversed(path.split("/")[:-1]):
        if folder.lower() in _FOLDER_NAMES:
            return _FOLDER_NAMES[folder.lower()]
    raise BadInput(
        f"{path}: cannot tell which RedPajama subset this file is; name it like the 1T-Sample layout "
        f"(<subset>_sample.jsonl, cc_<dump>_sample.jsonl) or put it under a folder named one of {', '.join(SUBSETS)}"
    )


def _is_input_file(name: str) -> bool:
    return name.endswith(INPUT_SUFFIXES)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by INPUTs (RedPajama root folders, subset folders, files, globs; local or fsspec URIs), sorted."""
    files: set[str] = set()
    for item in inputs:
        fs, _ = fsspec.core.url_to_fs(item)
        protocol = "" if "://" not in item else item.split("://", 1)[0] + "://"
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item, recursive=True)) if not protocol else fs.glob(item)
        elif fs.isdir(item):
            found = [p for p in fs.find(item) if _is_input_file(p)]
        elif fs.exists(item):
            found = [item]
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
        found = [p if p.startswith(protocol) else protocol + p for p in found if _is_input_file(p)]
        if not found:
            raise FileNotFoundError(f"input {item!r} holds no RedPajama files ({' or '.join(INPUT_SUFFIXES)})")
        files.update(os.path.abspath(p) if not protocol else p for p in found)
    return sorted(files)


def _lines(path: str) -> Iterator[tuple[bytes, bool]]:
    """Raw lines of a (possibly zstd-compressed) file; the flag marks a last line cut off by a truncated file."""
    with fsspec.open(path, "rb") as f:
        if not path.endswith(".zst"):
            yield from ((line, False) for line in f)
            return
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        pending = b""
        while chunk := f.read(READ_CHUNK):
            data = decompressor.decompress(chunk)
            while decompressor.eof and decompressor.unused_data:  # a file made of several zstd frames
                rest = decompressor.unused_data
                decompressor = zstandard.ZstdDecompressor().decompressobj()
                data += decompressor.decompress(rest)
            *complete, pending = (pending + data).split(b"\n")
            yield from ((line + b"\n", False) for line in complete)
        if not decompressor.eof:
            yield pending, True
        elif pending:
            yield pending, False


def read_records(path: str, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Document | Rejected]:
    """Each non-blank line of `path` as a Document or a Rejected (with reason and 1-based line number)."""
    for number, (raw, cut_off) in enumerate(_lines(path), start=1):
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if cut_off:
            yield Rejected("truncated", number, raw[:200].decode("utf-8", "replace"))
            return
        if not raw.strip():
            continue
        yield _parse(raw, number, max_doc_bytes)


def _parse(raw: bytes, number: int, max_doc_bytes: int) -> Document | Rejected:
    def reject(reason: str) -> Rejected:
        return Rejected(reason, number, raw[:200].decode("utf-8", "replace"))

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return reject("invalid_utf8")
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return reject("not_json")
    if not isinstance(record, dict):
        return reject("not_object")
    if "text" not in record:
        return reject("no_text")
    text = record["text"]
    if not isinstance(text, str):
        return reject("text_not_string")
    if not text.strip():
        return reject("empty_text")
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates written as \ud800 escapes
        return reject("invalid_utf8")
    if nbytes > max_doc_bytes:
        return reject("too_large")
    meta = record["meta"] if "meta" in record else {k: v for k, v in record.items() if k != "text"}
    return Document(text, json.dumps(meta, ensure_ascii=False), number, nbytes)
