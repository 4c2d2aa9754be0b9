"""The local services we start: loopback only, token auth on, stopped by process group, restartable."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from openllama import ray_jobs, services

REPO = Path(__file__).resolve().parents[1]


def listening_addresses(pids: list[int]) -> set[str]:
    """The local IP addresses that processes `pids` accept TCP connections on."""
    addresses = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_ray_head_listens_on_loopback_only(ray_head):
    addresses = listening_addresses(ray_head.pids())
    assert addresses, "the Ray head's processes listen on nothing; were they found?"
    assert all(is_loopback(ip) for ip in addresses), addresses


def test_mlflow_server_listens_on_loopback_only(mlflow_server):
    addresses = listening_addresses(mlflow_server.pids())
    assert addresses
    assert all(is_loopback(ip) for ip in addresses), addresses


def test_ray_head_requires_a_token(ray_head):
    assert ray_jobs.auth_mode(ray_head.dashboard_url) == "token"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert error.value.code == 401


def test_client_env_without_a_token_says_how_to_provide_one(ray_head, tmp_path):
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    with pytest.raises(ray_jobs.RayAuthError, match="RAY_AUTH_TOKEN_PATH"):
        ray_jobs.client_env(ray_head.dashboard_url, base=bare)


def test_client_env_turns_token_mode_on_when_a_token_is_available(ray_head, tmp_path):
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": ray_head.token_path}
    env = ray_jobs.client_env(ray_head.dashboard_url, base=bare)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_API_SERVER_ADDRESS"] == ray_head.dashboard_url


def test_job_submit_without_auth_settings_is_refused(ray_head, tmp_path):
    """What a user meets against a token head with a bare environment (the Ray 2.60 behaviour we guard)."""
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", ray_head.dashboard_url],
        env=bare, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "AuthenticationError" in result.stdout + result.stderr


def test_submitted_job_runs_on_the_head_with_the_head_env(ray_head, tmp_path):
    script = tmp_path / "job" / "probe.py"
    script.parent.mkdir()
    script.write_text("import json, ray\nray.init()\nprint('RESOURCES', json.dumps(ray.cluster_resources()))\n")
    log = tmp_path / "job.log"
    ray_jobs.submit(["python", "probe.py"], api_url=ray_head.dashboard_url, env={**os.environ, **ray_head.env},
                    working_dir=script.parent, submission_id="probe-resources", log_path=log)
    line = next(x for x in log.read_text().splitlines() if x.startswith("RESOURCES"))
    assert json.loads(line.split(" ", 1)[1])["CPU"] == ray_head.num_cpus


def test_failed_job_raises_job_failed_naming_the_job(ray_head, tmp_path):
    (tmp_path / "fail").mkdir()
    with pytest.raises(ray_jobs.JobFailed, match="probe-failure"):
        ray_jobs.submit(["python", "-c", "raise SystemExit(3)"], api_url=ray_head.dashboard_url,
                        env={**os.environ, **ray_head.env}, working_dir=tmp_path / "fail",
                        submission_id="probe-failure", echo=open(os.devnull, "w"))


def test_stopping_a_ray_head_ends_all_its_processes(tmp_path):
    head = services.start_ray_head(tmp_path / "state", num_cpus=1, object_store_bytes=100 << 20)
    pids = head.pids()
    assert len(pids) > 3
    assert services.stop_ray_head(head)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not Path(head.temp_dir).exists()
    assert services.read_ray_head(tmp_path / "state") is None


def test_a_head_whose_owner_process_dies_is_stopped(tmp_path):
    """A test session killed before its teardown must not leave its Ray head running."""
    owner = subprocess.Popen(["sleep", "600"])
    head = services.start_ray_head(tmp_path / "state", num_cpus=1, object_store_bytes=100 << 20, owner_pid=owner.pid)
    try:
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 60
        # the watchdog stops the group, then removes the temp dir: wait for both
        while (head.pids() or Path(head.temp_dir).exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not head.pids()
        assert not Path(head.temp_dir).exists()
    finally:
        services.stop_ray_head(head)


def test_stop_ignores_a_stale_record_whose_group_is_not_ours(tmp_path):
    """A record left by a crashed session must never make us kill someone else's processes."""
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stale = services.RayHead(str(tmp_path), "/tmp/olr-ray-gone", "127.0.0.1:1", "http://127.0.0.1:1",
                                 str(tmp_path / "token"), sleeper.pid, 1)
        assert not services.stop_ray_head(stale)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_mlflow_server_restarts_on_the_same_port_with_its_runs(mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment("restart-check")
    run_id = client.create_run(experiment).info.run_id
    mlflow_server.stop()
    assert not mlflow_server.pids()
    mlflow_server.start()
    assert client.get_run(run_id).info.run_id == run_id


IN_PROCESS_PROBE = """
import json, psutil
from openllama import ray_jobs
ray_jobs.connect(num_cpus=1)
me = psutil.Process()
addresses = set()
for proc in [me, *me.children(recursive=True)]:
    try:
        addresses |= {c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print("LISTENING", json.dumps(sorted(addresses)))
"""


def test_an_in_process_ray_from_connect_listens_on_loopback_only(tmp_path):
    """What every CLI verb gets with no RAY_ADDRESS: Ray started inside the command, on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # an in-process Ray writes ~/.ray/auth_token; keep it out of the real home
    result = subprocess.run([sys.executable, "-c", IN_PROCESS_PROBE], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("LISTENING"))
    addresses = json.loads(line.split(" ", 1)[1])
    assert addresses and all(is_loopback(ip) for ip in addresses), addresses
