"""The packed shard format: packing convention, reading rows by index, refusing unfinished or damaged data."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openllama.data.shards import DatasetNotFinished, PackedDataset, Packer, ShardCorrupted

SEQ_LEN = 8


def make_dataset(root, shard_rows=(3, 5), finished=True, as_list=False):
    """A dataset of one subset whose row r holds r * 100 + column index, split over shards."""
    shards, start = [], 0
    for number, n in enumerate(shard_rows):
        rows = (np.arange(start, start + n)[:, None] * 100 + np.arange(SEQ_LEN + 1)).astype(np.int32)
        start += n
        relative = f"train/c4/{number:05d}.parquet"
        (root / "train/c4").mkdir(parents=True, exist_ok=True)
        column = (pa.array(rows.tolist(), type=pa.list_(pa.int32())) if as_list
                  else pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), SEQ_LEN + 1))
        pq.write_table(pa.table({"tokens": column}), root / relative)
        shards.append({"path": relative, "split": "train", "subset": "c4", "rows": n, "tokens": n * SEQ_LEN,
                       "documents": 1, "sha256": hashlib.sha256((root / relative).read_bytes()).hexdigest()})
    manifest = {"format": "openllama-packed-v1", "finished": finished, "seq_len": SEQ_LEN,
                "tokenizer": {"path": "t.model", "sha256": "0", "vocab_size": 512}, "shards": shards, "stats": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_packed_rows_overlap_by_one_token_so_each_token_is_a_target_once():
    stream = np.arange(1, 30, dtype=np.int32)
    packer = Packer(seq_len=SEQ_LEN)
    rows = np.concatenate([packer.add(stream[:5]), packer.add(stream[5:17]), packer.add(stream[17:])])
    assert rows.shape == (3, SEQ_LEN + 1)
    targets = rows[:, 1:].ravel()
    assert np.array_equal(targets, stream[1 : 1 + 3 * SEQ_LEN])
    assert np.array_equal(packer.pending, stream[3 * SEQ_LEN :])


def test_rows_are_read_by_global_index_across_shards_in_the_order_asked(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    rows = dataset.read("c4", np.array([6, 0, 3, 2]))
    assert rows.dtype == np.int32 and rows.shape == (4, SEQ_LEN + 1)
    assert list(rows[:, 0] // 100) == [6, 0, 3, 2]


def test_list_columns_read_like_fixed_size_lists(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path, as_list=True)))
    assert list(dataset.read("c4", np.array([7]))[0]) == [700 + i for i in range(SEQ_LEN + 1)]


def test_subset_row_and_token_counts_come_from_the_manifest(tmp_path):
    dataset = PackedDataset.open(str(make_dataset(tmp_path)))
    assert (dataset.subsets, dataset.rows("c4"), dataset.tokens("c4"), dataset.seq_len) == (["c4"], 8, 64, 8)


def test_an_unfinished_dataset_is_refused_with_a_rerun_hint(tmp_path):
    with pytest.raises(DatasetNotFinished, match="Rerun"):
        PackedDataset.open(str(make_dataset(tmp_path, finished=False)))


def test_a_corrupted_shard_is_detected_on_first_read_and_named(tmp_path):
    root = make_dataset(tmp_path)
    shard = root / "train/c4/00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    dataset = PackedDataset.open(str(root))
    assert dataset.read("c4", np.array([0])).shape == (1, SEQ_LEN + 1)  # the intact shard still reads
    with pytest.raises(ShardCorrupted, match="train/c4/00001.parquet"):
        dataset.read("c4", np.array([4]))


def test_verify_checks_every_shard(tmp_path):
    root = make_dataset(tmp_path)
    (root / "train/c4/00000.parquet").write_bytes(b"garbage")
    with pytest.raises(ShardCorrupted, match="00000.parquet"):
        PackedDataset.open(str(root)).verify()


def test_an_out_of_range_row_index_is_an_error(tmp_path):
    with pytest.raises(IndexError, match="c4"):
        PackedDataset.open(str(make_dataset(tmp_path))).read("c4", np.array([8]))


def test_a_missing_split_is_an_error_naming_the_splits_present(tmp_path):
    with pytest.raises(ValueError, match="train"):
        PackedDataset.open(str(make_dataset(tmp_path)), split="validation")
