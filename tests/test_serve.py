"""raytrain serve: a trained run as a real Ray Serve application in a process of its own,
answered by a real HTTP client (httpx). Its answers equal ``raytrain predict`` on the same rows;
every bad request gets its status and one line; 2,000 requests from 16 threads are each answered
with their own row's answer; a replica killed with SIGKILL is replaced while the service keeps
answering; Ctrl-C deletes the application and leaves no process behind. The flags and the
config file for ``serve deploy`` are checked without Ray."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raytrain import cli
from tests.conftest import ROOT, one_error_line, run_module, save_checkpoint
from tests.tabular import MIXED_CATEGORICAL, MIXED_NUMERIC, make_mixed_table
from tests.test_predict import predict_here

FEATURES = [*MIXED_NUMERIC, *MIXED_CATEGORICAL]
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``raytrain serve ARGS`` as a process: its output lines as they come, its URL, and every
    process it started (to check that none is left)."""

    def __init__(self, *args: str):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raytrain", "serve", *args, "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pids: set[int] = set()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)
            self.lines.put(line)

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.lstrip().startswith("serving"):
                self.pids = self.descendants()
                return
        raise AssertionError(f"not serving: {''.join(self.out)}{''.join(self.err)}")

    def descendants(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def replicas(self) -> dict[int, str]:
        """The replica processes: pid -> process title."""
        found = {}
        for pid in self.descendants():
            try:
                title = " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            if "ServeReplica" in title:
                found[pid] = title
        return found

    def stop(self) -> int:
        """Ctrl-C; the exit code. Kills by process id whatever is left after a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids | self.descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        return self.proc.returncode


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """300 rows the model never saw (missing values, rare and unseen cities) as Parquet, and the
    same rows as JSON records, with an id column the model does not read."""
    table = make_mixed_table(300, seed=7)
    table = table.select(FEATURES).append_column("id", pa.array(np.arange(300)))
    path = tmp_path_factory.mktemp("serve-rows") / "rows.parquet"
    pq.write_table(table, path, row_group_size=100)
    return path, table.to_pylist()


def predicted(run_dir: Path, data: Path, out: Path) -> pa.Table:
    """``raytrain predict`` on the session's Ray: its output table."""
    predict_here(str(run_dir), "--data", str(data), "--out", str(out), "--keep", "id")
    return pq.read_table(out)


@pytest.fixture(scope="module")
def species(tabular_run, rows, tmp_path_factory):
    """The species classifier served with 2 replicas, and predict's answers for ``rows``."""
    _, trained = tabular_run("species")
    expected = predicted(trained.run_dir, rows[0], tmp_path_factory.mktemp("p") / "out")
    service = Service(str(trained.run_dir), "--replicas", "2", "--max-batch-size", "16")
    try:
        service.wait_until_serving()
        yield service, expected
    finally:
        service.stop()


def check_answer(answer: dict, expected: pa.Table, row: int) -> None:
    """One answer against predict's row: the same class, each probability within 1e-6."""
    want = expected.slice(row, 1).to_pylist()[0]
    assert answer["prediction"] == want["prediction"], (row, answer, want)
    names = sorted(answer["probabilities"])
    got = np.array([answer["probabilities"][n] for n in names])
    assert np.abs(got - np.array(want["probabilities"])).max() < 1e-6, (row, answer, want)


@pytest.mark.ray
def test_answers_equal_raytrain_predict_for_lists_and_single_records(species, rows):
    service, expected = species
    records = rows[1]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for start in range(0, 300, 100):
            reply = client.post("/predict", json=records[start : start + 100])
            assert reply.status_code == 200, reply.text
            answers = reply.json()["predictions"]
            assert len(answers) == 100
            for i, answer in enumerate(answers):
                check_answer(answer, expected, start + i)
        for row in (0, 7, 299):  # one record: a list of one answer
            reply = client.post("/predict", json=records[row])
            assert reply.status_code == 200, reply.text
            check_answer(reply.json()["predictions"][0], expected, row)
    assert sorted(expected.column_names) == ["id", "prediction", "probabilities"]


@pytest.mark.ray
def test_get_describes_the_model_and_the_api_comes_from_fastapi(species):
    service, _ = species
    with httpx.Client(base_url=service.url, timeout=30) as client:
        about = client.get("/").json()
        assert client.get("/healthz").json() == {"status": "ok"}
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    assert about["task"] == "classification"
    assert about["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert about["run"] == "species" and about["label"] == "species"
    assert about["checkpoint"].startswith(str(Path(about["checkpoint"]).parent))
    assert np.isfinite(about["validation"]["val_loss"])
    types = {c["name"]: c["type"] for c in about["columns"]}
    assert types == {
        **dict.fromkeys(MIXED_NUMERIC, "number"),
        **dict.fromkeys(MIXED_CATEGORICAL, "category"),
    }
    assert set(spec["components"]["schemas"]["Record"]["properties"]) == set(FEATURES)
    assert "/predict" in spec["paths"]


def _without(record: dict, column: str) -> dict:
    return {k: v for k, v in record.items() if k != column}


BAD_REQUESTS = [
    # (what, body maker, status, words in the one line)
    (
        "a missing column",
        lambda r: [r[0], _without(r[1], "island")],
        422,
        "record 1: column 'island' is missing",
    ),
    (
        "a string for a number",
        lambda r: {**r[0], "age": "three"},
        422,
        "column 'age' is \"three\"; expected a number",
    ),
    ("an empty list", lambda r: [], 422, "empty list"),
    ("a body that is no record", lambda r: 42, 422, "the body is 42"),
    ("an oversized body", lambda r: r * 40, 413, "over this service's limit of 1,048,576 bytes"),
]


@pytest.mark.ray
@pytest.mark.parametrize(
    "body,status,words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_a_bad_request_gets_its_status_and_one_line_and_the_service_goes_on(
    species, rows, body, status, words
):
    service, expected = species
    with httpx.Client(base_url=service.url, timeout=30) as client:
        reply = client.post("/predict", json=body(rows[1]))
        assert reply.status_code == status, reply.text
        message = reply.json()["error"]
        assert words in message and "\n" not in message, message
        assert "Traceback" not in reply.text
        good = client.post("/predict", json=rows[1][5])
    assert good.status_code == 200
    check_answer(good.json()["predictions"][0], expected, 5)


@pytest.mark.ray
def test_a_body_that_is_not_json_is_400_and_another_content_type_415(species):
    service, _ = species
    with httpx.Client(base_url=service.url, timeout=30) as client:
        broken = client.post(
            "/predict", content=b'{"age": ', headers={"content-type": "application/json"}
        )
        form = client.post("/predict", content=b"age=3")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    assert form.status_code == 415 and "application/json" in form.json()["error"]


def _ask(client_for, records, expected, row: int) -> int:
    reply = client_for().post("/predict", json=records[row])
    if reply.status_code != 200:
        return reply.status_code
    check_answer(reply.json()["predictions"][0], expected, row)
    return 200


@pytest.mark.ray
def test_2000_requests_from_16_threads_each_get_their_own_answer(species, rows):
    service, expected = species
    records, local = rows[1], threading.local()

    def client():
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=service.url, timeout=60)
        return local.client

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: _ask(client, records, expected, i % 300), range(2000)))
    seconds = time.perf_counter() - started
    print(f"2000 requests from 16 threads in {seconds:.1f} s ({2000 / seconds:.0f}/s)")
    assert statuses == [200] * 2000


@pytest.mark.ray
def test_a_replica_killed_with_sigkill_is_replaced_and_the_service_goes_on(species, rows):
    service, expected = species
    records = rows[1]
    before = service.replicas()
    assert len(before) == 2, before
    victim = sorted(before)[0]
    outcomes: list[int | str] = []
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=service.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                try:
                    outcomes.append(_ask(lambda: client, records, expected, i % 300))
                except httpx.HTTPError as e:
                    outcomes.append(type(e).__name__)
                i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replaced = None
    while time.monotonic() - killed_at < 90:
        now = service.replicas()
        if len(now) == 2 and victim not in now:
            replaced = time.monotonic() - killed_at
            break
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    service.pids |= service.descendants()
    failed = [o for o in outcomes if o != 200]
    print(
        f"replica {victim} killed: replaced after {replaced} s; {len(outcomes)} requests "
        f"meanwhile, {len(failed)} failed ({sorted(set(map(str, failed)))})"
    )
    assert replaced is not None, service.replicas()
    # What failed failed as a server error or a broken connection, never as a wrong answer
    # (check_answer) or a client error.
    assert all(not (isinstance(o, int) and 400 <= o < 500) for o in failed), failed
    assert len(failed) < len(outcomes) / 2
    with httpx.Client(base_url=service.url, timeout=30) as client:
        after = [_ask(lambda: client, records, expected, i) for i in range(100)]
    assert after == [200] * 100


@pytest.mark.ray
def test_ctrl_c_deletes_the_application_and_leaves_no_process(species):
    service, _ = species
    service.pids |= service.descendants()
    assert service.pids
    service.proc.send_signal(signal.SIGINT)
    assert service.proc.wait(timeout=90) == 130
    time.sleep(1)
    output = "".join(service.out)
    assert "interrupted; application 'species' deleted" in output, output
    left = [pid for pid in service.pids if psutil.pid_exists(pid)]
    alive = [pid for pid in left if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(psutil.Process(p).cmdline())[:80] for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(service.url + "/healthz", timeout=5)
    assert "Traceback" not in "".join(service.err)


@pytest.mark.ray
def test_a_regression_answers_in_the_targets_units_with_autoscaling(tabular_run, rows, tmp_path):
    _, trained = tabular_run("target")
    expected = predicted(trained.run_dir, rows[0], tmp_path / "out")
    service = Service(str(trained.run_dir), "--autoscale", "1-2")
    try:
        service.wait_until_serving()
        assert any("1-2 (autoscaled)" in line for line in service.out)
        with httpx.Client(base_url=service.url, timeout=30) as client:
            reply = client.post("/predict", json=rows[1][:50])
            about = client.get("/").json()
    finally:
        code = service.stop()
    assert code == 130
    assert reply.status_code == 200, reply.text
    got = np.array([a["prediction"] for a in reply.json()["predictions"]])
    want = np.array(expected["prediction"].to_pylist()[:50])
    assert np.abs(got - want).max() < 1e-6 * max(1.0, np.abs(want).max())
    assert about["task"] == "regression" and about["classes"] is None
    assert all("probabilities" not in a for a in reply.json()["predictions"])


# ---- without Ray -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A checkpoint as training writes it (a fresh model, no run), for the flag checks."""
    where = tmp_path_factory.mktemp("serve-ck") / "checkpoint_epoch_000001"
    save_checkpoint(where)
    return where


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--autoscale", "3-1"], "--autoscale '3-1': expected MIN-MAX"),
        (["--replicas", "0"], "'0' must be at least 1"),
        (["--max-batch-size", "0"], "'0' must be at least 1"),
        (["--detach"], "--detach leaves the application on a cluster"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms -1: must be 0 or more"),
        (["--route-prefix", "api"], "must start with '/'"),
        (["--checkpoint", "3"], "is a checkpoint already"),
    ],
)
def test_bad_flags_are_one_line_before_ray_starts(checkpoint_dir, flags, words, capsys):
    with pytest.raises(SystemExit) if "at least 1" in words else contextlib.nullcontext():
        assert cli.main(["serve", str(checkpoint_dir), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raytrain: error: "), err
    assert words in err, err


def test_a_port_in_use_is_one_line(checkpoint_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_module("raytrain", "serve", str(checkpoint_dir), "--port", str(port))
    line = one_error_line(proc)
    assert f"--port {port}: cannot listen there" in line, line


def test_print_config_is_a_serve_config_whose_application_builds(checkpoint_dir):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from raytrain.inference import serving

    proc = run_module(
        "raytrain",
        "serve",
        str(checkpoint_dir),
        "--print-config",
        "--autoscale",
        "2-6",
        "--max-batch-size",
        "64",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "is a local path" in proc.stderr  # the note about nodes that must see it
    document = yaml.safe_load(proc.stdout)
    schema = ServeDeploySchema.model_validate(document)
    (application,) = schema.applications
    assert application.import_path == "raytrain.inference.serving:app"
    assert application.deployments[0].autoscaling_config["max_replicas"] == 6
    options = serving.Options(**application.args)
    assert options.max_batch_size == 64 and options.checkpoint == str(checkpoint_dir)
    assert isinstance(serving.app(application.args), Application)


def test_the_rayservice_example_holds_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((ROOT / "configs" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = ServeDeploySchema.model_validate(serve_config).applications
    assert application.import_path == "raytrain.inference.serving:app"
    assert application.args["checkpoint"].startswith("s3://")
    json.dumps(serve_config)  # plain data only
