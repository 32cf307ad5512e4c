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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raytrain.config import Config, TrainConfig
from raytrain.data.pieces import HeldOut, PieceSet, read_share
from raytrain.data.scaling import Scaling
from raytrain.data.tables import to_arrays, to_tensors
from raytrain.evaluate import tally
from raytrain.model import build_model, unwrap
from raytrain.runs import checkpoint_name
from raytrain.storage import Location
from raytrain.train import checkpoint
from raytrain.train.faults import die_if_due
from raytrain.train.metrics import (
    PLACE,
    MetricsLog,
    epoch_totals,
    gather_epoch,
    gather_objects,
    sum_over_workers,
    worker_row,
)
from raytrain.train.optim import build_optimizer, build_scheduler
from raytrain.train.stopping import Watch


@dataclass(frozen=True)
class LoopArgs:
    """What the driver hands every worker: the config plus facts it measured."""

    config: Config
    threads: int
    features: int
    classes: int
    run_dir: Location
    session: str  # the driver's id: tells a restart of the worker group from a resumed run
    ingest: str = "memory"  # or "stream": see raytrain.data.datasets
    blocks: tuple = ()  # in memory: the training split's Arrow blocks in the object store
    val_blocks: tuple = ()  # in memory: the validation split's, likewise
    scaling: Scaling | None = None  # the training split's feature statistics, if scaled
    train_pieces: PieceSet | None = None  # Parquet: the row groups each worker reads itself
    val_pieces: PieceSet | None = None
    fail_at: tuple[int, int] | None = None  # (rank, epoch): raytrain.train.faults


def epoch_order(rows: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global order of the training rows in ``epoch`` (0-based); the same on every worker."""
    if not shuffle:
        return torch.arange(rows)
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(rows, generator=torch.Generator().manual_seed(epoch_seed))


_VAL_BATCH = 4096
# A streamed worker keeps the held-out rows its epochs read, for validation, up to this size.
HELD_OUT_BYTES = 256 << 20
Batches = Iterator[tuple[torch.Tensor, torch.Tensor, int]]


def memory_batches(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, rank: int, world: int
) -> Batches:
    """This worker's rows of every global batch of ``order``, with the global batch's size."""
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        mine = batch[rank::world]
        yield x[mine], y[mine], len(batch)


def local_batches(
    windows: Iterator[tuple[torch.Tensor, torch.Tensor]], local_batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of rows cut into batches of ``local_batch`` rows (the last may be
    smaller). A batch that spans two windows copies only its own rows."""
    left_x = left_y = None
    for x, y in windows:
        start = 0
        if left_y is not None and len(left_y):  # complete the batch begun in the last window
            start = min(local_batch - len(left_y), len(y))
            left_x, left_y = torch.cat([left_x, x[:start]]), torch.cat([left_y, y[:start]])
            if len(left_y) < local_batch:
                continue
            yield left_x, left_y
        end = start + (len(y) - start) // local_batch * local_batch
        for i in range(start, end, local_batch):
            yield x[i : i + local_batch], y[i : i + local_batch]
        left_x, left_y = x[end:], y[end:]
    if left_y is not None and len(left_y):
        yield left_x, left_y


def streamed_batches(
    shard, local_batch: int, seed: int, epoch: int, rank: int, world: int, scale: Callable
) -> Batches:
    """This worker's Ray Data shard, streamed in local batches, features scaled by ``scale``.

    Ray Data hands over whole blocks (a file's rows, or part of one); each is viewed without a
    copy, shuffled by a permutation seeded by ``(seed, epoch, rank)`` (the one copy of its rows)
    and scaled once. Ray Train splits the stream into equal shards, so every worker takes the
    same number of steps with batches of the same size, and the global batch is ``world`` local
    batches.
    """
    rng = np.random.default_rng([seed, epoch, rank])

    def blocks():
        for block in shard.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=1
        ):
            x, y = to_arrays(block)
            order = rng.permutation(len(y))
            yield scale(torch.from_numpy(x[order])), torch.from_numpy(y[order])

    for xb, yb in local_batches(blocks(), local_batch):
        yield xb, yb, len(yb) * world


def piece_batches(
    pieces: PieceSet,
    features: int,
    local_batch: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    scale: Callable,
    held: HeldOut | None = None,
) -> Batches:
    """This worker's deal of the row groups (``PieceSet.deal``), read in a random order seeded
    by ``(seed, epoch, rank)`` and cut into local batches, features scaled by ``scale``; with
    ``held``, the held-out rows of the row groups read are kept there.

    Every worker knows every worker's row count (the deal is the same everywhere), so all take
    the same number of steps: step ``j``'s global batch is the workers' ``j``-th local batches,
    a worker whose rows ran out contributing an empty one, and every row is seen once an epoch.
    """
    shares = pieces.deal(world)
    counts = [sum(pieces.rows(p) for p in share) for share in shares]
    steps = max(-(-n // local_batch) for n in counts)

    def global_rows(step: int) -> int:
        return sum(min(local_batch, max(0, n - step * local_batch)) for n in counts)

    def prepare(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return scale(torch.from_numpy(x)), torch.from_numpy(y)  # in the reading thread

    rng = np.random.default_rng([seed, epoch, rank])
    windows = pieces.windows(shares[rank], rng, prepare, held.pick if held else None)
    step = 0
    for step, (xb, yb) in enumerate(local_batches(windows, local_batch), start=1):
        yield xb, yb, global_rows(step - 1)
    for later in range(step, steps):  # this worker's rows ran out before the others'
        yield torch.zeros(0, features), torch.zeros(0, dtype=torch.int64), global_rows(later)


def val_batches_of(arrays: Iterator[tuple[np.ndarray, np.ndarray]], scale: Callable):
    """Validation rows, arrays at a time, in ``_VAL_BATCH`` batches of tensors, scaled."""
    for x, y in arrays:
        for i in range(0, len(y), _VAL_BATCH):
            # Copied, a batch's worth: the arrays may be the object store's read-only buffers.
            yield scale(torch.tensor(x[i : i + _VAL_BATCH])), torch.tensor(y[i : i + _VAL_BATCH])


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    world: int,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One epoch over this worker's batches; returns its own loss sum, correct count, rows, the
    seconds spent in forward, backward and the optimizer step (the rest is waiting for data), and
    the first step (1-based) whose loss was not finite, or 0."""
    model.train()
    # Summed on tensors and read once per epoch: an .item() per step would sync every step.
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = compute = 0.0
    first_bad = torch.zeros((), dtype=torch.int64)
    for step, (xb, yb, global_rows) in enumerate(batches, start=1):
        step_started = time.perf_counter()
        logits = model(xb)
        summed = F.cross_entropy(logits, yb, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        # DDP divides by world; this makes the step's gradient the mean over the global batch.
        (summed * (world / global_rows)).backward()
        if grad_clip is not None:  # the averaged gradient: the same on every worker
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += summed.detach()
        correct += (logits.argmax(dim=1) == yb).sum()
        # Without a branch on the value: no sync, and the first bad step stays.
        bad = ~torch.isfinite(summed.detach()) & (first_bad == 0)
        first_bad = torch.where(bad, step, first_bad)
        seen += len(yb)
        compute += time.perf_counter() - step_started
    return {
        "loss_sum": loss_sum.item(),
        "correct": float(correct.item()),
        "rows": seen,
        "compute_s": compute,
        "bad_step": float(first_bad.item()),
    }


def worker_data(args: LoopArgs, rank: int, world: int) -> tuple[Callable[[int], Batches], Callable]:
    """This worker's data: a function from the epoch (0-based) to its training batches, and one
    that gives its share of the validation rows as ``(x, y)`` batches."""
    import ray
    import ray.train

    cfg = args.config.train
    scale = args.scaling.apply if args.scaling is not None else (lambda x: x)
    if args.ingest == "memory":
        # Small enough to hold: the splits copied into tensors once, instead of reading them
        # again every epoch, and scaled in place.
        scale_ = args.scaling.apply_ if args.scaling is not None else (lambda x: x)
        if args.train_pieces is not None:
            # Each worker reads a run of the row groups, then the workers exchange their rows;
            # it validates the held-out rows of its run.
            share = read_share(
                args.train_pieces, args.val_pieces, args.features, rank, world, torch_empty
            )
            x, y = torch.from_numpy(share.x), torch.from_numpy(share.y)
            val_x, val_y = torch.from_numpy(share.val_x), torch.from_numpy(share.val_y)
            start, end = share.bounds[rank]
            scale_(x[start:end])
            scale_(val_x)
            exchange_rows((x, y), share.bounds, world)
        else:  # every worker fetches every block; validates rows rank, rank + W, ...
            x, y = to_tensors(ray.get(list(args.blocks)))
            val_x, val_y = to_tensors(ray.get(list(args.val_blocks)))
            scale_(x)
            val_x, val_y = scale_(val_x[rank::world].clone()), val_y[rank::world]

        def train_batches(epoch: int) -> Batches:
            order = epoch_order(len(y), cfg.seed, epoch, cfg.shuffle)
            return memory_batches(x, y, order, cfg.batch_size, rank, world)

        def val_batches():
            return (
                (val_x[i : i + _VAL_BATCH], val_y[i : i + _VAL_BATCH])
                for i in range(0, len(val_y), _VAL_BATCH)
            )

        return train_batches, val_batches
    local = cfg.batch_size // world  # the driver checked that every worker count divides it
    if args.train_pieces is not None:
        train, val = args.train_pieces, args.val_pieces
        held = HeldOut.for_split(train, val, world, rank, args.features, HELD_OUT_BYTES)

        return (
            lambda epoch: piece_batches(
                train, args.features, local, cfg.seed, epoch, rank, world, scale, held
            ),
            lambda: val_batches_of(held.rows() if held else val.read(val.deal(world)[rank]), scale),
        )
    shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    return (
        lambda epoch: streamed_batches(shard, local, cfg.seed, epoch, rank, world, scale),
        lambda: val_batches_of(
            (
                to_arrays(block)
                for block in val_shard.iter_batches(batch_size=None, batch_format="pyarrow")
            ),
            scale,
        ),
    )


def torch_empty(shape, dtype) -> np.ndarray:
    """``np.empty`` in memory from torch's allocator. NumPy asks the kernel for huge pages for
    large arrays, and the first touch of such memory can stall on compaction: receiving 160 MB
    of rows from another worker into it took 0.45 s here, 0.1 s into torch's."""
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def exchange_rows(
    tensors: tuple[torch.Tensor, ...], bounds: Sequence[tuple[int, int]], world: int
) -> None:
    """Fill in the rows other workers read: every rank's ``bounds`` rows of each tensor are
    broadcast from it to the others over the process group (gloo; 0.1-0.3 s for 400 MB on one
    machine, measured), so each worker reads only its part of the files."""
    if world == 1:
        return
    for source, (start, end) in enumerate(bounds):
        if end > start:
            for tensor in tensors:
                torch.distributed.broadcast(tensor[start:end], src=source)


def validate(
    model: torch.nn.Module, batches, classes: int, world: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """This worker's validation sums (for the epoch's row, gathered with its other numbers), and
    the validation of all held-out rows, summed over the workers in one all-reduce: the loss sum
    and the confusion matrix that a checkpoint of this epoch carries."""
    started = time.perf_counter()
    loss_sum, confusion = tally(unwrap(model), batches, classes)
    mine = {
        "val_loss_sum": loss_sum,
        "val_correct": float(confusion.diag().sum().item()),
        "val_rows": float(confusion.sum().item()),
    }
    whole = sum_over_workers(loss_sum, confusion, world)
    mine["val_time_s"] = time.perf_counter() - started
    return mine, whole


NOT_VALIDATED = {"val_loss_sum": 0.0, "val_correct": 0.0, "val_rows": 0.0, "val_time_s": 0.0}


def build_or_restore(args: LoopArgs):
    """The seeded model, its optimizer and learning-rate schedule, restored from the run's latest
    checkpoint if it has one; returns them, the epochs already done and early stopping's watch."""
    cfg = args.config
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, args.features, args.classes)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = checkpoint.restore(model, optimizer, scheduler)
    return model, optimizer, scheduler, state["epoch"], Watch(cfg, state.get("watch"))


def checkpoint_due(done: int, cfg: TrainConfig) -> bool:
    """Whether the epoch that made ``done`` epochs writes a checkpoint (always the last one)."""
    every = cfg.checkpoint_every
    return done == cfg.epochs or (every > 0 and done % every == 0)


def validation_due(done: int, cfg: TrainConfig) -> bool:
    """Whether the epoch that made ``done`` epochs is validated (every checkpoint's is)."""
    every = cfg.validate_every
    return checkpoint_due(done, cfg) or (every > 0 and done % every == 0)


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
    model, optimizer, scheduler, start_epoch, watch = build_or_restore(args)
    timeline["model_built"] = time.time()
    # Wraps in DDP (gloo on CPU) only when world > 1; DDP also broadcasts rank 0's weights.
    model = ray.train.torch.prepare_model(model)
    timeline["model_ready"] = time.time()
    train_batches, val_batches = worker_data(args, rank, world)
    timeline["data_ready"] = time.time()
    node_id, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    place = {"rank": rank, "node_id": node_id, "node_ip": node_ip}
    # Where every rank runs and how its start went: gathered once, written with the first row.
    starts = gather_objects({**place, **timeline}, world)
    log = None
    if rank == 0:
        group = ray.util.get_current_placement_group()
        log = MetricsLog(args.run_dir, args.session, start_epoch, group.id.hex() if group else None)
    scaling = args.scaling.to_dict() if args.scaling is not None else None

    for epoch in range(start_epoch, cfg.train.epochs):
        die_if_due(args.fail_at, rank, epoch + 1, args.run_dir)
        lr = optimizer.param_groups[0]["lr"]
        started_at, started = time.time(), time.perf_counter()
        local = train_epoch(model, optimizer, train_batches(epoch), world, cfg.train.grad_clip)
        local.update(epoch_time_s=time.perf_counter() - started, started_at=started_at)
        done = epoch + 1
        due = validation_due(done, cfg.train)
        whole = None
        if due:
            mine, whole = validate(model, val_batches(), args.classes, world)
            local.update(mine)
        else:
            local.update(NOT_VALIDATED)
        stats = gather_epoch(local, world)
        totals = {**epoch_totals(done, stats), "lr": lr}
        # The same gathered numbers on every worker: all stop together, none checkpoints.
        bad = [int(s["bad_step"]) for s in stats if s["bad_step"]]
        if bad:
            totals["nonfinite_step"] = min(bad)
        stop = not bad and watch.update(totals)
        if stop:
            totals["stopped_early"] = {"best_epoch": watch.best_epoch, "best": watch.best}
        save = not bad and (checkpoint_due(done, cfg.train) or stop)
        if save and whole is None:  # early stopping on a training metric, between validations
            _, whole = validate(model, val_batches(), args.classes, world)
        scheduler.step()  # first: a checkpoint holds the schedule of the epoch after it
        if log is not None:  # the row first: a crash while checkpointing keeps it
            facts = starts if epoch == start_epoch else [{k: s[k] for k in PLACE} for s in starts]
            workers = [worker_row(s, f) for s, f in zip(stats, facts, strict=True)]
            saved = str(args.run_dir / checkpoint_name(done)) if save else None
            log.write(totals, workers, saved)
        if save:
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
            extra = {"config": cfg.to_dict(), "scaling": scaling, "watch": watch.state()}
            extra["shape"] = {"features": args.features, "classes": args.classes}
            places = [{k: s[k] for k in PLACE} for s in starts]
            extra["validation"] = {**whole, "epoch": done, "workers": places}
            checkpoint.report(rank, done, totals, **state, **extra)
        if bad or stop:
            return
