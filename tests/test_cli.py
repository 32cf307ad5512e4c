"""The command users type, run as a subprocess with its own embedded Ray."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .conftest import run_module


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("raytrain.main", *args)


def test_four_workers_on_two_cores(tmp_path):
    proc = run_cli("--workers", "4", "--epochs", "2", "--storage-path", str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    lines = proc.stdout.splitlines()
    assert any(line.startswith("validation  acc") for line in lines), out
    assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["1/2", "2/2"]
    assert "4 workers on 2 cores" in proc.stdout or os.cpu_count() >= 4

    (run_dir,) = tmp_path.iterdir()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "state.pt").is_file()
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert len(history[-1]["workers"]) == 4
    results = json.loads((run_dir / "results.json").read_text())
    assert Path(results["checkpoint"]) == checkpoints[-1]
    assert results["validation"]["rows"] == 200
