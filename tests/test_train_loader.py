"""Global batches: a pure function of the step, the same whatever the worker split, epochs without replacement."""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import psutil
import pytest

from openllama.data.mixture import REDPAJAMA_TOKENS
from openllama.data.shards import FORMAT
from openllama.train.loader import GlobalBatches, MixtureSchedule, RowShuffle, mixture


class RowsInMemory:
    """A packed dataset in memory: row r of subset s holds the token (subset id * 1000 + r) in every place."""

    seq_len = 4

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes

    @property
    def subsets(self) -> list[str]:
        return sorted(self.sizes)

    def rows(self, subset: str) -> int:
        return self.sizes[subset]

    def read(self, subset: str, indices: np.ndarray) -> np.ndarray:
        code = self.subsets.index(subset) * 1000 + np.asarray(indices)
        return np.repeat(code[:, None], self.seq_len + 1, axis=1).astype(np.int32)


SOURCE = RowsInMemory({"github": 37, "wikipedia": 23, "book": 11})
WEIGHTS = {"github": 0.5, "wikipedia": 0.3, "book": 0.2}


def test_batch_of_a_step_does_not_depend_on_the_steps_read_before():
    walked = GlobalBatches(SOURCE, 8, seed=3, weights=WEIGHTS)
    for step in range(12):
        walked.read(step)
    fresh = GlobalBatches(SOURCE, 8, seed=3, weights=WEIGHTS)
    np.testing.assert_array_equal(fresh.read(12), walked.read(12))


def test_process_slices_concatenate_to_the_global_batch_for_any_process_count():
    batches = GlobalBatches(SOURCE, 8, seed=0, weights=WEIGHTS)
    whole = batches.read(5)
    for processes in (1, 2, 4, 8):
        per = 8 // processes
        parts = [batches.read(5, np.arange(p * per, (p + 1) * per)) for p in range(processes)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_seed_changes_the_batches():
    a = GlobalBatches(SOURCE, 8, seed=0, weights=WEIGHTS).read(0)
    b = GlobalBatches(SOURCE, 8, seed=1, weights=WEIGHTS).read(0)
    assert not np.array_equal(a, b)


def test_each_subset_is_read_without_replacement_within_an_epoch():
    batches = GlobalBatches(SOURCE, 8, seed=0, weights=WEIGHTS)
    seen = np.concatenate([batches.read(step)[:, 0] for step in range(40)])  # 320 rows, several epochs
    book = seen[(seen >= 0) & (seen < 1000)]  # subset "book" is index 0
    for epoch in range(len(book) // 11):
        assert sorted(book[epoch * 11:(epoch + 1) * 11]) == list(range(11))


def test_mixture_proportions_follow_weights():
    batches = GlobalBatches(SOURCE, 64, seed=0, weights=WEIGHTS)
    counts = sum(batches.counts(step) for step in range(200))
    shares = counts / counts.sum()
    np.testing.assert_allclose(shares, [WEIGHTS[s] for s in batches.subsets], atol=0.01)


def test_weights_are_renormalized_over_the_subsets_present():
    shares = mixture(["github", "book"], {"github": 0.3, "book": 0.1, "common_crawl": 0.6})
    assert shares == pytest.approx({"github": 0.75, "book": 0.25})


def test_default_weights_are_llamas_mixture():
    shares = mixture(["common_crawl", "c4"], None)
    assert shares == pytest.approx({"common_crawl": 0.67 / 0.82, "c4": 0.15 / 0.82})


def test_weights_for_no_present_subset_are_refused():
    with pytest.raises(ValueError, match="weight"):
        mixture(["github"], {"book": 1.0})


def test_unfinished_dataset_is_refused(tmp_path):
    from openllama.data.shards import DatasetNotFinished
    from openllama.train.config import load_config
    from openllama.train.trainer import open_datasets

    manifest = {"format": FORMAT, "finished": False, "seq_len": 128, "shards": []}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    config = load_config("tiny-cpu", [f"data.path={tmp_path}"])
    with pytest.raises(DatasetNotFinished, match="finished=False"):
        open_datasets(config)


# --- the shuffle: a bijection per epoch, computed per index --------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 11, 100, 1000, 1023, 1024, 1025, 4097])
def test_the_row_shuffle_reads_every_row_exactly_once_per_epoch(rows):
    for epoch in range(3):
        order = RowShuffle(rows, (0, 12345, epoch))(np.arange(rows))
        assert sorted(order.tolist()) == list(range(rows))


def test_the_row_shuffle_is_a_fresh_order_each_epoch_and_far_from_the_identity():
    rows = 10_000
    orders = [RowShuffle(rows, (0, 7, epoch))(np.arange(rows)) for epoch in range(3)]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    for order in orders:
        assert abs(np.corrcoef(np.arange(rows), order)[0, 1]) < 0.05
        assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.05  # neighbours land far apart


def test_the_row_shuffle_of_one_position_needs_no_other_position():
    shuffle = RowShuffle(1_000_003, (3, 1, 4))
    whole = shuffle(np.arange(1_000_003))
    picked = np.array([0, 17, 999_999, 1_000_002])
    np.testing.assert_array_equal(shuffle(picked), whole[picked])


def test_reads_over_many_epochs_take_every_row_once_per_epoch_of_each_subset():
    source = RowsInMemory({"github": 37, "wikipedia": 23, "book": 11})
    batches = GlobalBatches(source, 7, seed=5, weights=WEIGHTS)
    seen = np.concatenate([batches.read(step)[:, 0] for step in range(300)])
    for index, name in enumerate(batches.subsets):
        rows = source.rows(name)
        stream = seen[seen // 1000 == index] % 1000
        assert len(stream) // rows >= 10  # ten epochs or more of every subset
        for epoch in range(len(stream) // rows):
            assert sorted(stream[epoch * rows:(epoch + 1) * rows].tolist()) == list(range(rows)), (name, epoch)


# --- the mixture schedule: exact, closed form, faithful to the weights ------------------------------------------


def test_every_step_holds_exactly_the_batch_and_every_slot_one_subset():
    schedule = MixtureSchedule([0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02], seed=0)
    before = schedule.counts_before(0)
    for slots in range(1, 5000):
        after = schedule.counts_before(slots)
        assert after.sum() == slots and np.array_equal(np.sort(after - before), [0] * 6 + [1])
        before = after


def test_each_subsets_share_of_slots_stays_within_the_tree_depth_of_its_weight_at_any_point():
    weights = np.array([0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02])
    schedule = MixtureSchedule(list(weights), seed=1)
    depth = int(np.ceil(np.log2(len(weights))))
    for slots in [1, 10, 999, 123_457, 10**9 + 7, 512_000_000_000, 2**53 + 1]:
        deviation = np.abs(schedule.counts_before(slots) - slots * weights)
        assert deviation.max() <= depth + slots * len(weights) * 2.0**-32, (slots, deviation)


def test_mixture_counts_follow_weights_over_many_steps():
    batches = GlobalBatches(SOURCE, 64, seed=0, weights=WEIGHTS)
    counts = sum(batches.counts(step) for step in range(10_000))
    shares = counts / counts.sum()
    np.testing.assert_allclose(shares, [WEIGHTS[s] for s in batches.subsets], atol=1e-5)
    assert all(counts[i] > 0 for i in range(len(batches.subsets)))


def test_a_late_steps_positions_are_the_sum_of_the_counts_before_it():
    batches = GlobalBatches(SOURCE, 8, seed=2, weights=WEIGHTS)
    np.testing.assert_array_equal(batches.positions(3000), sum(batches.counts(step) for step in range(3000)))


# --- the cost of a plan does not depend on the corpus or the step ---------------------------------------------


class RedPajamaRows:
    """RedPajama-1T's row counts at seq_len 2048 (tokens // 2048 per subset), no tokens behind them."""

    seq_len = 2048

    @property
    def subsets(self) -> list[str]:
        return sorted(REDPAJAMA_TOKENS)

    def rows(self, subset: str) -> int:
        return REDPAJAMA_TOKENS[subset] // 2048

    def read(self, subset: str, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError("planning only")


@pytest.mark.parametrize("step", [0, 250_000])
def test_a_plan_at_redpajama_scale_takes_milliseconds_and_little_memory(step):
    """OpenLLaMA's batch (2048 rows of 2048 tokens) over RedPajama-1T's row counts, as on a fresh resume."""
    resident = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        batches = GlobalBatches(RedPajamaRows(), 2048, seed=0, weights=None)
        subset_ids, rows = batches.plan(step)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - resident
    timings = []
    for _ in range(5):  # a fresh loader each time, as on a resume; the best of five, the machine may be busy
        started = time.perf_counter()
        GlobalBatches(RedPajamaRows(), 2048, seed=0, weights=None).plan(step)
        timings.append(time.perf_counter() - started)
    print(f"\nplan({step}) at RedPajama-1T scale, fresh loader: best {min(timings) * 1e3:.2f} ms, worst "
          f"{max(timings) * 1e3:.2f} ms; traced peak {peak / 2**20:.2f} MiB, RSS growth {grown / 2**20:.1f} MiB")
    assert len(rows) == 2048 and rows.min() >= 0
    assert all(rows[subset_ids == i].max() < batches.row_counts[i] for i in np.unique(subset_ids))
    assert min(timings) < 0.050
    assert peak < 100 * 2**20 and grown < 100 * 2**20
