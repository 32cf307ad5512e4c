"""The commands users type: `raytrain` with its subcommands, and `python -m raytrain.main`, the
tutorial's entry point, each run as a subprocess with its own embedded Ray where it trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raytrain import config, runs
from raytrain.commands import args as cli_args
from raytrain.commands import train as train_command

from .conftest import ROOT, one_error_line, run_module

RAYTRAIN = str(Path(sys.executable).parent / "raytrain")  # the console script pip installed


@pytest.mark.ray
@pytest.mark.slow
def test_four_workers_on_two_cores(tmp_path):
    proc = run_module(
        "raytrain.main", "--workers", "4", "--epochs", "2", "--storage-path", str(tmp_path)
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("validation  acc") for line in lines), out
    assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["1/2", "2/2"]
    cores = os.cpu_count()
    shared = f"4 workers on {cores} cores: each worker gets {cores / 4:g} CPU"
    assert (shared in proc.stdout) == (cores < 4), proc.stdout

    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / runs.checkpoint_name(2) / "state.pt").is_file()
    history = runs.read_metrics(run_dir)
    assert [row["epoch"] for row in history] == [1, 2]
    assert len(history[-1]["workers"]) == 4
    results = json.loads((run_dir / "results.json").read_text())
    assert Path(results["checkpoint"]) == run_dir / runs.checkpoint_name(2)
    assert results["validation"]["rows"] == 200
    # One node: what the all-reduce costs is kept, but no verdict on a network is printed.
    network = results["communication"]
    assert network["gradient_mb"] == pytest.approx(88 / 1e6), network  # Linear(10, 2), float32
    assert 0 <= network["share"] <= 1 and network["step_ms"] > 0, network
    assert not any(line.lstrip().startswith("network") for line in lines), out


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_range_starts_with_what_the_machine_holds(tmp_path):
    """--workers 2-4 on an embedded Ray sized to this machine's cores (plus one CPU for reading
    data): Ray Train starts as many one-CPU workers as fit, at least 2 and at most 4."""
    proc = run_module(
        "raytrain.main",
        "--workers",
        "2-4",
        "--epochs",
        "2",
        "--storage-path",
        str(tmp_path),
        "--name",
        "elastic",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "workers  2-4 (elastic) x 1 CPU" in proc.stdout, proc.stdout
    results = json.loads((tmp_path / "elastic" / "results.json").read_text())
    expected = max(2, min(4, os.cpu_count() + 1))
    assert len(results["placement"]) == expected, results["placement"]
    rows = runs.read_metrics(tmp_path / "elastic")
    assert [len(row["workers"]) for row in rows] == [expected, expected]
    assert all(row["rows"] == 800 for row in rows)  # every training row, whatever the count
    assert results["workers"] == "2-4 (elastic)"


def test_raytrain_lists_its_subcommands():
    for command in ([RAYTRAIN, "--help"], [sys.executable, "-m", "raytrain", "--help"]):
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        for sub in ("train", "data", "report", "runs"):
            assert f"    {sub} " in proc.stdout, proc.stdout


def test_main_module_takes_the_train_commands_flags():
    main_help = run_module("raytrain.main", "--help", timeout=60).stdout
    train_help = run_module("raytrain", "train", "--help", timeout=60).stdout
    assert main_help.startswith("usage: python -m raytrain.main [options]")
    assert train_help.startswith("usage: raytrain train [options]")
    assert main_help.split("\n", 1)[1] == train_help.split("\n", 1)[1]


def test_every_config_field_has_a_flag_and_short_flags_come_from_the_schema():
    parser = train_command.build_parser("raytrain train")

    def leaves(prefix, model):
        for name, field in model.model_fields.items():
            if hasattr(field.annotation, "model_fields"):
                yield from leaves(f"{prefix}{name}.", field.annotation)
            else:
                yield f"{prefix}{name}"

    for dotted in leaves("", config.Config):
        flags = cli_args.config_flags(parser.parse_args([f"--{dotted}", "7"]))
        assert flags == {dotted: config.parse_value("7", dotted)}, dotted
    shorts = {
        "--workers": "scaling.workers",
        "--epochs": "train.epochs",
        "--lr": "train.lr",
        "--batch-size": "train.batch_size",
        "--seed": "train.seed",
        "--name": "run.name",
        "--storage-path": "run.storage_path",
        "--address": "run.address",
    }
    for flag, dotted in shorts.items():
        assert getattr(parser.parse_args([flag, "3"]), dotted) == "3", flag
    assert getattr(parser.parse_args(["--verbose"]), "run.verbose") is True


def test_flags_win_over_set_and_keep_text_fields_as_text():
    args = train_command.build_parser("t").parse_args(
        [
            "--set",
            "train.lr=0.5",
            "--lr",
            "0.25",
            "--name",
            "2024",
            "--model.hidden",
            "[8, 8]",
            "--workers",
            "2-3",
            "--train.shuffle",
            "false",
        ]
    )
    cfg = config.load(None, args.set, cli_args.config_flags(args))
    assert cfg.train.lr == 0.25 and cfg.run.name == "2024" and cfg.model.hidden == (8, 8)
    assert (cfg.scaling.min_workers, cfg.scaling.workers) == (2, 3)
    assert cfg.train.shuffle is False


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["data", "generate", "--rows", "ten", "--out", "x"], "'ten' is not a whole number"),
        (["data", "generate", "--rows", "0", "--out", "x"], "'0' must be at least 1"),
        (["data", "generate", "--rows", "5", "--out", "x", "--classes", "1"], "data.classes"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["report"], "the following arguments are required: RUN_DIR"),
    ],
)
def test_usage_errors_are_one_line(argv, needle, tmp_path):
    proc = subprocess.run(
        [RAYTRAIN, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    line = one_error_line(proc)
    assert needle in line, line
