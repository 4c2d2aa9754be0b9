"""The packed shard format: packing convention, reading rows by index, refusing unfinished or damaged data."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openllama import cli
from openllama.data.pack import convert_dataset
from openllama.data.shards import (
    FORMAT,
    DatasetNeedsConversion,
    DatasetNotFinished,
    PackedDataset,
    Packer,
    RowLayout,
    ShardCorrupted,
    ShardFile,
    ShardWriter,
    write_dataset,
)

SEQ_LEN = 8
LAYOUT = RowLayout.for_vocabulary(SEQ_LEN, 32000)  # uint16 tokens


def numbered_rows(start: int, n: int) -> np.ndarray:
    """Rows whose row r holds r * 100 + column index: a row read back names itself."""
    return (np.arange(start, start + n)[:, None] * 100 + np.arange(SEQ_LEN + 1)).astype(np.int32)


def make_dataset(root: Path, shard_rows=(3, 5), finished=True) -> Path:
    """A dataset of one subset whose row r holds r * 100 + column index, split over shards."""
    entries, start = [], 0
    for number, n in enumerate(shard_rows):
        with ShardFile(str(root), f"train/c4/{number:05d}.bin", "train", "c4", LAYOUT, bos_id=1) as shard:
            shard.add(numbered_rows(start, n))
        entries.append(shard.entry)
        start += n
    manifest = {"format": FORMAT, "finished": finished, "seq_len": SEQ_LEN, **LAYOUT.manifest_fields(),
                "tokenizer": {"path": "t.model", "sha256": "0", "vocab_size": 512}, "shards": entries, "stats": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_v1_dataset(root: Path, shard_rows=(3, 5), as_list=False) -> Path:
    """The same rows in the first format: parquet shards, one `tokens` column, as `openllama-packed-v1` wrote."""
    entries, start = [], 0
    for number, n in enumerate(shard_rows):
        rows = numbered_rows(start, n)
        start += n
        relative = f"train/c4/{number:05d}.parquet"
        (root / "train/c4").mkdir(parents=True, exist_ok=True)
        column = (pa.array(rows.tolist(), type=pa.list_(pa.int32())) if as_list
                  else pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), SEQ_LEN + 1))
        pq.write_table(pa.table({"tokens": column}), root / relative)
        entries.append({"path": relative, "split": "train", "subset": "c4", "rows": n, "tokens": n * SEQ_LEN,
                        "documents": 1, "sha256": hashlib.sha256((root / relative).read_bytes()).hexdigest()})
    (root / "rejected").mkdir()
    pq.write_table(pa.table({"reason": ["not_json"]}), root / "rejected/unit.parquet")
    manifest = {"format": "openllama-packed-v1", "finished": True, "seq_len": SEQ_LEN,
                "tokenizer": {"path": "t.model", "sha256": "0", "vocab_size": 512}, "settings": {"seq_len": SEQ_LEN},
                "shards": entries, "stats": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def flip(path: Path, offset: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


def bytes_read_by_this_process() -> int:
    """What the kernel counts as read by this process's read calls, page cache hits included."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


# --- the packing contract ---------------------------------------------------------------------------------


def test_packed_rows_overlap_by_one_token_so_each_token_is_a_target_once():
    stream = np.arange(1, 30, dtype=np.int32)
    packer = Packer(seq_len=SEQ_LEN)
    rows = np.concatenate([packer.add(stream[:5]), packer.add(stream[5:17]), packer.add(stream[17:])])
    assert rows.shape == (3, SEQ_LEN + 1)
    targets = rows[:, 1:].ravel()
    assert np.array_equal(targets, stream[1 : 1 + 3 * SEQ_LEN])
    assert np.array_equal(packer.pending, stream[3 * SEQ_LEN :])


# --- the file layout --------------------------------------------------------------------------------------


def test_a_shard_is_fixed_width_rows_of_uint16_tokens_each_with_its_checksum(tmp_path):
    root = make_dataset(tmp_path)
    data = (root / "train/c4/00001.bin").read_bytes()
    record = (SEQ_LEN + 1) * 2 + 4
    assert len(data) == 5 * record
    second = np.frombuffer(data[record : record + (SEQ_LEN + 1) * 2], dtype="<u2")
    np.testing.assert_array_equal(second, numbered_rows(4, 1)[0])  # row 1 of shard 1 is global row 4


def test_tokens_are_uint16_up_to_a_65536_piece_vocabulary_and_uint32_beyond():
    assert RowLayout.for_vocabulary(2048, 65536).dtype == np.uint16
    assert RowLayout.for_vocabulary(2048, 65537).dtype == np.uint32
    assert RowLayout.for_vocabulary(2048, 32000).record_bytes == 2049 * 2 + 4


def test_a_token_id_that_does_not_fit_the_token_type_is_refused_and_nothing_is_published(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint16"):
        with ShardWriter(str(tmp_path), "", "train", "c4", LAYOUT, 10, bos_id=1) as writer:
            writer.add(np.full((2, SEQ_LEN + 1), 70_000))
    assert list(tmp_path.rglob("*.bin")) == []


def test_the_manifests_sha256_is_the_whole_files_computed_while_writing(tmp_path):
    root = make_dataset(tmp_path)
    for entry in json.loads((root / "manifest.json").read_text())["shards"]:
        assert entry["sha256"] == hashlib.sha256((root / entry["path"]).read_bytes()).hexdigest()
        assert entry["bytes"] == (root / entry["path"]).stat().st_size


def test_writing_the_same_rows_again_gives_the_same_bytes(tmp_path):
    first = make_dataset(tmp_path / "a")
    second = make_dataset(tmp_path / "b")
    for name in ("00000.bin", "00001.bin"):
        assert (first / "train/c4" / name).read_bytes() == (second / "train/c4" / name).read_bytes()


# --- reading ------------------------------------------------------------------------------------------------


def test_rows_are_read_by_global_index_across_shards_in_the_order_asked(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    rows = dataset.read("c4", np.array([6, 0, 3, 2]))
    assert rows.dtype == np.int32 and rows.shape == (4, SEQ_LEN + 1)
    assert list(rows[:, 0] // 100) == [6, 0, 3, 2]


def test_a_row_asked_twice_is_returned_twice(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    assert list(dataset.read("c4", np.array([5, 5, 1, 5]))[:, 0] // 100) == [5, 5, 1, 5]


def test_subset_row_and_token_counts_come_from_the_manifest(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    assert (dataset.subsets, dataset.rows("c4"), dataset.tokens("c4"), dataset.seq_len) == (["c4"], 8, 64, 8)


def test_rows_are_read_through_a_uri_by_the_same_code_path(tmp_path):
    root = make_dataset(tmp_path)
    dataset = PackedDataset.open(f"file://{root}")
    np.testing.assert_array_equal(dataset.read("c4", np.array([7, 1])), numbered_rows(0, 8)[[7, 1]])


def test_reads_from_several_threads_at_once_each_get_their_rows(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path, shard_rows=(3, 5, 4, 6))))
    wrong = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(50):
            indices = rng.integers(0, 18, size=6)
            if not np.array_equal(dataset.read("c4", indices)[:, 0] // 100, indices):
                wrong.append(indices)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_a_dataset_reopens_after_pickling(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    dataset.read("c4", np.array([0, 6]))
    copy = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(copy.read("c4", np.array([0, 6])), dataset.read("c4", np.array([0, 6])))


def test_a_random_row_costs_one_ranged_read_of_about_its_own_size_on_a_cold_reader(tmp_path):
    """Production-width rows (2049 uint16 tokens) over several shards, read at random by a fresh reader."""
    rows = np.random.default_rng(0).integers(0, 32000, size=(4000, 2049)).astype(np.int32)
    write_dataset(str(tmp_path), {("train", "c4"): rows}, seq_len=2048, vocab_size=32000, shard_rows=1000)
    dataset = PackedDataset.open(str(tmp_path))
    indices = np.random.default_rng(1).choice(4000, size=64, replace=False)
    before = bytes_read_by_this_process()
    got = dataset.read("c4", indices)
    kernel = bytes_read_by_this_process() - before
    delivered = len(indices) * 2049 * 2  # the rows' tokens as stored
    np.testing.assert_array_equal(got, rows[indices])
    print(f"\nread amplification, 64 random rows, cold reader: {kernel / delivered:.4f} (kernel's count of bytes "
          f"read), {dataset.bytes_read / delivered:.4f} (ranged reads asked for)")
    assert dataset.bytes_read == len(indices) * dataset.layout.record_bytes
    assert kernel / delivered <= 2.0


def test_adjacent_rows_are_read_in_one_ranged_read(tmp_path, monkeypatch):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    calls = []
    read_range = dataset._read_range
    monkeypatch.setattr(dataset, "_read_range", lambda *a: calls.append(a[1:]) or read_range(*a))
    dataset.read("c4", np.array([7, 4, 5, 6, 0]))
    assert sorted(calls) == [(0, 1), (1, 4)]  # row 0 of shard 0; rows 1..4 of shard 1 in one read


# --- refusing what cannot be trusted -------------------------------------------------------------------------


def test_an_unfinished_dataset_is_refused_with_a_rerun_hint(tmp_path):
    with pytest.raises(DatasetNotFinished, match="Rerun"):
        PackedDataset.open(str(make_dataset(tmp_path, finished=False)))


def test_a_corrupted_shard_is_detected_on_first_read_and_named(tmp_path):
    root = make_dataset(tmp_path)
    shard = root / "train/c4/00001.bin"
    flip(shard, shard.stat().st_size // 2)  # inside row 2 of 5: global row 5
    dataset = PackedDataset.open(str(root))
    assert dataset.read("c4", np.array([0])).shape == (1, SEQ_LEN + 1)  # the intact shard still reads
    assert dataset.read("c4", np.array([4])).shape == (1, SEQ_LEN + 1)  # so do the intact rows of this one
    with pytest.raises(ShardCorrupted, match="train/c4/00001.bin: row 2 .* fails its crc32"):
        dataset.read("c4", np.array([5]))


def test_a_damaged_checksum_is_detected_like_damaged_tokens(tmp_path):
    root = make_dataset(tmp_path)
    flip(root / "train/c4/00000.bin", LAYOUT.record_bytes - 1)  # the last byte of row 0's crc32
    with pytest.raises(ShardCorrupted, match="row 0"):
        PackedDataset.open(str(root)).read("c4", np.array([0]))


def test_a_row_copied_over_another_is_detected(tmp_path):
    root = make_dataset(tmp_path)
    path = root / "train/c4/00001.bin"
    data = bytearray(path.read_bytes())
    data[LAYOUT.record_bytes : 2 * LAYOUT.record_bytes] = data[: LAYOUT.record_bytes]
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorrupted, match="row 1 "):
        PackedDataset.open(str(root)).read("c4", np.array([4]))


def test_a_truncated_shard_is_detected_when_first_opened(tmp_path):
    root = make_dataset(tmp_path)
    path = root / "train/c4/00001.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardCorrupted, match="00001.bin: .* cut short"):
        PackedDataset.open(str(root)).read("c4", np.array([3]))


def test_verify_checks_every_shard(tmp_path):
    root = make_dataset(tmp_path)
    (root / "train/c4/00000.bin").write_bytes(b"garbage")
    with pytest.raises(ShardCorrupted, match="00000.bin"):
        PackedDataset.open(str(root)).verify()


def test_verify_finds_a_flipped_byte_by_sha256_and_names_the_row(tmp_path):
    root = make_dataset(tmp_path)
    flip(root / "train/c4/00001.bin", 3 * LAYOUT.record_bytes + 5)
    PackedDataset.open(str(make_dataset(tmp_path / "intact"))).verify()
    with pytest.raises(ShardCorrupted, match=r"00001.bin: sha256 .* rows failing their crc32: \[3\]"):
        PackedDataset.open(str(root)).verify()


def test_an_out_of_range_row_index_is_an_error(tmp_path):
    with pytest.raises(IndexError, match="c4"):
        PackedDataset.open(str(make_dataset(tmp_path))).read("c4", np.array([8]))


def test_a_missing_split_is_an_error_naming_the_splits_present(tmp_path):
    with pytest.raises(ValueError, match="train"):
        PackedDataset.open(str(make_dataset(tmp_path)), split="validation")


# --- the first format: refused, and converted -----------------------------------------------------------------


def test_a_dataset_in_the_first_format_is_refused_naming_the_command_that_converts_it(tmp_path):
    old = make_v1_dataset(tmp_path / "old")
    with pytest.raises(DatasetNeedsConversion, match=f"openllama data convert {old} --out NEW_DIR"):
        PackedDataset.open(str(old))


def test_conversion_keeps_every_row_and_the_shard_entries(tmp_path):
    old = make_v1_dataset(tmp_path / "old")
    manifest = convert_dataset(str(old), str(tmp_path / "new"))
    dataset = PackedDataset.open(str(tmp_path / "new"))
    np.testing.assert_array_equal(dataset.read("c4", np.arange(8)), numbered_rows(0, 8))
    dataset.verify()
    assert [(s["path"], s["rows"], s["documents"]) for s in manifest["shards"]] == [
        ("train/c4/00000.bin", 3, 1), ("train/c4/00001.bin", 5, 1)]
    assert manifest["token_dtype"] == "uint16" and manifest["converted_from"] == str(old)
    assert (tmp_path / "new/rejected/unit.parquet").is_file()


def test_list_columns_read_like_fixed_size_lists(tmp_path):
    convert_dataset(str(make_v1_dataset(tmp_path / "old", as_list=True)), str(tmp_path / "new"))
    assert list(PackedDataset.open(str(tmp_path / "new")).read("c4", np.array([7]))[0]) == [
        700 + i for i in range(SEQ_LEN + 1)]


def test_a_failed_conversion_is_finished_by_a_rerun_that_redoes_only_the_missing_shards(tmp_path):
    """The second shard fails its checksum, so the run stops; once the file is whole again, the rerun converts
    exactly the shards the ledger does not hold (never the failed one's) and ends where a clean run does."""
    old, new = make_v1_dataset(tmp_path / "old"), tmp_path / "new"
    damaged = old / "train/c4/00001.parquet"
    whole = damaged.read_bytes()
    flip(damaged, 40)
    with pytest.raises(ShardCorrupted):
        convert_dataset(str(old), str(new))
    with pytest.raises(DatasetNotFinished):
        PackedDataset.open(str(new))
    recorded = sorted(p.name for p in (new / "units").glob("convert-*.json"))
    assert len(recorded) < 2
    damaged.write_bytes(whole)
    runs: list[int] = []
    convert_dataset(str(old), str(new), on_progress=lambda what, done, to_run: runs.append(to_run))
    assert set(runs) == {2 - len(recorded)}
    reference = convert_dataset(str(old), str(tmp_path / "reference"))
    assert json.loads((new / "manifest.json").read_text())["shards"] == reference["shards"]


def test_a_damaged_old_shard_is_not_converted(tmp_path):
    old = make_v1_dataset(tmp_path / "old")
    flip(old / "train/c4/00001.parquet", 40)
    with pytest.raises(ShardCorrupted, match="00001.parquet: sha256"):
        convert_dataset(str(old), str(tmp_path / "new"))


def test_the_convert_command_writes_the_new_dataset(tmp_path, capsys):
    old = make_v1_dataset(tmp_path / "old")
    assert cli.main(["data", "convert", str(old), "--out", str(tmp_path / "new")]) == 0
    assert "2 shards, 8 rows in openllama-packed-v2" in capsys.readouterr().out
    assert PackedDataset.open(str(tmp_path / "new")).rows("c4") == 8
    assert cli.main(["data", "convert", str(old), "--out", str(tmp_path / "new")]) == 0  # a rerun reuses it


def test_the_convert_command_refuses_a_dataset_already_in_the_new_format(tmp_path, capsys):
    assert cli.main(["data", "convert", str(make_dataset(tmp_path / "v2")), "--out", str(tmp_path / "new")]) == 2
    assert "only openllama-packed-v1 datasets are converted" in capsys.readouterr().err


def test_write_dataset_publishes_a_finished_dataset_of_the_rows_given(tmp_path):
    rows = numbered_rows(0, 7)
    chunks = iter([rows[:2], rows[2:]])
    write_dataset(str(tmp_path), {("validation", "wiki"): chunks}, seq_len=SEQ_LEN, vocab_size=512, shard_rows=3)
    dataset = PackedDataset.open(str(tmp_path), "validation")
    assert len(dataset.manifest["shards"]) == 3
    np.testing.assert_array_equal(dataset.read("wiki", np.arange(7)), rows)


def test_write_dataset_refuses_rows_of_another_width(tmp_path):
    with pytest.raises(ValueError, match="expected \\[n, 9\\]"):
        write_dataset(str(tmp_path), {("train", "c4"): np.zeros((2, 5))}, seq_len=SEQ_LEN, vocab_size=512)
