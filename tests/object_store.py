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
class S3Server:
    port: int
    pgid: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def stop(self) -> None:
        stop_group(self.pgid)


def start_s3_server(state_dir: Path, owner_pid: int | None = None, timeout: float = 60.0) -> S3Server:
    """`moto_server` on a free port of 127.0.0.1 in its own process group (stopped with `owner_pid`)."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise ServiceError(f"{binary} is missing: install the test extra (`pip install -e '.[test]'`)")
    port = free_port()
    log = Path(state_dir) / "moto-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ, MOTO_CALL_RESET_API="false"))
    server = S3Server(port, proc.pid, log)
    try:
        wait_http(f"{server.endpoint}/moto-api/", timeout, log, "S3 server (moto)", proc.pid)
    except BaseException:
        server.stop()
        raise
    if owner_pid is not None:
        stop_with_owner(owner_pid, proc.pid, str(binary))
    return server


@dataclass
class GcsServer:
    """A GCS JSON-API emulator (gcp-storage-emulator), reached as the Google client libraries reach one."""

    port: int
    pgid: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def stop(self) -> None:
        stop_group(self.pgid)


def start_gcs_server(state_dir: Path, owner_pid: int | None = None, timeout: float = 60.0) -> GcsServer:
    """`gcp-storage-emulator` on a free port of 127.0.0.1, in memory, in its own process group."""
    binary = Path(sys.executable).parent / "gcp-storage-emulator"
    if not binary.exists():
        raise ServiceError(f"{binary} is missing: install the test extra (`pip install -e '.[test]'`)")
    port = free_port()
    log = Path(state_dir) / "gcs-emulator.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(binary), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = GcsServer(port, proc.pid, log)
    try:
        wait_http(f"{server.endpoint}/storage/v1/b?project=openllama-test", timeout, log, "GCS emulator", proc.pid)
    except BaseException:
        server.stop()
        raise
    if owner_pid is not None:
        stop_with_owner(owner_pid, proc.pid, str(binary))
    return server
