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

The loop reads as that rule: restore, then per epoch: this worker's rows of every global batch ->
step -> gather the workers' numbers -> rank 0 writes the row -> checkpoint. It knows nothing of
the command line, the console or where it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raytrain.config import Config, TrainConfig
from raytrain.data.tables import FEATURES, LABEL, to_tensors
from raytrain.model import build_model
from raytrain.runs import checkpoint_name
from raytrain.train import checkpoint
from raytrain.train.faults import die_if_due
from raytrain.train.metrics import (
    PLACE,
    MetricsLog,
    epoch_totals,
    gather_epoch,
    gather_objects,
    worker_row,
)


@dataclass(frozen=True)
class LoopArgs:
    """What the driver hands every worker: the config plus facts it measured."""

    config: Config
    threads: int
    features: int
    classes: int
    run_dir: str
    session: str  # the driver's id: tells a restart of the worker group from a resumed run
    ingest: str = "memory"  # or "stream": see raytrain.data.datasets
    blocks: tuple = ()  # in memory: the training split's Arrow blocks in the object store
    fail_at: tuple[int, int] | None = None  # (rank, epoch): raytrain.train.faults


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


def epoch_batches(args: LoopArgs, rank: int, world: int) -> Callable[[int], Batches]:
    """This worker's data: a function from the epoch (0-based) to its batches."""
    import ray
    import ray.train

    cfg = args.config.train
    if args.ingest == "memory":
        # Small enough to hold: the split's blocks, copied into tensors once, instead of paying
        # a Ray Data pipeline start-up every epoch.
        x, y = to_tensors(ray.get(list(args.blocks)))
        return lambda epoch: memory_batches(
            x, y, epoch_order(len(y), cfg.seed, epoch, cfg.shuffle), cfg.batch_size, rank, world
        )
    shard = ray.train.get_dataset_shard("train")
    local = cfg.batch_size // world  # the driver checked that every worker count divides it
    return lambda epoch: streamed_batches(shard, local, cfg.seed, epoch, rank, world)


def build_or_restore(args: LoopArgs) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """The seeded model and its optimizer, restored from the run's latest checkpoint if it has
    one; returns them and the epochs already done."""
    cfg = args.config
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, args.features, args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    return model, optimizer, checkpoint.restore(model, optimizer)


def checkpoint_due(done: int, cfg: TrainConfig) -> bool:
    """Whether the epoch that made ``done`` epochs writes a checkpoint (always the last one)."""
    every = cfg.checkpoint_every
    return done == cfg.epochs or (every > 0 and done % every == 0)


def train_loop_per_worker(loop_config: dict[str, LoopArgs]) -> None:
    """Ray Train's per-worker entry point (``loop_config = {"args": LoopArgs}``)."""
    import ray
    import ray.train
    import ray.train.torch

    timeline = {"loop_start": time.time()}
    args = loop_config["args"]
    cfg = args.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(args.threads)
    model, optimizer, start_epoch = build_or_restore(args)
    timeline["model_built"] = time.time()
    # Wraps in DDP (gloo on CPU) only when world > 1; DDP also broadcasts rank 0's weights.
    model = ray.train.torch.prepare_model(model)
    timeline["model_ready"] = time.time()
    batches_of = epoch_batches(args, rank, world)
    timeline["data_ready"] = time.time()
    node_id, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    place = {"rank": rank, "node_id": node_id, "node_ip": node_ip}
    # Where every rank runs and how its start went: gathered once, written with the first row.
    starts = gather_objects({**place, **timeline}, world)
    log = MetricsLog(args.run_dir, args.session, start_epoch) if rank == 0 else None

    for epoch in range(start_epoch, cfg.train.epochs):
        die_if_due(args.fail_at, rank, epoch + 1, args.run_dir)
        started_at, started = time.time(), time.perf_counter()
        local = train_epoch(model, optimizer, batches_of(epoch), world)
        local.update(epoch_time_s=time.perf_counter() - started, started_at=started_at)
        stats = gather_epoch(local, world)
        done = epoch + 1
        totals = epoch_totals(done, stats)
        save = checkpoint_due(done, cfg.train)
        if log is not None:  # the row first: a crash while checkpointing keeps it
            facts = starts if epoch == start_epoch else [{k: s[k] for k in PLACE} for s in starts]
            workers = [worker_row(s, f) for s, f in zip(stats, facts, strict=True)]
            log.write(
                totals, workers, str(Path(args.run_dir) / checkpoint_name(done)) if save else None
            )
        if save:
            checkpoint.report(
                rank, done, totals, model=model, optimizer=optimizer, config=cfg.to_dict()
            )
