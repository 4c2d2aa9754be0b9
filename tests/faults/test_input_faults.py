"""Bad input: ten-plus kinds of broken RedPajama record through the whole pipeline, and bad configs of the
train, data and eval commands. Each record is quarantined and counted; each config is refused naming the field."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

import harness as faults

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
VALID = [
    "The blue whale is the largest animal known to have lived.",
    "Line one\nline two\n\nafter a blank line, with tabs\tand digits 12345.",
    "Unicode survives: café, 中文, emoji 🦙, Ελληνικά.",
    "Windows text\r\nwith CRLF inside\r\n",
    "def f(x):\n    return x * 2  # code keeps its indentation\n",
]
# (raw line, rejection reason): each a different way a real dump goes wrong
BAD = [
    (b"this is not json at all\n", "not_json"),
    (b'{"text": "unterminated\n', "not_json"),
    (b'{"text": "ok"} trailing garbage\n', "not_json"),
    (b'[1, 2, 3]\n', "not_object"),
    (b'"just a string"\n', "not_object"),
    (b'{"meta": {"url": "u"}}\n', "no_text"),
    (b'{"text": 42}\n', "text_not_string"),
    (b'{"text": {"nested": ["junk", {"deeper": null}]}}\n', "text_not_string"),
    (b'{"text": null}\n', "text_not_string"),
    (b'{"text": ""}\n', "empty_text"),
    (b'{"text": "   \\n\\t  "}\n', "empty_text"),
    (b'{"text": "caf\xe9 latin-1 bytes"}\n', "invalid_utf8"),
    (b'{"text": "lone surrogate \\ud800 here"}\n', "invalid_utf8"),
    (json.dumps({"text": "x" * 5000}).encode() + b"\n", "too_large"),
]
MAX_DOC_BYTES = 4096


def line(text: str, **extra) -> bytes:
    return json.dumps({"text": text, **extra}, ensure_ascii=False).encode() + b"\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """One wikipedia file mixing valid and bad lines (with a BOM and CRLF endings), one truncated zstd c4 file."""
    root = tmp_path_factory.mktemp("bad_records")
    wiki = root / "wikipedia" / "wiki.jsonl"
    wiki.parent.mkdir()
    lines = [b"\xef\xbb\xbf" + line(VALID[0], meta={"title": "bom first"})]
    for i, (raw, _) in enumerate(BAD):
        lines += [raw, line(VALID[1 + i % (len(VALID) - 1)], meta={"n": i})]
    lines[-1] = lines[-1].replace(b"\n", b"\r\n")  # CRLF line ending
    wiki.write_bytes(b"".join(lines))
    c4 = root / "c4" / "c4-train.00000-of-01024.jsonl.zst"
    c4.parent.mkdir()
    whole = zstandard.ZstdCompressor().compress(b"".join(line(f"{VALID[0]} #{i}") for i in range(40)))
    c4.write_bytes(whole[: len(whole) * 2 // 3])  # a download cut off mid-frame
    complete = zstandard.ZstdDecompressor().decompressobj().decompress(c4.read_bytes()).count(b"\n")
    wiki_docs = [VALID[0]] + [VALID[1 + i % (len(VALID) - 1)] for i in range(len(BAD))]
    return {"root": root, "wiki_docs": wiki_docs, "c4_docs": [f"{VALID[0]} #{i}" for i in range(complete)]}


@pytest.fixture(scope="module")
def built(corpus, sp_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bad_records_out") / "dataset"
    command = [str(Path(sys.executable).parent / "openllama"), "data", "tokenize",
               str(corpus["root"]), "--tokenizer", str(sp_model), "--out", str(out), "--seq-len", str(SEQ_LEN),
               "--val-fraction", "0", "--max-doc-bytes", str(MAX_DOC_BYTES), "--no-track"]
    started = time.perf_counter()
    done = faults.run(command, faults.clean_env(), timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"out": out, "seconds": time.perf_counter() - started,
            "stats": json.loads((out / "stats.json").read_text())}


def test_every_bad_record_is_quarantined_and_counted_by_reason(built, corpus, sp_model, fault_report):
    """The row's claims, all checked here: each bad line quarantined and counted by reason, and every valid
    document around them kept, token for token and in file order."""
    expected: dict[str, int] = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    subsets = built["stats"]["subsets"]
    assert subsets["wikipedia"]["rejected"] == expected
    assert subsets["c4"]["rejected"] == {"truncated": 1}
    rejected = [pq.read_table(p).to_pylist() for p in (built["out"] / "rejected").glob("*.parquet")]
    assert sum(map(len, rejected)) == len(BAD) + 1
    test_every_valid_document_around_bad_records_is_kept_token_for_token(built, corpus, sp_model)
    test_the_packed_rows_hold_the_valid_documents_in_file_order(built, corpus, sp_model)
    valid = sum(built["stats"]["subsets"][subset]["documents"] for subset in ("wikipedia", "c4"))
    fault_report.fault = f"bad records ({len(BAD) + 1} kinds of bad line, {len(set(expected)) + 1} reasons)"
    fault_report.happened = ("each quarantined in rejected/*.parquet with reason, file and line; counted in "
                             "stats.json: " + ", ".join(f"{k}={v}" for k, v in sorted(expected.items())) +
                             ", truncated=1")
    fault_report.lost = f"0 of {valid} valid documents (BOM stripped, CRLF kept), token for token in file order"


def test_every_valid_document_around_bad_records_is_kept_token_for_token(built, corpus, sp_model):
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    subsets = built["stats"]["subsets"]
    for subset, docs in (("wikipedia", corpus["wiki_docs"]), ("c4", corpus["c4_docs"])):
        assert subsets[subset]["documents"] == len(docs), subset
        expected_tokens = sum(len(ids) for ids in processor.encode(docs, add_bos=True, add_eos=True))
        assert subsets[subset]["tokens"] == expected_tokens, subset


def test_the_packed_rows_hold_the_valid_documents_in_file_order(built, corpus, sp_model):
    """The wikipedia stream rebuilt from its rows (which overlap by one token) is the valid documents' tokens."""
    from openllama.data.shards import PackedDataset

    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    dataset = PackedDataset.open(str(built["out"]), "train")
    rows = dataset.read("wikipedia", np.arange(dataset.rows("wikipedia")))
    stream = np.concatenate([rows[0], *(row[1:] for row in rows[1:])])
    expected = np.concatenate([np.array(ids) for ids in processor.encode(corpus["wiki_docs"], add_bos=True,
                                                                          add_eos=True)])
    assert len(expected) - len(stream) < SEQ_LEN  # only the final partial row is dropped, by design
    np.testing.assert_array_equal(stream, expected[: len(stream)])


# --- bad configs ------------------------------------------------------------------------------------------


def bad_yaml(tmp_path: Path) -> str:
    path = tmp_path / "list.yaml"
    path.write_text("- not\n- a mapping\n")
    return str(path)


TRAIN_CASES = [
    (["train.stepz=5"], "train.stepz"),
    (["train.steps=abc"], "train.steps"),
    (["train.global_batch_size=true"], "train.global_batch_size"),
    (["train.steps=0"], "train.steps"),
    (["train.global_batch_size=7", "scaling.num_workers=2"], "train.global_batch_size=7"),
    (["train.seq_len=100000"], "train.seq_len"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite"),
    (["mesh.tp=3"], "mesh"),
    (["optimizer.warmup_steps=500", "train.steps=100"], "optimizer.warmup_steps"),
    (["model.preset=70b"], "70b"),
    (["train.steps"], "train.steps"),
    (["scaling.use_tpu=true"], "scaling.topology"),
    (["eval.batches=0"], "eval.batches"),
    (["optimizer.peak_lr=fast"], "optimizer.peak_lr"),
    (["data.weights=[1, 2]"], "data.weights"),
]


@pytest.mark.parametrize(("overrides", "field"), TRAIN_CASES, ids=[c[1] + "|" + " ".join(c[0]) for c in TRAIN_CASES])
def test_a_bad_train_config_is_refused_naming_the_field(overrides, field, capsys, fault_report):
    from openllama.cli import main

    assert main(["train", "tiny-cpu", *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and field in error, error
    fault_report.fault = f"bad train config ({len(TRAIN_CASES)} kinds)"
    fault_report.happened = "exit 2 before any work, one line naming the field: " + error[:90]
    fault_report.lost = "n/a"


def test_a_train_config_file_that_is_not_a_mapping_is_named(tmp_path, capsys, fault_report):
    from openllama.cli import main

    path = bad_yaml(tmp_path)
    assert main(["train", path]) == 2
    error = capsys.readouterr().err.strip()
    assert path in error and "mapping" in error, error
    fault_report.fault = "bad train config file"
    fault_report.happened = "exit 2: the file is named and must hold a mapping at the top level"
    fault_report.lost = "n/a"


DATA_CASES = [  # (options replaced in a good command line, what the error must name)
    ({"--seq-len": "0"}, "seq_len=0"),
    ({"--val-fraction": "1.5"}, "val_fraction=1.5"),
    ({"--tokenizer": "/nonexistent/tokenizer.model"}, "/nonexistent/tokenizer.model"),
    ({"INPUT": "/nonexistent/corpus"}, "/nonexistent/corpus"),
]


@pytest.mark.parametrize(("changes", "field"), DATA_CASES, ids=[c[1] for c in DATA_CASES])
def test_a_bad_data_command_is_refused_naming_the_setting(changes, field, sp_model, tmp_path, capsys, fault_report):
    from openllama.cli import main

    options = {"INPUT": str(REPO / "data" / "sample" / "redpajama"), "--tokenizer": str(sp_model),
               "--out": str(tmp_path / "out"), **changes}
    argv = ["data", "tokenize", options.pop("INPUT"), *(x for item in options.items() for x in item), "--no-track"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert field in error, error
    assert not (tmp_path / "out" / "units").exists()  # refused before any work
    fault_report.fault = f"bad data command ({len(DATA_CASES)} kinds)"
    fault_report.happened = "exit 2 naming the setting: " + error.splitlines()[-1][:90]
    fault_report.lost = "n/a"


EVAL_CASES = [
    (["--tasks", "local_arc", "--limit", "-3"], "--limit=-3"),
    (["--tasks", "local_arc", "--workers", "0"], "--workers=0"),
    (["--tasks", "local_arc", "--batch-size", "0"], "--batch-size=0"),
    ([], "--tasks"),
]


@pytest.mark.parametrize(("args", "field"), EVAL_CASES, ids=[c[1] for c in EVAL_CASES])
def test_a_bad_eval_command_is_refused_naming_the_option(args, field, tmp_path, capsys, fault_report):
    from openllama.cli import main

    assert main(["eval", str(tmp_path), *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert field in error, error
    fault_report.fault = f"bad eval command ({len(EVAL_CASES)} kinds)"
    fault_report.happened = "exit 2 naming the option: " + error[:90]
    fault_report.lost = "n/a"
