"""What a run shows: the console view, the results file, the report, the list of runs.

    python -m raytrain.report runs/run-20261127-031516-c654   # report.png + report.html in it
    python -m raytrain.report --list runs                     # the runs under a storage path

What goes in ``metrics.jsonl`` and the TensorBoard events: see raytrain.metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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
from rich.table import Column, Table
from rich.text import Text

from raytrain import plots, runs
from raytrain.config import Config
from raytrain.errors import UserError
from raytrain.metrics import METRICS_FILE, read_metrics

RESULTS_FILE = "results.json"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"


class Console:
    """The quiet console view: a header, one line per epoch, the validation result, a summary.

    On a terminal, ``training(epochs)`` also shows a live progress bar (epoch, loss, accuracy,
    samples/s, ETA) below the lines; anywhere else (pipes, logs, CI) it prints the plain lines
    only, which is what scripts and tests parse.
    """

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        # The Follower's thread prints epochs while the main thread prints the rest.
        self._lock = threading.RLock()
        isatty = getattr(out, "isatty", None)
        self._rich = None
        if isatty is not None and isatty():
            self._rich = RichConsole(file=out, highlight=False)
        self._progress = None
        self._task = None
        self._arrivals: list[tuple[float, int]] = []

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

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        saved = "  checkpoint" if row.get("checkpoint") else ""
        with self._lock:
            if self._progress is not None:
                self._advance(row, epochs)  # first, so the bar redrawn below the line is current
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
    def training(self, epochs: int) -> Iterator[Console]:
        """``start(epochs)`` on entry, ``close()`` on exit, also on an error or Ctrl-C."""
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
                f"loss {row['loss']:.4f} acc {row['accuracy']:.1%} "
                f"{row['samples_per_s']:,.0f} samples/s"
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


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write results.json (atomically: a reader never sees half a file)."""
    path = Path(run_dir) / RESULTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds, read once: per-epoch rows, results.json, the config."""

    run_dir: Path
    rows: list[dict[str, Any]]
    results: dict[str, Any] | None
    config: dict[str, Any] | None


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory; a path that is not a run (or holds damaged files) is a UserError."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {str(run_dir)!r}")
    if not (run_dir / METRICS_FILE).exists() and not (run_dir / RESULTS_FILE).exists():
        raise UserError(
            f"{str(run_dir)!r} is not a raytrain run directory: it holds neither {METRICS_FILE} "
            f"nor {RESULTS_FILE}"
        )
    return _read_run(run_dir)


def _read_run(run_dir: Path) -> RunFiles:
    """Whatever a run directory holds so far; damaged files are a UserError naming them."""
    try:
        rows = read_metrics(run_dir)
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{str(run_dir / METRICS_FILE)!r} holds a line that is not a metrics row"
        ) from None
    results = _read_json(run_dir / RESULTS_FILE)
    config = results.get("config") if results else None
    if config is None and (run_dir / runs.CONFIG_FILE).exists():
        config = runs.saved_config(run_dir)
    return RunFiles(run_dir, rows, results, config)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} does not hold a JSON object")
    return data


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.png (loss, accuracy, phase times, throughput per worker) and a self-contained
    report.html (the PNG plus the numbers) into a run directory; returns their paths.

    Works on a finished run and on one still training or stopped (from metrics.jsonl alone).
    """
    run = load_run(run_dir)
    png = plots.render_png(run.run_dir.name, run.rows, run.results, run.config)
    html = plots.render_html(run.run_dir, run.rows, run.results, run.config, png)
    paths = run.run_dir / REPORT_PNG, run.run_dir / REPORT_HTML
    try:
        _write_atomically(paths[0], png)
        _write_atomically(paths[1], html.encode())
    except OSError as e:
        raise UserError(
            f"cannot write the report into {str(run.run_dir)!r} ({e.strerror})"
        ) from None
    return paths


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


FINISHED, INTERRUPTED, INCOMPLETE, EMPTY, UNREADABLE = (
    "finished",
    "interrupted",
    "incomplete",
    "empty",
    "unreadable",
)


@dataclass(frozen=True)
class RunSummary:
    """One line of the run list.

    ``status``: ``finished`` (results.json written); ``interrupted`` (a checkpoint to resume from
    but no results: stopped, failed, or still training); ``incomplete`` (epochs in metrics.jsonl
    but no checkpoint and no results: it cannot be resumed); ``empty`` (nothing trained);
    ``unreadable`` (damaged files).
    """

    name: str
    status: str
    epochs_done: int
    epochs_total: int | None
    val_accuracy: float | None
    checkpoint: Path | None
    started: float


def summarize_run(run_dir: Path) -> RunSummary:
    """The run list's line for one run directory."""
    try:
        run = _read_run(run_dir)
        checkpoint = runs.latest_checkpoint(run_dir)
    except UserError:
        return RunSummary(run_dir.name, UNREADABLE, 0, None, None, None, _started(run_dir, []))
    if run.results is not None:
        status = FINISHED
    elif checkpoint is not None:
        status = INTERRUPTED
    elif run.rows:
        status = INCOMPLETE
    else:
        status = EMPTY
    validation = (run.results or {}).get("validation") or {}
    total = ((run.config or {}).get("train") or {}).get("epochs")
    done = max((row["epoch"] for row in run.rows), default=(run.results or {}).get("epochs", 0))
    return RunSummary(
        name=run_dir.name,
        status=status,
        epochs_done=done,
        epochs_total=total if isinstance(total, int) else None,
        val_accuracy=validation.get("accuracy"),
        checkpoint=checkpoint,
        started=_started(run_dir, run.rows),
    )


def _started(run_dir: Path, rows: list[dict[str, Any]]) -> float:
    """When the run started: config.json is written first, before any training."""
    config = run_dir / runs.CONFIG_FILE
    if config.exists():
        return config.stat().st_mtime
    if rows and isinstance(rows[0].get("time"), (int, float)):
        return rows[0]["time"] - rows[0].get("epoch_time_s", 0.0)
    return run_dir.stat().st_mtime


def list_runs(storage_path: str | Path) -> list[RunSummary]:
    """The runs under a storage path, newest first."""
    storage = runs.storage_dir(str(storage_path))
    if not storage.is_dir():
        raise UserError(
            f"storage path {str(storage)!r} "
            f"{'is not a directory' if storage.exists() else 'does not exist'}; "
            "pass the --storage-path the runs were started with"
        )
    found = [
        summarize_run(path)
        for path in storage.iterdir()
        if path.is_dir() and not path.name.startswith(".")
    ]
    return sorted(found, key=lambda run: (run.started, run.name), reverse=True)


def runs_table(summaries: list[RunSummary]) -> list[list[str]]:
    """The run list as rows of text, header first."""
    table = [["name", "status", "epochs", "val acc", "started", "latest checkpoint"]]
    for run in summaries:
        epochs = str(run.epochs_done)
        if run.epochs_total:
            epochs += f"/{run.epochs_total}"
        checkpoint = "-"
        if run.checkpoint is not None:
            checkpoint = _display_path(run.checkpoint)
            if not run.checkpoint.exists():
                checkpoint += " (missing)"
        table.append(
            [
                run.name,
                run.status,
                epochs,
                "-" if run.val_accuracy is None else f"{run.val_accuracy:.1%}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started)),
                checkpoint,
            ]
        )
    return table


def _display_path(path: Path) -> str:
    """Relative to the working directory when under it (shorter to read and to copy)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_runs(storage_path: str | Path, out: TextIO | None = None) -> None:
    """Print the run list: a rich table on a terminal, aligned plain text anywhere else."""
    out = out or sys.stdout
    summaries = list_runs(storage_path)
    where = runs.storage_dir(str(storage_path))
    if not summaries:
        print(f"no runs in {where}", file=out)
        return
    header, *rows = runs_table(summaries)
    if getattr(out, "isatty", lambda: False)():
        table = Table(title=f"runs in {where}", title_justify="left")
        for name in header:
            justify = "right" if name in ("epochs", "val acc") else "left"
            table.add_column(name, justify=justify, overflow="fold")
        styles = {FINISHED: "green", INTERRUPTED: "yellow", INCOMPLETE: "red", UNREADABLE: "red"}
        for row in rows:
            table.add_row(*row, style=styles.get(row[1]))
        RichConsole(file=out).print(table)
        return
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {2, 3}
    for row in (header, *rows):
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raytrain.report",
        description="Write report.png and report.html into a run directory, or list the runs "
        "under a storage path.",
    )
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="A run's directory.")
    parser.add_argument(
        "--list",
        nargs="?",
        const=Config().run.storage_path,
        metavar="STORAGE_PATH",
        help="List the runs under STORAGE_PATH (default: %(const)s), newest first.",
    )
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.list is None):
        parser.error("give either RUN_DIR or --list [STORAGE_PATH]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The report command; returns the exit code (0 done, 2 not a run or no such storage)."""
    args = parse_args(argv)
    try:
        if args.list is not None:
            print_runs(args.list)
        else:
            for path in write_report(args.run_dir):
                print(f"wrote {path}")
    except UserError as e:
        print(f"raytrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
