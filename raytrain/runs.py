"""The run directory: every file name in it, and reading and writing them. One directory per run
under ``run.storage_path``; what each file holds is described in docs/run-directory.md.

```
RUN_DIR/
  config.json                       the config the run started with (what --resume uses)
  metrics.jsonl                     one line per epoch, and one per start of the worker group
  tensorboard/                      the same per-epoch scalars, for TensorBoard
  results.json                      written by the driver at the end
  report.png, report.html           the run at a glance
  checkpoint_epoch_NNNNNN/          Ray Train's checkpoint directories (raytrain.train.checkpoint)
  checkpoint_manager_snapshot.json  Ray Train's list of checkpoints: names the one to resume from
```

``metrics.jsonl`` is append-only. An epoch row has ``epoch``; a start line has ``start`` (a start
or restart of the worker group: ``session``, the driver's id; ``from_epoch``, the epochs the
checkpoint it starts from had done; ``supersedes``, the epochs already in the file that it trains
again; ``time``). A row of an epoch trained again supersedes the earlier one: readers show each
epoch once, the last one written.

This module imports nothing heavy: every worker loads it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytrain.config import Config
from raytrain.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"
TENSORBOARD_DIR = "tensorboard"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

# results.json "phases": seconds per phase of a driver session, in the order they happen.
PHASES = {
    "ray_start": "Ray start-up",  # starting or joining Ray
    "data_preparation": "data preparation",  # building the datasets on the driver
    "worker_startup": "worker start-up",  # until the slowest worker entered the training loop
    "model_definition": "model definition",  # the model and its optimizer
    "ddp_setup": "DDP set-up",
    "worker_data_copy": "data copy (workers)",  # each worker's copy of in-memory data
    "training": "training",  # first epoch's start to the last epoch's row
    "teardown": "teardown",  # until fit() returned
    "validation": "validation",  # of the final checkpoint, on the driver
}


class RunDirError(UserError):
    """A run directory that cannot be created, found, read or resumed."""


def storage_dir(storage_path: str) -> Path:
    """The absolute storage directory (workers chdir elsewhere, so relative paths would break)."""
    return Path(storage_path).expanduser().resolve()


def display(path: Path) -> str:
    """A path to show: relative to the working directory when under it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):  # elsewhere, or the working directory is gone (in a Ray Job)
        return str(path)


def checkpoint_name(epoch: int) -> str:
    """The directory name of the checkpoint written after ``epoch`` epochs."""
    return f"checkpoint_epoch_{epoch:06d}"


def fault_marker(run_dir: str | Path, rank: int, epoch: int) -> Path:
    """The file that records a fault injected into ``rank`` at ``epoch`` (RAYTRAIN_FAIL_AT)."""
    return Path(run_dir) / f".fault-injected-rank{rank}-epoch{epoch}"


# ---- creating, finding and resuming runs ---------------------------------------------------------


def claim(cfg: Config) -> Path:
    """Create a new run's directory; an existing run is never reused silently."""
    storage = storage_dir(cfg.run.storage_path)
    name = cfg.run.name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
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


def discard_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but the config its run just wrote."""
    if {p.name for p in run_dir.iterdir()} <= {CONFIG_FILE}:
        (run_dir / CONFIG_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


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
    write_atomically(run_dir / CONFIG_FILE, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run started with, as a dict."""
    data = read_json(run_dir / CONFIG_FILE)
    if data is None:
        raise RunDirError(f"run config {str(run_dir / CONFIG_FILE)!r} is missing")
    return data


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train will resume this run from (None if the run has none yet)."""
    snapshot = read_json(run_dir / RAY_SNAPSHOT_FILE)
    latest = (snapshot or {}).get("latest_checkpoint_result")
    if not latest:
        return None
    return run_dir / latest["checkpoint_dir_name"]


def resume_command(run_dir: Path, program: str = "python -m raytrain.main") -> str:
    """The command that continues this run."""
    args = ["--resume", run_dir.name, "--storage-path", str(run_dir.parent)]
    return f"{program} {shlex.join(args)}"


# ---- files written whole: config, results, report ------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file so that a reader sees the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write results.json."""
    path = run_dir / RESULTS_FILE
    write_atomically(path, (json.dumps(results, indent=2) + "\n").encode())
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file (None if there is no file); RunDirError if it is damaged."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{str(path)!r} does not hold a JSON object")
    return data


# ---- metrics.jsonl: appended by rank 0, read and followed by the driver --------------------------


def append_line(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one line to metrics.jsonl in a single write() to a file opened for appending, so
    that a worker killed mid-write never leaves half a line followed by another."""
    fd = os.open(Path(run_dir) / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl in order (a last line without its newline is still
    being written); RunDirError if one is not JSON."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]
    except ValueError:
        raise RunDirError(f"{str(path)!r} holds a line that is not a metrics row") from None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch rows of a run, one per epoch in epoch order, the last written winning."""
    by_epoch = {line["epoch"]: line for line in read_lines(run_dir) if "epoch" in line}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's segments, one per driver session (the first run and every --resume): the epoch
    it started from, the last epoch it wrote, its restarts of the worker group, and the seconds
    from its first start to its last row."""
    segments: list[dict[str, Any]] = []
    for line in read_lines(run_dir):
        if "start" in line:
            start = line["start"]
            if segments and segments[-1]["session"] == start["session"]:
                segments[-1]["restarts"] += 1
                continue
            segments.append(
                {
                    "session": start["session"],
                    "from_epoch": start["from_epoch"],
                    "to_epoch": start["from_epoch"],
                    "restarts": 0,
                    "started": start["time"],
                    "ended": start["time"],
                }
            )
        elif "epoch" in line and segments:
            segments[-1].update(to_epoch=line["epoch"], ended=line["time"])
    for segment in segments:
        segment["seconds"] = segment["ended"] - segment["started"]
    return segments


class Follower:
    """Calls ``on_line`` for every line added to metrics.jsonl from now on, from a thread."""

    def __init__(self, run_dir: str | Path, on_line: Callable[[dict[str, Any]], None]):
        self.path = Path(run_dir) / METRICS_FILE
        self.on_line = on_line
        self._stop = threading.Event()
        # A resumed run's earlier lines are history, not progress.
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
                self.on_line(json.loads(line))
