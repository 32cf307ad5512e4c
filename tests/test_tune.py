"""raytrain tune: sweeps on Ray Tune, each trial an ordinary raytrain run. A sweep of 6 trials x
1 worker x 3 epochs on an embedded Ray with ASHA stopping trials and a trial that fails; its best
config trained again to the same validation; bad sweep files and a sweep larger than a cluster,
one line each. A sweep interrupted and resumed: tests/test_storage.py, on object storage."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from raytrain import cli, config, runs
from raytrain.data.tables import xy_table
from raytrain.storage import Location
from raytrain.sweep import spec as sweep_spec
from raytrain.sweep.results import best_trial, summarize
from raytrain.train.outcome import validation_of
from tests.conftest import ROOT, one_error_line, save_checkpoint

SWEEP = {
    "data": {"samples": 1000},
    "train": {"epochs": 3, "batch_size": 64},
    "scaling": {"workers": 1},  # a trial's cost is mostly its start: one worker each
    "sweep": {
        "trials": 2,
        "concurrent": 2,
        "metric": "val_loss",
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
        "space": {
            # A model that cannot be built: those trials fail, and the sweep goes on.
            "model.name": {
                "grid": [
                    "simple",
                    "tests.custom_model:TinyNet",
                    "tests.custom_model:NotAModule",
                ]
            },
            "train.lr": {"choice": [0.02, 0.05, 0.2]},
        },
    },
}


def write_sweep(path: Path, **changes) -> Path:
    spec = json.loads(json.dumps(SWEEP))
    spec["sweep"].update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


def tune_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "raytrain", "tune", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mlflow_server):
    """The sweep of 6 trials (2 of them fail), tracked in MLflow."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_sweep(root / "s.yaml")
    tracked = yaml.safe_load(spec.read_text())
    tracked["run"] = {"mlflow": {"tracking_uri": mlflow_server.url, "experiment": "sweep-s1"}}
    spec.write_text(yaml.safe_dump(tracked))
    started = time.monotonic()
    proc = tune_cli("--config", str(spec), "--storage-path", str(root), "--name", "s1")
    print(f"sweep of 6 trials: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "s1", proc


@pytest.mark.ray
def test_a_sweep_of_6_trials_with_asha_and_a_failing_trial(swept):
    sweep_dir, proc = swept
    results = json.loads((sweep_dir / "sweep.json").read_text())
    trials = results["trials"]
    assert len(trials) == 6
    statuses = [t["status"] for t in trials]
    failed = [t for t in trials if t["status"] == "failed"]
    assert [t["params"]["model.name"] for t in failed] == ["tests.custom_model:NotAModule"] * 2
    assert all("has no nn.Module class named 'NotAModule'" in t["error"] for t in failed), failed
    assert "stopped early" in statuses and "finished" in statuses, statuses
    for t in trials:  # every trial is an ordinary run directory
        run_dir = Path(t["run_dir"])
        assert runs.saved_config(run_dir)["train"]["lr"] == t["params"]["train.lr"]
        if t["status"] == "stopped early":  # stopped between epochs: no results.json
            assert not (run_dir / "results.json").exists()
        if t["status"] == "finished":
            assert t["epochs"] == 3 and (run_dir / "results.json").exists()
    best = results["best"]
    ranked = sorted(t["best"] for t in trials if t["status"] != "failed")
    assert best["best"] == ranked[0]
    for t in trials:  # ranked by what each trial keeps: its best checkpoint's validation
        if t["status"] == "failed":
            continue
        kept = Path(t["run_dir"]) / runs.checkpoint_name(t["best_epoch"])
        assert validation_of(str(kept))["loss"] == pytest.approx(t["best"], abs=1e-5), t
        if t["status"] == "finished":
            run = json.loads((Path(t["run_dir"]) / "results.json").read_text())
            assert (run["best"]["epoch"], run["best"]["value"]) == (t["best_epoch"], t["best"])
    assert (sweep_dir / "sweep.csv").read_text().count("\n") == 7
    out = proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"best  {best['trial']}" in out and "raytrain train --config" in out


@pytest.mark.ray
def test_the_sweeps_trials_are_runs_of_one_mlflow_experiment(swept, mlflow_server):
    from mlflow.tracking import MlflowClient

    sweep_dir, _ = swept
    trials = {t["trial"]: t for t in json.loads((sweep_dir / "sweep.json").read_text())["trials"]}
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("sweep-s1")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # Every trial, also one that failed before training (its model could not be built).
    assert set(found) == set(trials)
    status = {"finished": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}
    for name, trial in trials.items():
        run = found[name]
        assert float(run.data.params["train.lr"]) == trial["params"]["train.lr"]
        assert run.data.params["model.name"] == trial["params"]["model.name"]
        assert run.info.status == status[trial["status"]], (name, trial["status"])
        if trial["status"] == "failed":  # and why, in a tag
            assert "has no nn.Module class named 'NotAModule'" in run.data.tags["raytrain.error"]


@pytest.mark.ray
def test_the_best_config_trains_again_to_the_same_validation(swept, train):
    """best.yaml, loaded as ``raytrain train --config best.yaml`` loads it, trains on the
    session's Ray to the trial's validation."""
    sweep_dir, _ = swept
    best = json.loads((sweep_dir / "sweep.json").read_text())["best"]
    assert best["status"] == "finished"
    again = train(config_file=sweep_dir / "best.yaml").results["validation"]
    trial = json.loads((Path(best["run_dir"]) / "results.json").read_text())["validation"]
    assert again["loss"] == trial["loss"] and again["confusion"] == trial["confusion"]


BAD = {
    "no sweep section": ({"train": {"epochs": 1}}, "has no sweep: section"),
    "unknown field": ({"sweep": {"space": {"train.nope": {"choice": [1]}}}}, "unknown config key"),
    "bad value": (
        {"sweep": {"space": {"train.lr": {"choice": [-1.0]}}}},
        "invalid value for train.lr",
    ),
    "bad kind": ({"sweep": {"space": {"train.lr": {"normal": [0, 1]}}}}, "give one of choice"),
    "low above high": ({"sweep": {"space": {"train.lr": {"uniform": [1, 0.1]}}}}, "low < high"),
    "empty space": ({"sweep": {"space": {}}}, "the search space is empty"),
    "two metrics": (
        {
            "run": {"checkpoint_metric": "val_accuracy"},
            "sweep": {"metric": "val_loss", "space": {"train.lr": {"choice": [0.1]}}},
        },
        "sweep.metric val_loss and run.checkpoint_metric val_accuracy differ",
    ),
}


def test_a_sweep_ranks_each_trial_by_the_checkpoint_it_keeps(tmp_path):
    """The review's case: trial a's lowest val_loss (0.111 at epoch 2) came from an epoch that
    wrote no checkpoint, and the model it keeps is epoch 3's (0.137); trial b keeps 0.12; trial
    c's row names a checkpoint that was never written whole (its process was ended first), so
    it keeps nothing. The sweep ranks what the trials keep: b is the best."""
    sweep = sweep_spec.SweepConfig(space={"train.lr": {"choice": [0.1]}}, metric="val_loss")
    cases = {
        "trial-a_00000": ([0.2, 0.111, 0.137], {3}),
        "trial-b_00001": ([0.15, 0.125, 0.12], {3}),
        "trial-c_00002": ([0.05], set()),
    }
    for trial, (losses, written) in cases.items():
        run_dir = Location.of(tmp_path / trial)
        run_dir.mkdir()
        runs.save_config(run_dir, config.load(flags={"train.epochs": 3}))
        for epoch, loss in enumerate(losses, 1):
            named = run_dir / runs.checkpoint_name(epoch)
            if epoch in written:
                save_checkpoint(named.as_path())
            saved = str(named) if epoch in written or trial.startswith("trial-c") else None
            runs.append_line(run_dir, {"epoch": epoch, "val_loss": loss, "checkpoint": saved})
    rows = summarize(Location.of(tmp_path), sweep, 3, [], interrupted=False)
    assert {r["trial"]: (r["best"], r["best_epoch"]) for r in rows} == {
        "trial-a_00000": (0.137, 3),
        "trial-b_00001": (0.12, 3),
        "trial-c_00002": (None, None),
    }
    assert best_trial(sweep, rows)["trial"] == "trial-b_00001"


def test_a_sweeps_trials_keep_a_checkpoint_at_each_new_best_of_its_metric(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", metric="val_accuracy")
    base, sweep = sweep_spec.load(path)
    assert base["run"]["checkpoint_metric"] == sweep.metric == "val_accuracy"
    assert base["train"]["checkpoint_best"] is True
    spec = yaml.safe_load(path.read_text())
    spec["train"]["checkpoint_best"] = False  # the file's own choice stands
    path.write_text(yaml.safe_dump(spec))
    assert sweep_spec.load(path)[0]["train"]["checkpoint_best"] is False


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_sweep_file_is_one_line_before_ray_starts(tmp_path, capsys, case):
    spec, needle = BAD[case]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["tune", "--config", str(path), "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.glob("sweep-*")), "nothing was created"


def test_the_command_line_says_a_missing_sweep_file_in_one_line(tmp_path):
    proc = tune_cli("--config", str(tmp_path / "nope.yaml"), "--storage-path", str(tmp_path))
    assert "does not exist" in one_error_line(proc)


def write_parquet(path: Path, rows: int, inf_at: int | None = None) -> Path:
    """A Parquet file of ``rows`` rows of 10 features and 2 classes (an infinite value in row
    ``inf_at``)."""
    x = np.random.default_rng(0).standard_normal((rows, 10), dtype=np.float32)
    if inf_at is not None:
        x[inf_at, 3] = np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(xy_table(x, x[:, 0] > 0), path)
    return path


@pytest.mark.ray
def test_a_sweep_on_bad_data_is_one_line_before_any_trial(tmp_path):
    """The sweep checks its data files itself, once: an infinity in one file is one line naming it,
    exit 2, and no trial ran (nothing is left of the sweep)."""
    write_parquet(tmp_path / "data" / "a.parquet", 500)
    write_parquet(tmp_path / "data" / "b.parquet", 500, inf_at=7)
    spec = write_sweep(tmp_path / "s.yaml")
    text = yaml.safe_load(spec.read_text())
    text["data"] = {"path": str(tmp_path / "data")}
    spec.write_text(yaml.safe_dump(text))
    proc = tune_cli("--config", str(spec), "--storage-path", str(tmp_path / "sweeps"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert "b.parquet" in line and "infinite" in line, line
    assert not list((tmp_path / "sweeps").glob("*")), "nothing was left of the sweep"


@pytest.mark.ray
@pytest.mark.slow
def test_optuna_search_draws_the_trials(tmp_path):
    """Two trials drawn by Optuna, on Parquet files that the sweep checked once for both."""
    data = write_parquet(tmp_path / "data" / "part-0.parquet", 1000).parent
    spec = write_sweep(
        tmp_path / "s.yaml",
        trials=2,
        concurrent=1,
        search="optuna",
        scheduler="none",
        space={"train.lr": {"loguniform": [0.01, 0.1]}, "model.name": {"choice": ["simple"]}},
    )
    text = yaml.safe_load(spec.read_text())
    text["train"]["epochs"] = 1
    text["data"] = {"path": str(data)}
    spec.write_text(yaml.safe_dump(text))
    # On a terminal: the live table of the trials, not a line per event.
    code, screen = in_terminal(
        "--config", str(spec), "--storage-path", str(tmp_path), "--name", "opt"
    )
    assert code == 0, screen
    trials = json.loads((tmp_path / "opt" / "sweep.json").read_text())["trials"]
    assert len(trials) == 2 and all(t["status"] == "finished" for t in trials)
    assert all(0.01 <= t["params"]["train.lr"] <= 0.1 for t in trials)
    # One check of the files, by the sweep, taken by both trials (each of its own would differ
    # in how long it took).
    checks = {
        json.loads((tmp_path / "opt" / t["trial"] / "results.json").read_text())["data_check_s"]
        for t in trials
    }
    assert len(checks) == 1 and None not in checks, checks
    plain = ANSI.sub("", screen)
    assert "0/1 trials done" in plain and "2/2 trials done" in plain, plain
    assert re.search(r"trial-\S+\s+running\s+0/1", plain), plain
    assert re.search(r"trial-\S+\s+finished\s+1/1\s+\d\.\d{4}", plain), plain
    assert "started  train.lr=" not in plain  # the lines are for pipes and logs
    assert f"best  {trials[0]['trial']}" in plain or f"best  {trials[1]['trial']}" in plain


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_terminal(*args: str, timeout: float = 600) -> tuple[int, str]:
    """``python -m raytrain tune ARGS`` with its output on a pseudo-terminal, as a user sees it:
    its exit code and everything it wrote there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TERM="xterm-256color", COLUMNS="160", LINES="50")
    control, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "raytrain", "tune", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=ROOT,
        env=env,
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(control, 65536)
            except OSError:  # the terminal closed: the command and its children are gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    os.close(control)
    return code, b"".join(chunks).decode(errors="replace")
