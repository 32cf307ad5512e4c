"""An elastic run's restart after a lost node: sized for the nodes left, at once.

When a node dies, the workers elsewhere see their Gloo connections close within a second, and
Ray Train decides to restart the worker group. Left to itself it sizes the new group from what
the autoscaling coordinator counted last: the dead node is still in that count (Ray marks a node
dead only after missing its health checks, about 15 s with the defaults, and the coordinator
looks again every 20 s), so it asks for the old number of workers, waits out its worker-group
start timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s) for a node that is gone, and
only then settles for fewer.

``RestartOnNodesLeft`` is a Ray Train controller callback (it runs in the controller, through
``RunConfig(callbacks=...)``). Before the controller acts on a failure, it checks the nodes the
worker group ran on: if all their raylets answer, a worker died and the restart goes ahead at
once; if one does not, it waits until Ray marks that node dead, and has the coordinator count
the nodes again, so that the restart asks for what the nodes left can hold.
"""

from __future__ import annotations

import logging
import socket
import time

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

log = logging.getLogger(__name__)

WAIT_LIMIT_S = 60.0  # the start timeout it replaces: longer than this, the old way is no worse
PROBE_TIMEOUT_S = 1.0


class RestartOnNodesLeft(ControllerCallback, WorkerGroupCallback):
    """Hold an elastic run's restart until Ray has noticed a lost node (see the module)."""

    def __init__(self) -> None:
        self.node_ids: set[str] = set()

    def after_worker_group_start(self, worker_group) -> None:
        self.node_ids = {w.metadata.node_id for w in worker_group.get_workers()}

    def before_controller_execute_failure_decision(self, failure_decision) -> None:
        if getattr(failure_decision, "name", "") != "RETRY" or not self.node_ids:
            return
        try:
            settle(self.node_ids)
        except Exception:  # never a reason to fail the run: the restart goes ahead as Ray's
            log.warning("raytrain: could not check the lost nodes", exc_info=True)


def settle(node_ids: set[str], limit: float = WAIT_LIMIT_S) -> list[str]:
    """Wait until every node of ``node_ids`` whose raylet does not answer is marked dead by Ray
    (at most ``limit`` s), then have the autoscaling coordinator count the nodes again. Returns
    the dead nodes' ids; at once, and empty, when every raylet answers."""
    import ray

    deadline = time.monotonic() + limit
    while True:
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        dead = [i for i in node_ids if not nodes.get(i, {}).get("Alive", False)]
        if dead:
            recount()
            return dead
        silent = [i for i in node_ids if not answers(nodes[i])]
        if not silent or time.monotonic() > deadline:
            return []
        time.sleep(0.5)


def answers(node: dict) -> bool:
    """Whether the node's raylet accepts a TCP connection (a lost host's does not)."""
    address = (node["NodeManagerAddress"], node["NodeManagerPort"])
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def recount() -> None:
    """Have Ray's autoscaling coordinator (which an elastic run's restart asks how many workers
    fit) look at the cluster's nodes now instead of at its next 20 s tick."""
    import ray

    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("raytrain", recompute=True), timeout=30)
