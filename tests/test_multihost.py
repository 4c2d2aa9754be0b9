"""Training across hosts: a real Ray cluster of separate network hosts on this machine (tests/hosts.py),
one Ray Train worker per host, one `jax.distributed` system over gloo between them, and a host lost mid-run
(a worker host, or the head).

The head host has no CPUs for Ray to schedule and each worker host has one, so the two Ray Train workers
(1 CPU each) can only run on two different hosts. The driver (`openllama train`) runs on the head host, a
client of the head's GCS, as on a cluster's head node. The hosts share the filesystem (a directory every
host mounts): dataset, output_dir, MLflow's sqlite file. What ran where, and how often, is read from what
Ray records (Ray Train's state API: attempts, their times, workers, node IPs); the addresses JAX used and
the step a worker resumed from, from each worker's log where that record locates it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import pytest

import harness
import hosts
from openllama.train.checkpoint import RunDir, load_model
from openllama.train.config import TrainConfig, load_config
from openllama.train.launch import gcs_answers
from openllama.train.trainer import Hook, Trainer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
SEQ_LEN = 32
STEPS = 10

pytestmark = pytest.mark.skipif(hosts.unavailable_reason() is not None, reason=str(hosts.unavailable_reason()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head host (0 CPUs) and 2 worker hosts (1 CPU each), removed at the end whatever happened."""
    network = hosts.HostNetwork()
    started = None
    try:
        try:
            network.create()
            started = hosts.ClusterOfHosts.start(network, tmp_path_factory.mktemp("hosts"), worker_hosts=2)
        except hosts.HostsUnavailable as error:  # root, but no network namespaces here (a locked container)
            pytest.skip(str(error))
        yield started
    finally:
        if started is not None:
            started.stop()
        network.destroy()


def on_head_host(cluster: hosts.ClusterOfHosts, *command: str, timeout: float = 300, **env: str):
    """Run a command on the head host as a client of the cluster, to the end; fails with its output."""
    done = harness.run([*cluster.head_host.launcher, *command], cluster.env(**env), timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def dataset(cluster, sp_model, tmp_path_factory) -> Path:
    """The sample corpus packed by `tokenize_dataset` on this cluster (its tasks run on the worker hosts)."""
    if not SAMPLE.is_dir():
        pytest.skip(f"the sample corpus {SAMPLE} is not in this checkout")
    out = tmp_path_factory.mktemp("packed") / "data"
    build = ("from openllama.data.pack import tokenize_dataset; "
             f"tokenize_dataset([{str(SAMPLE)!r}], {str(sp_model)!r}, {str(out)!r}, seq_len={SEQ_LEN}, "
             "val_fraction=0.2, track=False)")
    on_head_host(cluster, sys.executable, "-c", build)
    return out


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory) -> list[str]:
    """The overrides of tests/test_train_run.py: dataset, a short schedule, one JAX compilation cache."""
    return harness.short_run(dataset, SEQ_LEN, STEPS, tmp_path_factory.mktemp("jax_cache"))


class Losses(Hook):
    """Each step's loss, as the worker loop computed it."""

    def __init__(self):
        self.by_step: dict[int, float] = {}

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.by_step[step] = float(metrics["loss"])


@pytest.fixture(scope="module")
def one_host(base, tmp_path_factory) -> tuple[dict[int, float], TrainConfig]:
    """The reference: the same run in this process, one JAX process on one host."""
    out = tmp_path_factory.mktemp("one_host")
    config = load_config("tiny-cpu", [*base, f"output_dir={out}", "tracking.enabled=false"])
    losses = Losses()
    Trainer(config, [losses]).fit()
    return losses.by_step, config


@dataclass
class AcrossHosts:
    """A finished `openllama train` run on the cluster: its config, MLflow store and Ray Train's record."""

    config: TrainConfig
    tracking_uri: str
    ray_run: dict  # Ray Train's record of the run: attempts, their workers and nodes
    worker_hosts: list[str]  # the worker hosts' addresses when it ended

    def losses(self) -> dict[int, list[float]]:
        from mlflow.tracking import MlflowClient

        run_id = RunDir(self.config.run_dir).tracking_run_id()
        steps: dict[int, list[float]] = {}
        for metric in MlflowClient(self.tracking_uri).get_metric_history(run_id, "loss"):
            steps.setdefault(metric.step, []).append(metric.value)
        return steps

    def final_params(self):
        return load_model(RunDir(self.config.run_dir).latest()[1])[1]

    @property
    def attempts(self) -> list[dict]:
        return sorted(self.ray_run["attempts"], key=lambda attempt: attempt["start_time_ns"])


def train_command(base: list[str], out: Path, *overrides: str) -> tuple[list[str], TrainConfig, str]:
    tracking_uri = f"sqlite:///{out}/mlruns.db"
    args = [*base, f"output_dir={out}", f"tracking.uri={tracking_uri}", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", *overrides]
    return [sys.executable, "-m", "openllama.cli", "train", "tiny-cpu", *args], load_config("tiny-cpu", args), \
        tracking_uri


def ray_train_run(cluster: hosts.ClusterOfHosts, config: TrainConfig) -> dict:
    """Ray Train's record of the run named after `config` (the newest, if several)."""
    runs = [run for run in cluster.train_runs() if run["name"] == config.name]
    assert runs, f"Ray Train recorded no run named {config.name}: {[r['name'] for r in cluster.train_runs()]}"
    return max(runs, key=lambda run: run["start_time_ns"])


# Ray Train's state actor records runs and attempts only when the driver asks for it
STATE_TRACKING = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


@pytest.fixture(scope="module")
def across_hosts(cluster, base, tmp_path_factory) -> AcrossHosts:
    """`openllama train tiny-cpu scaling.num_workers=2` from the head host, one worker per worker host."""
    out = tmp_path_factory.mktemp("across_hosts")
    command, config, tracking_uri = train_command(base, out)
    on_head_host(cluster, *command, timeout=400, **STATE_TRACKING)
    return AcrossHosts(config, tracking_uri, ray_train_run(cluster, config), cluster.worker_addresses)


def assert_each_step_logged_once_as(losses: dict[int, list[float]], reference: dict[int, float]) -> None:
    """Every step's loss is in MLflow exactly once, equal to the one-host run's (fp32: 1e-5)."""
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    for step, values in losses.items():
        assert values == pytest.approx([reference[step]], abs=1e-5), step


def assert_same_params(a, b, atol: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


# --- the hosts ---------------------------------------------------------------------------------------------


def test_each_host_is_a_ray_node_on_its_own_address(cluster):
    addresses = [cluster.head_host.address, *cluster.worker_addresses]
    assert len(set(addresses)) == 3
    assert cluster.alive_node_ips() == sorted(addresses)
    assert not any(address.startswith("127.") for address in addresses)


def test_hosts_reach_each_other_only_on_the_private_bridge(cluster):
    """No default route, no other interface: a host's traffic stays between the hosts and its loopback."""
    for host in cluster.network.hosts:
        routes = harness.run([*host.launcher, "ip", "-o", "route", "show"], harness.clean_env()).stdout.splitlines()
        assert [route.split()[0] for route in routes] == [f"{cluster.network.subnet}.0/24"], (host, routes)
        links = harness.run([*host.launcher, "ip", "-o", "link", "show"], harness.clean_env()).stdout.splitlines()
        assert sorted(link.split(":")[1].strip().split("@")[0] for link in links) == ["eth0", "lo"], (host, links)


def test_hosts_of_a_killed_test_process_are_removed_with_all_they_run():
    """A test session SIGKILLed before its teardown leaves no namespace, bridge or process behind."""
    owner = harness.start([sys.executable, "-c", (
        "import subprocess, sys, time; import hosts; network = hosts.HostNetwork().create(); "
        "host = network.add_host(); subprocess.Popen([*host.launcher, 'sleep', '600'], start_new_session=True); "
        "print(host.name, network.bridge, flush=True); time.sleep(600)")], harness.clean_env(), cwd=REPO / "tests")
    try:
        name, bridge = owner.stdout.readline().split()
        sleeper = harness.wait_for(lambda: hosts.namespace_pids(name), 10, f"the process on host {name}")
    finally:
        owner.kill()
        owner.wait()
    harness.wait_for(lambda: name not in hosts.namespaces() and not hosts.ip("link", "show", bridge, check=False)
                     and not any(hosts.alive(pid) for pid in sleeper), 30, f"host {name} and bridge {bridge} removed")


# --- training across hosts ---------------------------------------------------------------------------------


def test_the_two_train_workers_run_on_the_two_worker_hosts(across_hosts):
    [attempt] = across_hosts.attempts
    assert attempt["status"] == "FINISHED"
    assert sorted(worker["node_ip"] for worker in attempt["workers"]) == across_hosts.worker_hosts


def test_jax_coordinator_and_gloo_are_on_the_worker_hosts_addresses(across_hosts):
    """The coordinator is rank 0's host address and each worker's gloo its own host's: on 127.0.0.1 (what
    this machine's hostname resolves to) the workers on other hosts could not connect."""
    [attempt] = across_hosts.attempts
    first = next(worker for worker in attempt["workers"] if worker["world_rank"] == 0)
    for worker in attempt["workers"]:
        log = Path(worker["log_file_path"]).read_text(errors="replace")
        assert f"coordinator {first['node_ip']}:" in log and f"gloo on {worker['node_ip']}" in log, worker


def test_losses_across_hosts_equal_the_one_host_run(one_host, across_hosts):
    assert_each_step_logged_once_as(across_hosts.losses(), one_host[0])


def test_parameters_across_hosts_equal_the_one_host_run(one_host, across_hosts):
    _, config = one_host
    assert_same_params(across_hosts.final_params(), load_model(RunDir(config.run_dir).latest()[1])[1], atol=1e-5)


# --- a host lost mid-run -----------------------------------------------------------------------------------


@dataclass
class HostLost(AcrossHosts):
    """A run whose first worker's host was killed whole between the step-5 and step-10 checkpoints."""

    victim: str = ""  # the lost host's address
    replacement: str = ""  # the address of the host that joined after it
    checkpoints_at_kill: list[int] = field(default_factory=list)
    killed_at_ns: int = 0
    reached: int = 0  # the newest step the driver had heard of at the kill
    whole_s: float = 0.0  # from the kill to the resumed run logging that step (harness: time to recover)

    @property
    def restart_s(self) -> float:
        """From the kill to the start of the attempt that finished, by Ray Train's record."""
        return (self.attempts[-1]["start_time_ns"] - self.killed_at_ns) / 1e9


def running_workers(cluster: hosts.ClusterOfHosts, config: TrainConfig) -> list[dict] | None:
    """The workers of the run's attempt in progress, once Ray Train has recorded them."""
    try:
        run = ray_train_run(cluster, config)
    except (AssertionError, OSError):
        return None
    running = [attempt for attempt in run["attempts"] if attempt["status"] == "RUNNING"]
    return running[-1]["workers"] if running and running[-1]["workers"] else None


def replace_host_until_done(cluster: hosts.ClusterOfHosts, address: str, driver: harness.Watched) -> hosts.Host:
    """The worker host at `address` lost whole and a new host joined; then the training command `driver`
    waited for to its end, which must be a success."""
    cluster.lose_host(address)
    replacement = cluster.add_worker_host()
    assert driver.wait(timeout=400) == 0, driver.text("out")[-3000:] + driver.text()[-4000:]
    return replacement


@pytest.fixture(scope="module")
def host_lost(cluster, base, tmp_path_factory) -> HostLost:
    """`scaling.max_failures=1`; once the step-5 checkpoint is complete, the host of the rank-0 worker (the
    JAX coordinator) is frozen, then every process on it SIGKILLed and the host removed; a new host joins."""
    out = tmp_path_factory.mktemp("host_lost")
    command, config, tracking_uri = train_command(base, out, "scaling.max_failures=1")
    run = RunDir(config.run_dir)
    driver = harness.Watched([*cluster.head_host.launcher, *command], cluster.env(**STATE_TRACKING), cwd=REPO)
    proc = driver.proc
    try:
        workers = harness.wait_for(lambda: running_workers(cluster, config), 300, "Ray Train's workers", proc,
                                   poll=0.5)
        first = next(worker for worker in workers if worker["world_rank"] == 0)
        harness.wait_for(run.latest, 300, "the step-5 checkpoint", proc)
        # stopped at once, the run halts at its next collective: no later checkpoint can complete
        os.kill(first["pid"], signal.SIGSTOP)
        checkpoints_at_kill = [step for step, _ in run.complete_checkpoints()]
        killed_at_ns = time.time_ns()
        reached = max(driver.reached(killed_at_ns / 1e9), *checkpoints_at_kill)
        replacement = replace_host_until_done(cluster, first["node_ip"], driver)
    except BaseException:
        harness.kill_group(proc)
        raise
    return HostLost(config, tracking_uri, ray_train_run(cluster, config), cluster.worker_addresses,
                    victim=first["node_ip"], replacement=replacement.address,
                    checkpoints_at_kill=checkpoints_at_kill, killed_at_ns=killed_at_ns, reached=reached,
                    whole_s=driver.whole_again_at(killed_at_ns / 1e9, reached) - killed_at_ns / 1e9)


@pytest.mark.faults
def test_host_was_lost_between_two_checkpoints(host_lost):
    assert host_lost.checkpoints_at_kill == [5]


@pytest.mark.faults
def test_ray_train_restarted_the_worker_group_on_the_replacement_host(host_lost):
    first, second = host_lost.attempts  # exactly one restart
    assert first["status"] in ("ERRORED", "ABORTED") and second["status"] == "FINISHED"
    assert host_lost.victim in {worker["node_ip"] for worker in first["workers"]}
    survivors = {worker["node_ip"] for worker in first["workers"]} - {host_lost.victim}
    assert {worker["node_ip"] for worker in second["workers"]} == survivors | {host_lost.replacement}
    assert first["end_time_ns"] <= second["start_time_ns"]
    assert 0 < host_lost.restart_s < 180, host_lost.restart_s


@pytest.mark.faults
def test_restarted_workers_resumed_from_the_newest_complete_checkpoint(host_lost):
    """The run directory: step 5 was saved once, before the host was lost (a restart from scratch would
    have saved it again), step 10 after the restart began; each restarted worker's log, where Ray recorded
    it, says it resumed from step 5."""
    run = RunDir(host_lost.config.run_dir)
    _, second = host_lost.attempts
    assert (run.step_dir(5) / "state.json").stat().st_mtime_ns < host_lost.killed_at_ns
    assert (run.step_dir(STEPS) / "state.json").stat().st_mtime_ns > second["start_time_ns"]
    logs = [Path(worker["log_file_path"]).read_text(errors="replace") for worker in second["workers"]]
    assert all(f"resuming from {run.step_dir(5)} (step 5)" in log for log in logs)


@pytest.mark.faults
def test_run_with_a_lost_host_ends_with_the_uninterrupted_parameters(one_host, host_lost, fault_report):
    """The row's claims, each checked here: the kill between the checkpoints of steps 5 and 10, Ray Train's
    one restart on the survivor and the new host, its workers' `resuming from` step 5, the final parameters
    and each step's loss once."""
    _, config = one_host
    test_host_was_lost_between_two_checkpoints(host_lost)
    test_ray_train_restarted_the_worker_group_on_the_replacement_host(host_lost)
    test_restarted_workers_resumed_from_the_newest_complete_checkpoint(host_lost)
    test_run_with_a_lost_host_logs_each_steps_loss_once(one_host, host_lost)
    assert_same_params(host_lost.final_params(), load_model(RunDir(config.run_dir).latest()[1])[1], atol=1e-5)
    fault_report.fault = "a worker host lost while training (every process SIGKILLed, the host removed)"
    fault_report.happened = (f"killed at step {host_lost.reached}; Ray Train's one restart, on the surviving and a "
                             f"new host, began {host_lost.restart_s:.0f} s after the kill; both workers resumed from "
                             "step 5; final parameters equal (atol 1e-5), each step's loss logged once")
    fault_report.lost = harness.steps_lost(5, host_lost.reached)
    fault_report.recovery_s = host_lost.whole_s


@pytest.mark.faults
def test_run_with_a_lost_host_logs_each_steps_loss_once(one_host, host_lost):
    assert_each_step_logged_once_as(host_lost.losses(), one_host[0])


# --- a worker host preempted: SIGTERM first, then gone -------------------------------------------------------

PREEMPT_STEPS = 200  # steps take milliseconds and MLflow hears of them late: the host is preempted (at a logged
MILESTONE = 150  # step 8 or later) long before the milestone


@dataclass
class HostPreempted(AcrossHosts):
    """A run whose rank-1 worker was sent SIGTERM (as a preempted VM's processes are) before any checkpoint;
    its host was removed once the save that caused was complete, and a new host joined."""

    victim: str = ""
    replacement: str = ""
    reached: int = 0  # the newest step MLflow or the driver had heard of when the signal was sent
    checkpoints_at_signal: list[int] = field(default_factory=list)
    checkpoints_when_lost: list[int] = field(default_factory=list)
    signalled_ns: int = 0
    whole_s: float = 0.0  # from the signal to the resumed run at the step reached (harness: time to recover)


@pytest.fixture(scope="module")
def host_preempted(cluster, base, tmp_path_factory) -> HostPreempted:
    out = tmp_path_factory.mktemp("host_preempted")
    command, config, tracking_uri = train_command(base, out, "scaling.max_failures=1", f"train.steps={PREEMPT_STEPS}",
                                                  f"checkpoint.every_steps={MILESTONE}", "eval.every_steps=0")
    run = RunDir(config.run_dir)
    progress = AcrossHosts(config, tracking_uri, {}, [])
    driver = harness.Watched([*cluster.head_host.launcher, *command], cluster.env(**STATE_TRACKING), cwd=REPO)
    proc = driver.proc

    def logged() -> int:
        try:
            return max(progress.losses(), default=0) if run.tracking_run_id() else 0
        except Exception:  # the sqlite store is being created
            return 0

    try:
        workers = harness.wait_for(lambda: running_workers(cluster, config), 300, "Ray Train's workers", proc,
                                   poll=0.5)
        second = next(worker for worker in workers if worker["world_rank"] == 1)
        harness.wait_for(lambda: logged() >= 8, 300, "step 8 in MLflow", proc, poll=0.1)
        checkpoints_at_signal = [step for step, _ in run.complete_checkpoints()]
        reached = logged()
        os.kill(second["pid"], signal.SIGTERM)
        signalled_ns = time.time_ns()
        reached = max(reached, driver.reached(signalled_ns / 1e9))
        harness.wait_for(run.latest, 120, "the preemption save", proc, poll=0.05)
        checkpoints_when_lost = [step for step, _ in run.complete_checkpoints()]
        replacement = replace_host_until_done(cluster, second["node_ip"], driver)  # the VM stops
    except BaseException:
        harness.kill_group(proc)
        raise
    return HostPreempted(config, tracking_uri, ray_train_run(cluster, config), cluster.worker_addresses,
                         victim=second["node_ip"], replacement=replacement.address, reached=reached,
                         checkpoints_at_signal=checkpoints_at_signal, checkpoints_when_lost=checkpoints_when_lost,
                         signalled_ns=signalled_ns,
                         whole_s=driver.whole_again_at(signalled_ns / 1e9, reached) - signalled_ns / 1e9)


@pytest.fixture(scope="module")
def one_host_run(base, tmp_path_factory) -> tuple[dict[int, float], TrainConfig]:
    """The same PREEMPT_STEPS steps in this process, one JAX process on one host."""
    config = load_config("tiny-cpu", [*base, f"output_dir={tmp_path_factory.mktemp('one_host_run')}",
                                      "tracking.enabled=false", f"train.steps={PREEMPT_STEPS}",
                                      f"checkpoint.every_steps={MILESTONE}", "eval.every_steps=0"])
    losses = Losses()
    Trainer(config, [losses]).fit()
    return losses.by_step, config


@pytest.mark.faults
def test_a_preempted_host_costs_no_step(host_preempted, one_host_run, fault_report):
    """Checked while it happened: no checkpoint existed at the signal, the save it caused is at or past the
    step reached, and it was complete before the host went. Then Ray Train's record: one restart, on the
    survivor and the new host, whose workers resumed from that save; the run ends on the one-host parameters."""
    preempted = host_preempted
    (saved,) = preempted.checkpoints_when_lost
    assert preempted.checkpoints_at_signal == []
    assert saved >= preempted.reached >= 8 and saved < MILESTONE  # a save of its own, before the milestone
    first, second = preempted.attempts  # exactly one restart
    assert first["status"] in ("ERRORED", "ABORTED") and second["status"] == "FINISHED"
    survivors = {worker["node_ip"] for worker in first["workers"]} - {preempted.victim}
    assert {worker["node_ip"] for worker in second["workers"]} == survivors | {preempted.replacement}
    run = RunDir(preempted.config.run_dir)
    logs = [Path(worker["log_file_path"]).read_text(errors="replace") for worker in second["workers"]]
    assert all(f"resuming from {run.step_dir(saved)} (step {saved})" in log for log in logs)
    assert_same_params(preempted.final_params(), load_model(RunDir(one_host_run[1].run_dir).latest()[1])[1],
                       atol=1e-5)
    losses = preempted.losses()
    assert sorted(losses) == list(range(1, PREEMPT_STEPS + 1)) and all(len(v) == 1 for v in losses.values())
    fault_report.fault = ("a worker host preempted while training (its train worker sent SIGTERM, then every "
                          "process SIGKILLed and the host removed)")
    fault_report.happened = (f"no checkpoint yet at the signal (step {preempted.reached} reached); both workers "
                             f"saved step {saved} before the host went; Ray Train's one restart, on the survivor "
                             f"and a new host, resumed from step {saved}; final parameters equal (atol 1e-5)")
    fault_report.lost = f"0 steps (saved {saved} >= reached {preempted.reached})"
    fault_report.recovery_s = preempted.whole_s


# --- tokenizing across hosts, one host lost ----------------------------------------------------------------


def shard_entries(dataset: Path) -> list[tuple]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return sorted((s["path"], s["sha256"], s["rows"], s["documents"]) for s in manifest["shards"])


@pytest.fixture(scope="module")
def tokenize_host_lost(cluster, sp_model, dataset, tmp_path_factory) -> dict:
    """The `dataset` fixture's command run as a Ray client from the head host, a worker host killed whole once
    the first unit is done and a replacement host joining; rerun when the first run failed."""
    out = tmp_path_factory.mktemp("tokenize_host_lost") / "data"
    command = [*cluster.head_host.launcher, sys.executable, "-m", "openllama.cli", "data", "tokenize", str(SAMPLE),
               "--tokenizer", str(sp_model), "--out", str(out), "--seq-len", str(SEQ_LEN), "--val-fraction", "0.2",
               "--no-track"]
    proc = harness.start(command, cluster.env(), cwd=REPO)
    try:
        harness.wait_for(lambda: list((out / "units").glob("*.json")), 300, "the first finished unit", proc)
        done_at_kill = len(list((out / "units").glob("*.json")))
        killed_at = time.perf_counter()
        victim = cluster.worker_addresses[0]
        cluster.lose_host(victim)
        cluster.add_worker_host()
        _, first_err = proc.communicate(timeout=400)
    except BaseException:
        harness.kill_group(proc)
        raise
    reruns = 0
    if proc.returncode != 0:  # Ray did not run the lost tasks again: the rerun finishes the dataset
        reruns = 1
        again = harness.run(command, cluster.env(), timeout=400, cwd=REPO)
        assert again.returncode == 0, first_err[-3000:] + again.stderr[-4000:]
    return {"out": out, "done_at_kill": done_at_kill, "recovery_s": time.perf_counter() - killed_at,
            "reruns": reruns, "victim": victim}


@pytest.mark.faults
def test_a_dataset_tokenized_across_hosts_with_one_lost_equals_an_uninterrupted_run(tokenize_host_lost, dataset,
                                                                                   fault_report):
    out = tokenize_host_lost["out"]
    assert 1 <= tokenize_host_lost["done_at_kill"] < len(list(SAMPLE.glob("*.jsonl")))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] is True
    assert shard_entries(out) == shard_entries(dataset)  # no document lost, none twice
    assert [p for p in out.rglob("*") if ".tmp-" in p.name] == []
    total = manifest["stats"]["total"]
    how = "Ray ran its tasks again on the other hosts" if not tokenize_host_lost["reruns"] else "the rerun finished"
    fault_report.fault = "a worker host lost while tokenizing"
    fault_report.happened = (f"killed with {tokenize_host_lost['done_at_kill']} of 7 units done; {how}; the "
                             "dataset equals an uninterrupted run's, shard for shard")
    fault_report.lost = f"0 of {total['documents']:,} documents, 0 of {total['tokens']:,} tokens, none twice"
    fault_report.recovery_s = tokenize_host_lost["recovery_s"]


# --- the head lost -----------------------------------------------------------------------------------------


@dataclass
class HeadLost(AcrossHosts):
    """A run whose Ray head host lost every process but the driver between the step-5 and step-10
    checkpoints, then the same command run again against a new head with new worker hosts."""

    head: str = ""  # the lost head's GCS address
    checkpoints_at_kill: list[int] = field(default_factory=list)
    killed_at_ns: int = 0
    driver_code: int = 0  # the first driver's exit status
    driver_err: str = ""  # ... and its stderr
    driver_end_ns: int = 0
    orphans: int = 0  # processes still alive on the old worker hosts when the driver had ended
    rerun_start_ns: int = 0  # the new head and worker hosts up
    rerun_end_ns: int = 0
    rerun_logs: list[str] = field(default_factory=list)  # each rerun worker's log, read before its host went
    reached: int = 0  # the newest step the first driver had heard of at the kill
    whole_s: float = 0.0  # from the kill to the rerun logging that step (harness: time to recover)

    @property
    def driver_ended_s(self) -> float:
        """From the kill to the first driver's exit."""
        return (self.driver_end_ns - self.killed_at_ns) / 1e9

    @property
    def rerun_ended_s(self) -> float:
        """From the kill to the end of the rerun on the new head: a new cluster started, the run finished."""
        return (self.rerun_end_ns - self.killed_at_ns) / 1e9


@pytest.fixture(scope="module")
def head_lost(cluster, base, tmp_path_factory) -> HeadLost:
    """A cluster of its own on the module's network, so that `cluster` never sees a broken head. Once the
    step-5 checkpoint is complete the rank-0 worker is frozen (no later checkpoint can complete, as in
    `host_lost`), then every process of the head host but the driver is SIGKILLed: GCS, raylet, dashboard,
    Ray Train's controller. Once the driver has ended, the old worker hosts are removed (their Ray processes
    outlive the head; unfrozen, their training could go on writing into the run directory) and the same
    command runs again on a new head with 2 new worker hosts."""
    out = tmp_path_factory.mktemp("head_lost")
    command, config, tracking_uri = train_command(base, out)
    run = RunDir(config.run_dir)
    states = tmp_path_factory.mktemp("head_lost_hosts")
    first = hosts.ClusterOfHosts.start(cluster.network, states, worker_hosts=2)
    live = [first]
    try:
        driver = harness.Watched([*first.head_host.launcher, *command], first.env(**STATE_TRACKING), cwd=REPO)
        proc = driver.proc
        try:
            workers = harness.wait_for(lambda: running_workers(first, config), 300, "Ray Train's workers", proc,
                                       poll=0.5)
            rank0 = next(worker for worker in workers if worker["world_rank"] == 0)
            harness.wait_for(run.latest, 300, "the step-5 checkpoint", proc)
            os.kill(rank0["pid"], signal.SIGSTOP)
            checkpoints_at_kill = [step for step, _ in run.complete_checkpoints()]
            killed_at_ns = time.time_ns()
            reached = max(driver.reached(killed_at_ns / 1e9), *checkpoints_at_kill)
            first.lose_head(spare=harness.process_tree(proc.pid))
            driver.wait(timeout=300)
            driver_err = driver.text()
            driver_end_ns = time.time_ns()
        except BaseException:
            harness.kill_group(proc)
            raise
        orphans = sum(len(host.pids()) for host, _ in first.workers.values())
        first.remove()
        live.remove(first)
        second = hosts.ClusterOfHosts.start(cluster.network, states, worker_hosts=2)
        live.append(second)
        rerun_start_ns = time.time_ns()
        rerun = harness.Watched([*second.head_host.launcher, *command], second.env(**STATE_TRACKING), cwd=REPO)
        assert rerun.wait(timeout=400) == 0, rerun.text("out")[-3000:] + rerun.text()[-4000:]
        rerun_end_ns = time.time_ns()
        ray_run = ray_train_run(second, config)
        logs = [Path(worker["log_file_path"]).read_text(errors="replace")
                for attempt in ray_run["attempts"] for worker in attempt["workers"]]
        lost = HeadLost(config, tracking_uri, ray_run, second.worker_addresses, head=first.head.address,
                        checkpoints_at_kill=checkpoints_at_kill, killed_at_ns=killed_at_ns,
                        driver_code=proc.returncode, driver_err=driver_err, driver_end_ns=driver_end_ns,
                        orphans=orphans, rerun_start_ns=rerun_start_ns, rerun_end_ns=rerun_end_ns,
                        rerun_logs=logs, reached=reached,
                        whole_s=rerun.whole_again_at(killed_at_ns / 1e9, reached) - killed_at_ns / 1e9)
    finally:
        for left in live:
            left.remove()
    print(f"head lost: the driver ended {lost.driver_ended_s:.1f} s after the kill, {orphans} processes alive on the "
          f"old worker hosts then; a new cluster up {(rerun_start_ns - killed_at_ns) / 1e9:.1f} s after the kill, "
          f"the rerun was back at step {reached} {lost.whole_s:.1f} s and ended {lost.rerun_ended_s:.1f} s after it")
    return lost


@pytest.mark.faults
def test_head_was_lost_between_two_checkpoints(head_lost):
    assert head_lost.checkpoints_at_kill == [5]


@pytest.mark.faults
def test_a_driver_whose_head_is_lost_ends_with_one_line_saying_how_to_resume(head_lost):
    """Exit 1 soon after the kill, the last line naming the lost head and the checkpoint a rerun starts from."""
    run = RunDir(head_lost.config.run_dir)
    assert head_lost.driver_code == 1, head_lost.driver_err[-4000:]
    assert head_lost.driver_err.strip().splitlines()[-1] == (
        f"openllama train: {head_lost.config.name} failed: the Ray cluster (head at {head_lost.head}) was lost: "
        "its GCS does not answer; running the same command again on a new head resumes from the newest "
        f"checkpoint (step 5, {run.step_dir(5)})")
    assert "Traceback" not in head_lost.driver_err.split("openllama train:")[-1]
    assert 0 < head_lost.driver_ended_s < 60, head_lost.driver_ended_s


@pytest.mark.faults
def test_only_a_gcs_that_does_not_answer_counts_as_a_lost_head(cluster, head_lost):
    """A controller lost while its GCS answers is not called a lost head: Ray's own error stands."""
    assert gcs_answers(cluster.head.address)
    assert not gcs_answers(head_lost.head, timeout=1.0)  # its host is gone: no refusal, a timeout


@pytest.mark.faults
def test_the_same_command_on_a_new_head_resumes_from_the_newest_checkpoint(head_lost):
    """One attempt, on the new worker hosts only; step 5 was saved once, before the kill, step 10 by the
    rerun; each of its workers' logs says it resumed from step 5."""
    run = RunDir(head_lost.config.run_dir)
    [attempt] = head_lost.attempts
    assert attempt["status"] == "FINISHED"
    assert sorted(worker["node_ip"] for worker in attempt["workers"]) == head_lost.worker_hosts
    assert (run.step_dir(5) / "state.json").stat().st_mtime_ns < head_lost.killed_at_ns
    assert (run.step_dir(STEPS) / "state.json").stat().st_mtime_ns > attempt["start_time_ns"]
    assert len(head_lost.rerun_logs) == 2
    assert all(f"resuming from {run.step_dir(5)} (step 5)" in log for log in head_lost.rerun_logs)
    assert 0 < head_lost.whole_s < head_lost.rerun_ended_s < 240, (head_lost.whole_s, head_lost.rerun_ended_s)


@pytest.mark.faults
def test_run_with_a_lost_head_ends_with_the_uninterrupted_parameters(one_host, head_lost, fault_report):
    """The row's claims, each checked here: the kill between two checkpoints, the driver's one line, the
    rerun on a new head resuming from step 5, the final parameters and each step's loss once."""
    _, config = one_host
    test_head_was_lost_between_two_checkpoints(head_lost)
    test_a_driver_whose_head_is_lost_ends_with_one_line_saying_how_to_resume(head_lost)
    test_the_same_command_on_a_new_head_resumes_from_the_newest_checkpoint(head_lost)
    test_run_with_a_lost_head_logs_each_steps_loss_once(one_host, head_lost)
    assert_same_params(head_lost.final_params(), load_model(RunDir(config.run_dir).latest()[1])[1], atol=1e-5)
    fault_report.fault = "the Ray head lost while training (every Ray process of the head host SIGKILLed)"
    fault_report.happened = (f"killed at step {head_lost.reached}; the driver ended {head_lost.driver_ended_s:.0f} s "
                             "later with one line naming the head and step 5; the same command on a new head and "
                             "hosts resumed from step 5 and ended on the uninterrupted run's parameters (atol 1e-5), "
                             "each step's loss logged once")
    fault_report.lost = harness.steps_lost(5, head_lost.reached)
    fault_report.recovery_s = head_lost.whole_s


@pytest.mark.faults
def test_run_with_a_lost_head_logs_each_steps_loss_once(one_host, head_lost):
    assert_each_step_logged_once_as(head_lost.losses(), one_host[0])
