"""One embedded Ray for the whole test session, and helpers that run real trainings on it.

Tests that start Ray in any way carry the ``ray`` marker: ``scripts/test -m "not ray"`` runs the
rest in about a minute. Tests that train or start a cluster carry ``slow`` as well, marked
here when they use a fixture that trains (``SLOW_FIXTURES``) and by hand when they train in a
process of their own: ``scripts/test -m "not slow"`` runs the rest in a few minutes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrain import cluster, config, runs
from raytrain.report.console import Console
from raytrain.train import checkpoint, driver

ROOT = Path(__file__).resolve().parent.parent
# Fixtures that train a model or start a cluster: a test that uses one is slow.
SLOW_FIXTURES = {"train", "ray_cluster", "cluster", "swept", "run", "two_epoch_run", "tabular_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, never joining an outside cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``raytrain: error:`` line of a command that failed on bad input."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raytrain: error: "), proc.stderr
    return lines[0]


def submit_job(dashboard_url: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``python -m raytrain.main ARGS`` with this checkout as working dir."""
    submit = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        f"--address={dashboard_url}",
        f"--working-dir={ROOT}",
        "--",
        "python",
        "-m",
        "raytrain.main",
        *args,
    ]
    for _ in range(10):
        proc = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=300)
        # Ray's own answer while the head's job agent is still starting: "try again later".
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    return proc


@pytest.fixture(scope="session")
def ray_session():
    """A private Ray with 4 logical CPUs (this machine has 2 cores), shut down at the end."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    cluster.init_ray(address=None, num_cpus=4, verbose=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow tracking server for the session (tests/mlflowserver.py): the tracked run and
    the tracked sweep log to experiments of their own in it."""
    from tests.mlflowserver import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


class Trained:
    """What one real training run left behind."""

    def __init__(self, cfg: config.Config, results: dict, console_text: str):
        self.cfg = cfg
        self.results = results
        self.console = console_text
        self.run_dir = Path(results["run_dir"])
        self.metrics = runs.read_metrics(self.run_dir)
        # The weights training ended with (the best checkpoint is results["checkpoint"]).
        self.state = checkpoint.load(results["latest_checkpoint"])


@pytest.fixture(scope="session")
def train(ray_session, tmp_path_factory):
    """train(*overrides) runs raytrain in-process on the session's Ray, with --set overrides."""

    def run(
        *overrides: str,
        cores: int = 2,
        fail_at: tuple[int, int] | None = None,
        report: bool = False,
        storage: Path | None = None,
        config_file: Path | None = None,
    ) -> Trained:
        storage = storage or tmp_path_factory.mktemp("runs")
        flags = {"run.storage_path": str(storage)}
        cfg = config.load(config_file, overrides=list(overrides), flags=flags)
        plan = cluster.plan_embedded(cfg, cores)
        run_dir = runs.claim(cfg)
        runs.save_config(run_dir, cfg)
        out = io.StringIO()
        results = driver.run(cfg, plan, run_dir, Console(out), fail_at, report=report)
        return Trained(cfg, results, out.getvalue())

    return run


@pytest.fixture(scope="session")
def two_epoch_run(train):
    """2 workers, 2 epochs, a checkpoint each, with its report: trained once for the tests that
    read a finished run (its report, resuming it, damaged copies of its checkpoint)."""
    return train("scaling.workers=2", "train.epochs=2", "train.checkpoint_every=1", report=True)


@pytest.fixture(scope="session")
def tabular_run(train, tmp_path_factory):
    """tabular_run(label): configs/tabular.yaml on tests/tabular.py's mixed data, given only the
    path and the label, trained once per session (the tabular and the serving tests share it):
    (data directory, Trained)."""
    from tests.tabular import write_mixed

    storage = tmp_path_factory.mktemp("tabular-runs")
    found: dict[str, tuple[Path, Trained]] = {}

    def get(label: str) -> tuple[Path, Trained]:
        if label not in found:
            path = write_mixed(tmp_path_factory.mktemp("mixed") / label, label)
            trained = train(
                f"data.path={path}",
                f"data.label_column={label}",
                "scaling.workers=2",
                f"run.name={label}",
                storage=storage,
                config_file=ROOT / "configs" / "tabular.yaml",
            )
            found[label] = (path, trained)
        return found[label]

    return get


def predict_here(*argv: str, cores: int = 2):
    """``raytrain predict ARGV`` on the session's Ray: the command's checks, then its run."""
    from raytrain import cli
    from raytrain.commands import predict

    args = cli.build_parser().parse_args(["predict", *argv])
    checked = predict.prepare(args)
    cfg = predict.cluster_config(args, args.data, str(checked[2].parent))
    out = io.StringIO()
    manifest, metrics = predict.execute(
        args, checked, cluster.plan_embedded(cfg, cores), Console(out)
    )
    return manifest, metrics, out.getvalue()


def save_checkpoint(
    directory,
    model_name: str = "simple",
    features: int = 10,
    classes: int = 2,
    scaling=None,
    **fields,
):
    """A checkpoint as rank 0 writes it (raytrain.train.checkpoint.save) of a freshly built,
    seeded model: for the tests of what uses checkpoints (predict, export) without a training
    run. ``scaling``: a Scaling or None; ``fields``: more model.* settings."""
    import torch

    from raytrain.model import build_model

    flags = {"model.name": model_name, **{f"model.{k}": v for k, v in fields.items()}}
    cfg = config.load(flags=flags)
    torch.manual_seed(1)
    model = build_model(cfg.model, features, classes)
    checkpoint.save(
        directory,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        epoch=1,
        config=cfg.to_dict(),
        metrics={"epoch": 1},
        scaling=scaling.to_dict() if scaling is not None else None,
        shape={"features": features, "classes": classes},
    )
    return model.eval()
