"""The training loop that runs on every Ray Train worker.

The data-parallel rule (the same numbers mean the same maths for any worker count):

- every epoch has one global order of the training rows: a permutation seeded by
  ``(train.seed, epoch)``, or the stored order when ``train.shuffle`` is off;
- step ``j`` trains on the global batch ``order[j*B:(j+1)*B]`` (``B`` = ``train.batch_size``);
  the last batch of an epoch may be smaller, and no row is dropped;
- worker ``r`` of ``W`` takes rows ``r, r+W, r+2W, ...`` of each global batch, so the workers'
  parts are disjoint and together make up the batch (as torch's DistributedSampler deals rows);
- each worker scales its summed loss by ``W / len(global batch)``; DDP averages gradients over
  the ``W`` workers, so every step applies the gradient of the mean loss over the global batch,
  exactly what one process would compute, and the learning rate applies to the global batch.

This module knows nothing of the command line, the console or where it runs.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raytrain import checkpoint
from raytrain.config import Config
from raytrain.data import FEATURES, LABEL, read_tensors
from raytrain.model import build_model

# Rows read per batch when a worker copies the training split into memory once.
_READ_BATCH = 65536


@dataclass(frozen=True)
class LoopArgs:
    """What the driver hands every worker: the config plus facts it measured."""

    config: Config
    threads: int
    features: int
    classes: int
    run_dir: str
    ingest: str = "memory"  # or "stream": see raytrain.data
    # (rank, epoch): that rank kills itself with SIGKILL when it starts that epoch (1-based),
    # once per run. For rehearsing recovery; see RAYTRAIN_FAIL_AT in the README.
    fail_at: tuple[int, int] | None = None


def epoch_order(rows: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global order of the training rows in ``epoch`` (0-based); the same on every worker."""
    if not shuffle:
        return torch.arange(rows)
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(rows, generator=torch.Generator().manual_seed(epoch_seed))


Batches = Iterator[tuple[torch.Tensor, torch.Tensor, int]]


def memory_batches(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, rank: int, world: int
) -> Batches:
    """This worker's rows of every global batch of ``order``, with the global batch's size."""
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        mine = batch[rank::world]
        yield x[mine], y[mine], len(batch)


def streamed_batches(shard, local_batch: int, seed: int, epoch: int, rank: int, world: int):
    """This worker's Ray Data shard, streamed in local batches with a seeded local shuffle.

    Ray Train splits the stream into equal shards, so every worker takes the same number of
    steps with batches of the same size, and the global batch is ``world`` local batches.
    """
    shuffle_seed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    for batch in shard.iter_torch_batches(
        batch_size=local_batch,
        prefetch_batches=4,
        local_shuffle_buffer_size=8 * local_batch,
        local_shuffle_seed=shuffle_seed,
    ):
        yield batch[FEATURES], batch[LABEL], len(batch[LABEL]) * world


def train_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, world: int
) -> dict[str, float]:
    """One epoch over this worker's batches; returns its own loss sum, correct count, rows and the
    seconds spent in forward, backward and the optimizer step (the rest is waiting for data)."""
    model.train()
    # Summed on tensors and read once per epoch: an .item() per step would sync every step.
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = compute = 0.0
    for xb, yb, global_rows in batches:
        step_started = time.perf_counter()
        logits = model(xb)
        summed = F.cross_entropy(logits, yb, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        # DDP divides by world; this makes the step's gradient the mean over the global batch.
        (summed * (world / global_rows)).backward()
        optimizer.step()
        loss_sum += summed.detach()
        correct += (logits.argmax(dim=1) == yb).sum()
        seen += len(yb)
        compute += time.perf_counter() - step_started
    return {
        "loss_sum": loss_sum.item(),
        "correct": float(correct.item()),
        "rows": seen,
        "compute_s": compute,
    }


def _die_once(rank: int, epoch: int, run_dir: str) -> None:
    """SIGKILL this worker process, unless this fault was injected before in this run."""
    marker = Path(run_dir) / f".fault-injected-rank{rank}-epoch{epoch}"
    if marker.exists():
        return
    # Die a moment into the epoch, as a real failure would, after Ray Train has collected the
    # previous epoch's report (a report still queued in a dead process is lost with it).
    time.sleep(1.0)
    marker.write_text(json.dumps({"rank": rank, "epoch": epoch, "killed_at": time.time()}))
    os.kill(os.getpid(), signal.SIGKILL)


def _global_totals(local: dict[str, float], seconds: float, world: int) -> dict[str, float]:
    """Sum the workers' counts (and take the slowest epoch time) over all ranks."""
    sums = torch.tensor([local["loss_sum"], local["correct"], local["rows"]], dtype=torch.float64)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_sum, correct, rows = sums.tolist()
    return {
        "loss": loss_sum / rows,
        "accuracy": correct / rows,
        "rows": int(rows),
        "epoch_time_s": slowest.item(),
        "samples_per_s": rows / slowest.item(),
    }


def train_loop_per_worker(loop_config: dict[str, LoopArgs]) -> None:
    """Ray Train's per-worker entry point (``loop_config = {"args": LoopArgs}``): resume if there
    is a checkpoint, train, report every epoch."""
    import ray.train
    import ray.train.torch

    timeline = {"loop_start": time.time()}
    args = loop_config["args"]
    cfg = args.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(args.threads)
    node_id = ray.get_runtime_context().get_node_id()
    node_ip = ray.util.get_node_ip_address()

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, args.features, args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    start_epoch = 0
    resume_from = ray.train.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            state = checkpoint.load(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"]
    timeline["model_built"] = time.time()
    # Wraps in DDP (gloo on CPU) only when world > 1; DDP also broadcasts rank 0's weights.
    model = ray.train.torch.prepare_model(model)
    timeline["model_ready"] = time.time()

    shard = ray.train.get_dataset_shard("train")
    if args.ingest == "memory":
        # Small enough to hold: copy the split into tensors once, instead of paying a Ray Data
        # pipeline start-up every epoch.
        x, y = read_tensors(shard.iter_torch_batches(batch_size=_READ_BATCH))
    timeline["data_ready"] = time.time()

    config_dict = cfg.to_dict()
    every = cfg.train.checkpoint_every
    for epoch in range(start_epoch, cfg.train.epochs):
        if args.fail_at == (rank, epoch + 1):
            _die_once(rank, epoch + 1, args.run_dir)
        started_at = time.time()
        started = time.perf_counter()
        if args.ingest == "memory":
            order = epoch_order(len(y), cfg.train.seed, epoch, cfg.train.shuffle)
            batches = memory_batches(x, y, order, cfg.train.batch_size, rank, world)
        else:
            local_batch = cfg.train.batch_size // world
            batches = streamed_batches(shard, local_batch, cfg.train.seed, epoch, rank, world)
        local = train_epoch(model, optimizer, batches, world)
        seconds = time.perf_counter() - started
        totals = _global_totals(local, seconds, world)
        done = epoch + 1
        metrics: dict[str, Any] = {
            "epoch": done,
            **totals,
            "worker": {
                "rank": rank,
                "node_id": node_id,
                "node_ip": node_ip,
                "started_at": started_at,
                "compute_s": local["compute_s"],
                **(timeline if epoch == start_epoch else {}),
                "loss": local["loss_sum"] / max(local["rows"], 1),
                "accuracy": local["correct"] / max(local["rows"], 1),
                "rows": int(local["rows"]),
                "epoch_time_s": seconds,
                "samples_per_s": local["rows"] / seconds,
            },
        }
        wants_checkpoint = done == cfg.train.epochs or (every > 0 and done % every == 0)
        if wants_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as tmp:
                checkpoint.save(
                    tmp,
                    model=model,
                    optimizer=optimizer,
                    epoch=done,
                    config=config_dict,
                    metrics=totals,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            # Every rank reports the same number of times: report() is a barrier.
            ray.train.report(metrics, checkpoint=None)
