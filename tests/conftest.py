"""One embedded Ray for the whole test session, and helpers that run real trainings on it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from raytrain import checkpoint, cluster, config, driver, runs
from raytrain.report import Console, read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session():
    """A private Ray with 4 logical CPUs (this machine has 2 cores), shut down at the end."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    cluster.init_ray(address=None, num_cpus=4, verbose=False)
    yield
    ray.shutdown()


class Trained:
    """What one real training run left behind."""

    def __init__(self, cfg: config.Config, results: dict, console_text: str):
        self.cfg = cfg
        self.results = results
        self.console = console_text
        self.run_dir = Path(results["run_dir"])
        self.metrics = read_metrics(self.run_dir)
        self.state = checkpoint.load(results["checkpoint"])


@pytest.fixture(scope="session")
def train(ray_session, tmp_path_factory):
    """train(*overrides) runs raytrain in-process on the session's Ray, with --set overrides."""

    def run(*overrides: str, cores: int = 2, fail_at: tuple[int, int] | None = None) -> Trained:
        storage = tmp_path_factory.mktemp("runs")
        cfg = config.load(overrides=list(overrides), flags={"run.storage_path": str(storage)})
        plan = cluster.plan_embedded(cfg, cores)
        run_dir = runs.claim(cfg)
        runs.save_config(run_dir, cfg)
        out = io.StringIO()
        results = driver.run(cfg, plan, run_dir, Console(out), fail_at, report=False)
        return Trained(cfg, results, out.getvalue())

    return run
