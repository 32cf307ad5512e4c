"""What the gradient all-reduce costs a training step, measured while training, and whether a
run across nodes is bound by its compute or by the network (docs/scaling.md).

Each worker reads DDP's own runtime statistics (torch samples the first 10 steps and every
100th): how long the all-reduce of a step's gradients took and how much of it overlapped the
backward pass. What did not overlap is what the network adds to the step. The epoch's row keeps
it as ``communication``: the gradient's megabytes, the bytes a ring all-reduce moves per worker
and step (2(N-1)/N of them), the average step and the network's part of it, and its share. The
driver prints the verdict once, after the first epoch, when the workers span more than one node
(raytrain.report.console.network_verdict); results.json keeps the last epoch's.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def gradient_bytes(model: torch.nn.Module) -> int:
    """The bytes of one step's gradients: every trainable parameter's, as float32 or whatever
    the parameters are."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def exposed_seconds(model: torch.nn.Module) -> float:
    """This worker's average seconds per step spent waiting for the all-reduce after its
    backward pass finished, from DDP's statistics; 0 without DDP (one worker), NaN when DDP
    kept no statistics (torch calls the interface a prototype): unknown, not free."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return 0.0
    try:
        data = model._get_ddp_logging_data()
    except (AttributeError, RuntimeError):
        return math.nan
    comm = data.get("avg_backward_comm_time")
    if not comm:
        return math.nan
    overlap = data.get("avg_backward_compute_comm_overlap_time", 0) or 0
    return max(comm - overlap, 0) / 1e9


def summary(stats: list[dict[str, float]], grad_bytes: int) -> dict[str, Any] | None:
    """The epoch's ``communication`` from every worker's ``compute_s``, ``steps`` and
    ``comm_s``, or None for one worker. Where a worker's ``comm_s`` is unknown (NaN), so are
    ``allreduce_ms`` and ``share`` (None), and no verdict is given."""
    world = len(stats)
    steps = [s["steps"] for s in stats if s["steps"]]
    if world < 2 or not steps:
        return None
    step = sum(s["compute_s"] / s["steps"] for s in stats if s["steps"]) / len(steps)
    # DDP averages the steps it samples (the first 10, then every 100th), whose first ones carry
    # Gloo's warm-up; the step is every step's average and includes the all-reduce: capped at it.
    network = min(sum(s["comm_s"] for s in stats) / world, step)
    known = not math.isnan(network)
    return {
        "gradient_mb": grad_bytes / 1e6,
        "ring_mb_per_step": 2 * (world - 1) / world * grad_bytes / 1e6,
        "step_ms": step * 1e3,
        "allreduce_ms": network * 1e3 if known else None,
        "share": (network / step if step > 0 else 0.0) if known else None,
    }
