"""What a run leaves behind and shows: the metrics file, the console view, the results file.

``metrics.jsonl`` in the run directory gets one JSON object per epoch while training runs, written
by a Ray Train callback on the controller (which Ray places on the driver's node). Fields:

- ``epoch`` (1-based), ``loss``, ``accuracy``: over all workers' rows, weighted by rows;
- ``rows``, ``epoch_time_s`` (the slowest worker's), ``samples_per_s`` (rows / epoch_time_s);
- ``checkpoint``: the checkpoint's path when this epoch wrote one, else null;
- ``time``: Unix time the controller received the epoch;
- ``workers``: per worker ``rank``, ``node_id``, ``loss``, ``accuracy``, ``rows``,
  ``epoch_time_s``, ``samples_per_s``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ray.train import UserCallback

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


class MetricsLog(UserCallback):
    """Appends one line per epoch to ``metrics.jsonl`` as soon as all workers have reported."""

    def __init__(self, run_dir: str):
        self.path = str(Path(run_dir) / METRICS_FILE)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = metrics[0]
        row = {key: value for key, value in first.items() if key != "worker"}
        row["checkpoint"] = checkpoint.path if checkpoint is not None else None
        row["time"] = time.time()
        row["workers"] = [m["worker"] for m in metrics]
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, one per epoch (empty if it has none yet).

    An epoch trained again after a restart appears twice in the file; the later line wins.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
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


class Console:
    """The quiet console view: a header, one line per epoch, the validation result, a summary."""

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self._lock = threading.Lock()

    def line(self, text: str = "") -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def header(self, items: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in items)
        for key, value in items:
            self.line(f"{key:>{width}}  {value}")

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        saved = "  checkpoint" if row.get("checkpoint") else ""
        self.line(
            f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  loss {row['loss']:.4f}  "
            f"acc {row['accuracy']:6.1%}  {row['samples_per_s']:>9,.0f} samples/s  "
            f"{row['epoch_time_s']:.3f} s{saved}"
        )

    def validation(self, val: dict[str, Any]) -> None:
        self.line(
            f"validation  acc {val['accuracy']:.1%}  loss {val['loss']:.4f}  "
            f"({val['rows']} held-out rows, on the driver)"
        )


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write results.json (atomically: a reader never sees half a file)."""
    path = Path(run_dir) / RESULTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return path
