"""Reading RedPajama: both layouts, zstd, and one rejection reason per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from openllama.data import redpajama
from openllama.data.redpajama import Document, Rejected


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def records(path: Path, **kwargs) -> list:
    return list(redpajama.read_records(str(path), **kwargs))


@pytest.mark.parametrize("path, subset", [
    ("rp/arxiv/arxiv_024de5df-1b7f-447c-8c3a-51407d8d6732.jsonl", "arxiv"),
    ("rp/book/book.jsonl", "book"),
    ("rp/c4/c4-train.00000-of-01024.jsonl", "c4"),
    ("rp/common_crawl/2019-30/en_head_0000.json.gz.dedup.classifier.jsonl.zst", "common_crawl"),
    ("rp/github/filtered_0a0.sampled.jsonl", "github"),
    ("rp/stackexchange/stackexchange.jsonl", "stackexchange"),
    ("rp/wikipedia/wiki.jsonl", "wikipedia"),
    ("sample/arxiv_sample.jsonl", "arxiv"),
    ("sample/cc_2023-06_sample.jsonl", "common_crawl"),
    ("sample/stackexchange_sample.jsonl", "stackexchange"),
    ("gs://bucket/redpajama/c4/c4-train.01023-of-01024.jsonl", "c4"),
])
def test_subset_comes_from_the_path_in_both_layouts(path, subset):
    assert redpajama.subset_of(path) == subset


def test_a_file_of_no_known_subset_is_an_error_naming_it():
    with pytest.raises(ValueError, match="mystery.jsonl"):
        redpajama.subset_of("/data/mystery.jsonl")


def test_zstd_common_crawl_records_keep_their_flat_fields_as_meta(tmp_path):
    record = {"text": "Some web page.", "pred_label": "__label__wiki", "pred_label_prob": 0.9,
              "wiki_prob": 0.9, "source": "cc/2019-30/x"}
    path = tmp_path / "common_crawl" / "2019-30" / "en_head_0000.jsonl.zst"
    path.parent.mkdir(parents=True)
    path.write_bytes(zstandard.ZstdCompressor().compress((json.dumps(record) + "\n").encode()))
    [doc] = records(path)
    assert doc.text == "Some web page." and json.loads(doc.meta) == {k: v for k, v in record.items() if k != "text"}


def test_meta_is_kept_whole_as_json(tmp_path):
    meta = {"url": "https://example.org", "timestamp": "2019-04-25T12:57:54Z"}
    path = write_lines(tmp_path / "c4_sample.jsonl", [json.dumps({"text": "hi", "meta": meta}).encode() + b"\n"])
    assert json.loads(records(path)[0].meta) == meta


@pytest.mark.parametrize("line, reason", [
    (b"{not json}\n", "not_json"),
    (b"[1, 2]\n", "not_object"),
    (b'{"meta": {}}\n', "no_text"),
    (b'{"text": 42}\n', "text_not_string"),
    (b'{"text": "  \\n\\t "}\n', "empty_text"),
    (b'{"text": "caf\xe9"}\n', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}\n', "invalid_utf8"),
    (b'{"text": "' + b"x" * 200 + b'"}\n', "too_large"),
])
def test_a_bad_record_is_rejected_with_its_reason_and_line_and_neighbours_are_kept(tmp_path, line, reason):
    good = b'{"text": "valid document"}\n'
    path = write_lines(tmp_path / "c4_sample.jsonl", [good, line, good])
    result = records(path, max_doc_bytes=100)
    assert [type(r) for r in result] == [Document, Rejected, Document]
    assert (result[1].reason, result[1].line) == (reason, 2)


def test_a_utf8_bom_at_file_start_is_stripped(tmp_path):
    path = write_lines(tmp_path / "c4_sample.jsonl", [b'\xef\xbb\xbf{"text": "first"}\n'])
    assert records(path)[0].text == "first"


def test_crlf_line_endings_and_crlf_text_are_valid(tmp_path):
    path = write_lines(tmp_path / "c4_sample.jsonl", [b'{"text": "line one\\r\\nline two"}\r\n'])
    assert records(path)[0].text == "line one\r\nline two"


def test_blank_lines_are_not_records(tmp_path):
    path = write_lines(tmp_path / "c4_sample.jsonl", [b'{"text": "a"}\n', b"\n", b'{"text": "b"}\n'])
    assert [(r.text, r.line) for r in records(path)] == [("a", 1), ("b", 3)]


def test_a_truncated_zstd_file_keeps_its_complete_lines_and_rejects_the_cut_one(tmp_path):
    lines = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(2000))
    compressed = zstandard.ZstdCompressor(level=1).compress(lines)
    path = tmp_path / "cc_2019-30_sample.jsonl.zst"
    path.write_bytes(compressed[: len(compressed) // 2])
    result = records(path)
    assert all(isinstance(r, Document) for r in result[:-1])
    assert isinstance(result[-1], Rejected) and result[-1].reason == "truncated"
    assert result[-1].line == len(result)


def test_a_multi_frame_zstd_file_is_read_whole(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": t}).encode() + b"\n") for t in "abc"]
    path = tmp_path / "cc_2019-30_sample.jsonl.zst"
    path.write_bytes(b"".join(frames))
    assert [r.text for r in records(path)] == ["a", "b", "c"]


def test_inputs_expand_folders_globs_and_files(tmp_path):
    for name in ("c4/c4-train.00000-of-01024.jsonl", "c4/c4-train.00001-of-01024.jsonl", "book/book.jsonl",
                 "book/notes.txt"):
        write_lines(tmp_path / name, [b'{"text": "x"}\n'])
    found = redpajama.expand_inputs([str(tmp_path / "c4"), str(tmp_path / "*/book.jsonl"),
                                     str(tmp_path / "c4/c4-train.00000-of-01024.jsonl")])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "book/book.jsonl", "c4/c4-train.00000-of-01024.jsonl", "c4/c4-train.00001-of-01024.jsonl"]


def test_a_missing_input_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        redpajama.expand_inputs([str(tmp_path / "nowhere")])


def spanned_file(tmp_path: Path) -> Path:
    """Lines of very different lengths (one far longer than a span), blank lines, CRLF, no final newline."""
    lines = [BOM_LINE]
    for i in range(300):
        size = 5000 if i == 150 else (i * 37) % 400
        lines.append(json.dumps({"text": f"doc {i} " + "x" * size}).encode() + (b"\r\n" if i % 7 == 0 else b"\n"))
        if i % 11 == 0:
            lines.append(b"\n")
    lines.append(json.dumps({"text": "the last line has no newline"}).encode())
    return write_lines(tmp_path / "wikipedia" / "wiki.jsonl", lines)


BOM_LINE = redpajama.BOM + json.dumps({"text": "the first line starts with a BOM"}).encode() + b"\n"


@pytest.mark.parametrize("span_bytes", [1, 97, 1000, 4999, 5001, 30_000, 10**9])
def test_spans_of_a_file_read_every_line_exactly_once_with_its_offset(tmp_path, span_bytes):
    path = spanned_file(tmp_path)
    whole = records(path)
    spans = redpajama.spans_of(str(path), span_bytes)
    assert spans[0].start == 0 and spans[-1].end is None and len(spans) == max(1, -(-path.stat().st_size // span_bytes))
    pieces = [r for span in spans for r in redpajama.read_records(span)]
    assert [(r.text, r.offset) for r in pieces] == [(r.text, r.offset) for r in whole]
    data = path.read_bytes()
    for record in pieces:  # each offset is where the record's line starts in the file
        assert data[record.offset:].split(b"\n", 1)[0].lstrip(redpajama.BOM).decode().rstrip("\r") == \
            json.dumps({"text": record.text})
    assert [r.line for r in whole] == sorted(r.line for r in whole)  # line numbers where the span starts the file


def test_a_compressed_file_is_one_span(tmp_path):
    path = tmp_path / "c4" / "c4-train.00000-of-01024.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 10_000))
    assert redpajama.spans_of(str(path), 100) == [redpajama.Span(str(path))]


def zstd_file(tmp_path: Path, cut: bool = False) -> Path:
    """A zstd c4 file of varied lines (one far longer than a part, blank lines, a bad line), optionally cut off."""
    lines = []
    for i in range(3000):
        size = 20_000 if i == 1000 else (i * 53) % 700
        lines.append(json.dumps({"text": f"doc {i} " + "y" * size}).encode() + b"\n")
        if i % 17 == 0:
            lines.append(b"\n" if i % 2 else b"{not json\n")
    compressed = zstandard.ZstdCompressor(level=1).compress(b"".join(lines))
    path = tmp_path / "c4" / "c4-train.00000-of-01024.jsonl.zst"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compressed[: len(compressed) * 2 // 3] if cut else compressed)
    return path


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut_off"])
@pytest.mark.parametrize("span_bytes", [1, 10_000, 150_000, 10**9])
def test_a_compressed_file_streamed_into_parts_reads_as_the_file_did(tmp_path, span_bytes, cut):
    path = zstd_file(tmp_path, cut)
    pieces: dict[int, bytes] = {}
    parts, truncated = redpajama.split_stream(str(path), span_bytes, pieces.__setitem__)
    assert [p.index for p in parts] == sorted(pieces) == list(range(len(parts)))
    assert all(pieces[p.index].endswith(b"\n") for p in parts[:-1])  # cut after a newline: no line in two parts
    # at most a span, unless one line alone is longer
    assert all(len(pieces[p.index]) <= span_bytes or pieces[p.index].count(b"\n") == 1 for p in parts[:-1])
    found = []
    for part in parts:
        (tmp_path / f"part-{part.index}.jsonl").write_bytes(pieces[part.index])
        found += redpajama.read_records(str(tmp_path / f"part-{part.index}.jsonl"), origin=(part.offset, part.line))
    found += [truncated] if truncated else []
    whole = records(path)
    def places(rs: list) -> list[tuple]:
        return [(type(r), r.line, r.offset, r.text if isinstance(r, Document) else r.excerpt) for r in rs]

    assert places(found) == places(whole)
    assert (truncated is not None) == cut
    assert any(isinstance(r, Rejected) and r.reason == "not_json" for r in whole)


def test_only_a_compressed_file_that_may_hold_several_spans_is_streamed(tmp_path):
    path = zstd_file(tmp_path)
    size = path.stat().st_size
    assert redpajama.needs_streamed_split(str(path), size)
    assert not redpajama.needs_streamed_split(str(path), size * redpajama.ZSTD_RATIO)
    plain = write_lines(tmp_path / "c4" / "c4-train.00001-of-01024.jsonl", [b'{"text": "a"}\n'] * 10_000)
    assert not redpajama.needs_streamed_split(str(plain), 100)
