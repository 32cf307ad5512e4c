"""Connect to a Ray cluster or start an embedded one, size the request, shut down.

An embedded Ray (no address) fits any worker count onto this machine's cores by giving each worker
a fractional CPU; an existing cluster is never stretched: a request it cannot hold is an error
within seconds, instead of Ray Train's endless retrying.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from raytrain.config import Config
from raytrain.errors import UserError

# How often Ray Train's controller polls the workers. Each ray.train.report() after the first waits
# for one poll, so the default 2 s would cost up to 2 s per epoch.
_POLL_INTERVAL_S = "0.1"


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

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker


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
    return Plan(workers, cpus, _threads(cpus), embedded=True, address=None, note=note)


def plan_cluster(cfg: Config, address: str, resources: dict, nodes: list[dict]) -> Plan:
    """Check the request against an existing cluster's CPUs; ClusterError if it cannot fit."""
    workers = cfg.scaling.workers
    cpus = cfg.scaling.cpus_per_worker or 1.0
    total = resources.get("CPU", 0.0)
    if workers * cpus > total:
        per_node = ", ".join(
            f"{n['NodeManagerAddress']} {n['Resources'].get('CPU', 0):g}"
            for n in nodes
            if n.get("Alive")
        )
        raise ClusterError(
            f"asked for {workers} workers x {cpus:g} CPUs = {workers * cpus:g} CPUs, but the "
            f"cluster at {address} has {total:g} CPUs ({per_node or 'no live nodes'}); use fewer "
            "--workers or a smaller scaling.cpus_per_worker"
        )
    return Plan(workers, cpus, _threads(cpus), embedded=False, address=address)


def _threads(cpus_per_worker: float) -> int:
    return max(1, int(cpus_per_worker))


def _quiet_environment(verbose: bool) -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", _POLL_INTERVAL_S)
    # Without this every worker print reaches the console twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str | None, num_cpus: int | None, verbose: bool) -> None:
    """ray.init, quiet unless ``verbose``: ``address=None`` starts a private embedded instance."""
    import ray
    from ray.data import DataContext

    _quiet_environment(verbose)
    common = {
        "logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
        "log_to_driver": verbose,
    }
    if address:
        ray.init(address=address, **common)
    else:
        # address="local" always starts a private instance, never joins another one on this host.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = verbose
    data_ctx.print_on_execution_start = verbose


@contextmanager
def connect(cfg: Config) -> Iterator[Plan]:
    """Join the cluster at ``run.address`` / RAY_ADDRESS, or start an embedded Ray; yield the Plan.

    Ray is shut down on the way out, whatever happens inside.
    """
    import ray

    address = cfg.run.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            init_ray(address, None, cfg.run.verbose)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        try:
            plan = plan_cluster(cfg, address, ray.cluster_resources(), ray.nodes())
        except ClusterError:
            ray.shutdown()
            raise
    else:
        cores = os.cpu_count() or 1
        plan = plan_embedded(cfg, cores)
        init_ray(None, max(cores, math.ceil(plan.cpus)), cfg.run.verbose)
    try:
        yield plan
    finally:
        ray.shutdown()
