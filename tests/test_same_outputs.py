"""The data stage's outputs on the shipped sample, and tiny-cpu's first 30 losses on them, equal those of the
code before the data stage was reshaped (commit a521f89: `data/tokenize.py`, dedup in one file).

tests/golden/sample_outputs.json holds what that commit wrote, run as the pipeline runs the stages: dedup
(decontaminated against the local task pack), a 512-piece tokenizer trained on its output, tokenize at
seq_len 128, then `train tiny-cpu` for 30 steps. Files are compared byte for byte, but for what necessarily
differs between two runs: JSON is compared with the run's folders replaced by placeholders and `seconds`
left out, names carry a hash of their input's path (replaced by `H`), parquet files by their schema and rows
(rows name their source file by absolute path, which differs between checkouts), the tokenizer's own file
records the temporary folder it was trained in (its pieces and scores are what the dataset's digests check), and the
ledgers (`units/`) are the new format's. The one recorded setting the change altered is dedup.json's
`settings.decontaminate`: the tasks' names, where it named the pack; `eval_ngrams_sha256` beside it shows
that the n-grams decontaminated against are the same.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
GOLDEN = Path(__file__).parent / "golden" / "sample_outputs.json"
HASHED = re.compile(r"-[0-9a-f]{10}(?=[-.])")  # the path hash in a unit's and a shard's name


def normalized(value, swaps: dict[str, str]):
    """A JSON value with the run's own folders and digests replaced by placeholders and timings left out."""
    if isinstance(value, dict):
        return {k: normalized(v, swaps) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [normalized(v, swaps) for v in value]
    if isinstance(value, str):
        for old, new in swaps.items():
            value = value.replace(old, new)
        return HASHED.sub("-H", value)
    return value


def parquet_rows(path: Path, swaps: dict[str, str]) -> bytes:
    """A parquet file as its schema and rows, paths replaced: its rows name their source file by absolute path."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return json.dumps({"schema": str(table.schema), "rows": normalized(table.to_pylist(), swaps)},
                      sort_keys=True).encode()


def digests(root: Path, swaps: dict[str, str], skip: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or relative.split("/")[0] in skip:
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":
            data = parquet_rows(path, swaps)
        elif path.suffix == ".json":
            value = normalized(json.loads(data), swaps)
            if relative == "dedup.json":
                del value["settings"]["decontaminate"]
            data = json.dumps(value, sort_keys=True).encode()
        found[HASHED.sub("-H", relative)] = hashlib.sha256(data).hexdigest()
    return found


def outputs(work: Path) -> dict[str, dict[str, str]]:
    tokenizer = work / "tok" / "tokenizer.model"
    swaps = {str(work): "<OUT>", str(REPO): "<REPO>", hashlib.sha256(tokenizer.read_bytes()).hexdigest(): "<TOKENIZER>"}
    return {"dedup": digests(work / "dedup", swaps, skip=("work",)),
            "data": digests(work / "data", swaps, skip=("units",))}


def openllama(ray_head, *args, tracking_uri: str | None = None) -> None:
    harness.on_cluster(ray_head, sys.executable, "-m", "openllama.cli", *map(str, args), tracking_uri=tracking_uri)


@pytest.fixture(scope="module")
def built(ray_head, tmp_path_factory) -> Path:
    """The pipeline's data stages on the shipped sample, each as its command, on the session's Ray head."""
    work = tmp_path_factory.mktemp("same_outputs")
    openllama(ray_head, "eval", "texts", "openllama_local", "--out", work / "texts.json")
    openllama(ray_head, "data", "dedup", SAMPLE, "--out", work / "dedup", "--no-track",
              "--decontaminate", work / "texts.json")
    openllama(ray_head, "tokenizer", "train", work / "dedup", "--out", work / "tok", "--vocab-size", 512)
    openllama(ray_head, "data", "tokenize", work / "dedup", "--tokenizer", work / "tok" / "tokenizer.model",
              "--out", work / "data", "--seq-len", 128, "--no-track")
    return work


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_dedup_output_is_the_previous_layouts_byte_for_byte(built, golden):
    assert outputs(built)["dedup"] == golden["dedup"]


def test_the_dataset_is_the_previous_layouts_byte_for_byte(built, golden):
    assert outputs(built)["data"] == golden["data"]


def test_tiny_cpu_losses_are_the_previous_layouts(ray_head, built, golden):
    """Within 1e-6 on the processor they were recorded on; XLA's CPU code follows the processor's vector
    width, so on another model the order of float sums may differ, and there they agree within 1e-4."""
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{built}/mlruns.db"
    openllama(ray_head, "train", "tiny-cpu", f"output_dir={built}/runs", f"data.path={built}/data",
              "data.build_from=null", "train.steps=30", "train.log_every=1", "eval.tasks=[]",
              f"tracking.uri={tracking_uri}",
              "checkpoint.every_steps=30", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    losses = {str(m.step): m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(losses, key=int) == sorted(golden["losses"], key=int)
    tolerance = 1e-6 if processor() == golden["processor"] else 1e-4
    worst = max(abs(losses[step] - golden["losses"][step]) for step in losses)
    assert worst <= tolerance, f"largest difference {worst:.2e} (processor {processor()!r})"


def processor() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else the platform's)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
