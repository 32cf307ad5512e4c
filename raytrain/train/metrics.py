"""Per-epoch metrics: every worker's numbers gathered in one collective, turned into the epoch's
row, and written by rank 0 to ``metrics.jsonl`` (format: raytrain.runs) and TensorBoard.

An epoch row holds ``epoch`` (1-based), ``loss`` and ``accuracy`` over all workers' rows (weighted
by rows), ``lr`` (the learning rate the epoch trained with), ``nonfinite_step`` (only in an epoch
whose loss became NaN or infinite: the first such step, 1-based; training stops there), ``rows``,
``epoch_time_s`` (the slowest worker's, training only), ``samples_per_s``; in a validated epoch
``val_loss``, ``val_accuracy`` (over all validation rows, each worker validating its share),
``val_log_loss`` (the same as ``val_loss``: named as scikit-learn names it), ``val_f1`` (macro),
``val_auc`` (binary; one-vs-rest macro for more classes; raytrain.evaluate), ``val_rows`` and
``val_time_s`` (the slowest worker's); with two workers or more ``communication`` (what the
gradient all-reduce cost a step: raytrain.train.communication); ``stopped_early`` (only in the
epoch early stopping ended: ``best_epoch`` and ``best``); ``checkpoint`` (the checkpoint this
epoch wrote, or null), ``time`` and ``workers``: per worker ``rank``, ``node_id``, ``node_ip``,
``started_at``, ``compute_s``, ``loss``, ``accuracy``, ``rows``, ``epoch_time_s``,
``samples_per_s``; in the first epoch after a start of the worker group also when the worker
entered the loop (``loop_start``) and had its model (``model_built``), DDP (``model_ready``)
and data (``data_ready``).

TensorBoard (``tensorboard --logdir RUN_DIR/tensorboard``), step = epoch: ``train/loss``,
``train/accuracy``, ``train/lr``, ``val/loss``, ``val/accuracy``, ``perf/samples_per_s``,
``perf/epoch_time_s``, and per worker ``perf/samples_per_s/rank{r}`` and
``perf/epoch_time_s/rank{r}``.

Epoch metrics do not go through ``ray.train.report``: a report is a barrier that waits for Ray
Train's controller to poll, so raytrain reports only with checkpoints.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raytrain import runs
from raytrain.evaluate import auc, f1_macro
from raytrain.storage import Location

# What each worker contributes to an epoch's row, gathered in one collective per epoch.
STATS = (
    "loss_sum",
    "correct",
    "rows",
    "epoch_time_s",
    "compute_s",
    "steps",
    "comm_s",
    "started_at",
    "bad_step",
    "val_loss_sum",
    "val_correct",
    "val_rows",
    "val_time_s",
)
PLACE = ("rank", "node_id", "node_ip")  # where a worker runs: in every row


def gather_epoch(local: dict[str, float], world: int) -> list[dict[str, float]]:
    """Every worker's ``STATS`` for this epoch, indexed by rank, on every rank."""
    mine = torch.tensor([local[key] for key in STATS], dtype=torch.float64)
    table = [mine]
    if world > 1:
        table = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(table, mine)
    return [dict(zip(STATS, row.tolist(), strict=True)) for row in table]


def sum_over_workers(
    loss_sum: float, confusion: torch.Tensor, scores: torch.Tensor, world: int
) -> dict[str, Any]:
    """A validation's loss sum, confusion matrix and score counts added up over the workers
    (one all-reduce; float64 counts are exact far beyond any row count), with the AUC and
    macro F1 of the sums (raytrain.evaluate)."""
    classes = confusion.shape[0]
    packed = torch.cat(
        [
            torch.tensor([loss_sum], dtype=torch.float64),
            confusion.flatten().to(torch.float64),
            scores.flatten().to(torch.float64),
        ]
    )
    if world > 1:
        dist.all_reduce(packed)
    counts = packed[1 : 1 + classes * classes].round().to(torch.int64).view(classes, classes)
    summed_scores = packed[1 + classes * classes :].view(scores.shape)
    return {
        "loss_sum": packed[0].item(),
        "confusion": counts.tolist(),
        "auc": auc(summed_scores),
        "f1": f1_macro(counts),
    }


def validation_totals(whole: dict[str, Any], rows: int) -> dict[str, Any]:
    """The epoch's row's metrics of a validation over all workers (``sum_over_workers``)."""
    out = {"val_log_loss": whole["loss_sum"] / rows, "val_f1": whole["f1"]}
    if whole.get("auc") is not None:
        out["val_auc"] = whole["auc"]
    return out


def gather_objects(mine: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every worker's ``mine`` (small, JSON-ready), indexed by rank, on every rank."""
    if world == 1:
        return [mine]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def epoch_totals(epoch: int, stats: list[dict[str, float]]) -> dict[str, Any]:
    """The epoch over all workers: loss and accuracy weighted by rows, the slowest worker's time."""
    rows = sum(s["rows"] for s in stats)
    slowest = max(s["epoch_time_s"] for s in stats)
    totals = {
        "epoch": epoch,
        "loss": sum(s["loss_sum"] for s in stats) / rows,
        "accuracy": sum(s["correct"] for s in stats) / rows,
        "rows": int(rows),
        "epoch_time_s": slowest,
        "samples_per_s": rows / slowest,
    }
    val_rows = sum(s.get("val_rows", 0) for s in stats)
    if val_rows:  # a validated epoch: every worker's share of the held-out rows, summed
        totals["val_loss"] = sum(s["val_loss_sum"] for s in stats) / val_rows
        totals["val_accuracy"] = sum(s["val_correct"] for s in stats) / val_rows
        totals["val_rows"] = int(val_rows)
        totals["val_time_s"] = max(s["val_time_s"] for s in stats)
    return totals


def worker_row(stats: dict[str, float], facts: dict[str, Any]) -> dict[str, Any]:
    """One worker's part of an epoch's row: where it runs (``facts``) and its own numbers."""
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


class MetricsLog:
    """Rank 0's writer of metrics.jsonl and the TensorBoard events of one worker-group start."""

    def __init__(
        self,
        run_dir: runs.RunPath,
        session: str,
        from_epoch: int,
        placement_group: str | None = None,
    ):
        """Write the start line: this start trains from ``from_epoch`` on, superseding the rows
        of later epochs already in the file (a restart, or a resumed run); ``placement_group``:
        the worker group's (a sweep releases it when it stops the trial)."""
        self.run_dir = run_dir = Location.of(run_dir)
        self.tensorboard = run_dir / runs.TENSORBOARD_DIR
        # TensorBoard's writer needs a local file: on an object store, the events are written
        # here and the file is uploaded whole after each epoch (a few hundred bytes an epoch).
        self._tensorboard_dir = (
            self.tensorboard.as_path()
            if run_dir.local
            else Path(tempfile.mkdtemp(prefix="raytrain-tensorboard-"))
        )
        self._writer = None
        written = [row["epoch"] for row in runs.read_metrics(run_dir)]
        start = {
            "session": session,
            "from_epoch": from_epoch,
            "time": time.time(),
            "supersedes": [epoch for epoch in written if epoch > from_epoch],
            "placement_group": placement_group,
        }
        runs.append_line(run_dir, {"start": start})

    def write(self, totals: dict[str, Any], workers: list[dict[str, Any]], checkpoint: str | None):
        """Append the epoch's row: ``totals`` over all workers, each worker's own numbers, and
        the checkpoint this epoch writes (its path) or None. Returns the row."""
        row = {**totals, "checkpoint": checkpoint, "time": time.time(), "workers": workers}
        runs.append_line(self.run_dir, row)
        self._tensorboard(row)
        return row

    def _tensorboard(self, row: dict[str, Any]) -> None:
        # Imported here: only rank 0 needs it.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        epoch, now = row["epoch"], time.time()
        if self._writer is None:
            self._tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(
                str(self._tensorboard_dir / "events"),
                # Event file names carry only the second and the host: the nanoseconds keep two
                # writers of one run (a restarted worker group, a resumed run) apart and in the
                # order TensorBoard must read them.
                filename_suffix=f".{time.time_ns()}.{os.getpid()}.{secrets.token_hex(2)}",
            )
            # With this marker TensorBoard drops the values at this and later steps that earlier
            # files hold (epochs trained again), so it shows each epoch once, the last one
            # trained. SummaryWriter(purge_step=...) writes the same.
            self._writer.write_event(
                Event(wall_time=now, step=epoch, session_log=SessionLog(status=SessionLog.START))
            )
        scalars = {
            "train/loss": row["loss"],
            "perf/samples_per_s": row["samples_per_s"],
            "perf/epoch_time_s": row["epoch_time_s"],
        }
        if "accuracy" in row:
            scalars["train/accuracy"] = row["accuracy"]
        if "lr" in row:
            scalars["train/lr"] = row["lr"]
        if "val_loss" in row:
            scalars["val/loss"] = row["val_loss"]
        for key in ("accuracy", "auc", "f1", "rmse", "mae", "r2"):
            if f"val_{key}" in row:
                scalars[f"val/{key}"] = row[f"val_{key}"]
        for worker in row["workers"]:
            scalars[f"perf/samples_per_s/rank{worker['rank']}"] = worker["samples_per_s"]
            scalars[f"perf/epoch_time_s/rank{worker['rank']}"] = worker["epoch_time_s"]
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self._writer.write_event(Event(wall_time=now, step=epoch, summary=Summary(value=values)))
        # TensorBoard reads the files while training runs: each epoch is on disk when it ends.
        # (tensorboardX's SummaryWriter writes from a queue on a thread of its own, and its
        # flush() does not wait for that queue.)
        self._writer.flush()
        if not self.tensorboard.local:
            for events in self._tensorboard_dir.iterdir():  # this writer's one file
                (self.tensorboard / events.name).write_bytes(events.read_bytes())
