"""The run directory: every file name in it, and reading and writing them. One directory per run
under ``run.storage_path``, a local directory or an object-store URI (raytrain.storage); what
each file holds is described in docs/run-directory.md.

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

``metrics.jsonl`` is append-only (on an object store, which cannot append, rank 0 writes the whole
object again with each line: a PUT is atomic, so readers always see whole lines, and the one writer
reads before it writes, so no line is lost). An epoch row has ``epoch``; a start line has ``start``
(a start or restart of the worker group: ``session``, the driver's id; ``from_epoch``, the epochs
the checkpoint it starts from had done; ``supersedes``, the epochs already in the file that it
trains again; ``time``). A row of an epoch trained again supersedes the earlier one: readers show
each epoch once, the last one written.

This module imports nothing heavy: every worker loads it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raytrain.config import Config
from raytrain.errors import UserError, first_line, one_line
from raytrain.storage import ACCESS_HINT, Location, StorageError, check_bucket

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"
TENSORBOARD_DIR = "tensorboard"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
MLFLOW_FILE = "mlflow.json"  # a tracked run's MLflow run (raytrain.tracking)

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


RunPath = str | os.PathLike | Location


def display(path: RunPath) -> str:
    """A path to show: relative to the working directory when under it (shorter to read); a URI
    as it is."""
    if isinstance(path, Location):
        if not path.local:
            return str(path)
        path = path.as_path()
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):  # elsewhere, or the working directory is gone (in a Ray Job)
        return str(path)


def checkpoint_name(epoch: int) -> str:
    """The directory name of the checkpoint written after ``epoch`` epochs."""
    return f"checkpoint_epoch_{epoch:06d}"


def fault_marker(run_dir: RunPath, rank: int, epoch: int) -> Location:
    """The file that records a fault injected into ``rank`` at ``epoch`` (RAYTRAIN_FAIL_AT)."""
    return Location.of(run_dir) / f".fault-injected-rank{rank}-epoch{epoch}"


# ---- creating, finding and resuming runs ---------------------------------------------------------


def claim(cfg: Config) -> Location:
    """Create a new run's directory; an existing run is never reused silently."""
    storage = Location.of(cfg.run.storage_path)
    name = cfg.run.name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if storage.local:
        _check_local_storage(storage.as_path())
    else:
        check_object_storage(storage)
    run_dir = storage / name
    exists = RunDirError(
        f"run {name!r} already exists in {str(storage)!r}; continue it with --resume {name}, "
        "or choose another --name (or leave it out for a fresh one)"
    )
    if not storage.local:
        # An object store has no "create if absent": a run exists once any of its files does.
        if run_dir.exists():
            raise exists
        run_dir.mkdir()
        return run_dir
    try:
        run_dir.as_path().mkdir()
    except FileExistsError:
        raise exists from None
    return run_dir


def _check_local_storage(storage: Path) -> None:
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


def check_object_storage(storage: Location) -> None:
    """Fail in seconds, in one sentence, on a bucket that does not exist, credentials it refuses
    or an endpoint that does not answer, before anything starts."""
    what = f"run.storage_path {str(storage)!r}"
    try:
        check_bucket(storage, what)
        storage.mkdir()
    except StorageError as e:
        raise RunDirError(str(e)) from None
    except OSError as e:
        raise RunDirError(f"{what} cannot be used: {one_line(e)}; {ACCESS_HINT}") from None


def discard_if_unused(run_dir: Location) -> None:
    """Remove a run directory that holds nothing but the config its run just wrote."""
    if {child.name for child in run_dir.children()} <= {CONFIG_FILE}:
        config = run_dir / CONFIG_FILE
        if config.exists():
            config.delete_file()
        run_dir.delete_dir()


def locate(resume: str, storage_path: RunPath) -> Location:
    """The run directory to resume: a run name under the storage path, or a path to one."""
    storage = Location.of(storage_path)
    candidates = [storage / resume, Location.of(resume)]
    for run_dir in candidates:
        if (run_dir / CONFIG_FILE).is_file():
            return run_dir
    raise RunDirError(
        f"--resume {resume!r}: no run of that name in {str(storage)!r} and no run "
        f"directory (with a {CONFIG_FILE}) at that path"
    )


def save_config(run_dir: Location, cfg: Config) -> None:
    """Record the config a run started with, so that --resume continues with the same one."""
    (run_dir / CONFIG_FILE).write_bytes((json.dumps(cfg.to_dict(), indent=2) + "\n").encode())


def saved_config(run_dir: Location) -> dict[str, Any]:
    """The config a run started with, as a dict."""
    data = read_json(run_dir / CONFIG_FILE)
    if data is None:
        raise RunDirError(f"run config {str(run_dir / CONFIG_FILE)!r} is missing")
    return data


def latest_checkpoint(run_dir: RunPath) -> Location | None:
    """The checkpoint Ray Train will resume this run from (None if the run has none yet)."""
    run_dir = Location.of(run_dir)
    snapshot = read_json(run_dir / RAY_SNAPSHOT_FILE)
    latest = (snapshot or {}).get("latest_checkpoint_result")
    if not latest:
        return None
    return run_dir / latest["checkpoint_dir_name"]


def resume_command(
    run_dir: Location, program: str = "python -m raytrain.main", more: Sequence[str] = ()
) -> str:
    """The command that continues this run (``more``: further arguments)."""
    args = ["--resume", run_dir.name, "--storage-path", str(run_dir.parent), *more]
    return f"{program} {shlex.join(args)}"


# ---- files written whole: config, results, report ------------------------------------------------


def write_results(run_dir: Location, results: dict[str, Any]) -> Location:
    """Write results.json."""
    path = run_dir / RESULTS_FILE
    path.write_bytes((json.dumps(results, indent=2) + "\n").encode())
    return path


def read_json(path: RunPath) -> dict[str, Any] | None:
    """A JSON object from a file (None if there is no file); RunDirError if it is damaged."""
    path = Location.of(path)
    try:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{str(path)!r} does not hold a JSON object")
    return data


# ---- metrics.jsonl: appended by rank 0, read and followed by the driver --------------------------


def append_line(run_dir: RunPath, record: dict[str, Any]) -> None:
    """Append one line to metrics.jsonl (on an object store: the object written again whole, by
    the one writer there is, rank 0, so no line is ever lost and readers see whole lines)."""
    (Location.of(run_dir) / METRICS_FILE).append((json.dumps(record) + "\n").encode())


def read_lines(run_dir: RunPath) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl in order (a last line without its newline is still
    being written); RunDirError if one is not JSON."""
    path = Location.of(run_dir) / METRICS_FILE
    try:
        if not path.exists():
            return []
        text = path.read_text()
    except OSError as e:
        raise RunDirError(f"{str(path)!r} cannot be read ({first_line(e)})") from None
    try:
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
    except ValueError:
        raise RunDirError(f"{str(path)!r} holds a line that is not a metrics row") from None


def read_metrics(run_dir: RunPath) -> list[dict[str, Any]]:
    """The epoch rows of a run, one per epoch in epoch order, the last written winning."""
    by_epoch = {line["epoch"]: line for line in read_lines(run_dir) if "epoch" in line}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def history(run_dir: RunPath) -> list[dict[str, Any]]:
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
    """Calls ``on_line`` for every line added to metrics.jsonl from now on, from a thread: every
    0.1 s on a disk (a seek and a read), every second on an object store (a HEAD, and a GET when
    the object grew)."""

    def __init__(self, run_dir: RunPath, on_line: Callable[[dict[str, Any]], None]):
        self.path = Location.of(run_dir) / METRICS_FILE
        self.on_line = on_line
        self._interval = 0.1 if self.path.local else 1.0
        self._stop = threading.Event()
        # A resumed run's earlier lines are history, not progress.
        self._offset = self.path.size() if self.path.exists() else 0
        self._thread = threading.Thread(target=self._loop, name="raytrain-follow", daemon=True)

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # whatever arrived after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._poll()
            except OSError:
                continue  # an object store that did not answer this time: ask again

    def _poll(self) -> None:
        if not self.path.exists() or self.path.size() <= self._offset:
            return
        if self.path.local:
            with open(self.path.path, "rb") as f:
                f.seek(self._offset)
                new = f.read()
        else:
            new = self.path.read_bytes()[self._offset :]
        complete = new[: new.rfind(b"\n") + 1]  # a line still being written: read it next time
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                self.on_line(json.loads(line))
