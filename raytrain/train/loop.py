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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raytrain.config import Config, TrainConfig
from raytrain.data.pieces import HeldOut, PieceSet, read_share
from raytrain.data.scaling import Scaling
from raytrain.data.tables import to_arrays, to_tensors
from raytrain.evaluate import regression_loss, regression_metrics, tally, tally_regression
from raytrain.model import build_model, unwrap
from raytrain.runs import checkpoint_name
from raytrain.storage import Location
from raytrain.train import checkpoint, communication, compression
from raytrain.train.batches import (
    HELD_OUT_BYTES,
    VAL_BATCH,
    Batches,
    epoch_order,
    exchange_rows,
    memory_batches,
    piece_batches,
    streamed_batches,
    torch_empty,
    val_batches_of,
)
from raytrain.train.faults import die_if_due
from raytrain.train.metrics import (
    PLACE,
    MetricsLog,
    epoch_totals,
    gather_epoch,
    gather_objects,
    sum_over_workers,
    validation_totals,
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
    categories: tuple[int, ...] = ()  # codes per categorical column (the last features)
    class_weights: tuple[float, ...] | None = None  # train.class_weight: balanced
    encoding: dict[str, Any] | None = None  # files: raytrain.data.columns.Encoding, for checkpoints
    target: tuple[float, float] | None = None  # regression: the target's mean and std


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    world: int,
    grad_clip: float | None = None,
    class_weights: torch.Tensor | None = None,
    regression: str | None = None,
) -> dict[str, float]:
    """One epoch over this worker's batches; returns its own loss sum, correct count, rows, the
    seconds spent in forward, backward and the optimizer step (the rest is waiting for data), the
    steps, and the first step (1-based) whose loss was not finite, or 0."""
    model.train()
    # Summed on tensors and read once per epoch: an .item() per step would sync every step.
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = compute = 0.0
    steps = 0
    first_bad = torch.zeros((), dtype=torch.int64)
    for step, (xb, yb, global_rows) in enumerate(batches, start=1):
        step_started = time.perf_counter()
        logits = model(xb)
        if regression is None:
            summed = F.cross_entropy(logits, yb, weight=class_weights, reduction="sum")
        else:  # train.loss on the standardised target
            summed = regression_loss(logits.squeeze(1), yb, regression)
        optimizer.zero_grad(set_to_none=True)
        # DDP divides by world; this makes the step's gradient the mean over the global batch.
        (summed * (world / global_rows)).backward()
        if grad_clip is not None:  # the averaged gradient: the same on every worker
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += summed.detach()
        if regression is None:
            correct += (logits.argmax(dim=1) == yb).sum()
        # Without a branch on the value: no sync, and the first bad step stays.
        bad = ~torch.isfinite(summed.detach()) & (first_bad == 0)
        first_bad = torch.where(bad, step, first_bad)
        seen += len(yb)
        steps = step
        compute += time.perf_counter() - step_started
    return {
        "loss_sum": loss_sum.item(),
        "correct": float(correct.item()),
        "rows": seen,
        "compute_s": compute,
        "steps": float(steps),
        "bad_step": float(first_bad.item()),
    }


def worker_data(args: LoopArgs, rank: int, world: int) -> tuple[Callable[[int], Batches], Callable]:
    """This worker's data: a function from the epoch (0-based) to its training batches, and one
    that gives its share of the validation rows as ``(x, y)`` batches."""
    import ray.train

    if args.ingest == "memory":
        return memory_data(args, rank, world)
    cfg = args.config.train
    scale = args.scaling.apply if args.scaling is not None else (lambda x: x)
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


def memory_data(args: LoopArgs, rank: int, world: int) -> tuple[Callable[[int], Batches], Callable]:
    """``worker_data`` in memory: the splits copied into tensors once, instead of reading them
    again every epoch, and scaled in place."""
    import ray

    cfg = args.config.train
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
            (val_x[i : i + VAL_BATCH], val_y[i : i + VAL_BATCH])
            for i in range(0, len(val_y), VAL_BATCH)
        )

    return train_batches, val_batches


def validate_regression(
    model: torch.nn.Module, batches, args: LoopArgs, world: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """``validate`` of a regression: the loss and the sums of RMSE, MAE and R^2, summed over
    the workers in one all-reduce; the pairs of (actual, predicted) this worker kept."""
    started = time.perf_counter()
    loss_sum, sums, pairs = tally_regression(unwrap(model), batches, args.config.train.loss)
    mine = {"val_loss_sum": loss_sum, "val_correct": 0.0, "val_rows": float(sums[4].item())}
    packed = torch.cat([torch.tensor([loss_sum], dtype=torch.float64), sums])
    if world > 1:
        torch.distributed.all_reduce(packed)
    whole = {"task": "regression", "loss_sum": packed[0].item(), "sums": packed[1:].tolist()}
    mean, std = args.target
    whole["pairs"] = [[a * std + mean, p * std + mean] for a, p in pairs]
    whole.update(regression_metrics(whole["sums"], args.target))
    mine["val_time_s"] = time.perf_counter() - started
    return mine, whole


def validate(
    model: torch.nn.Module, batches, classes: int, world: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """This worker's validation sums (for the epoch's row, gathered with its other numbers), and
    the validation of all held-out rows, summed over the workers in one all-reduce: the loss sum
    and the confusion matrix that a checkpoint of this epoch carries."""
    started = time.perf_counter()
    loss_sum, confusion, scores = tally(unwrap(model), batches, classes)
    mine = {
        "val_loss_sum": loss_sum,
        "val_correct": float(confusion.diag().sum().item()),
        "val_rows": float(confusion.sum().item()),
    }
    whole = sum_over_workers(loss_sum, confusion, scores, world)
    mine["val_time_s"] = time.perf_counter() - started
    return mine, whole


NOT_VALIDATED = {"val_loss_sum": 0.0, "val_correct": 0.0, "val_rows": 0.0, "val_time_s": 0.0}


def build_or_restore(args: LoopArgs):
    """The seeded model, its optimizer and learning-rate schedule, restored from the run's latest
    checkpoint if it has one; returns them, the epochs already done and early stopping's watch."""
    cfg = args.config
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, args.features, args.classes, args.categories)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    state = checkpoint.restore(model, optimizer, scheduler)
    watch = Watch(cfg, state.get("watch"))
    return model, optimizer, scheduler, state["epoch"], watch, state.get("compression")


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
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(args.threads)
    model, optimizer, scheduler, start_epoch, watch, saved = build_or_restore(args)
    timeline["model_built"] = time.time()
    # Wraps in DDP (gloo on CPU) only when world > 1; DDP also broadcasts rank 0's weights.
    model = ray.train.torch.prepare_model(model)
    hooked = compression.register(model, args.config.train, rank, saved)
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
    worker = Worker(
        args, rank, world, model, optimizer, scheduler, watch, val_batches, starts, log, hooked
    )
    for epoch in range(start_epoch, args.config.train.epochs):
        die_if_due(args.fail_at, rank, epoch + 1, args.run_dir)
        if not worker.epoch(epoch, train_batches(epoch), first=epoch == start_epoch):
            return


@dataclass
class Worker:
    """One worker's training state between epochs, and what each epoch does with it."""

    args: LoopArgs
    rank: int
    world: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    watch: Watch
    val_batches: Callable
    starts: list[dict[str, Any]]  # every rank's place and start-up times, gathered once
    log: MetricsLog | None  # rank 0's
    compression: Any = None  # PowerSGD's state (raytrain.train.compression), kept in checkpoints

    def epoch(self, epoch: int, batches: Batches, first: bool) -> bool:
        """Train one epoch, validate if due, gather every worker's numbers; rank 0 writes the
        row, and the checkpoint if one is due. Returns whether training goes on."""
        cfg, done = self.args.config.train, epoch + 1
        lr = self.optimizer.param_groups[0]["lr"]
        started_at, started = time.time(), time.perf_counter()
        weights = self.args.class_weights
        weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        regression = cfg.loss if self.args.target is not None else None
        local = train_epoch(
            self.model, self.optimizer, batches, self.world, cfg.grad_clip, weights, regression
        )
        local.update(epoch_time_s=time.perf_counter() - started, started_at=started_at)
        local["comm_s"] = communication.exposed_seconds(self.model)
        whole = None
        if validation_due(done, cfg):
            mine, whole = self.validate()
            local.update(mine)
        else:
            local.update(NOT_VALIDATED)
        stats = gather_epoch(local, self.world)
        totals = {**epoch_totals(done, stats), "lr": lr}
        network = communication.summary(stats, communication.gradient_bytes(self.model))
        if network is not None:
            totals["communication"] = network
        if self.args.target is not None:  # regression: no accuracy, its errors instead
            totals.pop("accuracy")
            totals.pop("val_accuracy", None)
            if whole is not None:
                totals.update({f"val_{k}": whole[k] for k in ("rmse", "mae", "r2")})
        elif whole is not None:
            totals.update(validation_totals(whole, totals["val_rows"]))
        # The same gathered numbers on every worker: all stop together, none checkpoints.
        bad = not_finite(totals, stats)
        stop = not bad and self.watch.update(totals)
        if stop:
            totals["stopped_early"] = {"best_epoch": self.watch.best_epoch, "best": self.watch.best}
        new_best = cfg.checkpoint_best and self.watch.best_epoch == done
        save = not bad and (checkpoint_due(done, cfg) or stop or new_best)
        if save and whole is None:  # the metric is a training one, between validations
            _, whole = self.validate()
        self.scheduler.step()  # first: a checkpoint holds the schedule of the epoch after it
        if self.log is not None:  # the row first: a crash while checkpointing keeps it
            places = self.starts if first else [{k: s[k] for k in PLACE} for s in self.starts]
            workers = [worker_row(s, f) for s, f in zip(stats, places, strict=True)]
            saved = str(self.args.run_dir / checkpoint_name(done)) if save else None
            self.log.write(totals, workers, saved)
        if save:
            self.save(done, totals, whole)
        return not (bad or stop)

    def validate(self) -> tuple[dict[str, float], dict[str, Any]]:
        if self.args.target is not None:
            return validate_regression(self.model, self.val_batches(), self.args, self.world)
        return validate(self.model, self.val_batches(), self.args.classes, self.world)

    def save(self, done: int, totals: dict[str, Any], whole: dict[str, Any]) -> None:
        """Report the epoch with its checkpoint (written by rank 0), which carries everything a
        resumed run needs and the validation of all held-out rows."""
        args = self.args
        state = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        extra = {
            "config": args.config.to_dict(),
            "scaling": args.scaling.to_dict() if args.scaling is not None else None,
            "watch": self.watch.state(),
            "shape": {
                "features": args.features,
                "classes": args.classes,
                "categories": list(args.categories),
            },
            "encoding": args.encoding,
            "compression": compression.gather(self.compression, self.rank, self.world),
        }
        places = [{k: s[k] for k in PLACE} for s in self.starts]
        extra["validation"] = {**whole, "epoch": done, "workers": places}
        checkpoint.report(self.rank, done, totals, **state, **extra)


def not_finite(totals: dict[str, Any], stats: list[dict[str, Any]]) -> bool:
    """Whether the epoch went wrong: a training step whose loss was NaN or infinite (its step
    goes into ``totals["nonfinite_step"]``) or a validation loss that is (``totals[
    "nonfinite_validation"]``). Such an epoch writes no checkpoint and ends training."""
    bad = [int(s["bad_step"]) for s in stats if s["bad_step"]]
    if bad:
        totals["nonfinite_step"] = min(bad)
        return True
    if "val_loss" in totals and not math.isfinite(totals["val_loss"]):
        totals["nonfinite_validation"] = True
        return True
    return False
