"""Reading RedPajama jsonl files (full 1T layout and 1T-Sample layout) with per-record validation.

Every line of an input becomes either a `Document` or a `Rejected` record that says why and where, so a bad
line is quarantined and counted instead of stopping a multi-terabyte run, and no valid document is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import zstandard

from openllama import files
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
    line: int | None  # 1-based line number in the file; None inside a span that starts mid-file
    nbytes: int
    offset: int = 0  # where the line starts in the file's (decompressed) bytes


@dataclass(frozen=True)
class Rejected:
    reason: str
    line: int | None
    excerpt: str
    offset: int = 0


@dataclass(frozen=True)
class Span:
    """A part of one input file: the lines whose first byte lies in [start, end) of its (decompressed) bytes.

    Spans let the cores of a cluster share one large file. Each line belongs to exactly one span, the one
    holding its first byte, so spans that tile a file read every document once: a span starting mid-line
    skips to the next line, and one whose last line runs past `end` reads it to its newline.
    A compressed file is one span (its bytes can only be reached by decompressing from the start).
    """

    path: str
    start: int = 0
    end: int | None = None  # None: the end of the file

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None


def spans_of(path: str, span_bytes: int) -> list[Span]:
    """`path` cut into spans of about `span_bytes` (one span for a compressed or a small file)."""
    if path.endswith(".zst"):
        return [Span(path)]
    size = files.size_of(path)  # one request per input on a bucket: only plain files need it
    if size <= span_bytes:
        return [Span(path)]
    count = -(-size // span_bytes)
    edges = [size * i // count for i in range(count + 1)]
    return [Span(path, start, end if end < size else None) for start, end in zip(edges, edges[1:], strict=False)]


ZSTD_RATIO = 4  # about how much zstd shrinks RedPajama text: a .zst this much smaller than a span may hold several


def needs_streamed_split(path: str, span_bytes: int) -> bool:
    """Whether a compressed file probably holds more than one span of text, and is worth streaming once to split."""
    return path.endswith(".zst") and files.size_of(path) * ZSTD_RATIO > span_bytes


@dataclass(frozen=True)
class Part:
    """A piece of a decompressed file, as `split_stream` cut it: whole lines, from byte `offset` and line `line`."""

    index: int
    offset: int
    line: int
    nbytes: int


def split_stream(path: str, span_bytes: int, write_part: Callable[[int, bytes], None]
                 ) -> tuple[list[Part], Rejected | None]:
    """Decompress `path` once, front to back, and hand its lines to `write_part(index, bytes)` in pieces of about
    `span_bytes`, each cut after a newline; returns the pieces and the last line when the file is cut off.

    This is how a large compressed file is shared by many cores: one task streams it (decompressing is far faster
    than tokenizing), every piece is then tokenized like a small plain file.
    """
    parts: list[Part] = []
    buffer = bytearray()
    offset, line = 0, 1

    def emit(data: bytes | bytearray) -> None:
        nonlocal offset, line
        write_part(len(parts), bytes(data))
        parts.append(Part(len(parts), offset, line, len(data)))
        offset += len(data)
        line += data.count(b"\n")

    with files.open_input(path) as reader:
        try:
            for data in _decompressed(_chunks(reader)):
                buffer += data
                while len(buffer) >= span_bytes:
                    cut = buffer.rfind(b"\n", 0, span_bytes)
                    cut = cut if cut >= 0 else buffer.find(b"\n", span_bytes)
                    if cut < 0:
                        break  # one line longer than a span: read on until it ends
                    emit(buffer[:cut + 1])
                    del buffer[:cut + 1]
        except EOFError:
            complete = buffer.rfind(b"\n") + 1
            if complete:
                emit(buffer[:complete])
            tail = bytes(buffer[complete:])
            return parts, Rejected("truncated", line, tail[:200].decode("utf-8", "replace"), offset)
    if buffer or not parts:
        emit(buffer)
    return parts, None


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
    """Files named by INPUTs (RedPajama root folders, subset folders, files, globs; local, gs:// or s3://), sorted."""
    found_all: set[str] = set()
    for item in inputs:
        if any(ch in item for ch in "*?["):
            found = files.glob_files(item)
        else:
            kind = files.kind(item)
            if kind == pafs.FileType.Directory:
                found = files.files_under(item)
            elif kind == pafs.FileType.File:
                found = [files.check_location(item) if files.is_uri(item) else files.filesystem(item)[1]]
            else:
                raise FileNotFoundError(f"input {item!r} does not exist")
        found = [p for p in found if _is_input_file(p)]
        if not found:
            raise FileNotFoundError(f"input {item!r} holds no RedPajama files ({' or '.join(INPUT_SUFFIXES)})")
        found_all.update(found)
    return sorted(found_all)


def _chunks(reader, first: bytes = b"") -> Iterator[bytes]:
    """`first`, then the reader's bytes in READ_CHUNK pieces."""
    if first:
        yield first
    while chunk := reader.read(READ_CHUNK):
        yield chunk


def _decompressed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """zstd-compressed chunks decompressed (a file may hold several frames); raises EOFError when cut off."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    for chunk in chunks:
        data = decompressor.decompress(chunk)
        while decompressor.eof and decompressor.unused_data:  # a file made of several zstd frames
            rest = decompressor.unused_data
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            data += decompressor.decompress(rest)
        yield data
    if not decompressor.eof:
        raise EOFError


def _lines(span: Span) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, raw line) of the lines that start in `span`; the flag marks a last line cut off by a truncated file."""
    with files.open_input(span.path) as reader:
        offset = span.start
        if span.start:
            reader.seek(span.start - 1)  # the byte before the span says whether it starts on a line
            chunks = _chunks(reader)
            if reader.read(1) != b"\n":
                for chunk in chunks:
                    newline = chunk.find(b"\n")
                    if newline < 0:
                        offset += len(chunk)
                        continue
                    offset += newline + 1
                    chunks = _chunks(reader, chunk[newline + 1:])
                    break
                else:
                    return  # the span lies inside the file's last line, which the span before owns
        else:
            chunks = _chunks(reader)
        if span.path.endswith(".zst"):
            chunks = _decompressed(chunks)
        pending = b""
        try:
            for data in chunks:
                *complete, pending = (pending + data).split(b"\n")
                for line in complete:
                    if span.end is not None and offset >= span.end:
                        return
                    yield offset, line + b"\n", False
                    offset += len(line) + 1
        except EOFError:
            yield offset, pending, True
            return
        if pending and (span.end is None or offset < span.end):
            yield offset, pending, False


def read_records(source: str | Span, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
                 origin: tuple[int, int] = (0, 1)) -> Iterator[Document | Rejected]:
    """Each non-blank line of a file (or of one span of it) as a Document or a Rejected with reason and place.

    `origin` is (byte offset, line number) of the file's first byte in the file it was cut from (a `Part`),
    so that places are those of the original.
    """
    span = source if isinstance(source, Span) else Span(source)
    for number, (local, raw, cut_off) in enumerate(_lines(span), start=1):
        line = number + origin[1] - 1 if span.start == 0 else None
        offset = local + origin[0]
        if offset == 0 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if cut_off:
            yield Rejected("truncated", line, raw[:200].decode("utf-8", "replace"), offset)
            return
        if not raw.strip():
            continue
        yield _parse(raw, line, offset, max_doc_bytes)


def _parse(raw: bytes, number: int | None, offset: int, max_doc_bytes: int) -> Document | Rejected:
    def reject(reason: str) -> Rejected:
        return Rejected(reason, number, raw[:200].decode("utf-8", "replace"), offset)

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
    return Document(text, json.dumps(meta, ensure_ascii=False), number, nbytes, offset)
