"""Global batches: a pure function of the step, the same whatever the worker split, epochs without replacement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openllama.train.loader import GlobalBatches, mixture


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

    manifest = {"format": "openllama-packed-v1", "finished": False, "seq_len": 128, "shards": []}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    config = load_config("tiny-cpu", [f"data.path={tmp_path}"])
    with pytest.raises(DatasetNotFinished, match="finished=False"):
        open_datasets(config)
