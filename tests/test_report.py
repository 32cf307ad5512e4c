"""What a run leaves behind and shows, without starting Ray: the metrics file and TensorBoard
events written by rank 0's writer, the console view, the report, the run list.

Run directories are built from files: MetricsLog is called with rows made by the worker's own
functions (epoch_totals, worker_row), as rank 0 does; results.json holds phases computed by the
driver's own function and is written by runs.write_results, as the driver does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import struct
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raytrain import cluster, runs
from raytrain.config import Config
from raytrain.report.console import Console
from raytrain.report.listing import print_runs
from raytrain.report.page import write_report
from raytrain.train.metrics import MetricsLog, epoch_totals, worker_row
from raytrain.train.outcome import phases

from .conftest import one_error_line, run_module

NODE = "7e858184a603ad0f1e223df89491f4ba336f951ed0be3290d833356c"
T0 = time.time() - 100  # when the fixture's first worker group started


def worker_stats(epoch: int, workers: int = 2, validated: bool = False) -> list[dict]:
    """Each worker's numbers for one epoch, as gather_epoch hands them to every rank."""
    loss, accuracy = 0.7 / epoch, min(0.5 + 0.1 * epoch, 0.99)
    rows = 400 // workers
    val = (
        {
            "val_loss_sum": 0.8 / epoch * 50,
            "val_correct": 40.0,
            "val_rows": 50.0,
            "val_time_s": 0.01,
        }
        if validated
        else {}
    )
    return [
        {
            **val,
            "loss_sum": (loss + 0.01 * (rank - (workers - 1) / 2)) * rows,  # mean: loss
            "correct": accuracy * rows,
            "rows": rows,
            "epoch_time_s": 0.2 + 0.01 * rank + 0.001 * epoch,
            "compute_s": 0.15,
            "started_at": T0 + 10 + epoch,
        }
        for rank in range(workers)
    ]


def start_facts(workers: int = 2) -> list[dict]:
    """Where each worker runs and when its start-up steps ended, as the loop gathers them."""
    return [
        {
            "rank": r,
            "node_id": NODE,
            "node_ip": f"10.0.0.{5 + r}",
            "loop_start": T0 + 4,
            "model_built": T0 + 6,
            "model_ready": T0 + 6.5,
            "data_ready": T0 + 7,
        }
        for r in range(workers)
    ]


def write_epoch(log: MetricsLog, epoch: int, first: bool = False, save: bool = False) -> dict:
    """What rank 0 writes at the end of ``epoch``; returns the row."""
    stats = worker_stats(epoch)
    facts = start_facts()
    if not first:
        facts = [{k: f[k] for k in ("rank", "node_id", "node_ip")} for f in facts]
    workers = [worker_row(s, f) for s, f in zip(stats, facts, strict=True)]
    saved = str(log.run_dir / runs.checkpoint_name(epoch)) if save else None
    if save:
        (log.run_dir.as_path() / runs.checkpoint_name(epoch)).mkdir(exist_ok=True)
    return log.write(epoch_totals(epoch, stats), workers, saved)


def train_files(run_dir: Path, epochs: range, session: str = "s1", every: int = 2) -> MetricsLog:
    """What one start of the worker group leaves: its start line, rows, TensorBoard events,
    checkpoints every ``every`` epochs, and Ray Train's snapshot naming the latest one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, session, epochs.start - 1)
    for epoch in epochs:
        write_epoch(log, epoch, first=epoch == epochs.start, save=epoch % every == 0)
    saved = [e for e in epochs if e % every == 0]
    latest = {"checkpoint_dir_name": runs.checkpoint_name(saved[-1])} if saved else None
    snapshot = {"ray_version": "2.60.0", "latest_checkpoint_result": latest}
    (run_dir / runs.RAY_SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return log


def config_dict(epochs: int) -> dict:
    cfg = Config().to_dict()
    cfg["train"]["epochs"] = epochs
    return cfg


def finish(run_dir: Path, epochs: int) -> dict:
    """results.json as the driver writes it at the end of a session."""
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps(config_dict(epochs)))
    rows = runs.read_metrics(run_dir)
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
        "phases": phases(
            rows,
            ray_start=3.1,
            data_preparation=1.9,
            fit_window=(T0, rows[-1]["time"] + 1.5),
            validation=0.4,
        ),
        "segments": runs.history(run_dir),
        "config": config_dict(epochs),
    }
    runs.write_results(run_dir, results)
    return results


def finished_run(run_dir: Path, epochs: int = 4) -> dict:
    train_files(run_dir, range(1, epochs + 1))
    return finish(run_dir, epochs)


def scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, as TensorBoard itself reads the event files (purges included)."""
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# --- metrics.jsonl and TensorBoard ------------------------------------------------------------


def test_epochs_are_visible_while_the_run_is_still_training(tmp_path):
    """Rank 0 (here a thread of its own) appends an epoch; the driver's Follower and
    read_metrics see it before the next epoch is even written."""
    seen: queue.Queue = queue.Queue()
    proceed = threading.Event()
    failures = []

    def rank0() -> None:
        try:
            log = MetricsLog(tmp_path, "s1", 0)
            for epoch in range(1, 4):
                write_epoch(log, epoch, first=epoch == 1)
                if not proceed.wait(10):
                    failures.append(f"the driver never saw epoch {epoch}")
                    return
                proceed.clear()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(repr(e))

    with runs.Follower(tmp_path, seen.put):
        thread = threading.Thread(target=rank0)
        thread.start()
        assert seen.get(timeout=10)["start"]["from_epoch"] == 0
        for epoch in range(1, 4):
            row = seen.get(timeout=10)
            assert row["epoch"] == epoch
            assert [r["epoch"] for r in runs.read_metrics(tmp_path)] == list(range(1, epoch + 1))
            assert [w["rank"] for w in row["workers"]] == [0, 1]
            assert row["workers"][1]["epoch_time_s"] == pytest.approx(0.21 + 0.001 * epoch)
            proceed.set()
        thread.join(10)
    assert not failures
    assert seen.empty()


def test_a_line_still_being_written_is_not_yet_a_row(tmp_path):
    train_files(tmp_path, range(1, 3))
    whole = (tmp_path / runs.METRICS_FILE).read_text()
    with open(tmp_path / runs.METRICS_FILE, "a") as f:
        f.write(whole.splitlines()[1][:40])  # rank 0 is half way through writing epoch 3
    assert [row["epoch"] for row in runs.read_metrics(tmp_path)] == [1, 2]
    _, html = write_report(tmp_path)  # the report of a run in progress does not trip over it
    epochs = html.read_text().split("<h2>Epochs</h2>")[1]
    assert re.findall(r"<tr><td>(\d+)</td>", epochs) == ["1", "2"]


def test_metrics_rows_keep_their_fields(tmp_path):
    train_files(tmp_path, range(1, 3))
    rows = runs.read_metrics(tmp_path)
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
    assert rows[1]["checkpoint"] == str(tmp_path / "checkpoint_epoch_000002")
    assert set(rows[0]["workers"][0]) >= {"rank", "node_id", "loop_start", "data_ready"}
    assert set(rows[1]["workers"][0]) >= {"rank", "node_id", "loss", "epoch_time_s", "rows"}


def test_tensorboard_has_every_epochs_scalars_as_soon_as_it_ends(tmp_path):
    log = MetricsLog(tmp_path, "s1", 0)
    for epoch in (1, 2, 3):
        row = write_epoch(log, epoch)
        # Read while the writer is still open: what TensorBoard sees during training.
        found = scalars(tmp_path / runs.TENSORBOARD_DIR)
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


def test_epochs_trained_again_are_shown_once_and_the_file_says_what_was_superseded(tmp_path):
    """The worker group restarts from the checkpoint of epoch 2 after writing epoch 4 (a killed
    worker), then the driver is killed after epoch 5 and the run resumed from epoch 4."""
    train_files(tmp_path, range(1, 5), session="s1")  # checkpoints at 2 and 4
    train_files(tmp_path, range(3, 6), session="s1")  # a restart from epoch 2
    train_files(tmp_path, range(5, 8), session="s2")  # --resume from epoch 4
    starts = [line["start"] for line in runs.read_lines(tmp_path) if "start" in line]
    assert [(s["from_epoch"], s["supersedes"]) for s in starts] == [(0, []), (2, [3, 4]), (4, [5])]
    rows = runs.read_metrics(tmp_path)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
    found = scalars(tmp_path / runs.TENSORBOARD_DIR)
    assert sorted(found["train/loss"]) == [1, 2, 3, 4, 5, 6, 7]
    assert found["train/loss"][5] == pytest.approx(rows[4]["loss"])
    segments = runs.history(tmp_path)
    assert [(s["session"], s["from_epoch"], s["to_epoch"], s["restarts"]) for s in segments] == [
        ("s1", 0, 5, 1),
        ("s2", 4, 7, 0),
    ]


# --- the console ------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """Captured output that says it is a terminal, as a real TTY does."""

    def isatty(self) -> bool:
        return True


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_console_off_a_terminal_prints_the_plain_lines_only():
    out = io.StringIO()
    console = Console(out)
    row = {
        **epoch_totals(5, worker_stats(5, validated=True)),
        "checkpoint": "/x/checkpoint_epoch_000005",
    }
    with console.training(10, "s1"):
        console.show(row)
        console.show(epoch_totals(6, worker_stats(6)))
    best = {"epoch": 5, "metric": "val_loss"}
    by = {"epoch": 5, "workers": [{"rank": 0}, {"rank": 1}]}
    console.validation({"accuracy": 0.965, "loss": 0.3687, "rows": 2000, "validated_by": by}, best)
    assert out.getvalue().splitlines() == [
        "epoch  5/10  loss 0.1400  acc  99.0%  val_loss 0.1600  val_acc  80.0%"
        "      1,860 samples/s  0.215 s  checkpoint",
        "epoch  6/10  loss 0.1167  acc  99.0%                                 "
        "      1,852 samples/s  0.216 s",
        "validation  acc 96.5%  loss 0.3687  (2,000 held-out rows, on 2 workers; the checkpoint "
        "of epoch 5, best by val_loss)",
    ]


def test_console_writes_to_stdout_as_it_is_when_it_is_made(capsys):
    Console().line("hello")
    assert capsys.readouterr().out == "hello\n"


def test_console_shows_each_epoch_once_across_a_restart():
    out = io.StringIO()
    console = Console(out)
    lines = [
        {"start": {"session": "me", "from_epoch": 0, "supersedes": [], "time": T0}},
        *[epoch_totals(e, worker_stats(e)) for e in (1, 2, 3)],
        {"start": {"session": "me", "from_epoch": 1, "supersedes": [2, 3], "time": T0 + 9}},
        *[epoch_totals(e, worker_stats(e)) for e in (2, 3, 4)],
    ]
    with console.training(4, "me"):
        for line in lines:
            console.show(line)
    shown = out.getvalue().splitlines()
    assert [line.split()[1] for line in shown if line.startswith("epoch")] == [
        "1/4",
        "2/4",
        "3/4",
        "4/4",
    ]
    assert shown[3] == (
        "restart: the worker group restarted from the checkpoint of epoch 1; "
        "epochs 2-3 are trained again"
    )


def test_console_on_a_terminal_shows_a_live_bar_above_which_epochs_stay():
    """A resumed run: the first epoch shown is 6 of 8."""
    out = Terminal()
    console = Console(out)
    console.header([("run", "r1 (resumed)")])
    with console.training(8, "s2"):
        for epoch in (6, 7, 8):
            console.show(epoch_totals(epoch, worker_stats(epoch)))
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


# --- the report -------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def cells(page: str, after: str) -> list[str]:
    """The table cells of the first table after the heading ``after``."""
    return re.findall(r"<td>([^<]*)</td>", page.split(after)[1].split("</table>")[0])


def test_report_command_writes_a_figure_and_a_page_with_the_numbers(tmp_path):
    run_dir = tmp_path / "r1"
    results = finished_run(run_dir)
    proc = run_module("raytrain", "report", str(run_dir), timeout=120)
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
    final = cells(page, "Final numbers")
    for number in ("0.1750", "90.0%", "96.5%", "0.3687"):
        assert number in final, number
    assert cells(page, "Per class") == ["0", "97.1%", "96.2%", "106", "1", "95.8%", "96.8%", "94"]
    assert cells(page, "Confusion matrix") == ["0", "102", "4", "1", "3", "91"]
    # Every phase the driver measures, in order, with its seconds.
    timed = cells(page, "Where the time went")
    assert timed[0::3] == list(runs.PHASES.values())
    assert timed[1::3] == [f"{results['phases'][k]:.2f}" for k in runs.PHASES]
    assert "10.0.0.6" in cells(page, "Workers and placement")
    assert "4/4" in cells(page, "Summary")
    assert "Run history" not in page  # one uninterrupted session


def test_report_of_a_resumed_run_says_so_and_what_each_session_cost(tmp_path):
    train_files(tmp_path, range(1, 4), session="s1")  # the driver was killed after epoch 3
    train_files(tmp_path, range(3, 7), session="s2")  # resumed from the checkpoint of epoch 2
    finish(tmp_path, 6)
    _, html = write_report(tmp_path)
    page = html.read_text()
    assert "resumed from the checkpoint of epoch 2" in page
    history = cells(page, "Run history")
    assert history[:4] == ["1", "0", "3", "0"] and history[5:9] == ["2", "2", "6", "0"]
    segments = runs.history(tmp_path)
    assert [history[4], history[9]] == [f"{s['seconds']:.1f}" for s in segments]
    assert "in 2 sessions" in " ".join(cells(page, "Summary"))
    epochs = page.split("<h2>Epochs</h2>")[1]
    assert re.findall(r"<tr><td>(\d+)</td>", epochs) == ["1", "2", "3", "4", "5", "6"]


def test_report_of_a_run_still_training(tmp_path):
    train_files(tmp_path, range(1, 4))
    png_path, html_path = write_report(tmp_path)
    assert png_size(png_path.read_bytes()) == (1400, 900)
    page = html_path.read_text()
    assert "no results.json" in page
    assert cells(page, "Final numbers")[:2] == ["training (last epoch)", "0.2333"]


def test_report_of_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    line = one_error_line(run_module("raytrain", "report", str(tmp_path), timeout=120))
    assert str(tmp_path) in line and "metrics.jsonl" in line and "results.json" in line
    assert not (tmp_path / "report.png").exists()
    (tmp_path / "results.json").write_text("{half a fi")
    line = one_error_line(run_module("raytrain", "report", str(tmp_path), timeout=120))
    assert "results.json" in line and "not readable JSON" in line
    line = one_error_line(run_module("raytrain", "report", str(tmp_path / "nope"), timeout=120))
    assert line == f"raytrain: error: no run directory at {str(tmp_path / 'nope')!r}"


# --- the run list -----------------------------------------------------------------------------


def storage_with_runs(storage: Path) -> None:
    """Four runs, started an hour apart: finished, interrupted, incomplete, empty."""
    finished_run(storage / "done", epochs=4)
    train_files(storage / "stopped", range(1, 4))  # a checkpoint after epoch 2, no results
    (storage / "stopped" / "config.json").write_text(json.dumps(config_dict(10)))
    train_files(storage / "crashed", range(1, 2))  # no checkpoint yet
    (storage / "crashed" / "config.json").write_text(json.dumps(config_dict(10)))
    (storage / "blank").mkdir()
    (storage / "blank" / "config.json").write_text(json.dumps(config_dict(10)))
    for hours, name in enumerate(["done", "stopped", "crashed", "blank"]):
        started = 1_795_700_000 + 3600 * hours
        os.utime(storage / name / "config.json", (started, started))


def test_run_list_shows_each_runs_status_newest_first(tmp_path):
    storage_with_runs(tmp_path / "runs")
    proc = run_module("raytrain", "runs", str(tmp_path / "runs"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
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
    assert table[2][-1].endswith("runs/stopped/checkpoint_epoch_000002")
    assert table[3][-1].endswith("runs/done/checkpoint_epoch_000004")
    assert table[0][-1] == table[1][-1] == "-"


def test_run_list_on_a_terminal_is_a_table(tmp_path):
    storage_with_runs(tmp_path)
    out = Terminal()
    print_runs(tmp_path, out)
    text = ANSI.sub("", out.getvalue())
    assert f"runs in {tmp_path}" in text
    for name, status in (("done", "finished"), ("stopped", "interrupted"), ("blank", "empty")):
        assert re.search(rf"│ {name} +│ {status} +│", text), text


def test_run_list_of_a_missing_storage_path_is_one_clear_line(tmp_path):
    line = one_error_line(run_module("raytrain", "runs", str(tmp_path / "nowhere"), timeout=120))
    assert line == (
        f"raytrain: error: storage path {str(tmp_path / 'nowhere')!r} does not exist; "
        "pass the --storage-path the runs were started with"
    )


@pytest.mark.ray
def test_a_real_runs_report_shows_every_phase(two_epoch_run):
    trained = two_epoch_run
    page = (trained.run_dir / runs.REPORT_HTML).read_text()
    assert cells(page, "Where the time went")[0::3] == list(runs.PHASES.values())
    assert set(trained.results["phases"]) == set(runs.PHASES)
    assert png_size((trained.run_dir / runs.REPORT_PNG).read_bytes()) == (1400, 900)


@pytest.mark.parametrize(
    ("message", "where", "text"),
    [
        (
            "The node with node id: 36663ed82765da69ea58f4ef2c65a05712b89ea97c95eafc339c0f42 and "
            "address: 10.185.203.3 and node name: 10.185.203.3 has been marked dead because the "
            "detector has missed too many heartbeats from it. This can happen when a \t(1) raylet "
            "crashes unexpectedly (OOM, etc.)",
            "lost",
            "   lost  node 10.185.203.3 (36663ed8): Ray marked it dead (the detector has missed "
            "too many heartbeats from it)",
        ),
        (
            "WARNING: 8 PYTHON worker processes have been started on node: 1f2e with address: "
            "192.0.2.2. This could be a result of using a large number of actors, or due to "
            "tasks blocked in ray.get() calls (see https://github.com/ray-project/ray/issues/3644 "
            "for some discussion of workarounds).",
            "log",
            None,
        ),
        (
            "Raylet is terminated. Termination is unexpected. Possible reasons include: (1) "
            "SIGKILL by the user or system OOM killer, (2) Invalid memory access from Raylet "
            "causing SIGSEGV or SIGBUS, (3) Other termination signals. Last 20 lines of the "
            "Raylet logs:\n    [2026-12-05 00:55:47,792 I 28974 28974] (raylet) "
            "worker_pool.cc:811: Job 06000000 already started in worker pool.\n",
            "log",
            None,
        ),
        ("Task was killed due to the node running low on memory.", "console", None),
    ],
)
def test_ray_cluster_messages_are_routed_without_verbose(message, where, text):
    """The messages Ray publishes to every driver: a lost node becomes one line, Ray's
    housekeeping warnings and a dying node's raylet log tail go to a log, anything else
    reaches the console as Ray wrote it."""
    routed = cluster.route_cluster_message(message)
    assert routed == (where, text if text is not None else message)


def test_no_network_verdict_without_ddps_statistics():
    """Workers on two nodes: a verdict from what DDP measured; none where DDP kept no statistics
    (a worker's all-reduce time unknown), rather than a "compute-bound" read from a zero."""
    import math

    from raytrain.train.communication import summary

    def shown(comm_s: float) -> str:
        stats = [{"compute_s": 1.0, "steps": 100, "comm_s": c} for c in (comm_s, 0.004)]
        row = {"communication": summary(stats, 4_000_000)}
        row["workers"] = [{"node_id": "a"}, {"node_id": "b"}]
        out = io.StringIO()
        Console(out).network(row)
        return out.getvalue()

    assert "network-bound across 2 nodes: all-reduce 5.0 ms of a 10.0 ms step" in shown(0.006)
    unknown = summary([{"compute_s": 1.0, "steps": 100, "comm_s": math.nan}] * 2, 4_000_000)
    assert unknown["allreduce_ms"] is None and unknown["share"] is None, unknown
    assert shown(math.nan) == ""
    # DDP's sampled steps (Gloo's warm-up among them) above the step's average: capped at it,
    # never "inf x faster".
    whole = shown(0.02)
    assert "all-reduce 10.0 ms of a 10.0 ms step (100%" in whole, whole
    assert "the step is almost all all-reduce" in whole and "inf" not in whole, whole
