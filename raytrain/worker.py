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
from raytrain.data import FEATURES, LABEL, to_tensors
from raytrain.metrics import MetricsLog
from raytrain.model import build_model


@dataclass(frozen=True)
class LoopArgs:
    """What the driver hands every worker: the config plus facts it measured."""

    config: Config
    threads: int
    features: int
    classes: int
    run_dir: str
    ingest: str = "memory"  # or "stream": see raytrain.data
    blocks: tuple = ()  # in memory: the training split's Arrow blocks (raytrain.data.Datasets)
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
    # Die a moment into the epoch, as a real failure would.
    time.sleep(1.0)
    marker.write_text(json.dumps({"rank": rank, "epoch": epoch, "killed_at": time.time()}))
    os.kill(os.getpid(), signal.SIGKILL)


# What each worker contributes to an epoch's row, gathered in one collective per epoch.
_STATS = ("loss_sum", "correct", "rows", "epoch_time_s", "compute_s", "started_at")


def gather_epoch(local: dict[str, float], world: int) -> list[dict[str, float]]:
    """Every worker's numbers for this epoch (``_STATS``), indexed by rank, on every rank."""
    mine = torch.tensor([local[key] for key in _STATS], dtype=torch.float64)
    if world == 1:
        return [dict(zip(_STATS, mine.tolist(), strict=True))]
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine)
    return [dict(zip(_STATS, row.tolist(), strict=True)) for row in table]


def epoch_totals(epoch: int, stats: list[dict[str, float]]) -> dict[str, Any]:
    """The epoch over all workers: loss and accuracy weighted by rows, the slowest worker's time."""
    rows = sum(s["rows"] for s in stats)
    slowest = max(s["epoch_time_s"] for s in stats)
    return {
        "epoch": epoch,
        "loss": sum(s["loss_sum"] for s in stats) / rows,
        "accuracy": sum(s["correct"] for s in stats) / rows,
        "rows": int(rows),
        "epoch_time_s": slowest,
        "samples_per_s": rows / slowest,
    }


def worker_row(stats: dict[str, float], facts: dict[str, Any]) -> dict[str, Any]:
    """One worker's part of an epoch's row in metrics.jsonl."""
    rows = max(stats["rows"], 1)
    return {
        **facts,
        "started_at": stats["started_at"],
        "compute_s": stats["compute_s"],
        "loss": stats["loss_sum"] / rows,
        "accuracy": stats["correct"] / rows,
        "rows": int(stats["rows"]),
        "epoch_time_s": stats["epoch_time_s"],
        "samples_per_s": stats["rows"] / stats["epoch_time_s"],
    }


def train_loop_per_worker(loop_config: dict[str, LoopArgs]) -> None:
    """Ray Train's per-worker entry point (``loop_config = {"args": LoopArgs}``): resume if there
    is a checkpoint, train; every epoch rank 0 writes the metrics row, and with a checkpoint all
    ranks report to Ray Train."""
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

    if args.ingest == "memory":
        # Small enough to hold: the split's blocks, copied into tensors once, instead of paying
        # a Ray Data pipeline start-up every epoch.
        x, y = to_tensors(ray.get(list(args.blocks)))
    else:
        shard = ray.train.get_dataset_shard("train")
    timeline["data_ready"] = time.time()

    # Where every rank runs and how its start went: gathered once, written by rank 0.
    start = {"rank": rank, "node_id": node_id, "node_ip": node_ip, **timeline}
    starts = [start]
    if world > 1:
        starts = [{} for _ in range(world)]
        dist.all_gather_object(starts, start)
    log = MetricsLog(args.run_dir) if rank == 0 else None

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
        local.update(epoch_time_s=time.perf_counter() - started, started_at=started_at)
        stats = gather_epoch(local, world)
        done = epoch + 1
        totals = epoch_totals(done, stats)

        saved = None
        if done == cfg.train.epochs or (every > 0 and done % every == 0):
            # report() is a barrier: every rank calls it; rank 0 hands over the checkpoint.
            if rank == 0:
                with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as tmp:
                    checkpoint.save(
                        tmp,
                        model=model,
                        optimizer=optimizer,
                        epoch=done,
                        config=config_dict,
                        metrics=totals,
                    )
                    ray.train.report(totals, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                saved = ray.train.get_checkpoint().path  # where Ray Train persisted it
            else:
                ray.train.report(totals, checkpoint=None)
        if log is not None:
            # The start-up times go with the first epoch of this start of the worker group.
            first = epoch == start_epoch
            places = [s if first else {k: s[k] for k in ("rank", "node_id", "node_ip")}
                      for s in starts]  # fmt: skip
            log.write(totals, [worker_row(s, p) for s, p in zip(stats, places, strict=True)], saved)
