"""Shared fixtures: a small LLaMA-style tokenizer and tiny model configs, built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

import harness

# Every test runs on CPU. The TPU compiler (libtpu, the `tpu` extra) is installed for `openllama plan`; left
# to itself, JAX would try to start it as a runtime in every process and warn that there is no TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"


def sample_documents(limit: int = 400) -> list[str]:
    """Real text for training a test tokenizer: the shipped sample corpus, else the stdlib's sources."""
    import json

    docs: list[str] = []
    for path in sorted(SAMPLE.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    if not docs:
        import sysconfig

        stdlib = Path(sysconfig.get_path("stdlib"))
        docs = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:60]]
    return docs[:limit]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-settings SentencePiece model with vocab 512 (the `tiny` preset's vocab size)."""
    from openllama.data.tokenizer import train_sentencepiece

    return train_sentencepiece(sample_documents(), tmp_path_factory.mktemp("tokenizer"), vocab_size=512)


@pytest.fixture(scope="session")
def packed_sample(ray_head, sp_model, tmp_path_factory) -> Path:
    """The shipped sample packed at seq_len 32 (a fifth held out), built once by `data tokenize`'s function on the
    session's Ray head; the training tests share it."""
    import sys

    out = tmp_path_factory.mktemp("packed") / "data"
    build = ("from openllama.data.pack import tokenize_dataset; "
             f"tokenize_dataset([{str(SAMPLE)!r}], {str(sp_model)!r}, {str(out)!r}, seq_len=32, "
             "val_fraction=0.2, track=False)")
    harness.on_cluster(ray_head, sys.executable, "-c", build)
    return out


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A real `ray start --head` on 127.0.0.1 with token auth, stopped by process group at the end.

    Use `ray_head.env` as the environment of subprocesses (`ray job submit`, CLI verbs); this process's own
    environment is left alone so in-process tests keep their embedded Ray.
    """
    from openllama.services import start_ray_head, stop_ray_head

    head = start_ray_head(tmp_path_factory.mktemp("ray_head"), num_cpus=2, object_store_bytes=512 << 20,
                          owner_pid=os.getpid())  # stopped even if this test process is killed
    yield head
    stop_ray_head(head)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, served artifacts); `.uri`, `.stop()`, `.start()`."""
    from openllama.services import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), owner_pid=os.getpid())
    yield server
    server.stop()


def _started(tmp_path_factory: pytest.TempPathFactory, start) -> Iterator:
    server = start(tmp_path_factory.mktemp(start.__name__), owner_pid=os.getpid())
    yield server
    server.stop()


def _new_bucket(server, scheme: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return f"{scheme}://{server.new_bucket()}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-protocol server (moto) on 127.0.0.1; `.env` points clients at it, `.new_bucket()` makes one."""
    from object_store import start_s3_server

    yield from _started(tmp_path_factory, start_s3_server)


@pytest.fixture
def bucket(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """s3://<a new bucket>, with this process's environment pointing at the test server for the test."""
    return _new_bucket(s3_server, "s3", monkeypatch)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory):
    """A GCS emulator on 127.0.0.1; `.env` points clients at it (STORAGE_EMULATOR_HOST, and TensorStore through
    a relay that adds the generation header the emulator leaves out: `object_store.CountingRelay`)."""
    from object_store import CountingRelay, start_gcs_server

    for server in _started(tmp_path_factory, start_gcs_server):
        server.relay = CountingRelay(server.endpoint, gcs_generation=True)
        yield server
        server.relay.stop()


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """gs://<a new bucket>, with this process's environment pointing at the emulator for the test."""
    return _new_bucket(gcs_server, "gs", monkeypatch)


# --- the fault report: one row per fault test (`make faults`, tests/harness.py) ------------------------------

OUTCOME = pytest.StashKey[str]()
HAS_ROW = pytest.StashKey[bool]()  # the test's `fault_report` was set up: its teardown writes the row


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" or (report.when == "setup" and not report.passed):
        item.stash[OUTCOME] = report.outcome
    path = os.environ.get(harness.REPORT_ENV)
    if path and report.when == "setup" and not report.passed and item.get_closest_marker("faults") \
            and not item.stash.get(HAS_ROW, False):
        # skipped (a host feature missing) or broken before its row existed: the table still shows it
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else "setup failed"
        harness.record(path, {"test": item.nodeid, "outcome": report.outcome, "fault": item.name,
                              "happened": f"{report.outcome} before it ran: {reason}", "lost": "", "recovery_s": None,
                              "details": {}})
    return report


@dataclass
class FaultRow:
    fault: str = ""
    happened: str = ""
    lost: str = ""  # what was lost, in the data's own units ("0 of 1,234 documents")
    recovery_s: float | None = None  # from the fault to whole again; None when there is nothing to recover
    details: dict = field(default_factory=dict)


@pytest.fixture
def fault_report(request: pytest.FixtureRequest):
    """The test's report row, written at teardown with the test's outcome: a test that fails or skips before
    it filled its row still writes one, under its own name, so the table cannot show only successes."""
    row = FaultRow()
    request.node.stash[HAS_ROW] = True
    yield row
    path = os.environ.get(harness.REPORT_ENV)
    if path:
        outcome = request.node.stash.get(OUTCOME, "error")
        row.fault = row.fault or request.node.name
        row.happened = row.happened or f"the test {outcome} before it said what happened"
        harness.record(path, {"test": request.node.nodeid, "outcome": outcome, **asdict(row)})
