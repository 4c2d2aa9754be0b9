"""`openllama data tokenize` on Ray Data: packing, quarantine, ledger and restart, validation split, tracking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from openllama import cli, files
from openllama.data import pack
from openllama.data.shards import DatasetNotFinished, PackedDataset

SEQ_LEN = 64
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "redpajama"
BAD_LINES = [b"{oops\n", b'{"text": ""}\n', b'{"meta": {}}\n', b'{"text": "caf\xe9"}\n']


def sample_texts(name: str, n: int, size: int = 1500) -> list[str]:
    """n documents of about `size` characters cut from a shipped sample file."""
    text = "\n".join(json.loads(line)["text"] for line in open(SAMPLE / name, encoding="utf-8"))
    return [text[i * size : (i + 1) * size] for i in range(n)]


def jsonl(texts: list[str], meta: dict | None = None) -> list[bytes]:
    extra = {"meta": meta} if meta is not None else {"source": "cc", "pred_label_prob": 0.5}
    return [json.dumps({"text": t, **extra}).encode() + b"\n" for t in texts]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Full-layout c4 (with bad lines) and zstd common_crawl, plus a 1T-Sample-layout wikipedia file."""
    root = tmp_path_factory.mktemp("corpus")
    c4 = sample_texts("c4_sample.jsonl", 40)
    cc = sample_texts("cc_2019-30_sample.jsonl", 30)
    wiki = sample_texts("wikipedia_sample.jsonl", 30)
    (root / "rp/c4").mkdir(parents=True)
    lines = jsonl(c4, {"url": "u"})
    (root / "rp/c4/c4-train.00000-of-01024.jsonl").write_bytes(b"".join(lines[:20] + BAD_LINES + lines[20:]))
    (root / "rp/common_crawl/2019-30").mkdir(parents=True)
    (root / "rp/common_crawl/2019-30/en_head_0000.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(jsonl(cc))))
    (root / "sample").mkdir()
    (root / "sample/wikipedia_sample.jsonl").write_bytes(b"".join(jsonl(wiki, {"title": "t"})))
    inputs = [str(root / "rp"), str(root / "sample/wikipedia_sample.jsonl")]
    return {"inputs": inputs, "texts": {"c4": c4, "common_crawl": cc, "wikipedia": wiki}}


def build(corpus, sp_model, out, **kwargs) -> dict:
    options = {"seq_len": SEQ_LEN, "val_fraction": 0.2, "shard_tokens": 4000, "track": False, **kwargs}
    return pack.tokenize_dataset(corpus["inputs"], str(sp_model), str(out), **options)


@pytest.fixture(scope="module")
def built(corpus, sp_model, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dataset")
    return out, build(corpus, sp_model, out)


def test_every_valid_document_is_counted_per_subset(corpus, built):
    stats = built[1]["stats"]["subsets"]
    assert {s: stats[s]["documents"] for s in stats} == {s: len(t) for s, t in corpus["texts"].items()}


def test_rejected_lines_are_quarantined_with_reason_source_and_line(built):
    rejected = pq.read_table(built[0] / "rejected").to_pylist()
    assert sorted((r["reason"], r["line"]) for r in rejected) == [
        ("empty_text", 22), ("invalid_utf8", 24), ("no_text", 23), ("not_json", 21)]
    assert all(r["source"].endswith("c4-train.00000-of-01024.jsonl") for r in rejected)


def test_small_spans_and_streamed_parts_give_the_same_documents_tokens_and_rejections(corpus, built, sp_model,
                                                                                      tmp_path):
    """Spans of 8 kB cut the plain files in pieces and send the .zst file through a streamed split into parts."""
    manifest = build(corpus, sp_model, tmp_path, span_bytes=8000)
    units = [json.loads(p.read_text()) for p in (tmp_path / "units").glob("*.json")]
    assert sum("-part" in u["unit"] for u in units) > 1 and sum("-at" in u["unit"] for u in units) > 1
    compressed = {str(p) for p in Path(corpus["inputs"][0]).rglob("*.zst")}
    assert {u["source"] for u in units if "-part" in u["unit"]} == compressed
    for key in ("documents", "validation_documents", "tokens", "bytes", "files"):
        assert {s: e[key] for s, e in manifest["stats"]["subsets"].items()} == \
            {s: e[key] for s, e in built[1]["stats"]["subsets"].items()}, key
    rejected = pq.read_table(tmp_path / "rejected").to_pylist()
    whole = pq.read_table(built[0] / "rejected").to_pylist()
    assert sorted((r["reason"], r["source"], r["offset"]) for r in rejected) == \
        sorted((r["reason"], r["source"], r["offset"]) for r in whole)
    assert not (tmp_path / "staging").exists()  # the streamed parts are gone once the dataset is finished


def test_rejections_are_counted_by_reason_in_stats(built):
    stats = json.loads((built[0] / "stats.json").read_text())
    assert stats["subsets"]["c4"]["rejected"] == {"empty_text": 1, "invalid_utf8": 1, "no_text": 1, "not_json": 1}


def test_rows_hold_the_documents_tokens_in_order_with_bos_and_eos(corpus, built, sp_model):
    """Unit shards then the tail shard, each row after the first adding seq_len new tokens."""
    out, manifest = built
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    train_docs = [t for t in corpus["texts"]["wikipedia"] if not pack.is_validation(t, 0.2, 0)]
    expected = np.concatenate([processor.encode(t, add_bos=True, add_eos=True) for t in train_docs])
    shards = [s for s in manifest["shards"] if s["split"] == "train" and s["subset"] == "wikipedia"]
    assert len(shards) > 2
    dataset = PackedDataset.open(str(out))
    rows = dataset.read("wikipedia", np.arange(dataset.rows("wikipedia")))
    stream = np.concatenate([rows[0], rows[1:, 1:].ravel()])
    assert np.array_equal(stream, expected[: len(stream)]) and len(expected) - len(stream) < SEQ_LEN


def test_rows_never_mix_subsets(built):
    assert all(s["path"].startswith(f"{s['split']}/{s['subset']}/") for s in built[1]["shards"])


def test_validation_split_holds_the_documents_chosen_by_seeded_hash(corpus, built):
    stats = built[1]["stats"]["subsets"]
    for subset, texts in corpus["texts"].items():
        assert stats[subset]["validation_documents"] == sum(pack.is_validation(t, 0.2, 0) for t in texts)
    assert PackedDataset.open(str(built[0]), "validation").rows("c4") > 0


def test_shards_are_fixed_width_rows_of_uint16_tokens(built):
    out, manifest = built
    assert manifest["format"] == "openllama-packed-v2" and manifest["token_dtype"] == "uint16"
    assert manifest["row_bytes"] == (SEQ_LEN + 1) * 2 + 4
    for shard in manifest["shards"]:
        assert shard["path"].endswith(".bin")
        assert (out / shard["path"]).stat().st_size == shard["rows"] * manifest["row_bytes"] == shard["bytes"]


def test_an_out_holding_a_dataset_in_the_first_format_names_the_convert_command(corpus, sp_model, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "openllama-packed-v1", "finished": True}))
    with pytest.raises(ValueError, match=f"openllama data convert {tmp_path} --out NEW_DIR"):
        build(corpus, sp_model, tmp_path)


def test_every_shard_matches_its_checksum(built):
    PackedDataset.open(str(built[0])).verify()
    PackedDataset.open(str(built[0]), "validation").verify()


def test_a_run_stopped_midway_is_unfinished_and_a_rerun_gives_the_same_shards(corpus, built, sp_model, tmp_path):
    def crash_after_the_first_unit(what: str, finished: int, to_run: int) -> None:
        raise RuntimeError(f"stopping after {finished} of {to_run} units, as if the run had crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        build(corpus, sp_model, tmp_path, on_progress=crash_after_the_first_unit)
    with pytest.raises(DatasetNotFinished):
        PackedDataset.open(str(tmp_path))
    # a half-written shard of an unfinished unit, as a kill during writing would leave it
    partial = files.temporary_name(tmp_path / "train/wikipedia/partial.bin")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half")
    rerun = build(corpus, sp_model, tmp_path)
    assert not partial.exists()
    assert rerun["shards"] == built[1]["shards"]
    assert rerun["stats"]["total"] == built[1]["stats"]["total"]


def test_a_finished_dataset_with_the_same_settings_is_reused(corpus, built, sp_model, monkeypatch):
    monkeypatch.setattr(pack, "run_units", lambda *a, **k: pytest.fail("tokenized again"))
    assert build(corpus, sp_model, built[0]) == built[1]


def test_a_dataset_built_with_other_settings_is_not_overwritten(corpus, built, sp_model):
    with pytest.raises(ValueError, match="seq_len"):
        build(corpus, sp_model, built[0], seq_len=32)


def test_the_command_line_writes_a_dataset_and_logs_it_to_mlflow(corpus, sp_model, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = cli.main(["data", "tokenize", *corpus["inputs"], "--tokenizer", str(sp_model), "--out",
                          str(tmp_path / "out"), "--seq-len", "128"])
    assert code == 0 and "100 documents" in capsys.readouterr().out
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("data").experiment_id])
    assert run.data.metrics["c4_rejected_not_json"] == 1 and run.data.params["seq_len"] == "128"
