"""What a run leaves behind and shows, without Ray: the metrics file and TensorBoard events written
by the real callback, the console view, the report command, the run list.

Run directories are built from files: MetricsLog.write is called with rows made by the worker's own
functions (epoch_totals, worker_row), as rank 0 does, and results.json is written by write_results,
as the driver does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from ray.train import Checkpoint
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event, SessionLog

from raytrain import report
from raytrain.config import Config
from raytrain.metrics import Follower, MetricsLog, read_metrics
from raytrain.report import Console, write_results
from raytrain.worker import epoch_totals, worker_row

from .conftest import run_module

NODE = "7e858184a603ad0f1e223df89491f4ba336f951ed0be3290d833356c"


def worker_stats(epoch: int, workers: int = 2) -> list[dict]:
    """Each worker's numbers for one epoch, as gather_epoch hands them to every rank."""
    loss, accuracy = 0.7 / epoch, min(0.5 + 0.1 * epoch, 0.99)
    rows = 400 // workers
    return [
        {
            "loss_sum": (loss + 0.01 * (rank - (workers - 1) / 2)) * rows,  # mean: loss
            "correct": accuracy * rows,
            "rows": rows,
            "epoch_time_s": 0.2 + 0.01 * rank + 0.001 * epoch,
            "compute_s": 0.15,
            "started_at": 1795749337.0 + epoch,
        }
        for rank in range(workers)
    ]


def write_epoch(log: MetricsLog, epoch: int, saved: Checkpoint | None = None) -> dict:
    """What rank 0 writes at the end of ``epoch``; returns the row."""
    stats = worker_stats(epoch)
    places = [{"rank": r, "node_id": NODE, "node_ip": "10.0.0.5"} for r in range(len(stats))]
    workers = [worker_row(s, p) for s, p in zip(stats, places, strict=True)]
    return log.write(epoch_totals(epoch, stats), workers, saved.path if saved else None)


def checkpoint_dir(run_dir: Path, epoch: int) -> Checkpoint:
    path = run_dir / f"checkpoint_2026-11-27_03-15-{epoch:02}.000000"
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"epoch": epoch}))
    return Checkpoint.from_directory(str(path))


def train_files(run_dir: Path, epochs: int, checkpoint_every: int = 2) -> MetricsLog:
    """metrics.jsonl, TensorBoard events, checkpoints and Ray Train's snapshot for ``epochs``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(str(run_dir))
    latest = None
    for epoch in range(1, epochs + 1):
        saved = checkpoint_dir(run_dir, epoch) if epoch % checkpoint_every == 0 else None
        write_epoch(log, epoch, saved)
        if saved is not None:
            latest = {"checkpoint_dir_name": Path(saved.path).name, "metrics": {"epoch": epoch}}
    snapshot = {"ray_version": "2.60.0", "latest_checkpoint_result": latest}
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return log


def config_dict(epochs: int) -> dict:
    cfg = Config().to_dict()
    cfg["train"]["epochs"] = epochs
    return cfg


def finished_run(run_dir: Path, epochs: int = 4, phases: bool = True) -> dict:
    """A finished run's files, results.json as the driver writes it."""
    train_files(run_dir, epochs)
    (run_dir / "config.json").write_text(json.dumps(config_dict(epochs)))
    rows = read_metrics(run_dir)
    results = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "checkpoint": rows[-1]["checkpoint"],
        "epochs": epochs,
        "train": {k: rows[-1][k] for k in ("loss", "accuracy", "rows", "samples_per_s")},
        "validation": {
            "rows": 200,
            "accuracy": 0.965,
            "loss": 0.3687,
            "precision": [0.9714285714285714, 0.9578947368421052],
            "recall": [0.9622641509433962, 0.9680851063829787],
            "confusion": [[102, 4], [3, 91]],
        },
        "workers": 2,
        "placement": [{"rank": r, "node_id": NODE, "node_ip": f"10.0.0.{5 + r}"} for r in range(2)],
        "cpus_per_worker": 1.0,
        "threads_per_worker": 1,
        "wall_time_s": {"train": 21.2, "total": 23.7},
        "config": config_dict(epochs),
    }
    if phases:
        results["phases"] = {
            "data_preparation": 1.93,
            "startup": 11.27,
            "training": 8.11,
            "validation": 0.42,
        }
    write_results(run_dir, results)
    return results


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory: Path) -> list[tuple[str, Event]]:
    """Every event in a TensorBoard directory, as (file name, event), checking each record's CRCs
    (the TFRecord format TensorBoard reads: length, its CRC, payload, its CRC)."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc(header)
            payload = data[pos + 12 : pos + 12 + length]
            assert len(payload) == length, f"{path.name}: truncated record"
            (crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert crc == masked_crc(payload)
            events.append((path.name, Event.FromString(payload)))
            pos += 16 + length
    return events


def scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}; a later event for the same step wins, as TensorBoard shows it."""
    found: dict[str, dict[int, float]] = {}
    for _, event in read_events(directory):
        for value in event.summary.value:
            found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


# --- metrics.jsonl and TensorBoard, written by the callback -------------------------------------


def test_epochs_are_visible_while_the_run_is_still_training(tmp_path):
    """Rank 0 (here a thread of its own) appends an epoch; the driver's Follower and
    read_metrics see it before the next epoch is even written."""
    seen: queue.Queue = queue.Queue()
    proceed = threading.Event()
    log = MetricsLog(str(tmp_path))
    failures = []

    def controller() -> None:
        try:
            for epoch in range(1, 4):
                write_epoch(log, epoch)
                if not proceed.wait(10):
                    failures.append(f"the driver never saw epoch {epoch}")
                    return
                proceed.clear()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(repr(e))

    with Follower(tmp_path, seen.put):
        thread = threading.Thread(target=controller)
        thread.start()
        for epoch in range(1, 4):
            row = seen.get(timeout=10)
            assert row["epoch"] == epoch
            assert [r["epoch"] for r in read_metrics(tmp_path)] == list(range(1, epoch + 1))
            assert [w["rank"] for w in row["workers"]] == [0, 1]
            assert row["workers"][1]["epoch_time_s"] == pytest.approx(0.21 + 0.001 * epoch)
            proceed.set()
        thread.join(10)
    assert not failures
    assert seen.empty()


def test_a_line_still_being_written_is_not_yet_a_row(tmp_path):
    train_files(tmp_path, epochs=2)
    whole = (tmp_path / "metrics.jsonl").read_text()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(whole.splitlines()[0][:40])  # the controller is half way through epoch 3
    assert [row["epoch"] for row in read_metrics(tmp_path)] == [1, 2]
    report.write_report(tmp_path)  # the report of a run in progress does not trip over it


def test_metrics_rows_keep_their_fields(tmp_path):
    train_files(tmp_path, epochs=2)
    rows = read_metrics(tmp_path)
    assert set(rows[0]) == {
        "epoch",
        "loss",
        "accuracy",
        "rows",
        "epoch_time_s",
        "samples_per_s",
        "checkpoint",
        "time",
        "workers",
    }
    assert rows[0]["checkpoint"] is None
    assert rows[1]["checkpoint"] == str(tmp_path / "checkpoint_2026-11-27_03-15-02.000000")
    assert set(rows[1]["workers"][0]) >= {"rank", "node_id", "loss", "epoch_time_s", "rows"}


def test_tensorboard_has_every_epochs_scalars_as_soon_as_it_ends(tmp_path):
    log = MetricsLog(str(tmp_path))
    for epoch in (1, 2, 3):
        row = write_epoch(log, epoch)
        # Read while the writer is still open: what TensorBoard sees during training.
        found = scalars(tmp_path / "tensorboard")
        expected = {
            "train/loss": row["loss"],
            "train/accuracy": row["accuracy"],
            "perf/samples_per_s": row["samples_per_s"],
            "perf/epoch_time_s": row["epoch_time_s"],
            "perf/samples_per_s/rank0": row["workers"][0]["samples_per_s"],
            "perf/samples_per_s/rank1": row["workers"][1]["samples_per_s"],
            "perf/epoch_time_s/rank1": row["workers"][1]["epoch_time_s"],
        }
        for tag, value in expected.items():
            assert sorted(found[tag]) == list(range(1, epoch + 1)), tag
            assert found[tag][epoch] == pytest.approx(value, rel=1e-6), tag
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_tensorboard_hides_epochs_trained_again(tmp_path):
    """A restart trains epochs again and a resumed run starts a new writer: each new file starts
    with a purge marker at its first epoch, so TensorBoard drops the older values from there."""
    log = train_files(tmp_path, epochs=4)
    write_epoch(log, 3)  # the worker group restarted at epoch 3
    resumed = MetricsLog(str(tmp_path))  # a resumed run, continuing after epoch 4
    write_epoch(resumed, 5)

    events = read_events(tmp_path / "tensorboard")
    files = sorted({name for name, _ in events})
    assert len(files) == 3
    starts = {
        name: event.step
        for name, event in events
        if event.HasField("session_log") and event.session_log.status == SessionLog.START
    }
    assert sorted(starts.values()) == [1, 3, 5]
    assert sorted(scalars(tmp_path / "tensorboard")["train/loss"]) == [1, 2, 3, 4, 5]


# --- the console --------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """Captured output that says it is a terminal, as a real TTY does."""

    def isatty(self) -> bool:
        return True


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_console_off_a_terminal_prints_the_plain_lines_only(tmp_path):
    out = io.StringIO()
    console = Console(out)
    row = {**epoch_totals(5, worker_stats(5)), "checkpoint": "/x/checkpoint_1"}
    with console.training(10):
        console.epoch(row, 10)
    console.validation({"accuracy": 0.965, "loss": 0.3687, "rows": 200})
    assert out.getvalue().splitlines() == [
        "epoch  5/10  loss 0.1400  acc  99.0%      1,860 samples/s  0.215 s  checkpoint",
        "validation  acc 96.5%  loss 0.3687  (200 held-out rows, on the driver)",
    ]


def test_console_on_a_terminal_shows_a_live_bar_above_which_epochs_stay(tmp_path):
    """A resumed run: the first epoch shown is 6 of 8."""
    out = Terminal()
    console = Console(out)
    console.header([("run", "r1 (resumed)")])
    with console.training(8):
        for epoch in (6, 7, 8):
            console.epoch(epoch_totals(epoch, worker_stats(epoch)), 8)
    console.validation({"accuracy": 0.965, "loss": 0.3687, "rows": 200})
    text = ANSI.sub("", out.getvalue())
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    # The epoch lines, each printed once and whole, in order (the bar is redrawn below them).
    epochs = [line for line in lines if re.match(r"epoch +\d+/8  loss", line)]
    assert [line.split()[1] for line in epochs] == ["6/8", "7/8", "8/8"]
    assert lines[0] == "run  r1 (resumed)"
    assert lines[-1].startswith("validation  acc 96.5%")
    # The bar: progress, loss, accuracy, samples/s and an ETA once there is a pace to go by.
    bar = [line for line in lines if "ETA" in line]
    assert any("epoch -/8" in line and "starting the workers" in line for line in bar)
    assert any("epoch 6/8" in line and "ETA -:--:--" in line for line in bar)
    assert any(
        re.search(r"epoch 7/8 .*loss 0\.1000 acc 99\.0% 1,843 samples/s ETA 0:00:0\d", line)
        for line in bar
    ), bar
    assert "epoch 8/8" in text


# --- the report ---------------------------------------------------------------------------------


def run_report(*args: str) -> subprocess.CompletedProcess:
    return run_module("raytrain.report", *args, timeout=120)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_command_writes_a_figure_and_a_page_with_the_numbers(tmp_path):
    run_dir = tmp_path / "r1"
    finished_run(run_dir)
    proc = run_report(str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"wrote {run_dir / 'report.png'}",
        f"wrote {run_dir / 'report.html'}",
    ]

    png = (run_dir / "report.png").read_bytes()
    assert png_size(png) == (1400, 900)
    assert 30_000 < len(png) < 400_000
    page = (run_dir / "report.html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == png
    assert "<script" not in page and "http" not in page  # self-contained
    cells = re.findall(r"<td>([^<]*)</td>", page)
    # final train loss/accuracy, validation accuracy/loss, per-class precision and recall
    for number in ("0.1750", "90.0%", "96.5%", "0.3687", "97.1%", "95.8%", "96.2%", "96.8%"):
        assert number in cells, number
    confusion = page.split("Confusion matrix")[1].split("</table>")[0]
    assert re.findall(r"<td>([^<]*)</td>", confusion) == ["0", "102", "4", "1", "3", "91"]
    phases = page.split("Where the time went")[1].split("</table>")[0]
    assert re.findall(r"<td>([^<]*)</td>", phases) == [
        "data preparation", "1.93", "9%",
        "start-up (model, workers)", "11.27", "52%",
        "training", "8.11", "37%",
        "validation", "0.42", "2%",
    ]  # fmt: skip
    assert "10.0.0.6" in cells and NODE in cells
    assert "4/4" in cells  # epochs done of the config's total


def test_report_of_an_older_run_and_of_one_still_training(tmp_path):
    older = tmp_path / "older"
    finished_run(older, phases=False)
    png_path, html_path = report.write_report(older)
    assert png_size(png_path.read_bytes()) == (1400, 900)
    page = html_path.read_text()
    assert "did not record its phases" in page
    assert "<td>21.20</td>" in page and "<td>2.50</td>" in page  # fit, then the rest

    training = tmp_path / "training"
    train_files(training, epochs=3)
    png_path, html_path = report.write_report(training)
    assert png_size(png_path.read_bytes()) == (1400, 900)
    page = html_path.read_text()
    assert "no results.json" in page
    assert "<td>3</td>" in page and "<td>0.2333</td>" in page  # the last epoch's row


def test_report_of_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    proc = run_report(str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("raytrain: error: ") and str(tmp_path) in line
    assert "metrics.jsonl" in line and "results.json" in line
    assert not (tmp_path / "report.png").exists()


def test_report_of_a_missing_or_damaged_run(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert (
        capsys.readouterr().err
        == f"raytrain: error: no run directory at {str(tmp_path / 'nope')!r}\n"
    )
    (tmp_path / "results.json").write_text("{half a fi")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrain: error: ") and "results.json" in err and err.count("\n") == 1


# --- the run list -------------------------------------------------------------------------------


def storage_with_runs(storage: Path) -> None:
    """Four runs, started an hour apart: finished, interrupted, incomplete, empty."""
    finished_run(storage / "done", epochs=4)
    train_files(storage / "stopped", epochs=3)  # a checkpoint after epoch 2, no results
    (storage / "stopped" / "config.json").write_text(json.dumps(config_dict(10)))
    train_files(storage / "crashed", epochs=1)  # no checkpoint yet
    (storage / "crashed" / "config.json").write_text(json.dumps(config_dict(10)))
    (storage / "blank").mkdir()
    (storage / "blank" / "config.json").write_text(json.dumps(config_dict(10)))
    for hours, name in enumerate(["done", "stopped", "crashed", "blank"]):
        started = 1_795_700_000 + 3600 * hours
        os.utime(storage / name / "config.json", (started, started))


def test_run_list_shows_each_runs_status_newest_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage_with_runs(tmp_path / "runs")
    assert report.main(["--list"]) == 0  # the default storage path, runs
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "name",
        "status",
        "epochs",
        "val",
        "acc",
        "started",
        "latest",
        "checkpoint",
    ]
    table = [line.split() for line in lines]
    assert [row[:4] for row in table] == [
        ["blank", "empty", "0/10", "-"],
        ["crashed", "incomplete", "1/10", "-"],
        ["stopped", "interrupted", "3/10", "-"],
        ["done", "finished", "4/4", "96.5%"],
    ]
    assert table[2][-1] == "runs/stopped/checkpoint_2026-11-27_03-15-02.000000"
    assert table[3][-1] == "runs/done/checkpoint_2026-11-27_03-15-04.000000"
    assert table[0][-1] == table[1][-1] == "-"


def test_run_list_on_a_terminal_is_a_table(tmp_path):
    storage_with_runs(tmp_path)
    out = Terminal()
    report.print_runs(tmp_path, out)
    text = ANSI.sub("", out.getvalue())
    assert f"runs in {tmp_path}" in text
    for name, status in (("done", "finished"), ("stopped", "interrupted"), ("blank", "empty")):
        assert re.search(rf"│ {name} +│ {status} +│", text), text


def test_run_list_of_a_missing_storage_path_is_one_clear_line(tmp_path, capsys):
    assert report.main(["--list", str(tmp_path / "nowhere")]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"raytrain: error: storage path {str(tmp_path / 'nowhere')!r} does not exist; "
        "pass the --storage-path the runs were started with\n"
    )
