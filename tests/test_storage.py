"""Runs on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1, started
and stopped by process id, that checks credentials. A run keeps everything there (checkpoints,
metrics.jsonl, TensorBoard, results.json, the report), reads its Parquet data from there, is
interrupted and resumed, listed and reported; a sweep keeps its trials there, interrupted and
resumed; bad storage input is one line before Ray starts."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from raytrain import runs
from raytrain.config import DataConfig
from raytrain.data.synthetic import draw
from raytrain.data.tables import xy_table
from raytrain.storage import Location
from raytrain.train import checkpoint

from .conftest import ROOT, one_error_line, save_checkpoint
from .s3server import S3Server, free_port
from .test_recovery import start_cli, wait_for_checkpoint, wait_for_epochs

BUCKET = "runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, monkeypatch_module):
    server = S3Server(log=tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.create_bucket(BUCKET)
        for name, value in server.env.items():
            monkeypatch_module.setenv(name, value)  # this process reads the bucket too
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def cli(*args: str, env: dict | None = None, module: str = "raytrain.main", timeout=300):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_environment(env),
        timeout=timeout,
    )


def _environment(extra: dict | None) -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (extra or {})


def objects(s3: S3Server, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    return {
        key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        for key in s3.keys(BUCKET, prefix)
        if not key.endswith("/")
    }


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_object_storage_is_interrupted_resumed_listed_and_reported(s3):
    data = Location.of(s3.uri(BUCKET, "data"))
    x, y, _ = draw(20000, DataConfig(), 0)
    pq.write_table(
        xy_table(x.numpy(), y.numpy()), (data / "part-0.parquet").path, filesystem=data.fs
    )
    storage = s3.uri(BUCKET, "team")
    run_dir = str(Location.of(storage) / "r1")
    args = ["--workers", "2", "--set", "train.checkpoint_every=1", "--storage-path", storage]

    proc = start_cli(*args, "--epochs", "6", "--data.path", str(data), "--name", "r1")
    wait_for_epochs(run_dir, 2, proc)
    wait_for_checkpoint(run_dir, proc)
    started = time.monotonic()
    # SIGTERM, as a scheduler or `kill` stops a job (Ctrl-C is tests/test_recovery.py's): the
    # run stops as on Ctrl-C, keeps its checkpoints and says how to continue.
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out
    resume = out.splitlines()[-1].removeprefix("raytrain: continue with: ")
    assert resume == f"python -m raytrain.main --resume r1 --storage-path {shlex.quote(storage)}"
    latest = runs.latest_checkpoint(run_dir)
    assert latest is not None and checkpoint.load_at(latest)["epoch"] >= 1

    proc = start_cli(*shlex.split(resume)[3:])
    out, _ = proc.communicate(timeout=300)
    print(f"resumed run: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, out
    assert "(resumed)" in out and "epoch 6/6" in out and "validation  acc" in out, out
    results = json.loads((Location.of(run_dir) / "results.json").read_text())
    print("phases:", results["phases"])
    assert results["run_dir"] == run_dir and results["epochs"] == 6
    assert results["checkpoint"].startswith(f"s3://{BUCKET}/team/r1/checkpoint_epoch_")
    assert 3500 < results["validation"]["rows"] < 4500  # the hashed 20% held out
    assert [row["epoch"] for row in runs.read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert len(runs.history(run_dir)) == 2  # the first session and the resumed one

    stored = objects(s3, "team/r1/")
    names = {key.removeprefix("team/r1/") for key in stored}
    assert {"config.json", "metrics.jsonl", "results.json", "report.png", "report.html"} <= names
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in names), names
    assert "checkpoint_epoch_000006/state.pt" in names
    # Credentials come from the environment and go nowhere else.
    for key, body in stored.items():
        assert s3.secret_key.encode() not in body, key
    assert s3.secret_key not in out
    assert not (ROOT / "s3:").exists(), "a local directory named after the URI was written"

    listing = cli("runs", storage, module="raytrain")
    assert listing.returncode == 0, listing.stderr
    (line,) = [line for line in listing.stdout.splitlines() if line.startswith("r1 ")]
    assert "finished" in line and "6/6" in line, listing.stdout

    report = cli("report", run_dir, module="raytrain")
    assert report.returncode == 0 and f"wrote {run_dir.replace('/r1?', '/r1/report.png?')}" in (
        report.stdout
    ), report.stdout + report.stderr

    again = cli("--name", "r1", "--storage-path", storage)
    assert "run 'r1' already exists" in one_error_line(again)


def fails_in_seconds(*args: str, env: dict | None = None, within: float = 30) -> str:
    started = time.monotonic()
    proc = cli(*args, "--epochs", "1", env=env)
    assert time.monotonic() - started < within
    return one_error_line(proc)


def test_a_missing_bucket_is_one_line(s3):
    line = fails_in_seconds("--storage-path", s3.uri("no-such-bucket", "team"))
    assert "bucket 'no-such-bucket' does not exist" in line


def test_credentials_the_store_refuses_are_one_line(s3):
    line = fails_in_seconds(
        "--storage-path", s3.uri(BUCKET, "refused"), env={"AWS_SECRET_ACCESS_KEY": "wrong"}
    )
    assert "cannot be used" in line and "ACCESS_DENIED" in line and "credentials" in line
    assert "wrong" not in line
    assert not s3.keys(BUCKET, "refused")


def test_an_endpoint_that_does_not_answer_is_one_line():
    nobody = f"127.0.0.1:{free_port()}"
    line = fails_in_seconds(
        "--storage-path", f"s3://{BUCKET}/x?endpoint_override={nobody}&scheme=http"
    )
    assert "cannot be used" in line and nobody in line and "endpoint" in line


def test_a_data_path_in_a_missing_bucket_is_one_line(s3, tmp_path):
    line = fails_in_seconds(
        "--set", f"data.path={s3.uri('no-such-bucket', 'rows')}", "--storage-path", str(tmp_path)
    )
    assert "data path" in line and "bucket 'no-such-bucket' does not exist" in line


def test_a_data_path_whose_endpoint_does_not_answer_is_one_line(tmp_path):
    nobody = f"127.0.0.1:{free_port()}"
    line = fails_in_seconds(
        "--set",
        f"data.path=s3://{BUCKET}/rows?endpoint_override={nobody}&scheme=http",
        "--storage-path",
        str(tmp_path),
    )
    assert "data path" in line and "cannot be used" in line and nobody in line


def test_aws_endpoint_url_names_the_server_too(s3):
    """The standard variable instead of the URI's query: the answer comes from the test's server
    (this machine reaches no real S3)."""
    line = fails_in_seconds(
        "--storage-path", "s3://no-such-bucket/x", env={"AWS_ENDPOINT_URL": s3.url}
    )
    assert "bucket 'no-such-bucket' does not exist" in line


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:hunter2@runs/x",
        "s3://runs/x?access_key=AKIAEXAMPLE&secret_key=hunter2",
    ],
)
def test_credentials_in_the_uri_are_refused_and_not_repeated(uri):
    line = fails_in_seconds("--storage-path", uri)
    assert "carries credentials" in line and "AWS_ACCESS_KEY_ID" in line
    assert "hunter2" not in line


@pytest.mark.ray
@pytest.mark.slow
def test_predict_reads_a_checkpoint_and_data_on_object_storage_and_writes_there(s3, tmp_path):
    import pyarrow.fs as pafs

    save_checkpoint(tmp_path / "ckpt")
    ckpt = Location.of(s3.uri(BUCKET, "models/ckpt"))
    pafs.copy_files(str(tmp_path / "ckpt"), ckpt.path, destination_filesystem=ckpt.fs)
    data = Location.of(s3.uri(BUCKET, "to-score"))
    x, y, _ = draw(3000, DataConfig(), 0)
    pq.write_table(xy_table(x.numpy(), y.numpy()), (data / "p.parquet").path, filesystem=data.fs)
    out = s3.uri(BUCKET, "scored")

    proc = cli(
        "predict", str(ckpt), "--data", str(data), "--out", out, "--label", "y", module="raytrain"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "y: acc" in proc.stdout and "Traceback" not in proc.stderr
    assert set(s3.keys(BUCKET, "scored/")) >= {
        "scored/part-00000.parquet",
        "scored/_prediction.json",
        "scored/_metrics.json",
    }
    assert not [key for key in s3.keys(BUCKET, "") if ".partial-" in key]  # staging moved away
    written = pq.read_table((Location.of(out) / "part-00000.parquet").path, filesystem=data.fs)
    assert written.num_rows == 3000 and written.column_names == ["prediction", "probabilities"]
    again = cli("predict", str(ckpt), "--data", str(data), "--out", out, module="raytrain")
    assert "exists; pass --overwrite" in one_error_line(again)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_on_object_storage_is_interrupted_resumed_and_keeps_everything_there(s3, tmp_path):
    """Two trials one at a time; Ctrl-C once the first has finished (exit 130, the command that
    continues); --resume runs only the trial that was left. Every trial is an ordinary run in
    the bucket, with the sweep's files and Tune's state beside them. (One sweep for both
    scenarios: each sweep costs an embedded Ray and a process per trial.)"""
    import yaml

    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "data": {"samples": 1000},
                "train": {"epochs": 2, "batch_size": 64},
                "scaling": {"workers": 1},  # a trial's cost is mostly its start
                "sweep": {
                    "trials": 1,
                    "concurrent": 1,
                    "scheduler": "none",
                    "space": {"train.lr": {"grid": [0.05, 0.2]}},
                },
            }
        )
    )
    storage = s3.uri(BUCKET, "sweeps")
    argv = ["-m", "raytrain", "tune", "--config", str(spec), "--storage-path", storage]
    proc = subprocess.Popen(
        [sys.executable, *argv, "--name", "sw"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=_environment(None),
    )
    try:
        deadline = time.monotonic() + 600
        while not finished_trials(s3):  # one trial finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "Traceback" not in out, out
    resume = [line for line in out.splitlines() if "raytrain tune --resume" in line]
    assert resume and "sw" in resume[0], out
    finished_before = finished_trials(s3)

    again = cli("tune", "--resume", "sw", "--storage-path", storage, module="raytrain",
                timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    sweep_dir = Location.of(storage) / "sw"
    results = json.loads((sweep_dir / "sweep.json").read_text())
    trials = results["trials"]
    assert sorted(t["params"]["train.lr"] for t in trials) == [0.05, 0.2]
    assert all(t["status"] == "finished" and t["epochs"] == 2 for t in trials), trials
    assert all(t["run_dir"].startswith(f"s3://{BUCKET}/sweeps/sw/trial-") for t in trials)
    for name in finished_before:  # a finished trial was not run again
        rows = runs.read_metrics(str(sweep_dir / name))
        assert [r["epoch"] for r in rows] == [1, 2]
    names = {key.removeprefix("sweeps/sw/") for key in s3.keys(BUCKET, "sweeps/sw/")}
    assert {"sweep.yaml", "sweep.json", "sweep.csv", "best.yaml", "sweep.png"} <= names, names
    for t in trials:  # each trial an ordinary run there, checkpoints and all
        trial = t["trial"]
        assert {f"{trial}/results.json", f"{trial}/checkpoint_epoch_000002/state.pt"} <= names
    assert any(name.startswith("tune/") for name in names)  # Tune's state, for --resume
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["train"]["lr"] == results["best"]["params"]["train.lr"]
    assert s3.secret_key not in out + again.stdout + again.stderr
    assert not (ROOT / "s3:").exists(), "a local directory named after the URI was written"


def finished_trials(s3: S3Server) -> set[str]:
    """The sweep's trials that have written their results.json to the bucket."""
    keys = s3.keys(BUCKET, "sweeps/sw/")
    return {key.split("/")[2] for key in keys if key.endswith("/results.json") and "trial-" in key}
