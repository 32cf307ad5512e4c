"""The list of runs under a storage path (``raytrain runs``): name, status, epochs, validation
accuracy, when it started, its latest checkpoint; newest first."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console as RichConsole
from rich.table import Table

from raytrain import runs
from raytrain.errors import UserError, first_line
from raytrain.report.rundir import read_run
from raytrain.storage import Location

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
    checkpoint: Location | None
    started: float


def summarize_run(run_dir: Location) -> RunSummary:
    """The run list's line for one run directory."""
    try:
        run = read_run(run_dir)
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


def _started(run_dir: Location, rows: list[dict[str, Any]]) -> float:
    """When the run started: config.json is written first, before any training."""
    config = run_dir / runs.CONFIG_FILE
    if config.exists():
        return config.mtime() or 0.0
    if rows and isinstance(rows[0].get("time"), (int, float)):
        return rows[0]["time"] - rows[0].get("epoch_time_s", 0.0)
    return run_dir.mtime() or 0.0


def list_runs(storage_path: str | Path) -> list[RunSummary]:
    """The runs under a storage path (a directory or URI), newest first."""
    storage = Location.of(storage_path)
    try:
        kind = "a directory" if storage.is_dir() else "a file" if storage.exists() else None
        children = storage.children() if kind == "a directory" else []
    except OSError as e:
        raise UserError(f"cannot read storage path {str(storage)!r}: {first_line(e)}") from None
    if kind != "a directory":
        raise UserError(
            f"storage path {str(storage)!r} "
            f"{'is not a directory' if kind else 'does not exist'}; "
            "pass the --storage-path the runs were started with"
        )
    found = [
        summarize_run(path) for path in children if path.is_dir() and not path.name.startswith(".")
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
            checkpoint = runs.display(run.checkpoint)
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


def print_runs(storage_path: str | Path, out: TextIO | None = None) -> None:
    """Print the run list: a rich table on a terminal, aligned plain text anywhere else."""
    out = out if out is not None else sys.stdout
    summaries = list_runs(storage_path)
    where = Location.of(storage_path)
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
