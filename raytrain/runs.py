"""The storage layout: one directory per run under ``run.storage_path``.

A run directory holds ``config.json`` (the config the run started with), ``metrics.jsonl``,
``results.json``, Ray Train's checkpoint directories and its ``checkpoint_manager_snapshot.json``,
which names the checkpoint Ray Train resumes from.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

from raytrain.config import Config
from raytrain.errors import UserError

CONFIG_FILE = "config.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


class RunDirError(UserError):
    """A run directory that cannot be created, found or resumed."""


def storage_dir(storage_path: str) -> Path:
    """The absolute storage directory (workers chdir elsewhere, so relative paths would break)."""
    return Path(storage_path).expanduser().resolve()


def new_run_name() -> str:
    """A fresh, sortable run name: run-YYYYmmdd-HHMMSS-xxxx."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def claim(cfg: Config) -> Path:
    """Create a new run's directory; an existing run is never reused silently."""
    storage = storage_dir(cfg.run.storage_path)
    name = cfg.run.name or new_run_name()
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"run.storage_path {str(storage)!r} cannot be created ({e.strerror}); "
            "choose a writable directory with --storage-path"
        ) from None
    if not storage.is_dir() or not os.access(storage, os.W_OK | os.X_OK):
        raise RunDirError(
            f"run.storage_path {str(storage)!r} is not a writable directory; "
            "choose a writable directory with --storage-path"
        )
    run_dir = storage / name
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise RunDirError(
            f"run {name!r} already exists in {str(storage)!r}; continue it with --resume {name}, "
            "or choose another --name (or leave it out for a fresh one)"
        ) from None
    return run_dir


def locate(resume: str, storage_path: str) -> Path:
    """The run directory to resume: a run name under the storage path, or a path to one."""
    candidates = [storage_dir(storage_path) / resume, Path(resume).expanduser().resolve()]
    for run_dir in candidates:
        if (run_dir / CONFIG_FILE).is_file():
            return run_dir
    raise RunDirError(
        f"--resume {resume!r}: no run of that name in {str(candidates[0].parent)!r} and no run "
        f"directory (with a {CONFIG_FILE}) at that path"
    )


def save_config(run_dir: Path, cfg: Config) -> None:
    """Record the config a run started with, so that --resume continues with the same one."""
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run started with, as a dict."""
    path = run_dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunDirError(f"run config {str(path)!r} is missing or not valid JSON") from None
    if not isinstance(data, dict):
        raise RunDirError(f"run config {str(path)!r} does not hold a config mapping")
    return data


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train will resume this run from (None if the run has none yet)."""
    path = run_dir / RAY_SNAPSHOT_FILE
    if not path.exists():
        return None
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError, AttributeError):
        raise RunDirError(f"Ray Train's checkpoint list {str(path)!r} is not readable") from None
    if not latest:
        return None
    return run_dir / latest["checkpoint_dir_name"]


def resume_command(run_dir: Path) -> str:
    """The command that continues this run."""
    return shlex.join(
        [
            "python",
            "-m",
            "raytrain.main",
            "--resume",
            run_dir.name,
            "--storage-path",
            str(run_dir.parent),
        ]
    )
