"""The console view of a run: a header, one line per epoch, the validation result, a summary;
on a terminal also a live progress bar. Quiet by default: Ray's own output is not shown here."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

# Above this share of a step the network is the bottleneck; below a tenth it hardly matters.
NETWORK_BOUND = 0.5
NEGLIGIBLE = 0.1


class Console:
    """The quiet console view: a header, one line per epoch, the validation result, a summary.

    On a terminal, ``training(epochs)`` also shows a live progress bar (epoch, loss, accuracy,
    samples/s, ETA) below the lines; anywhere else (pipes, logs, CI) it prints the plain lines
    only, which is what scripts and tests parse.
    """

    def __init__(self, out: TextIO | None = None):
        # sys.stdout as it is now, not as it was when this module was imported.
        self.out = out if out is not None else sys.stdout
        # The Follower's thread prints epochs while the main thread prints the rest.
        self._lock = threading.RLock()
        isatty = getattr(out, "isatty", None)
        self._rich = None
        if isatty is not None and isatty():
            self._rich = RichConsole(file=out, highlight=False)
        self._progress = None
        self._task = None
        self._arrivals: list[tuple[float, int]] = []
        self._epochs = 0  # of the run being followed
        self._session = ""  # the driver session being followed
        self._shown = 0  # the last epoch shown
        self._started = False  # whether the worker group of this session has started yet
        self._judged = False  # whether the network's verdict has been said

    def line(self, text: str = "") -> None:
        with self._lock:
            if self._rich is None:
                print(text, file=self.out, flush=True)
            else:
                # Through rich, so that the line lands above the live bar, not through it.
                self._rich.print(text, markup=False, soft_wrap=True)

    def header(self, items: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in items)
        for key, value in items:
            self.line(f"{key:>{width}}  {value}")

    def show(self, line: dict[str, Any]) -> None:
        """A line of metrics.jsonl (raytrain.runs): an epoch row, or a start of the worker
        group. Each epoch is shown once: epochs trained again after a restart are announced,
        not repeated."""
        if "start" in line:
            start = line["start"]
            if start["session"] != self._session:
                return  # another driver's: a resumed run's history
            if self._started:
                done = start["from_epoch"]
                where = f"the checkpoint of epoch {done}" if done else "the start"
                again = (
                    f"; epoch {self._shown} is trained again"
                    if done + 1 == self._shown
                    else f"; epochs {done + 1}-{self._shown} are trained again"
                )
                self.line(
                    f"restart: the worker group restarted from {where}"
                    + (again if done < self._shown else "")
                )
            self._started = True
            return
        if line["epoch"] > self._shown:
            self._shown = line["epoch"]
            self.epoch(line, self._epochs)
            self.network(line)

    def network(self, row: dict[str, Any]) -> None:
        """Once, after the first epoch of workers on more than one node: compute- or
        network-bound, from what the all-reduce cost its steps (the row's ``communication``)."""
        nodes = len({w.get("node_id") for w in row.get("workers", ())})
        comm = row.get("communication")
        if self._judged or nodes < 2 or not comm or comm.get("share") is None:
            return
        self._judged = True
        self.line(f"{'network':>7}  {network_verdict(row['communication'], nodes)}")

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        saved = "  checkpoint" if row.get("checkpoint") else ""
        # Validation's columns, or as many blanks in an epoch that was not validated.
        val = " " * len(f"  val_loss {0:.4f}  val_acc {0:6.1%}")
        if "val_rmse" in row:  # regression: the error in the target's units, and R^2
            val = f"  val_loss {row['val_loss']:.4f}  val_rmse {row['val_rmse']:.4g}"
            val += f"  val_r2 {row['val_r2']:.3f}"
        elif "val_loss" in row:
            val = f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:6.1%}"
        acc = f"  acc {row['accuracy']:6.1%}" if "accuracy" in row else ""
        with self._lock:
            if self._progress is not None:
                self._advance(row, epochs)  # first, so the bar redrawn below the line is current
            self.line(
                f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  loss {row['loss']:.4f}"
                f"{acc}{val}  {row['samples_per_s']:>9,.0f} samples/s  "
                f"{row['epoch_time_s']:.3f} s{saved}"
            )

    def validation(self, val: dict[str, Any], best: dict[str, Any] | None = None) -> None:
        which = ""
        if best is not None and best.get("epoch") is not None:
            which = f"; the checkpoint of epoch {best['epoch']}, best by {best['metric']}"
        if "rmse" in val:
            what = f"rmse {val['rmse']:.4g}  mae {val['mae']:.4g}  r2 {val['r2']:.3f}"
        else:
            what = f"acc {val['accuracy']:.1%}  loss {val['loss']:.4f}"
            if val.get("auc") is not None:
                what += f"  auc {val['auc']:.3f}"
        self.line(f"validation  {what}  ({val['rows']:,} held-out rows, on {_workers(val)}{which})")

    def start(self, epochs: int) -> None:
        """Show the live progress bar (on a terminal; elsewhere this does nothing)."""
        with self._lock:
            if self._rich is not None and self._progress is None:
                self._start(epochs)

    def _start(self, epochs: int) -> None:
        self._arrivals = []
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True)),
            _EtaColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(),
            console=self._rich,
            refresh_per_second=4,
            transient=True,  # the epoch lines above already say everything the bar said
        )
        self._task = self._progress.add_task(
            f"epoch -/{epochs}", total=epochs, stats="starting the workers", finish_at=None
        )
        self._progress.start()

    def close(self) -> None:
        """Remove the live progress bar, if there is one."""
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    @contextmanager
    def training(self, epochs: int, session: str = "") -> Iterator[Console]:
        """Follow a run of ``epochs`` epochs driven by ``session``: ``start(epochs)`` on entry,
        ``close()`` on exit, also on an error or Ctrl-C."""
        self._epochs, self._session, self._shown, self._started = epochs, session, 0, False
        self.start(epochs)
        try:
            yield self
        finally:
            self.close()

    def _advance(self, row: dict[str, Any], epochs: int) -> None:
        now, epoch = time.monotonic(), row["epoch"]
        if self._arrivals and epoch <= self._arrivals[-1][1]:
            self._arrivals = []  # epochs trained again after a restart: a new pace
        self._arrivals.append((now, epoch))
        finish_at = None
        (t0, e0), (t1, e1) = self._arrivals[0], self._arrivals[-1]
        # The pace between epochs as the driver sees them (epoch_time_s leaves out checkpoints
        # and gathering the metrics, so alone it would promise too much); not from the first
        # epoch's arrival alone, which also paid the start-up.
        if e1 > e0:
            finish_at = now + (epochs - epoch) * (t1 - t0) / (e1 - e0)
        self._progress.update(
            self._task,
            completed=epoch,
            total=epochs,
            description=f"epoch {epoch}/{epochs}",
            stats=(
                f"loss {row['loss']:.4f} "
                + (f"acc {row['accuracy']:.1%} " if "accuracy" in row else "")
                + f"{row['samples_per_s']:,.0f} samples/s"
            ),
            finish_at=finish_at,
            refresh=True,
        )


class _EtaColumn(ProgressColumn):
    """'ETA 0:00:12', counting down between epochs from the pace of the epochs so far."""

    def render(self, task) -> Text:
        finish_at = task.fields.get("finish_at")
        if task.finished:
            left = 0
        elif finish_at is None:
            return Text("ETA -:--:--", style="progress.remaining")
        else:
            left = max(0, round(finish_at - time.monotonic()))
        minutes, seconds = divmod(left, 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"ETA {hours}:{minutes:02}:{seconds:02}", style="progress.remaining")


def _workers(validation: dict[str, Any]) -> str:
    count = len((validation.get("validated_by") or {}).get("workers") or ())
    return f"{count} worker{'s' if count != 1 else ''}"


def network_verdict(comm: dict[str, Any], nodes: int) -> str:
    """One line: compute- or network-bound, and by how much, for a run across ``nodes``."""
    share, moved = comm["share"], comm["ring_mb_per_step"]
    waited = f"all-reduce {comm['allreduce_ms']:.1f} ms of a {comm['step_ms']:.1f} ms step"
    sent = f"{moved:.1f} MB sent per worker and step"
    if share >= NETWORK_BOUND:
        compute = comm["step_ms"] - comm["allreduce_ms"]
        gain = (
            f"steps would run {comm['step_ms'] / compute:.1f}x faster without it"
            if compute > 0.05 * comm["step_ms"]
            else "the step is almost all all-reduce"
        )
        return (
            f"network-bound across {nodes} nodes: {waited} ({share:.0%}, {sent}); {gain}: try "
            "train.gradient_compression=powersgd or fp16, a larger batch per worker, or fewer "
            "nodes"
        )
    if share >= NEGLIGIBLE:
        return f"partly network-bound across {nodes} nodes: {waited} ({share:.0%}, {sent})"
    return f"compute-bound across {nodes} nodes: {waited} ({share:.0%}, {sent})"
