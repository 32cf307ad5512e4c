"""A real multi-node Ray cluster on this machine: three nodes started with `ray start`, token auth
on, stopped by process id at the end. raytrain connects to it, spreads its workers over the nodes,
runs as a Ray Job, and fails fast and clearly on a wrong address, a missing token or a request the
cluster cannot hold."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from . import hosts
from .conftest import ROOT, one_error_line, submit_job

pytestmark = pytest.mark.ray
VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """`ray start --block` processes: one head and some worker nodes, each its own node."""

    def __init__(self, tmp: Path, cpus_per_node: list[int]):
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Token auth, as a production cluster has it, with a token of this test's own.
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        }
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        head, *workers = cpus_per_node
        try:
            self._start(
                "head",
                [
                    "--head",
                    f"--port={self.port}",
                    f"--temp-dir={tmp / 'ray'}",
                    "--include-dashboard=true",
                    f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1",
                ],
                head,
            )
            self._wait_for_nodes(1)
            # One at a time: on 2 cores, nodes that start together time out registering.
            for i, cpus in enumerate(workers):
                self._start(f"worker{i}", [f"--address={self.address}"], cpus)
                self._wait_for_nodes(i + 2)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str], cpus: int) -> None:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [
            f"{VENV_BIN}/ray",
            "start",
            "--block",
            f"--num-cpus={cpus}",
            "--disable-usage-stats",
            # Not the default 52365: another Ray on this host (the session's embedded one) may
            # hold it, and a node whose agent cannot listen accepts no Ray Job.
            f"--dashboard-agent-listen-port={free_port()}",
            *args,
        ]
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        script = (
            "import ray, time\n"
            f"deadline = time.time() + {timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        ray.init(address='{self.address}',\n"
            "                 logging_config=ray.LoggingConfig(log_level='ERROR'))\n"
            "        break\n"
            "    except ConnectionError:\n"
            "        assert time.time() < deadline, 'the head did not start'\n"
            "        time.sleep(1)\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    assert time.time() < deadline, 'nodes did not join'\n"
            "    time.sleep(0.5)\n"
        )
        subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            check=True,
            timeout=timeout + 30,
            capture_output=True,
        )

    def stop(self) -> None:
        # SIGTERM makes `ray start --block` stop the Ray processes it started: only ours.
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    # A short directory: Ray's Unix socket paths under it must stay within 107 bytes, which a
    # pytest tmp_path does not always leave room for.
    tmp = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp"))
    cluster = RayCluster(tmp, [1, 1, 1])
    yield cluster
    cluster.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def raytrain(cluster: RayCluster, *args: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "raytrain.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**cluster.env, **(env or {})},
        timeout=timeout,
    )


# Where hosts of their own can be built, tests/test_hosts.py trains across them as a Ray Job on
# object storage: the two trainings below would prove nothing more, and cost two minutes.
covered_by_hosts = pytest.mark.skipif(
    hosts.unavailable() is None, reason="covered by tests/test_hosts.py on hosts of their own"
)


@covered_by_hosts
def test_spread_workers_over_nodes_and_validate_on_the_driver(ray_cluster, tmp_path):
    proc = raytrain(
        ray_cluster,
        "--address",
        ray_cluster.address,
        "--workers",
        "3",
        "--epochs",
        "2",
        "--set",
        "scaling.placement_strategy=SPREAD",
        "--storage-path",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Ray cluster at {ray_cluster.address} (3 nodes)" in proc.stdout
    assert "validation  acc" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    nodes = {worker["node_id"] for worker in results["placement"]}
    assert len(results["placement"]) == 3 and len(nodes) >= 2, results["placement"]
    # The best checkpoint's validation, by the workers that wrote it, each on its own node.
    validated_by = results["validation"]["validated_by"]
    assert validated_by["workers"] == [
        {k: w[k] for k in ("rank", "node_id", "node_ip")} for w in results["placement"]
    ]
    assert results["validation"]["rows"] == 200


@covered_by_hosts
def test_submit_as_a_ray_job(ray_cluster, tmp_path):
    dashboard = f"http://127.0.0.1:{ray_cluster.dashboard_port}"
    args = ("--workers", "2", "--epochs", "2", "--storage-path", str(tmp_path))
    proc = submit_job(dashboard, ray_cluster.env, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "succeeded" in out and "validation  acc" in out, out
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "results.json").exists()


def _fails_clearly(proc: subprocess.CompletedProcess, *needles: str) -> None:
    line = one_error_line(proc)
    for needle in needles:
        assert needle in line, line


def test_unreachable_address_is_a_clear_error_in_seconds(ray_cluster, tmp_path):
    nobody = f"127.0.0.1:{free_port()}"
    proc = raytrain(ray_cluster, "--address", nobody, "--storage-path", str(tmp_path))
    _fails_clearly(proc, nobody, "cannot reach")
    assert not any(tmp_path.iterdir()), "a failed start left a run directory behind"


def test_missing_token_is_a_clear_error_in_seconds(ray_cluster, tmp_path):
    proc = raytrain(
        ray_cluster,
        "--address",
        ray_cluster.address,
        "--storage-path",
        str(tmp_path),
        env={"RAY_AUTH_MODE": "disabled"},
    )
    _fails_clearly(proc, "refused authentication", "RAY_AUTH_MODE=token")


def test_request_larger_than_the_cluster_is_a_clear_error_in_seconds(ray_cluster, tmp_path):
    proc = raytrain(
        ray_cluster,
        "--address",
        ray_cluster.address,
        "--workers",
        "5",
        "--storage-path",
        str(tmp_path),
    )
    _fails_clearly(proc, "5 workers", "= 5 CPUs", "has 3 CPUs on 3 node(s)")


def test_storage_check_that_times_out_is_one_line_and_shuts_ray_down(ray_cluster, tmp_path):
    """The check that every node sees the storage directory gives up after its timeout (here 0 s,
    so that the nodes cannot answer in time): one line, exit 2, and Ray is shut down."""
    script = (
        "import sys, ray\n"
        "from raytrain import cluster\n"
        "from raytrain.commands.train import main\n"
        "cluster._STORAGE_CHECK_TIMEOUT_S = 0\n"
        f"argv = ['--address', {ray_cluster.address!r}, '--storage-path', {str(tmp_path)!r}]\n"
        "code = main(argv)\n"
        "print('connected' if ray.is_initialized() else 'shut down')\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ray_cluster.env,
        timeout=300,
    )
    _fails_clearly(proc, "did not say within 0 s", "run.storage_path", str(tmp_path))
    assert proc.stdout.splitlines()[-1] == "shut down"


def test_a_sweep_larger_than_the_cluster_is_one_line_in_seconds(ray_cluster, tmp_path):
    """2 trials at once x (2 workers x 1 CPU + 0.5 for each trial's driver) on 3 CPUs."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "scaling: {workers: 2}\n"
        "sweep: {trials: 2, concurrent: 2, space: {train.lr: {choice: [0.01, 0.1]}}}\n"
    )
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raytrain",
            "tune",
            "--config",
            str(sweep),
            "--address",
            ray_cluster.address,
            "--storage-path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ray_cluster.env,
        timeout=120,
    )
    assert time.monotonic() - started < 60
    line = one_error_line(proc)
    assert "= 5 CPUs, but the cluster at" in line and "has 3" in line and "concurrent to 1" in line
