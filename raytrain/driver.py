"""The driver's part of a run: build the TorchTrainer, fit(), then validate the final checkpoint
on the driver, on rows no worker trained on."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raytrain import checkpoint
from raytrain.cluster import Plan
from raytrain.config import Config, ConfigError
from raytrain.data import Datasets, build_datasets
from raytrain.evaluate import evaluate
from raytrain.model import build_model
from raytrain.report import Console, Follower, MetricsLog, write_results
from raytrain.worker import LoopArgs, train_loop_per_worker

_VAL_BATCH = 4096


def new_run_name() -> str:
    """A fresh, sortable run name: run-YYYYmmdd-HHMMSS-xxxx."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def claim_run_dir(cfg: Config) -> Path:
    """Create the run's directory under the storage path; ConfigError if that cannot be done.

    An existing run is never reused silently: a name that exists already is an error.
    """
    storage = Path(cfg.run.storage_path).expanduser().resolve()
    name = cfg.run.name or new_run_name()
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"run.storage_path {str(storage)!r} cannot be created ({e.strerror}); "
            "choose a writable directory with --storage-path"
        ) from None
    if not storage.is_dir() or not os.access(storage, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run.storage_path {str(storage)!r} is not a writable directory; "
            "choose a writable directory with --storage-path"
        )
    run_dir = storage / name
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise ConfigError(
            f"run {name!r} already exists in {str(storage)!r}; choose another --name "
            "(or leave it out for a fresh one)"
        ) from None
    return run_dir


def build_trainer(cfg: Config, plan: Plan, datasets: Datasets, run_dir: Path) -> TorchTrainer:
    """The TorchTrainer for this run: CPU-only workers, DDP over gloo, results under run_dir."""
    args = LoopArgs(
        config=cfg, threads=plan.threads, features=datasets.features, classes=datasets.classes
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers,
            use_gpu=False,
            resources_per_worker={"CPU": plan.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures,
                # The controller's own retries are unlimited by default: a request that can
                # never be placed would retry forever.
                controller_failure_limit=1,
            ),
            callbacks=[MetricsLog(str(run_dir))],
            logging_config=ray.train.LoggingConfig("INFO" if cfg.run.verbose else "ERROR"),
        ),
        datasets={"train": datasets.train},
        # Every worker reads the whole (small) training split once and trains on its own rows of
        # each global batch; see worker.py for the rule.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def run(cfg: Config, plan: Plan, run_dir: Path, console: Console) -> dict[str, Any]:
    """Train, validate on the driver, write results.json; returns the results."""
    started = time.perf_counter()
    datasets = build_datasets(cfg.data)
    trainer = build_trainer(cfg, plan, datasets, run_dir)
    with Follower(run_dir, lambda row: console.epoch(row, cfg.train.epochs)):
        result = trainer.fit()
    trained = time.perf_counter()

    with result.checkpoint.as_directory() as directory:
        state = checkpoint.load(directory)
    model = build_model(cfg.model, datasets.features, datasets.classes)
    model.load_state_dict(state["model"])
    validation = evaluate(
        model, datasets.val.iter_torch_batches(batch_size=_VAL_BATCH), datasets.classes
    )
    console.validation(validation)

    results = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "checkpoint": result.checkpoint.path,
        "epochs": state["epoch"],
        "train": state["meta"]["metrics"],
        "validation": validation,
        "workers": plan.workers,
        "cpus_per_worker": plan.cpus_per_worker,
        "threads_per_worker": plan.threads,
        "wall_time_s": {
            "train": trained - started,
            "total": time.perf_counter() - started,
        },
        "config": cfg.to_dict(),
    }
    write_results(run_dir, results)
    return results
