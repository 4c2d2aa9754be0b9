"""`ray job submit --working-dir . -- openllama data tokenize ...` against a real local Ray head."""

from __future__ import annotations

import io
import os
from pathlib import Path

from openllama import ray_jobs
from openllama.data.shards import PackedDataset

REPO = Path(__file__).resolve().parents[1]


def test_tokenize_runs_as_a_ray_job_and_writes_a_finished_dataset(ray_head, sp_model, tmp_path):
    env = ray_jobs.client_env(ray_head.dashboard_url, {**os.environ, **ray_head.env})
    out = tmp_path / "dataset"
    entrypoint = ["openllama", "data", "tokenize", "data/sample/redpajama/book_sample.jsonl",
                  "data/sample/redpajama/stackexchange_sample.jsonl", "--tokenizer", str(sp_model),
                  "--out", str(out), "--seq-len", "128", "--no-track"]
    log = io.StringIO()
    ray_jobs.submit(entrypoint, api_url=ray_head.dashboard_url, env=env, working_dir=REPO,
                    submission_id=f"test-data-tokenize-{os.getpid()}", echo=log)
    dataset = PackedDataset.open(str(out))
    assert dataset.subsets == ["book", "stackexchange"] and dataset.rows("book") > 0, log.getvalue()
