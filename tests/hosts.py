"""Test hosts: separate network hosts on this one machine, and a real multi-node Ray cluster across them.

Each host is a Linux network namespace with its own loopback and one interface, `eth0`, the end of a
veth pair whose other end is on a private bridge that only these hosts share (a /24 of 10.213.0.0/16 that
exists nowhere else; the root namespace holds the bridge's .254 so the test process reaches the head).
There is no default route and no forwarding: traffic goes only between the hosts, the test process and
each host's own loopback. The hosts share the filesystem, as hosts that mount one directory do.

`ClusterOfHosts` starts a Ray head on one host (`--num-cpus 0`: it schedules, it does not train) and a Ray
worker node with `--num-cpus 1` on each other host, each bound to its host's address with the head's
token (`openllama.services.start_ray_head` / `start_ray_worker` with `ip netns exec HOST` as launcher).

Teardown kills every process in each namespace (Ray workers run in sessions of their own, so a process
group is not enough), deletes the namespaces (their veth pairs go with them) and the bridge: at the end of
the fixture, and, through a watchdog process, when the test process is killed first. Names carry the owner's
pid (`olr<PID>-h<N>`, bridge `olr<PID>br`), and setup first removes what a dead owner left.

By hand (as root): `python tests/hosts.py up 2` starts a head and 2 worker hosts and prints how to reach
them; `python tests/hosts.py down` removes every set whose owner is gone (or all, with `--all`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PREFIX = "olr"
NAMESPACE = re.compile(rf"^{PREFIX}(\d+)-h(\d+)$")
BRIDGE = re.compile(rf"^{PREFIX}(\d+)br$")
SUBNETS = "10.213.{}"  # 10.213.X.0/24, X the first one no interface of this machine uses


class HostsUnavailable(RuntimeError):
    """This machine cannot make test hosts (not root, no `ip`); the message says which."""


def unavailable_reason() -> str | None:
    """Why network-namespace hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, veth pairs and a bridge); CI runs as root"
    if shutil.which("ip") is None:
        return "test hosts need `ip` (iproute2) to make network namespaces"
    return None


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Every process whose network namespace is `name`, whatever its session or process group."""
    return [int(pid) for pid in ip("netns", "pids", name, check=False).split()]


def kill_namespace(name: str, timeout: float = 30.0, spare: Collection[int] = ()) -> list[int]:
    """SIGKILL every process in namespace `name` but `spare` until none is left; returns the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := [pid for pid in namespace_pids(name) if alive(pid) and pid not in spare]:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in network namespace {name} survive SIGKILL")
        time.sleep(0.1)
    return sorted(set(killed))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remove_sets(owner: int | None = None, stale_only: bool = True) -> list[str]:
    """Remove the hosts and bridges of `owner` (all owners when None); with `stale_only`, only those whose
    owner process is gone. Returns what was removed."""

    def chosen(pid: int) -> bool:
        return (owner is None or pid == owner) and not (stale_only and psutil.pid_exists(pid))

    removed = []
    for name in namespaces():
        match = NAMESPACE.match(name)
        if match and chosen(int(match.group(1))):
            kill_namespace(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", "type", "bridge", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = BRIDGE.match(name)
        if match and chosen(int(match.group(1))):
            ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> str:
    used = ip("-o", "-4", "addr", "show", check=False)
    for x in range(256):
        prefix = SUBNETS.format(x)
        if f" {prefix}." not in used:
            return prefix
    raise HostsUnavailable("every 10.213.X.0/24 is already in use on this machine")


@dataclass
class Host:
    """One test host: a network namespace with its own loopback and one address on the private bridge."""

    name: str  # the network namespace
    address: str

    @property
    def launcher(self) -> list[str]:
        """The command prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        return [pid for pid in namespace_pids(self.name) if alive(pid)]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process of this host at once, as when its machine dies; returns their pids."""
        return kill_namespace(self.name)


@dataclass
class HostNetwork:
    """Hosts on one private bridge; `add_host` makes one, `destroy` removes them all and the bridge."""

    owner: int = field(default_factory=os.getpid)
    hosts: list[Host] = field(default_factory=list)
    subnet: str = ""
    count: int = 0

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.owner}br"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (the test process)."""
        return f"{self.subnet}.254"

    def create(self) -> HostNetwork:
        reason = unavailable_reason()
        if reason:
            raise HostsUnavailable(reason)
        remove_sets(stale_only=True)  # what killed sessions left behind
        self.subnet = _free_subnet()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        watch(self.owner)
        return self

    def add_host(self) -> Host:
        self.count += 1
        index = self.count
        host = Host(f"{PREFIX}{self.owner}-h{index}", f"{self.subnet}.{index}")
        veth, peer = f"{PREFIX}{self.owner}v{index}", f"{PREFIX}{self.owner}p{index}"
        ip("netns", "add", host.name)
        ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", host.name)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        ip("-n", host.name, "link", "set", peer, "name", "eth0")
        ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.name, "link", "set", "eth0", "up")
        ip("-n", host.name, "link", "set", "lo", "up")
        self.hosts.append(host)
        return host

    def remove_host(self, host: Host) -> None:
        host.kill_everything()
        ip("netns", "del", host.name, check=False)
        self.hosts.remove(host)

    def destroy(self) -> None:
        for host in list(self.hosts):
            self.remove_host(host)
        remove_sets(owner=self.owner, stale_only=False)


def watch(owner: int) -> None:
    """Remove `owner`'s hosts when it exits without doing so (a watchdog in a session of its own)."""
    subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "watch", str(owner)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def _owned(owner: int) -> bool:
    return any((m := NAMESPACE.match(name)) and int(m.group(1)) == owner for name in namespaces()) or \
        f"{PREFIX}{owner}br" in ip("-o", "link", "show", check=False)


def _watch(owner: int) -> None:
    time.sleep(2.0)  # the owner is making its bridge
    while _owned(owner):
        if not psutil.pid_exists(owner):
            remove_sets(owner=owner, stale_only=False)
            return
        time.sleep(1.0)


# ----------------------------------------------------------------------------------------- Ray cluster


@dataclass
class ClusterOfHosts:
    """A Ray cluster whose head and workers are separate test hosts; the head does no training work."""

    network: HostNetwork
    state_dir: Path
    head_host: Host
    head: object  # openllama.services.RayHead
    workers: dict[str, tuple[Host, object]] = field(default_factory=dict)  # address -> (host, RayWorker)

    @classmethod
    def start(cls, network: HostNetwork, state_dir: Path, worker_hosts: int) -> ClusterOfHosts:
        from openllama.services import start_ray_head

        host = network.add_host()
        head = start_ray_head(state_dir / host.name, num_cpus=0, object_store_bytes=256 << 20,
                              node_ip=host.address, launcher=host.launcher, owner_pid=network.owner)
        cluster = cls(network, state_dir, host, head)
        for _ in range(worker_hosts):
            cluster.add_worker_host()
        return cluster

    def add_worker_host(self) -> Host:
        """A new host whose Ray worker node (1 CPU) has joined the head."""
        from openllama.services import start_ray_worker

        host = self.network.add_host()
        worker = start_ray_worker(self.head, self.state_dir / host.name, node_ip=host.address, num_cpus=1,
                                  owner_pid=self.network.owner, launcher=host.launcher)
        self.workers[host.address] = (host, worker)
        return host

    def lose_host(self, address: str) -> list[int]:
        """Every process of the worker host at `address` SIGKILLed at once, then the host removed."""
        host, worker = self.workers.pop(address)
        killed = host.kill_everything()
        self.network.remove_host(host)
        worker.stop()  # nothing left to stop: removes its record and temp dir
        return killed

    def lose_head(self, spare: Collection[int] = ()) -> list[int]:
        """Every process of the head host SIGKILLed at once (GCS, raylet, dashboard, Ray Train's controller)
        but `spare`: a driver there, which must outlive its head to say what happened. The worker hosts are
        left as such a loss leaves them."""
        return kill_namespace(self.head_host.name, spare=spare)

    @property
    def worker_addresses(self) -> list[str]:
        return sorted(self.workers)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a Ray client on the head host (a driver: `ip netns exec HEAD ...`)."""
        import harness

        return harness.clean_env(**self.head.env, **extra)

    def get(self, path: str, timeout: float = 10.0):
        """A GET of the head's dashboard API with the cluster's token, as JSON."""
        token = Path(self.head.token_path).read_text().strip()
        request = urllib.request.Request(f"{self.head.dashboard_url}{path}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def alive_node_ips(self) -> list[str]:
        from openllama.services import alive_nodes

        return sorted(node["node_ip"] for node in alive_nodes(self.head))

    def train_runs(self) -> list[dict]:
        """Ray Train's own record of its runs (`RAY_TRAIN_ENABLE_STATE_TRACKING=1` in the driver): attempts,
        their status and times, and each attempt's workers with the node they ran on."""
        return self.get("/api/train/v2/runs/v1")["train_runs"]

    def stop(self) -> None:
        from openllama.services import stop_ray_head

        for host, worker in self.workers.values():
            host.kill_everything()
            worker.stop()
        self.workers.clear()
        self.head_host.kill_everything()
        stop_ray_head(self.head)

    def remove(self) -> None:
        """Stop the cluster and remove its hosts, leaving its network to others (a second cluster on it)."""
        own = [self.head_host, *(host for host, _ in self.workers.values())]
        self.stop()
        for host in own:
            self.network.remove_host(host)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/hosts.py",
                                     description="Test hosts (network namespaces) and a Ray cluster across them.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start a Ray head host and N worker hosts; Ctrl-C or kill removes them")
    up.add_argument("workers", type=int, nargs="?", default=2)
    down = verbs.add_parser("down", help="remove test hosts whose owner process is gone")
    down.add_argument("--all", action="store_true", help="also those of owners still running")
    watchdog = verbs.add_parser("watch", help=argparse.SUPPRESS)
    watchdog.add_argument("owner", type=int)
    args = parser.parse_args(argv)
    if args.verb == "watch":
        _watch(args.owner)
        return 0
    if args.verb == "down":
        for name in remove_sets(stale_only=not args.all):
            print(f"removed {name}")
        return 0
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import tempfile  # only this verb makes a state folder

    # Ctrl-C and `kill` both remove the hosts (a background job starts with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    state_dir = Path(tempfile.mkdtemp(prefix="olr-hosts-"))
    network = HostNetwork().create()
    cluster = None
    try:
        cluster = ClusterOfHosts.start(network, state_dir, args.workers)
        print(f"head {cluster.head_host.name} {cluster.head.address} dashboard {cluster.head.dashboard_url}")
        for host, _ in cluster.workers.values():
            print(f"worker {host.name} {host.address}")
        print(f"alive nodes: {cluster.alive_node_ips()}")
        print(f"a driver on the head host:\n  ip netns exec {cluster.head_host.name} env "
              + " ".join(f"{k}={v}" for k, v in cluster.head.env.items())
              + f" {sys.executable} -m openllama.cli train tiny-cpu scaling.num_workers={args.workers} ...")
        print("Ctrl-C removes the hosts")
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        if cluster is not None:
            cluster.stop()
        network.destroy()
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
