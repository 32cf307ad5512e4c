"""Failures and resumption: a worker killed with SIGKILL, an interrupted driver resumed with
--resume, checkpoints that are missing, truncated, tampered with or malicious, and a run that gives
up cleanly. Every training here is real; every kill is a real signal."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raytrain import cluster, config, runs
from raytrain.commands.train import main
from raytrain.errors import EXIT_USAGE
from raytrain.report.console import Console
from raytrain.train import checkpoint, driver
from raytrain.train.checkpoint import CheckpointError

from .conftest import ROOT

# AdamW with a warm-up and a cosine schedule: resuming must restore the schedule's state too.
SMALL = (
    "scaling.workers=2",
    "train.epochs=4",
    "train.checkpoint_every=1",
    "train.optimizer=adamw",
    "train.scheduler=cosine",
    "train.warmup_epochs=1",
)
# Large enough that an epoch takes a noticeable moment, so a signal lands mid-run.
SLOWER = ("--set", "data.samples=20000", "--set", "train.checkpoint_every=1", "--workers", "2")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "raytrain.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=environment,
    )


def wait_for_epochs(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(runs.read_metrics(run_dir)) >= count:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"{count} epochs not reached in {timeout} s")


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The run's latest checkpoint, once Ray Train has recorded one (rank 0 writes an epoch's row
    before its checkpoint, so a row alone does not say that the checkpoint is there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = runs.latest_checkpoint(run_dir)
        if latest is not None:
            return latest
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {timeout} s")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and every process it started (its embedded Ray), by process id: frozen
    first, so that none starts another in between."""
    pids = process_tree(proc.pid)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in set(pids + process_tree(proc.pid)):
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def uninterrupted(train):
    return train(*SMALL)


@pytest.mark.ray
def test_killed_worker_is_replaced_and_the_run_finishes_identically(train, uninterrupted):
    recovered = train(*SMALL, fail_at=(1, 3))
    marker = recovered.run_dir / ".fault-injected-rank1-epoch3"
    assert marker.exists(), "the fault was not injected"
    assert [row["epoch"] for row in recovered.metrics] == [1, 2, 3, 4]
    assert recovered.state["epoch"] == 4
    assert same_weights(recovered.state["model"], uninterrupted.state["model"])
    # The file says the worker group started twice in this session, the second time from the
    # checkpoint of epoch 2 (epoch 3 was killed before its row), and the console says so.
    starts = [line["start"] for line in runs.read_lines(recovered.run_dir) if "start" in line]
    assert [(s["from_epoch"], s["supersedes"]) for s in starts] == [(0, []), (2, [])]
    assert starts[0]["session"] == starts[1]["session"]
    assert "restart: the worker group restarted from the checkpoint of epoch 2" in (
        recovered.console
    )
    assert recovered.results["segments"][0]["restarts"] == 1


def starts_of(run_dir: Path) -> list[tuple[int, list[int]]]:
    """Each session's start line: the epoch it started from and the rows it superseded."""
    starts = [line["start"] for line in runs.read_lines(run_dir) if "start" in line]
    return [(s["from_epoch"], s["supersedes"]) for s in starts]


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_then_killed_driver_resumes_to_the_same_weights(train, tmp_path):
    """One run, stopped twice (the two scenarios share it: each session costs an embedded Ray):
    Ctrl-C after a checkpoint (exit 130, the command that continues); resumed, then the driver
    and its embedded Ray die with SIGKILL past a checkpoint; resumed again to the end. The file
    says which rows each session superseded, every reader shows each epoch once, and the
    weights are those of the same run never stopped."""
    run_dir = tmp_path / "r1"
    args = (*SLOWER, "--set", "train.checkpoint_every=2", "--epochs", "6")
    proc = start_cli(*args, "--storage-path", str(tmp_path), "--name", "r1")
    wait_for_epochs(run_dir, 2, proc)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    resume = f"python -m raytrain.main --resume r1 --storage-path {tmp_path}"
    assert resume in out, out
    first = [row["epoch"] for row in runs.read_metrics(run_dir)]
    stopped = checkpoint.load(runs.latest_checkpoint(run_dir))["epoch"]
    redone = [epoch for epoch in first if epoch > stopped]

    proc = start_cli("--resume", "r1", "--storage-path", str(tmp_path))
    deadline = time.monotonic() + 300
    # Until this session has written a row of its own (read_metrics leaves out the rows its
    # start line superseded).
    while len(starts_of(run_dir)) < 2 or len(runs.read_metrics(run_dir)) <= stopped:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    kill_tree(proc)
    second = [row["epoch"] for row in runs.read_metrics(run_dir)]
    assert runs.latest_checkpoint(run_dir).name in (
        runs.checkpoint_name(stopped),
        runs.checkpoint_name(stopped + 2),
    )
    done = checkpoint.load(runs.latest_checkpoint(run_dir))["epoch"]
    again = [epoch for epoch in second if epoch > done]
    assert again, "the kill came too late to leave epochs to train again"

    proc = start_cli("--resume", "r1", "--storage-path", str(tmp_path))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "(resumed)" in out and "epoch 6/6" in out
    assert starts_of(run_dir) == [(0, []), (stopped, redone), (done, again)]
    assert [row["epoch"] for row in runs.read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    shown = [line.split()[1] for line in out.splitlines() if line.startswith("epoch")]
    assert shown == [f"{e}/6" for e in range(done + 1, 7)]
    page = (run_dir / runs.REPORT_HTML).read_text()
    assert f"resumed from the checkpoint of epoch {done}" in page
    results = json.loads((run_dir / runs.RESULTS_FILE).read_text())
    assert [(s["from_epoch"], s["to_epoch"]) for s in results["segments"]] == [
        (0, first[-1]),
        (stopped, second[-1]),
        (done, 6),
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / runs.TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    resumed = checkpoint.load(results["latest_checkpoint"])
    assert resumed["epoch"] == 6
    reference = train("data.samples=20000", "train.checkpoint_every=2", "train.epochs=6")
    assert same_weights(resumed["model"], reference.state["model"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_keeps_its_epochs_row(ray_session, tmp_path):
    """Rank 0 writes the epoch's row before it hands Ray Train the checkpoint: when writing the
    checkpoint fails (here a file stands where its directory must go), the row is there."""
    import ray.train

    overrides = [
        "scaling.workers=2",
        "train.epochs=3",
        "train.checkpoint_every=2",
        "run.max_failures=0",
    ]
    cfg = config.load(overrides=overrides, flags={"run.storage_path": str(tmp_path)})
    run_dir = runs.claim(cfg)
    runs.save_config(run_dir, cfg)
    (run_dir.as_path() / runs.checkpoint_name(2)).write_text("in the way")
    plan = cluster.plan_embedded(cfg, 2)
    with pytest.raises(ray.train.TrainingFailedError):
        driver.run(cfg, plan, run_dir, Console(io.StringIO()), report=False)
    rows = runs.read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[1]["checkpoint"] == str(run_dir / runs.checkpoint_name(2))


@pytest.mark.ray
@pytest.mark.slow
def test_giving_up_names_the_worker_the_epoch_and_the_last_checkpoint(tmp_path):
    proc = start_cli(
        "--workers",
        "2",
        "--epochs",
        "3",
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "run.max_failures=0",
        "--storage-path",
        str(tmp_path),
        "--name",
        "g1",
        env={"RAYTRAIN_FAIL_AT": "1:2"},
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    (report,) = [line for line in out.splitlines() if "training failed" in line]
    assert "epoch 2" in report and "worker rank 1" in report
    latest = runs.latest_checkpoint(tmp_path / "g1")
    assert str(latest) in report and "--resume g1" in report


def test_bad_fault_injection_spec_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTRAIN_FAIL_AT", "rank1")
    assert main(["--storage-path", str(tmp_path)]) == EXIT_USAGE
    assert "RAYTRAIN_FAIL_AT='rank1'" in capsys.readouterr().err


# ---- bad checkpoints: each is refused with one line naming the path, exit code 2 ----------------


class Payload:
    """Unpickling this runs a shell command: a checkpoint must never execute it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"] = checkpoint._sha256(ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: len(data) // 2])


def _flip_a_byte(ckpt: Path) -> None:
    data = bytearray((ckpt / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "state.pt").write_bytes(bytes(data))


def _malicious(ckpt: Path) -> None:
    # A pickle that runs code, with its checksum updated as a careful attacker would.
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"model": Payload(ckpt.parent / "PWNED")}, f)
    _rehash(ckpt)


def _malicious_torch_file(ckpt: Path) -> None:
    torch.save({"model": Payload(ckpt.parent / "PWNED")}, ckpt / "state.pt")
    _rehash(ckpt)


def _other_format(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["format"] = checkpoint.FORMAT + 1  # what a later raytrain storing more would write
    (ckpt / "meta.json").write_text(json.dumps(meta))


CASES = {
    "another format": _other_format,
    "missing state": lambda c: (c / "state.pt").unlink(),
    "missing meta": lambda c: (c / "meta.json").unlink(),
    "missing directory": shutil.rmtree,
    "truncated": _truncate,
    "tampered": _flip_a_byte,
    "malicious pickle": _malicious,
    "malicious torch file": _malicious_torch_file,
}


@pytest.mark.ray
@pytest.mark.parametrize("damage", CASES.values(), ids=CASES.keys())
def test_bad_checkpoint_is_refused_with_the_path(damage, two_epoch_run, tmp_path, capsys):
    run_dir = tmp_path / two_epoch_run.run_dir.name
    shutil.copytree(two_epoch_run.run_dir, run_dir)
    latest = Path(runs.latest_checkpoint(run_dir))
    damage(latest)
    before = sorted(p.name for p in run_dir.rglob("*"))

    code = main(["--resume", run_dir.name, "--storage-path", str(tmp_path), "--epochs", "3"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith("raytrain: error: checkpoint") and err.count("\n") == 1, err
    assert str(latest) in err
    assert not (run_dir / "PWNED").exists(), "the checkpoint's payload was executed"
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written or removed


def test_malicious_checkpoint_is_refused_by_load(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"format": checkpoint.FORMAT}))
    _malicious_torch_file(ckpt)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load(ckpt)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.ray
def test_finished_run_needs_more_epochs_to_resume(two_epoch_run, capsys):
    code = main(["--resume", str(two_epoch_run.run_dir)])
    assert code == EXIT_USAGE
    assert "already trained 2 epochs" in capsys.readouterr().err
