"""The embedded Ray a default run starts listens on every interface (Ray lets only the dashboard,
which it does not start, bind to loopback): token auth is what keeps others out. A client on this
machine's non-loopback address without the run's token is refused; the same client with it gets in
(so the refusal is the token's doing); the run's token is its own, never written to disk, and on
even when the environment says ``RAY_AUTH_MODE=disabled``."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray  # noqa: F401 - puts Ray's own psutil on the path

from .test_recovery import process_tree, start_cli, wait_for_epochs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CLIENT = """
import ray
ray.init(address={address!r}, logging_config=ray.LoggingConfig(log_level="ERROR"))
print("ran a task:", ray.get(ray.remote(num_cpus=0)(lambda: 41 + 1).remote(), timeout=60))
"""


def outward_address() -> str:
    """This machine's address on its default route (not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the route
        address = s.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address")
    return address


def gcs_server(driver: int):
    """The GCS server process of a raytrain driver's embedded Ray."""
    import psutil  # Ray's own (ray/thirdparty_files), on the path since ray was imported

    for pid in process_tree(driver):
        process = psutil.Process(pid)
        if process.name() == "gcs_server":
            return process
    raise AssertionError("the run's GCS server was not found")


def gcs_port(driver: int) -> int:
    """The port the GCS server of a raytrain driver's embedded Ray listens on."""
    listening = gcs_server(driver).net_connections("tcp")
    (port,) = {c.laddr.port for c in listening if c.status == "LISTEN"}
    return port


def environ_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def client(address: str, home: Path, token: str | None) -> subprocess.Popen:
    """A Python process that knows nothing of the run: another HOME, no RAY_* settings but how
    often it retries."""
    # Ray's own patience with a GCS that does not let it in: 5 tries of the session's name
    # instead of 20 (a second each), so a refused client gives up in seconds; it has nothing to
    # do with the token.
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "RAY_NUM_REDIS_GET_RETRIES": "5"}
    if token is not None:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT.format(address=address)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def outcome(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_an_outside_client_without_the_runs_token_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    storage = tmp_path / "runs"
    run = start_cli(
        "--workers",
        "2",
        "--epochs",
        "5000",  # far more than it will train: it is stopped below
        "--storage-path",
        str(storage),
        "--name",
        "open",
        env={"HOME": str(home), "RAY_AUTH_MODE": "disabled"},  # ignored by the embedded Ray
    )
    try:
        wait_for_epochs(storage / "open", 1, run)
        address = f"{outward_address()}:{gcs_port(run.pid)}"
        outsider = tmp_path / "outsider"
        outsider.mkdir()

        # The token raytrain gave its Ray: in the environment of the processes Ray started.
        token = environ_of(gcs_server(run.pid).pid)["RAY_AUTH_TOKEN"]
        # Together: a refused client takes Ray's ~20 s of retries to give up.
        tries = [client(address, outsider, t) for t in (None, "0" * 64, token)]
        (code, out, err), (wrong_code, wrong_out, _), (_, admitted, why) = map(outcome, tries)
        assert code != 0 and "ran a task" not in out, out
        assert re.search(r"[Aa]uthentication|Failed to connect", err), err
        assert wrong_code != 0 and "ran a task" not in wrong_out, wrong_out
        assert "ran a task: 42" in admitted, admitted + why
    finally:
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 130, out
    assert not (home / ".ray" / "auth_token").exists(), "the run's token was written to disk"
    assert not (outsider / ".ray" / "auth_token").exists()
