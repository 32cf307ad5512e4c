"""Hosts that share nothing, on this one machine: each host is a network namespace with its own
address on a bridge and a mount namespace with its own /tmp, and runs a Ray node of its own.

    with Hosts(3, tmp) as hosts:          # 10.X.Y.1-3 on a bridge at 10.X.Y.254
        hosts.start_ray(cpus=1, env=s3.env)
        hosts.run(0, ["python", "-m", "raytrain.main", "--address", hosts.head_address, ...])
        hosts.kill_host(2)                # SIGKILL every process of host 2

What a host shares with the others is what machines built from one image share: the code and the
venv under /work (and the same host name). What it does not share: its IP, its /tmp (Ray's
session directories, any local --storage-path), its processes' network. Everything this creates
is removed by ``close()`` (also when the set-up fails): the Ray nodes are stopped by process id,
whatever is left in a namespace is killed by process id, then the namespaces, veths and the bridge
are deleted. Needs root, ``ip`` (iproute2 with netns), ``unshare`` and ``nsenter``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .conftest import ROOT

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RAY_PORT = 6379
DASHBOARD_PORT = 8265
_TOOLS = ("ip", "unshare", "nsenter")


class HostsError(RuntimeError):
    """The hosts could not be built or do not behave as separate machines."""


def unavailable() -> str | None:
    """Why hosts cannot be built here (None if they can)."""
    if os.geteuid() != 0:
        return "needs root and ip netns: not running as root"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs root and ip netns: {', '.join(missing)} not found"
    return None


def skip_unless_possible() -> None:
    """pytest.skip when hosts cannot be built on this machine."""
    import pytest

    reason = unavailable()
    if reason:
        pytest.skip(reason)


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.<100-250>.<0-255>.0/24 that no route or address of this machine touches."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        word = line.split()[0] if line.split() else ""
        if word and word[0].isdigit():
            used.append(ipaddress.ip_network(word, strict=False))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise HostsError("no free 10.x.y.0/24 found for the hosts' bridge")


class Hosts:
    """``count`` hosts on a bridge; ``ips[i]`` is host i's address, ``bridge_ip`` the root
    namespace's address on the bridge (where a server for every host can listen)."""

    def __init__(self, count: int, tmp: Path):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tag = secrets.token_hex(3)
        net = _free_subnet()
        self.prefix = net.prefixlen
        self.bridge = f"rtbr{tag}"
        self.bridge_ip = str(net.network_address + 254)
        self.ips = [str(net.network_address + i + 1) for i in range(count)]
        self.names = [f"rt{tag}-{i}" for i in range(count)]
        self._veths: list[str] = []
        self._netns: list[str] = []
        self._holders: list[subprocess.Popen] = []  # one per host: keeps its mount namespace
        self._mount_points: list[str] = []  # empty directories under /var/tmp, removed at close
        self._ray: dict[int, subprocess.Popen] = {}  # host index -> its `ray start --block`
        self._created_bridge = False
        self.node_ids: list[str | None] = [None] * count
        # No GLOO_SOCKET_IFNAME: raytrain must find each node's interface by itself.
        unwanted = {"RAY_ADDRESS", "GLOO_SOCKET_IFNAME"}
        self.env = {k: v for k, v in os.environ.items() if k not in unwanted}
        self.env["PATH"] = f"{VENV_BIN}:{os.environ.get('PATH', '')}"
        try:
            self._build(tag)
            self._check_network()
            self._check_private_tmp()
        except BaseException:
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------------------

    def _build(self, tag: str) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        _ip("addr", "add", f"{self.bridge_ip}/{self.prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True)):
            outside, inside = f"rtv{tag}-{i}", f"rtp{tag}-{i}"
            _ip("netns", "add", ns)
            self._netns.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self._veths.append(outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "link", "set", inside, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{ip}/{self.prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            self._holders.append(self._hold_mounts(ns))

    def _hold_mounts(self, ns: str) -> subprocess.Popen:
        """A process in ``ns`` with a mount namespace of its own whose /tmp is a fresh tmpfs.

        The code is shared, as a machine image would be: a checkout or virtualenv that lives
        under /tmp (a CI clone) is bound back into the fresh /tmp at the same path, through a
        mount point outside /tmp that only this namespace uses."""
        under_tmp = {p for p in (ROOT, Path(sys.prefix).resolve()) if Path("/tmp") in p.parents}
        keep = sorted(str(p) for p in under_tmp if not any(q in p.parents for q in under_tmp))
        hold = tempfile.mkdtemp(prefix=f"{ns}-", dir="/var/tmp")
        self._mount_points.append(hold)
        rebind = "".join(
            f" && mkdir -p {shlex.quote(p)} && mount --bind {hold}/{shlex.quote(p[5:])} "
            f"{shlex.quote(p)}"
            for p in keep
        )
        script = (
            f"mount --bind /tmp {hold} && mount -t tmpfs tmpfs /tmp{rebind} && umount -l {hold} "
            "&& exec sleep infinity"
        )
        holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # ip, unshare and sh each exec the next: once the pid is `sleep`, /tmp is mounted.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/comm").read_text().strip() != "sleep":
            if holder.poll() is not None:
                raise HostsError(f"cannot give host {ns} its own /tmp: {holder.stderr.read()}")
            if time.monotonic() > deadline:
                raise HostsError(f"host {ns}: the private /tmp was not mounted within 10 s")
            time.sleep(0.02)
        return holder

    def _check_network(self) -> None:
        """Every host reaches the next one over the bridge (host i -> host i+1, round): bridged
        traffic is not dropped (br_netfilter with an iptables FORWARD policy of DROP would)."""
        listen = (
            "import socket, sys\n"
            "s = socket.create_server((sys.argv[1], 0))\n"
            "print(s.getsockname()[1], flush=True)\n"
            "s.settimeout(20)\n"
            "c, _ = s.accept()\n"
            "c.sendall(b'ok')\n"
        )
        connect = (
            "import socket, sys\n"
            "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
            "assert c.recv(2) == b'ok'\n"
        )
        servers = [
            self.popen(i, [sys.executable, "-c", listen, ip], stdout=subprocess.PIPE)
            for i, ip in enumerate(self.ips)
        ]
        try:
            ports = [int(server.stdout.readline() or 0) for server in servers]
            for i in range(len(self.ips)):
                j = (i + 1) % len(self.ips)
                proc = self.run(i, [sys.executable, "-c", connect, self.ips[j], str(ports[j])])
                if proc.returncode != 0:
                    raise HostsError(
                        f"host {i} ({self.ips[i]}) cannot reach host {j} ({self.ips[j]}) over "
                        f"bridge {self.bridge}: is bridged traffic filtered (br_netfilter, "
                        f"net.bridge.bridge-nf-call-iptables, iptables FORWARD)? {proc.stderr}"
                    )
        finally:
            for server in servers:
                server.kill()
                server.wait()

    def _check_private_tmp(self) -> None:
        """A file written in /tmp on host 0 is seen on no other host, nor outside."""
        probe = f"/tmp/hosts-probe-{secrets.token_hex(4)}"
        self.run(0, ["sh", "-c", f"echo host0 > {probe}"], check=True)
        seen = [
            i for i in range(1, len(self.ips)) if self.run(i, ["test", "-e", probe]).returncode == 0
        ]
        if seen or Path(probe).exists():
            raise HostsError(f"{probe} written on host 0 is visible on host(s) {seen} or outside")

    # -- Ray ---------------------------------------------------------------------------------

    @property
    def head_address(self) -> str:
        return f"{self.ips[0]}:{RAY_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.ips[0]}:{DASHBOARD_PORT}"

    def start_ray(self, cpus: int = 1, env: dict[str, str] | None = None) -> None:
        """A Ray node on every host, token auth on: host 0 is the head, the others join one at a
        time (on 2 cores, nodes that start together time out registering). ``env`` goes to every
        node (the workers inherit it) and to whatever ``run``/``popen`` start later."""
        # Token auth, as a production cluster has it, with a token of this test run's own.
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env |= env or {}
        self.cpus = cpus
        self._start_node(
            0,
            [
                "--head",
                f"--port={RAY_PORT}",
                "--include-dashboard=true",
                "--dashboard-host=0.0.0.0",
                f"--dashboard-port={DASHBOARD_PORT}",
            ],
        )
        self._wait_for_nodes(1)
        for i in range(1, len(self.ips)):
            self.restart_ray(i)

    def restart_ray(self, i: int) -> None:
        """Start (again) the Ray node of worker host ``i`` and wait until it has joined."""
        old = self.node_ids[i]
        self._start_node(i, [f"--address={self.head_address}"])
        self._wait_for_nodes(i + 1 if old is None else len(self.ips), stale=old)

    def ray_alive(self, i: int) -> bool:
        """Whether host ``i``'s `ray start` is running (not stopped, not killed)."""
        return i in self._ray and self._ray[i].poll() is None

    def _start_node(self, i: int, args: list[str]) -> None:
        log = open(self.tmp / f"ray-host{i}.log", "a")  # noqa: SIM115 - closed with the process
        cmd = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={self.ips[i]}",
            f"--num-cpus={self.cpus}",
            "--disable-usage-stats",
            *args,
        ]
        # nsenter execs `ray start` (no fork without --pid): this pid is the node's `ray start`.
        self._ray[i] = self.popen(i, cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_for_nodes(self, count: int, stale: str | None = None, timeout: float = 120) -> None:
        """Until ``count`` nodes are alive, none of them ``stale`` (the node a killed host had,
        until the head notices its death); records each host's node id."""
        script = (
            "import json, ray, sys, time\n"
            f"deadline = time.time() + {timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        ray.init(address={self.head_address!r},\n"
            "                 logging_config=ray.LoggingConfig(log_level='ERROR'))\n"
            "        break\n"
            "    except ConnectionError:\n"
            "        assert time.time() < deadline, 'the head did not start'\n"
            "        time.sleep(1)\n"
            "while True:\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            "    alive = {n['NodeID']: n['NodeManagerAddress'] for n in nodes}\n"
            f"    if len(alive) >= {count} and {stale!r} not in alive:\n"
            "        break\n"
            "    assert time.time() < deadline, f'nodes did not join: {alive}'\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps(alive))\n"
        )
        proc = self.run(0, [sys.executable, "-c", script], timeout=timeout + 30)
        if proc.returncode != 0:
            raise HostsError(
                f"the Ray nodes did not come up ({count} wanted; logs in {self.tmp}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        by_ip = {ip: node for node, ip in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
        self.node_ids = [by_ip.get(ip) for ip in self.ips]

    # -- running things on a host ------------------------------------------------------------

    def _enter(self, i: int, argv: list[str], cwd: str | Path | None) -> list[str]:
        wd = Path(cwd or os.getcwd()).resolve()
        return ["nsenter", "-t", str(self._holders[i].pid), "-m", "-n", f"--wd={wd}", "--", *argv]

    def run(
        self,
        i: int,
        argv: list[str],
        env: dict[str, str] | None = None,
        timeout: float = 300,
        cwd: str | Path | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """subprocess.run on host ``i``, output captured as text."""
        return subprocess.run(
            self._enter(i, argv, cwd),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def popen(
        self,
        i: int,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        **kwargs,
    ) -> subprocess.Popen:
        """subprocess.Popen on host ``i`` (text mode; pass stdout= etc. as for Popen)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(
            self._enter(i, argv, cwd), env={**self.env, **(env or {})}, text=True, **kwargs
        )

    def pids(self, i: int) -> list[int]:
        """Every process in host ``i``'s network namespace."""
        return [int(pid) for pid in _ip("netns", "pids", self.names[i]).split()]

    def kill_host(self, i: int) -> None:
        """SIGKILL every process of host ``i`` (its raylet, workers, anything run there), as a
        machine that loses power; its mount namespace (and /tmp) stays, for ``restart_ray``."""
        holder = self._holders[i].pid
        self._kill_all(i, keep={holder})
        if i in self._ray:
            self._ray.pop(i).wait()

    def _kill_all(self, i: int, keep: set[int] = frozenset(), timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid in self.pids(i) if pid not in keep]
            if not left:
                return
            if time.monotonic() > deadline:
                raise HostsError(f"host {i}: processes {left} survive SIGKILL")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    # -- tear-down ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every Ray node, kill what is left on every host, delete what was created."""
        problems = []
        # Every process of a host is in its network namespace, and the namespace goes: each
        # is killed by its id below, instead of letting `ray start --block` stop its processes
        # on SIGTERM (that took 32 s per module; nothing of a host's is kept).
        for proc in self._ray.values():
            proc.kill()
            proc.wait()
        self._ray.clear()
        for i in range(len(self._netns)):
            try:
                self._kill_all(i)
            except HostsError as e:
                problems.append(str(e))
        for holder in self._holders:
            holder.kill()
            holder.wait()
        for ns in self._netns:
            try:
                _ip("netns", "del", ns)  # its eth0 goes with it, and so does the veth's other end
            except HostsError as e:
                problems.append(str(e))
        for veth in self._veths:
            # The kernel removes a deleted namespace's devices in the background, so the outside
            # end may still be listed for a moment and then vanish under `ip link del`.
            if _link_exists(veth):
                try:
                    _ip("link", "del", veth)
                except HostsError as e:
                    if _link_exists(veth):
                        problems.append(str(e))
        if self._created_bridge:
            try:
                _ip("link", "del", self.bridge)
            except HostsError as e:
                problems.append(str(e))
        for mount_point in self._mount_points:
            with contextlib.suppress(OSError):
                os.rmdir(mount_point)  # empty: its bind mount went with the namespace
        self._netns, self._veths, self._holders, self._created_bridge = [], [], [], False
        self._mount_points = []
        if problems:
            raise HostsError("; ".join(problems))

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
