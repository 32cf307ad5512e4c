"""Connect to a Ray cluster or start an embedded one, size the request, shut down.

An embedded Ray (no address) fits any worker count onto this machine's cores by giving each worker
a fractional CPU; an existing cluster is never stretched: a request it cannot hold is an error
within seconds, instead of Ray Train's endless retrying.

Why one long module (about 460 lines): sizing the request (``Plan``) and starting or joining
Ray share the same facts (cores, the cluster's CPUs and nodes, token auth, the storage every
node must see) and the one ``connect`` that every command calls; split, each half would import
the other's private helpers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from raytrain.config import Config
from raytrain.errors import UserError, first_line
from raytrain.storage import Location

# How often Ray Train's controller polls the workers: how soon it sees a checkpoint report, a dead
# worker or the end of training (the default 2 s adds seconds to every run's end). Epoch metrics
# do not wait for it (see raytrain.metrics). 0.02 s took a third of the compute-bound benchmark's
# throughput on 2 cores; between 0.05 s and 1 s the difference was within the noise.
_POLL_INTERVAL_S = "0.05"
_PROBE_TIMEOUT_S = 5.0
_STORAGE_CHECK_TIMEOUT_S = 120.0
DATA_CPUS = 1
_BLOCK_BYTES = 8 * 1024 * 1024
_EMBEDDED_TOKEN = secrets.token_hex(32)


class ClusterError(UserError):
    """The cluster cannot be reached or cannot hold the request (one sentence)."""


@dataclass(frozen=True)
class Plan:
    """What every worker gets, decided once before training."""

    workers: int
    cpus_per_worker: float
    threads: int
    embedded: bool
    address: str | None
    note: str | None = None  # one line for the user when the request had to be fitted
    min_workers: int | None = None  # set for an elastic run
    nodes: int = 1
    copies_per_node: int = 1  # the most workers one node can hold: copies of in-memory data
    ray_start_s: float = 0.0  # how long ray.init took

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """ScalingConfig's num_workers: a count, or (min, max) for an elastic run."""
        return self.workers if self.min_workers is None else (self.min_workers, self.workers)

    @property
    def workers_text(self) -> str:
        if self.min_workers is None:
            return str(self.workers)
        return f"{self.min_workers}-{self.workers} (elastic)"


def plan_embedded(cfg: Config, cores: int) -> Plan:
    """Fit the request onto this machine's ``cores``."""
    workers, asked = cfg.scaling.workers, cfg.scaling.cpus_per_worker
    note = None
    if asked is None:
        cpus = 1.0
        if workers > cores:
            cpus = cores / workers
            note = (
                f"{workers} workers on {cores} cores: each worker gets {cpus:g} CPU "
                "and 1 torch thread"
            )
    else:
        cpus = asked
        if workers * asked > cores:
            note = (
                f"{workers} workers x {asked:g} CPUs exceed this machine's {cores} cores: "
                f"embedded Ray offers {math.ceil(workers * asked)} logical CPUs (shared cores)"
            )
    if cfg.scaling.min_workers is not None:
        # Elastic: Ray Train starts as many whole-CPU workers as the cores hold.
        cpus, note = asked or 1.0, None
    return Plan(
        workers,
        cpus,
        _threads(cpus),
        embedded=True,
        address=None,
        note=note,
        min_workers=cfg.scaling.min_workers,
        copies_per_node=workers,
    )


def plan_cluster(cfg: Config, address: str, resources: dict, nodes: list[dict]) -> Plan:
    """Check the request against an existing cluster's CPUs; ClusterError if it cannot fit."""
    workers, least = cfg.scaling.workers, cfg.scaling.min_workers
    cpus = cfg.scaling.cpus_per_worker or 1.0
    total = resources.get("CPU", 0.0)
    needed = (least or workers) * cpus
    if cfg.data.path is not None:
        needed += DATA_CPUS  # Ray Data's read tasks need a CPU that no worker holds
    alive = [n for n in nodes if n.get("Alive")]
    if needed > total:
        per_node = ", ".join(
            f"{n['NodeManagerAddress']} ({n['NodeID'][:8]}): {n['Resources'].get('CPU', 0):g}"
            for n in alive
        )
        count = f"{least} workers (elastic minimum)" if least else f"{workers} workers"
        data = f" + {DATA_CPUS} for reading Parquet" if cfg.data.path is not None else ""
        raise ClusterError(
            f"asked for {count} x {cpus:g} CPUs{data} = {needed:g} CPUs, but the cluster at "
            f"{address} has {total:g} CPUs on {len(alive)} node(s) [{per_node}]; use fewer "
            "--workers or a smaller scaling.cpus_per_worker"
        )
    most_on_a_node = max(int(n["Resources"].get("CPU", 0) // cpus) for n in alive)
    if cfg.scaling.placement_strategy == "STRICT_SPREAD":
        most_on_a_node = 1
    return Plan(
        workers,
        cpus,
        _threads(cpus),
        embedded=False,
        address=address,
        min_workers=least,
        nodes=len(alive),
        copies_per_node=max(1, min(workers, most_on_a_node)),
    )


def _sees(marker: Location) -> bool:
    """Run on a node: whether it sees the marker (an object store it cannot reach: no)."""
    try:
        return marker.exists()
    except OSError:
        return False


def check_storage_visible(storage: Location) -> None:
    """On a multi-node cluster, check that every node sees the storage directory (or reaches the
    object store): checkpoints written by a worker on one node must be readable by the driver and
    by a restarted worker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    marker = storage / f".raytrain-visible-{secrets.token_hex(4)}"
    marker.write_bytes(b"raytrain checks that every node sees this directory\n")
    sees = ray.remote(num_cpus=0)(_sees)
    asks = [
        sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(marker)
        for n in nodes
    ]
    try:
        seen = ray.get(asks, timeout=_STORAGE_CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"the cluster's nodes did not say within {_STORAGE_CHECK_TIMEOUT_S:g} s whether they "
            f"see run.storage_path {str(storage)!r}; check that every node is healthy "
            "('ray status') and try again"
        ) from None
    finally:
        marker.delete_file()
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind and storage.local:
        raise ClusterError(
            f"run.storage_path {str(storage)!r} is not visible from node(s) {', '.join(blind)}: "
            "on a multi-node cluster, use a directory that every node mounts (NFS, a shared "
            "volume) or object storage (s3://bucket/prefix) with --storage-path"
        )
    if blind:
        raise ClusterError(
            f"run.storage_path {str(storage)!r} cannot be reached from node(s) "
            f"{', '.join(blind)}: the endpoint and the credentials must work on every node "
            "(an endpoint on 127.0.0.1 only works on its own host)"
        )


def _threads(cpus_per_worker: float) -> int:
    return max(1, int(cpus_per_worker))


def _quiet_environment(verbose: bool) -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", _POLL_INTERVAL_S)
    # Ray Train's Prometheus metrics callbacks: work on every report that nobody here reads.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # Without this every worker print reaches the console twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)


_NODE_DEAD = re.compile(
    r"node id: (?P<id>[0-9a-f]+) and address: (?P<ip>\S+).*? has been marked dead because "
    r"(?P<why>[^.]*)"
)


def route_cluster_message(line: str) -> tuple[str, str]:
    """Where a message Ray publishes to the driver goes without --verbose: ``("console", ...)``
    as Ray wrote it, ``("lost", one line of raytrain's)`` for a lost node, or ``("log", ...)``
    for Ray's warnings (such as "WARNING: 8 PYTHON worker processes have been started ..."),
    which are about Ray's own housekeeping, not the run. A dying node's agents also publish
    "Raylet is terminated" with the tail of its raylet's log: logged too, because the one-line
    "lost" message follows once Ray marks the node dead."""
    dead = _NODE_DEAD.search(line)
    if dead:
        why = dead["why"]
        return "lost", f"   lost  node {dead['ip']} ({dead['id'][:8]}): Ray marked it dead ({why})"
    if line.lstrip().startswith(("WARNING", "Raylet is terminated")):
        return "log", line
    return "console", line


def _relay_cluster_errors() -> None:
    """Ray prints the cluster's error messages on the driver's console whatever the log level
    (ray._private.worker.listen_error_messages): a lost node as a coloured paragraph, warnings
    about its worker processes. Without --verbose they go where route_cluster_message says; the
    log is ``raytrain_cluster_messages.log`` in the Ray session's log directory."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "raytrain_relay", False):
        return  # another Ray version, or done already

    def relay(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            original(data, ignore_prefix)
            return
        console = []
        for line in data.get("lines", []):
            where, text = route_cluster_message(line)
            if where == "lost":
                print(text, flush=True)
            elif where == "log":
                _log_cluster_message(ray_worker, text)
            else:
                console.append(text)
        if console:
            original({**data, "lines": console}, ignore_prefix)

    relay.raytrain_relay = True
    ray_worker.print_to_stdstream = relay


def _log_cluster_message(ray_worker, text: str) -> None:
    try:
        logs = ray_worker._global_node.get_logs_dir_path()
        with open(os.path.join(logs, "raytrain_cluster_messages.log"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
    except (AttributeError, OSError):
        pass  # no session to log into (shutting down): the message is Ray's housekeeping


def probe(address: str) -> None:
    """Fail within seconds, in one sentence, when the cluster is unreachable or refuses us.

    Left to itself, ray.init retries an unreachable or unauthorised cluster for 20 s or more.
    """
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        return  # Ray Client: ray.init reports its own errors
    try:
        gcs = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise ClusterError(f"cannot find the Ray cluster {address!r}: {e}") from None
    if gcs is None:
        raise ClusterError(
            f"--address {address!r}: no running Ray cluster found on this machine; start one "
            "with 'ray start --head' or give the head node's host:port"
        )
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({gcs}: {reason}); check the head "
            "node's host:port (Ray's default port is 6379) and that the cluster is running"
        ) from None
    try:
        with stderr_to_devnull():  # Ray's C++ client logs the refusal there as well
            ray._raylet.GcsClient(address=gcs)
    except ray.exceptions.AuthenticationError:
        raise ClusterError(
            f"the Ray cluster at {address!r} refused authentication: it uses token auth; "
            "export RAY_AUTH_MODE=token and make the cluster's token available in "
            "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
        ) from None
    except ray.exceptions.RayError as e:
        raise ClusterError(
            f"{gcs} does not answer as a Ray cluster ({first_line(e)}); --address takes the head "
            "node's GCS host:port (Ray's default port is 6379)"
        ) from None


@contextmanager
def stderr_to_devnull() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a while: what native code writes there too."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _code_runtime_env() -> dict | None:
    """Ship raytrain's own code to the cluster's workers, unless this driver is a Ray Job (whose
    working_dir already carries it, along with any of the user's modules)."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    package = Path(__file__).resolve().parent
    return {"py_modules": [str(package)], "excludes": ["__pycache__"]}


def _private_token() -> None:
    """Token auth for an embedded Ray, with a token of its own.

    Ray's processes listen on every interface (only the dashboard, which an embedded Ray does not
    start, can be bound to loopback); what keeps others out is Ray's token auth. ``ray.init()``
    turns it on by default, but reads ``RAY_AUTH_MODE=disabled`` from the environment and shares
    ``~/.ray/auth_token`` (mode 0644) with every Ray of the user. An embedded Ray gets token auth
    whatever the environment says, and a fresh token that only its own processes inherit (one
    per driver process: Ray's client caches the token it read first).
    """
    from ray._raylet import Config as RayConfig

    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _EMBEDDED_TOKEN}
    # This process read RAY_AUTH_MODE when Ray was imported: read it again (what ray.init does
    # itself when it turns token auth on by default).
    RayConfig.initialize("")


def auth_is_on() -> bool:
    """Whether this process's Ray uses token auth."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN


def init_ray(address: str | None, num_cpus: int | None, verbose: bool) -> None:
    """ray.init, quiet unless ``verbose``: ``address=None`` starts a private embedded instance
    (token auth on, with a token of its own: ``_private_token``)."""
    import ray
    from ray.data import DataContext

    _quiet_environment(verbose)
    common = {
        "logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
        "log_to_driver": verbose,
    }
    if address:
        ray.init(address=address, runtime_env=_code_runtime_env(), **common)
    else:
        # A private instance on one machine: no node can be preempted or drained, so Ray Train's
        # preemption watcher (an actor process of its own, ~110 MB) would watch for nothing. The
        # processes Ray starts here inherit this environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray starts its worker processes at nice 15, below its own daemons and the driver, so
        # that a busy cluster node keeps its raylet responsive. Here the training workers are
        # the work: at nice 15 every wake-up of Ray's daemons or the driver preempts one of a
        # multi-threaded worker's threads, and each parallel operation waits for the slowest
        # (measured in docs/performance.md). A user's own cluster keeps its setting.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local" always starts a private instance, never joins another one on this host.
        _private_token()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
        if not auth_is_on():
            raise ClusterError(
                "the embedded Ray started without token auth: anyone who reaches this machine "
                "could run code in it; stopped (this Ray version ignores RAY_AUTH_MODE=token)"
            )
    if not verbose:
        _relay_cluster_errors()
    data_ctx = DataContext.get_current()
    # Small blocks: what the driver buffers while it validates stays small however large a
    # Parquet file is (a block is read whole).
    data_ctx.target_max_block_size = _BLOCK_BYTES
    data_ctx.enable_progress_bars = verbose
    data_ctx.print_on_execution_start = verbose


def start_autoscaling_coordinator() -> None:
    """Start, without waiting, the actor to which every Ray Train controller sends its resource
    request right after it starts. The controller creates it on first use and waits for its
    answer: on a fresh embedded Ray a process of its own started on the critical path of the
    first fit(), 3-5 s here, which the driver starts while it prepares the data. Ray Data's own
    function, so the controller finds this very actor (by name); skipped if Ray no longer has
    it, and a no-op once the actor exists."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cluster_address(cfg: Config) -> str | None:
    """The Ray cluster a run joins (``run.address``, else RAY_ADDRESS); None: an embedded Ray."""
    return cfg.run.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def connect(cfg: Config, extra_cpus: float = 0) -> Iterator[Plan]:
    """Join the cluster at ``run.address`` / RAY_ADDRESS, or start an embedded Ray; yield the Plan.
    ``extra_cpus``: logical CPUs an embedded Ray offers beyond the plan's (a sweep's trial
    drivers).

    Ray is shut down on the way out, whatever happens inside.
    """
    import ray

    started = time.perf_counter()
    address = cluster_address(cfg)
    if address:
        probe(address)
        try:
            init_ray(address, None, cfg.run.verbose)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        try:
            plan = plan_cluster(cfg, address, ray.cluster_resources(), ray.nodes())
            check_storage_visible(Location.of(cfg.run.storage_path))
        except BaseException:
            ray.shutdown()  # whatever went wrong, nothing of this run stays connected
            raise
    else:
        cores = os.cpu_count() or 1
        plan = plan_embedded(cfg, cores)
        # An elastic run sizes itself to the real cores; a fixed one gets the CPUs it asked for.
        offered = cores if plan.min_workers is not None else max(cores, math.ceil(plan.cpus))
        # One more for Ray Data's read tasks: with every CPU held by a training worker, reading
        # Parquet would wait forever.
        init_ray(None, math.ceil(offered + DATA_CPUS + extra_cpus), cfg.run.verbose)
    plan = dataclasses.replace(plan, ray_start_s=time.perf_counter() - started)
    if threading.current_thread() is threading.main_thread():
        # After ray.init, which installs a SIGTERM handler of its own that just dies: SIGTERM
        # takes the way out Ctrl-C takes (stop Ray, keep what is kept, say what is left).
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield plan
    finally:
        ray.shutdown()
