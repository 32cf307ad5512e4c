"""A run directory read for showing: ``RunFiles`` (its metrics rows, sessions, results and
config, read once) for the report's page and figure and for the list of runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain import runs
from raytrain.errors import UserError, first_line
from raytrain.storage import Location


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds, read once."""

    run_dir: Location
    rows: list[dict[str, Any]]  # one per epoch (raytrain.runs.read_metrics)
    segments: list[dict[str, Any]]  # raytrain.runs.history
    results: dict[str, Any] | None
    config: dict[str, Any] | None


def read_run(run_dir: Location) -> RunFiles:
    """Whatever a run directory holds so far; damaged files are a RunDirError naming them."""
    results = runs.read_json(run_dir / runs.RESULTS_FILE)
    config = (results or {}).get("config") or runs.read_json(run_dir / runs.CONFIG_FILE)
    return RunFiles(run_dir, runs.read_metrics(run_dir), runs.history(run_dir), results, config)


def load_run(run_dir: str | Path | Location) -> RunFiles:
    """Read a run directory (a path or URI); a path that is not a run is a UserError."""
    run_dir = Location.of(run_dir)
    try:
        found = run_dir.is_dir()
    except OSError as e:
        raise UserError(f"cannot read {str(run_dir)!r}: {first_line(e)}") from None
    if not found:
        raise UserError(f"no run directory at {str(run_dir)!r}")
    if not any((run_dir / name).exists() for name in (runs.METRICS_FILE, runs.RESULTS_FILE)):
        raise UserError(
            f"{str(run_dir)!r} is not a raytrain run directory: it holds neither "
            f"{runs.METRICS_FILE} nor {runs.RESULTS_FILE}"
        )
    return read_run(run_dir)
