"""Local services the project starts for you: a Ray head and an MLflow tracking server, on 127.0.0.1 only.

Each service runs in a process group of its own, recorded in a small JSON file in a state directory, so
stopping it kills exactly the processes we started, by process group id. Never `ray stop`: that kills
every Ray process on the machine, including other users' clusters.

Loopback only: `--node-ip-address 127.0.0.1` alone is not enough on Linux, Ray resolves it back to the
machine's routable address; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray use 127.0.0.1 for the node
(the single-machine mode Ray uses on macOS), and then GCS, raylet, agents and workers listen on loopback.
Fixed default ports (client server 10001, agent 52365, metrics 44217/44227) are replaced by free ones, so
several heads can run side by side.

Ray token authentication is always on for heads started here: a token is generated per head, kept beside
the state file (mode 0600), and every client gets it through `RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN_PATH`
(see `RayHead.env`).

One host of many: `start_ray_head(node_ip=ADDR)` binds the head to a given address instead (then
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` must not be set: it would force 127.0.0.1 again), and
`start_ray_worker(head, node_ip=ADDR)` joins another node on its own address with the head's token. A
`launcher` prefix runs the node elsewhere (the tests' network-namespace hosts: `ip netns exec HOST`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from openllama.files import write_json
from openllama.processes import group_pids, stop_group

RAY_STATE = "ray-head.json"
RAY_WORKER_STATE = "ray-worker.json"
MLFLOW_STATE = "mlflow-server.json"
LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service that did not start or stop; the message says what to look at."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """An executable of the running interpreter's environment (the venv), so services match the client."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` is not installed in {Path(sys.executable).parent} nor on PATH; "
                           "run `make demo` or `pip install -e .` first")
    return found


def stop_with_owner(owner_pid: int, pgid: int, marker: str, remove: str | None = None) -> None:
    """Stop process group `pgid` when process `owner_pid` exits first (a watchdog in its own process).

    Tests start services for their session; if the test process is killed, its teardown never runs and
    the services would outlive it. The watchdog exits by itself once the group is gone; `remove` (a
    folder) goes with it whenever the owner is gone too, whoever ended the group.
    """
    subprocess.Popen([sys.executable, "-m", "openllama.services", str(owner_pid), str(pgid), marker, remove or ""],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def _watch(owner_pid: int, pgid: int, marker: str, remove: str) -> None:
    while group_pids(pgid):
        if not psutil.pid_exists(owner_pid):
            stop_group(pgid, marker=marker)
            break
        time.sleep(1.0)
    # the group may also have been killed from outside (a test host torn down whole): with its owner gone,
    # nobody else will remove what it left
    if remove and not psutil.pid_exists(owner_pid):
        shutil.rmtree(remove, ignore_errors=True)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_http(url: str, timeout: float, log: Path, what: str, pgid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _http_ok(url):
            return
        if pgid is not None and not group_pids(pgid):
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise ServiceError(f"{what} did not become healthy at {url} within {timeout:.0f}s; log {log}:\n{tail}")


# --------------------------------------------------------------------------------------------- Ray head


@dataclass
class RayHead:
    """A Ray head started by this project: where it is and how clients reach it."""

    state_dir: str
    temp_dir: str  # Ray's --temp-dir: short, under /tmp, because Ray's unix socket paths must fit 107 bytes
    address: str  # GCS address, for ray.init / RAY_ADDRESS
    dashboard_url: str  # dashboard and job submission API, for `ray job submit` / RAY_API_SERVER_ADDRESS
    token_path: str
    pgid: int
    num_cpus: int
    node_ip: str = LOOPBACK  # the address its daemons listen on: loopback unless it is one host of many

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients of this head: `ray job submit`, `ray.init()`, our CLI verbs."""
        env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }
        if self.node_ip == LOOPBACK:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def pids(self) -> list[int]:
        return group_pids(self.pgid)

    def stop(self) -> None:
        stop_ray_head(self)


def _ray_node_env(token_path: str | Path, node_ip: str) -> dict[str, str]:
    """The environment of `ray start` for a node on `node_ip` of a token-auth cluster."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # job entrypoints (`python`, `openllama`) must resolve to this environment's interpreter
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if node_ip == LOOPBACK:  # Ray's single-machine mode; on any other address it would undo --node-ip-address
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _ray_start(command: list[str], env: dict[str, str], log: Path, cwd: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        # a new session: `ray start` and every daemon it spawns share one process group we can stop
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)


def _wait_ray_start(proc: subprocess.Popen, timeout: float, log: Path, what: str) -> None:
    code = proc.wait(timeout=timeout)
    if code != 0:
        raise ServiceError(f"`{what}` exited with {code}; log {log}:\n{log.read_text(errors='replace')[-3000:]}")


def start_ray_head(state_dir: str | Path, num_cpus: int = 2, object_store_bytes: int = 1 << 30,
                   timeout: float = 120.0, owner_pid: int | None = None, node_ip: str = LOOPBACK,
                   launcher: Sequence[str] = ()) -> RayHead:
    """Start `ray start --head` on `node_ip` (loopback by default) with token auth; its record goes to
    STATE_DIR/ray-head.json.

    With `owner_pid`, the head is also stopped when that process exits (see `stop_with_owner`). `launcher`
    is a command prefix that runs the head elsewhere (e.g. `ip netns exec HOST`); this process must reach
    `node_ip` to see the head become healthy.
    """
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = read_ray_head(state_dir)
    if existing is not None and existing.pids():
        raise ServiceError(f"a Ray head recorded in {state_dir / RAY_STATE} is still running "
                           f"(dashboard {existing.dashboard_url}); stop it first (`make down`)")
    temp_dir = tempfile.mkdtemp(prefix="olr-ray-")
    token_path = state_dir / "ray-auth-token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port, client_port, agent_port, autoscaler_metrics, dashboard_metrics = (
        free_port() for _ in range(6)
    )
    env = _ray_node_env(token_path, node_ip)
    env.update(AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics))
    command = [
        *launcher, _bin("ray"), "start", "--head",
        "--node-ip-address", node_ip,
        "--port", str(gcs_port),
        "--dashboard-host", node_ip,
        "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(object_store_bytes),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]
    log = state_dir / "ray-head.log"
    proc = _ray_start(command, env, log, temp_dir)
    head = RayHead(str(state_dir), temp_dir, f"{node_ip}:{gcs_port}", f"http://{node_ip}:{dashboard_port}",
                   str(token_path), proc.pid, num_cpus, node_ip)
    write_json(state_dir / RAY_STATE, asdict(head))
    try:
        _wait_ray_start(proc, timeout, log, "ray start --head")
        wait_http(f"{head.dashboard_url}/api/gcs_healthz", timeout, log, "Ray dashboard", head.pgid)
    except BaseException:
        stop_ray_head(head)
        raise
    if owner_pid is not None:
        stop_with_owner(owner_pid, head.pgid, head.temp_dir, remove=head.temp_dir)
    return head


def read_ray_head(state_dir: str | Path) -> RayHead | None:
    path = Path(state_dir) / RAY_STATE
    return RayHead(**json.loads(path.read_text())) if path.is_file() else None


def stop_ray_head(head: RayHead) -> bool:
    """Stop the head's process group and remove its temp dir and record; False if it was not running."""
    stopped = stop_group(head.pgid, marker=head.temp_dir)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    (Path(head.state_dir) / RAY_STATE).unlink(missing_ok=True)
    return stopped


@dataclass
class RayWorker:
    """A Ray worker node started by this project, joined to a head on an address of its own."""

    state_dir: str
    temp_dir: str
    head_address: str
    node_ip: str
    pgid: int
    num_cpus: int

    def pids(self) -> list[int]:
        return group_pids(self.pgid)

    def stop(self) -> bool:
        """Stop the node's process group and remove its temp dir and record; False if it was not running."""
        stopped = stop_group(self.pgid, marker=self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        (Path(self.state_dir) / RAY_WORKER_STATE).unlink(missing_ok=True)
        return stopped


def alive_nodes(head: RayHead, timeout: float = 10.0) -> list[dict]:
    """The nodes the head counts alive, from Ray's state API (node_id, node_ip, resources_total, ...)."""
    token = Path(head.token_path).read_text().strip()
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        nodes = json.loads(response.read())["data"]["result"]["result"]
    return [node for node in nodes if node["state"] == "ALIVE"]


def start_ray_worker(head: RayHead, state_dir: str | Path, node_ip: str, num_cpus: int = 1,
                     object_store_bytes: int = 256 << 20, timeout: float = 120.0, owner_pid: int | None = None,
                     launcher: Sequence[str] = ()) -> RayWorker:
    """Join a worker node on `node_ip` to `head` (`ray start --address`, the head's token); returns once the
    head counts it alive. Its record goes to STATE_DIR/ray-worker.json; `owner_pid` and `launcher` as for
    `start_ray_head`.
    """
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="olr-ray-")
    command = [
        *launcher, _bin("ray"), "start",
        "--address", head.address,
        "--node-ip-address", node_ip,
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(object_store_bytes),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]
    log = state_dir / "ray-worker.log"
    proc = _ray_start(command, _ray_node_env(head.token_path, node_ip), log, temp_dir)
    worker = RayWorker(str(state_dir), temp_dir, head.address, node_ip, proc.pid, num_cpus)
    write_json(state_dir / RAY_WORKER_STATE, asdict(worker))
    try:
        _wait_ray_start(proc, timeout, log, "ray start --address")
        deadline = time.monotonic() + timeout
        while not any(node["node_ip"] == node_ip for node in alive_nodes(head)):
            if time.monotonic() > deadline or not worker.pids():
                raise ServiceError(f"the Ray worker on {node_ip} did not join {head.address} within "
                                   f"{timeout:.0f}s; log {log}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        worker.stop()
        raise
    if owner_pid is not None:
        stop_with_owner(owner_pid, worker.pgid, worker.temp_dir, remove=worker.temp_dir)
    return worker



# ---------------------------------------------------------------------------------------- MLflow server


@dataclass
class MlflowServer:
    """An `mlflow server` on 127.0.0.1 with a sqlite store and served artifacts; restartable on one port."""

    state_dir: str
    port: int
    pgid: int = 0
    owner_pid: int | None = None  # stop the server when this process exits (see `stop_with_owner`)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{Path(self.state_dir) / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.state_dir) / "mlartifacts"

    def pids(self) -> list[int]:
        return group_pids(self.pgid) if self.pgid else []

    def start(self, timeout: float = 120.0) -> MlflowServer:
        """Start (or start again) on the same port and store; returns when /health answers."""
        if self.pids():
            raise ServiceError(f"MLflow server {self.uri} is already running (pids {self.pids()})")
        state = Path(self.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(exist_ok=True)
        command = [
            _bin("mlflow"), "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", self.store_uri,
            "--serve-artifacts",
            "--artifacts-destination", str(self.artifacts_dir),
        ]
        log = state / "mlflow-server.log"
        # job execution is MLflow's GenAI task runner: ~8 extra processes and a /dev/shm folder we never use
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
                   DO_NOT_TRACK="true")
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=state, env=env)
        self.pgid = proc.pid
        write_json(state / MLFLOW_STATE, asdict(self))
        try:
            wait_http(f"{self.uri}/health", timeout, log, "MLflow server", self.pgid)
        except BaseException:
            self.stop()
            raise
        if self.owner_pid is not None:
            stop_with_owner(self.owner_pid, self.pgid, self.store_uri)
        return self

    def stop(self) -> bool:
        """Stop the server's process group; the store and artifacts stay for the next `start()`."""
        stopped = stop_group(self.pgid, marker=self.store_uri) if self.pgid else False
        self.pgid = 0
        (Path(self.state_dir) / MLFLOW_STATE).unlink(missing_ok=True)
        return stopped


def start_mlflow_server(state_dir: str | Path, port: int | None = None, timeout: float = 120.0,
                        owner_pid: int | None = None) -> MlflowServer:
    """Start `mlflow server` on 127.0.0.1; store and artifacts live in `state_dir`."""
    state_dir = Path(state_dir).absolute()
    existing = read_mlflow_server(state_dir)
    if existing is not None and existing.pids():
        raise ServiceError(f"an MLflow server recorded in {state_dir / MLFLOW_STATE} is still running "
                           f"at {existing.uri}; stop it first (`make down`)")
    return MlflowServer(str(state_dir), port or free_port(), owner_pid=owner_pid).start(timeout)


def read_mlflow_server(state_dir: str | Path) -> MlflowServer | None:
    path = Path(state_dir) / MLFLOW_STATE
    return MlflowServer(**json.loads(path.read_text())) if path.is_file() else None


def stop_all(state_dir: str | Path) -> list[str]:
    """Stop whatever services are recorded in `state_dir`; returns what was stopped, for the user."""
    stopped = []
    head = read_ray_head(state_dir)
    if head is not None:
        running = stop_ray_head(head)
        stopped.append(f"Ray head {head.dashboard_url}" + ("" if running else " (was not running; record removed)"))
    server = read_mlflow_server(state_dir)
    if server is not None:
        running = server.stop()
        stopped.append(f"MLflow server {server.uri}" if running
                       else f"MLflow server {server.uri} (was not running; record removed)")
    return stopped


if __name__ == "__main__":  # the watchdog of `stop_with_owner`: OWNER_PID PGID MARKER REMOVE
    _watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
