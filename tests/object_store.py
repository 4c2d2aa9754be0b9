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
    """A GCS JSON-API emulator (gcp-storage-emulator), reached as the Google client libraries reach one, and by
    TensorStore's GCS driver through `relay` (its own endpoint variable)."""

    relay: CountingRelay | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {"STORAGE_EMULATOR_HOST": self.endpoint}
        if self.relay is not None:
            env["TENSORSTORE_GCS_HTTP_URL"] = self.relay.endpoint
        return env

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


class CountingRelay:
    """An HTTP relay on 127.0.0.1 in front of a test server, counting the bytes of the responses it relays:
    give each process its own relay and the server side says what each one fetched.

    With `gcs_generation`, a media download that lacks the `x-goog-generation` header gets it from the object's
    metadata. Real GCS sends that header with every object download (its documented response headers), and
    TensorStore's GCS driver refuses a download without it ("Malformed StorageGeneration"); the emulator
    (gcp-storage-emulator 2026.7) leaves it out. Nothing else is changed.
    """

    def __init__(self, upstream: str, gcs_generation: bool = False):
        import http.client
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        target = urllib.parse.urlsplit(upstream)
        relay = self
        self.response_bytes = 0
        self.requests = 0
        self.log: list[tuple] = []  # (method, path, range, bytes) of every request relayed
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def relay(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    body = self.read_chunked()
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "expect")}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                extra = {}
                if gcs_generation and self.command == "GET" and "alt=media" in self.path \
                        and response.status in (200, 206) and "x-goog-generation" not in response.headers:
                    extra = relay.generation_of(connection, self.path.split("?", 1)[0])
                connection.close()
                with relay.lock:
                    relay.response_bytes += len(data)
                    relay.requests += 1
                    relay.log.append((self.command, self.path.split("?")[0], self.headers.get("Range"), len(data)))
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                for key, value in extra.items():
                    self.send_header(key, value)
                # a HEAD answer keeps the length of the object it describes
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def read_chunked(self) -> bytes:
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def generation_of(connection, path: str) -> dict[str, str]:
        import json

        connection.request("GET", path)
        metadata = json.loads(connection.getresponse().read())
        return {"x-goog-generation": metadata["generation"], "x-goog-metageneration": metadata["metageneration"]}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.response_bytes = self.requests = 0
            self.log = []

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
