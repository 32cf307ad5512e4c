"""The driver's part of a run: build the TorchTrainer, fit(), then validate the final checkpoint
on the driver, on rows no worker trained on."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raytrain import checkpoint
from raytrain.cluster import Plan
from raytrain.config import Config
from raytrain.data import Datasets, build_datasets
from raytrain.errors import UserError
from raytrain.evaluate import evaluate
from raytrain.metrics import Follower, read_metrics
from raytrain.model import build_model
from raytrain.report import Console, write_report, write_results
from raytrain.worker import LoopArgs, train_loop_per_worker

_VAL_BATCH = 4096


def build_trainer(
    cfg: Config,
    plan: Plan,
    datasets: Datasets,
    run_dir: Path,
    fail_at: tuple[int, int] | None = None,
) -> TorchTrainer:
    """The TorchTrainer for this run: CPU-only workers, DDP over gloo, results under run_dir.

    Running it again with the same run_dir resumes from the run's latest checkpoint.
    """
    args = LoopArgs(
        config=cfg,
        threads=plan.threads,
        features=datasets.features,
        classes=datasets.classes,
        run_dir=str(run_dir),
        fail_at=fail_at,
        ingest=datasets.ingest,
        blocks=datasets.blocks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
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
            logging_config=ray.train.LoggingConfig("INFO" if cfg.run.verbose else "ERROR"),
        ),
        # In memory, every worker fetches the training split's blocks once (LoopArgs.blocks) and
        # trains on its own rows of each global batch (see worker.py); streamed, Ray Train hands
        # each worker an equal shard of the Ray Dataset.
        datasets={"train": datasets.train} if datasets.ingest == "stream" else None,
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """trainer.fit() in a helper thread, so that Ctrl-C and SIGTERM reach raytrain's main thread
    (Ray installs a SIGINT handler of its own when fit() runs on the main thread)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed over to the main thread below
            outcome["error"] = e

    thread = threading.Thread(target=target, name="raytrain-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def placement(run_dir: Path) -> list[dict[str, Any]]:
    """Where each worker rank ran in the last epoch: node id and IP."""
    rows = read_metrics(run_dir)
    if not rows:
        return []
    return [
        {"rank": w["rank"], "node_id": w["node_id"], "node_ip": w.get("node_ip")}
        for w in sorted(rows[-1]["workers"], key=lambda w: w["rank"])
    ]


def run(
    cfg: Config,
    plan: Plan,
    run_dir: Path,
    console: Console,
    fail_at: tuple[int, int] | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Train (or continue training), validate on the driver, write results.json (and the report
    with its plots, unless ``report`` is off)."""
    started = time.perf_counter()
    datasets = build_datasets(cfg.data, plan.workers)
    prepared = time.perf_counter()
    console.line(
        f"{'data':>7}  {datasets.source}; {datasets.features} features, {datasets.classes} "
        f"classes; {datasets.train_rows:,} train / {datasets.val_rows:,} held-out rows"
    )
    if datasets.ingest == "stream" and cfg.train.batch_size % plan.workers:
        raise UserError(
            f"train.batch_size = {cfg.train.batch_size} must divide by {plan.workers} workers when "
            "the data is streamed (each worker takes an equal share of every step)"
        )
    trainer = build_trainer(cfg, plan, datasets, run_dir, fail_at)
    fit_started = time.time()
    # The Follower stops first (its last poll still reaches the progress bar), then the bar goes,
    # also on Ctrl-C or a failure, so that what main prints lands on a clean terminal.
    with console.training(cfg.train.epochs), Follower(
        run_dir, lambda row: console.epoch(row, cfg.train.epochs)
    ):
        result = fit(trainer)
    fit_ended = time.time()
    trained = time.perf_counter()

    with result.checkpoint.as_directory() as directory:
        state = checkpoint.load(directory)
    model = build_model(cfg.model, datasets.features, datasets.classes)
    model.load_state_dict(state["model"])
    validation = evaluate(
        model,
        datasets.val.iter_torch_batches(batch_size=_VAL_BATCH, prefetch_batches=0),
        datasets.classes,
    )
    validation["validated_by"] = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    console.validation(validation)
    validated = time.perf_counter()

    results = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "checkpoint": result.checkpoint.path,
        "epochs": state["epoch"],
        "train": state["meta"]["metrics"],
        "validation": validation,
        "workers": plan.workers_text,
        "placement": placement(run_dir),
        "cpus_per_worker": plan.cpus_per_worker,
        "threads_per_worker": plan.threads,
        "wall_time_s": {
            "train": trained - started,
            "total": time.perf_counter() - started,
        },
        "phases": phases(
            read_metrics(run_dir),
            ray_start=plan.ray_start_s,
            data_preparation=prepared - started,
            fit_window=(fit_started, fit_ended),
            validation=validated - trained,
        ),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": cfg.to_dict(),
    }
    write_results(run_dir, results)
    if report:
        png, html = write_report(run_dir)
        console.line(f"{'report':>7}  {html} ({png.name} beside it)")
    return results


def phases(
    rows: list[dict[str, Any]],
    ray_start: float,
    data_preparation: float,
    fit_window: tuple[float, float],
    validation: float,
) -> dict[str, float]:
    """Seconds per phase of this run, measured: starting or joining Ray; building the datasets on
    the driver; starting the worker processes (until the slowest entered the training loop);
    defining the model and optimizer; wrapping it in DDP; each worker's copy of its data; training
    until the last epoch's row was written; teardown until fit() returned; validation on the
    driver."""
    fit_started, fit_ended = fit_window
    mine = [row for row in rows if row["time"] >= fit_started]  # a resumed run's epochs only
    if not mine:
        return {"ray_start": ray_start, "data_preparation": data_preparation,
                "validation": validation}  # fmt: skip
    workers = mine[0]["workers"]
    first_epoch = min(w["started_at"] for w in workers)
    loop_start, model_built, model_ready, data_ready = (
        max(w.get(key, first_epoch) for w in workers)
        for key in ("loop_start", "model_built", "model_ready", "data_ready")
    )
    last_epoch = mine[-1]["time"]
    return {
        "ray_start": ray_start,
        "data_preparation": data_preparation,
        "worker_startup": loop_start - fit_started,
        # Includes the optimizer, whose first construction imports torch._dynamo (~1.3 s CPU).
        "model_definition": model_built - loop_start,
        "ddp_setup": model_ready - model_built,
        "worker_data_copy": data_ready - model_ready,
        "training": last_epoch - first_epoch,
        "teardown": fit_ended - last_epoch,
        "validation": validation,
    }
