"""A sweep's directory: its file names, a new one claimed, an interrupted one found again.

SWEEP/sweep.yaml            the sweep file it started from
SWEEP/trial-<id>/           each trial: an ordinary raytrain run directory
SWEEP/tune/                 Ray Tune's state, for --resume
SWEEP/sweep.json, sweep.csv, best.yaml, sweep.png, sweep.html   at the end
"""

from __future__ import annotations

import os
import time
from typing import Any

from raytrain.errors import UserError
from raytrain.storage import Location

SWEEP_FILE, RESULTS_JSON, RESULTS_CSV, BEST_FILE = (
    "sweep.yaml",
    "sweep.json",
    "sweep.csv",
    "best.yaml",
)
TUNE_DIR = "tune"
TRIAL_PREFIX = "trial-"


def trial_name(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


def params_text(params: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def claim_sweep(storage: str, name: str | None) -> Location:
    """A fresh sweep directory; UserError if the name is taken."""
    name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    sweep_dir = Location.of(storage) / name
    if sweep_dir.exists() and sweep_dir.children():
        raise UserError(
            f"sweep {name!r} already exists in {storage!r}; pick another --name, or "
            f"--resume {name} to finish it"
        )
    sweep_dir.mkdir()
    return sweep_dir


def locate_sweep(resume: str, storage: str) -> Location:
    for place in (Location.of(storage) / resume, Location.of(resume)):
        if (place / SWEEP_FILE).is_file() and (place / TUNE_DIR).is_dir():
            return place
    raise UserError(
        f"--resume {resume!r}: no sweep of that name in {storage!r} and no sweep directory "
        f"(with {SWEEP_FILE} and {TUNE_DIR}/) at that path"
    )


def discard_if_unused(sweep_dir: Location) -> None:
    """Remove a sweep directory that holds nothing but the sweep file its command just wrote."""
    if {child.name for child in sweep_dir.children()} <= {SWEEP_FILE}:
        sweep_dir.delete_dir()
