"""A real S3-protocol server on 127.0.0.1 for the bucket tests and the loader bench: moto in server mode.

Clients reach it the way they reach any S3 endpoint, through the standard environment (`env`), so the code
under test runs exactly as it would against AWS or a MinIO cluster; nothing in the product knows it is moto.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from openllama.processes import stop_group
from openllama.services import ServiceError, free_port, stop_with_owner, wait_http

# the test credentials: a secret a test can look for in logs, manifests and MLflow, where it must never appear
ACCESS_KEY = "openllama-test-key"
SECRET_KEY = "openllama-test-secret-" + uuid.uuid4().hex


@dataclass
class LoopbackServer:
    """A test server on a port of 127.0.0.1, in its own process group, writing to `log`."""

    port: int
    pgid: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_group(self.pgid)


class S3Server(LoopbackServer):
    @property
    def env(self) -> dict[str, str]:
        """The standard AWS settings that point any S3 client (pyarrow, boto3, the AWS CLI) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name (each test gets its own, so tests share the server and nothing else)."""
        import boto3

        name = f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                     region_name="us-east-1").create_bucket(Bucket=name)
        return name


def _start_service(name: str, arguments: list[str], health_path: str, what: str, state_dir: Path,
                   owner_pid: int | None, timeout: float, env: dict[str, str] | None = None) -> tuple[int, int, Path]:
    """The test extra's executable `name` with `arguments` (`{port}` filled in) on a free port of 127.0.0.1, in
    its own process group (stopped with `owner_pid`), once `health_path` answers: (port, pgid, log)."""
    binary = Path(sys.executable).parent / name
    if not binary.exists():
        raise ServiceError(f"{binary} is missing: install the test extra (`pip install -e '.[test]'`)")
    port = free_port()
    log = Path(state_dir) / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(binary), *(a.format(port=port) for a in arguments)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ, **(env or {})))
    try:
        wait_http(f"http://127.0.0.1:{port}{health_path}", timeout, log, what, proc.pid)
    except BaseException:
        stop_group(proc.pid)
        raise
    if owner_pid is not None:
        stop_with_owner(owner_pid, proc.pid, str(binary))
    return port, proc.pid, log


def start_s3_server(state_dir: Path, owner_pid: int | None = None, timeout: float = 60.0) -> S3Server:
    """`moto_server` on a free port of 127.0.0.1 in its own process group (stopped with `owner_pid`)."""
    return S3Server(*_start_service("moto_server", ["-H", "127.0.0.1", "-p", "{port}"], "/moto-api/",
                                    "S3 server (moto)", state_dir, owner_pid, timeout,
                                    env={"MOTO_CALL_RESET_API": "false"}))


class GcsServer(LoopbackServer):
    """A GCS JSON-API emulator (gcp-storage-emulator), reached as the Google client libraries reach one."""

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name, made through the JSON API's buckets.insert."""
        import json
        import urllib.request

        name = f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=openllama-test",
                                         data=json.dumps({"name": name}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, response.read()
        return name


def start_gcs_server(state_dir: Path, owner_pid: int | None = None, timeout: float = 60.0) -> GcsServer:
    """`gcp-storage-emulator` on a free port of 127.0.0.1, in memory, in its own process group."""
    return GcsServer(*_start_service("gcp-storage-emulator", ["start", "--host", "127.0.0.1", "--port", "{port}",
                                                              "--in-memory"],
                                     "/storage/v1/b?project=openllama-test", "GCS emulator", state_dir, owner_pid,
                                     timeout))
