"""The metrics record of a run: ``metrics.jsonl`` and TensorBoard events, written by rank 0 of
the worker group while training runs, followed by the driver.

``metrics.jsonl`` in the run directory gets one JSON object per epoch. Fields:

- ``epoch`` (1-based), ``loss``, ``accuracy``: over all workers' rows, weighted by rows;
- ``rows``, ``epoch_time_s`` (the slowest worker's), ``samples_per_s`` (rows / epoch_time_s);
- ``checkpoint``: the checkpoint's path when this epoch wrote one, else null;
- ``time``: Unix time rank 0 wrote the row;
- ``workers``: per worker ``rank``, ``node_id``, ``node_ip``, ``started_at``, ``compute_s``,
  ``loss``, ``accuracy``, ``rows``, ``epoch_time_s``, ``samples_per_s``; in the first epoch of a
  start (or restart) of the worker group also the times the worker entered the loop
  (``loop_start``), had its model (``model_built``), DDP (``model_ready``) and data
  (``data_ready``).

TensorBoard event files go to ``tensorboard/`` in the run directory
(``tensorboard --logdir RUN_DIR/tensorboard``), step = epoch: ``train/loss``, ``train/accuracy``,
``perf/samples_per_s``, ``perf/epoch_time_s`` and per worker ``perf/samples_per_s/rank{r}`` and
``perf/epoch_time_s/rank{r}``.

This module imports nothing heavy: every worker loads it.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends one line per epoch to ``metrics.jsonl`` and the epoch's scalars to TensorBoard.

    Rank 0 of the worker group writes it at the end of every epoch, once the workers' numbers
    are gathered (see worker.py); the driver follows the file (``Follower``). Epoch metrics do not
    go through ``ray.train.report``: a report is a barrier that waits for Ray Train's controller
    to poll, so raytrain reports only with checkpoints, and the controller can poll slowly.
    """

    def __init__(self, run_dir: str):
        self.path = str(Path(run_dir) / METRICS_FILE)
        self.tensorboard_dir = str(Path(run_dir) / TENSORBOARD_DIR)
        self._writer = None
        self._last_epoch = 0

    def write(
        self, totals: dict[str, Any], workers: list[dict[str, Any]], checkpoint: str | None
    ) -> dict[str, Any]:
        """Append the epoch's row: ``totals`` (with ``epoch``) over all workers, each worker's
        own numbers, and the checkpoint this epoch wrote (its path) or None."""
        row = {**totals, "checkpoint": checkpoint, "time": time.time(), "workers": workers}
        # One write() to a file opened for appending: a reader (or a worker killed mid-epoch)
        # never leaves half a row followed by another.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)
        self._tensorboard(row)
        return row

    def _tensorboard(self, row: dict[str, Any]) -> None:
        # Imported here: only rank 0 needs it.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        epoch, now = row["epoch"], time.time()
        if self._writer is not None and epoch <= self._last_epoch:
            self._writer.close()  # epochs trained again after a restart: a new file, below
            self._writer = None
        if self._writer is None:
            Path(self.tensorboard_dir).mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(
                str(Path(self.tensorboard_dir) / "events"),
                # Event file names carry only the second and the host: keep two writers of one
                # run (a restarted worker group, a resumed run) from truncating each other's file.
                filename_suffix=f".{os.getpid()}.{secrets.token_hex(3)}",
            )
            # With this marker TensorBoard drops the values at this and later steps that earlier
            # files hold (a resumed run, epochs trained again after a restart), so it shows the
            # epochs the final model went through. SummaryWriter(purge_step=...) writes the same.
            self._writer.write_event(
                Event(wall_time=now, step=epoch, session_log=SessionLog(status=SessionLog.START))
            )
        self._last_epoch = epoch
        scalars = {
            "train/loss": row["loss"],
            "train/accuracy": row["accuracy"],
            "perf/samples_per_s": row["samples_per_s"],
            "perf/epoch_time_s": row["epoch_time_s"],
        }
        for worker in row["workers"]:
            scalars[f"perf/samples_per_s/rank{worker['rank']}"] = worker["samples_per_s"]
            scalars[f"perf/epoch_time_s/rank{worker['rank']}"] = worker["epoch_time_s"]
        summary = Summary(
            value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        )
        self._writer.write_event(Event(wall_time=now, step=epoch, summary=summary))
        # TensorBoard reads the files while training runs: each epoch is on disk when it ends.
        # (tensorboardX's SummaryWriter writes from a queue on a thread of its own, and its
        # flush() does not wait for that queue, so an epoch could stay unwritten for minutes.)
        self._writer.flush()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, one per epoch (empty if it has none yet).

    An epoch trained again after a restart appears twice in the file; the later line wins. A
    last line without its newline is still being written, and not yet a row.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().split("\n")[:-1]:
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


class Follower:
    """Calls ``on_row`` for every line added to metrics.jsonl, from a background thread."""

    def __init__(self, run_dir: str | Path, on_row: Callable[[dict[str, Any]], None]):
        self.path = Path(run_dir) / METRICS_FILE
        self.on_row = on_row
        self._stop = threading.Event()
        # A resumed run's earlier epochs are history, not progress.
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._thread = threading.Thread(target=self._loop, name="raytrain-follow", daemon=True)

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # whatever arrived after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._poll()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break  # a line still being written: read it next time
                self._offset += len(line.encode())
                self.on_row(json.loads(line))
