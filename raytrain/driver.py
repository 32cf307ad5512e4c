"""The driver's part of a run: build the datasets and the TorchTrainer, fit() while the console
follows the metrics, validate the final checkpoint on rows no worker trained on, write results."""

from __future__ import annotations

import math
import os
import resource
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raytrain import runs
from raytrain.cluster import Plan
from raytrain.config import Config
from raytrain.data.datasets import Datasets, build_datasets
from raytrain.data.scaling import Scaling
from raytrain.data.tables import FEATURES, LABEL
from raytrain.errors import TrainingStopped, UserError
from raytrain.evaluate import evaluate
from raytrain.model import build_model
from raytrain.report.console import Console
from raytrain.report.page import write_report
from raytrain.train import checkpoint
from raytrain.train.loop import LoopArgs, train_loop_per_worker
from raytrain.train.stopping import mode_of

_VAL_BATCH = 4096


def build_trainer(
    cfg: Config,
    plan: Plan,
    datasets: Datasets,
    run_dir: Path,
    fail_at: tuple[int, int] | None,
    session: str,
) -> TorchTrainer:
    """The TorchTrainer for this run: CPU-only workers, DDP over gloo, results under run_dir;
    ``session`` names this driver's attempt in metrics.jsonl.

    Running it again with the same run_dir resumes from the run's latest checkpoint.
    """
    args = LoopArgs(
        config=cfg,
        threads=plan.threads,
        features=datasets.features,
        classes=datasets.classes,
        run_dir=str(run_dir),
        session=session,
        fail_at=fail_at,
        ingest=datasets.ingest,
        blocks=datasets.blocks,
        val_blocks=datasets.val_blocks,
        scaling=datasets.scaling,
    )
    metric = cfg.run.checkpoint_metric
    streamed = datasets.ingest == "stream"
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
            # The best checkpoints by the metric; Ray Train always keeps the latest one too.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode_of(metric),
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures,
                # The controller's own retries are unlimited by default: a request that can
                # never be placed would retry forever.
                controller_failure_limit=1,
            ),
            logging_config=ray.train.LoggingConfig("INFO" if cfg.run.verbose else "ERROR"),
        ),
        # In memory, every worker fetches the splits' blocks once (LoopArgs) and trains on its
        # own rows of each global batch (raytrain.train.loop); streamed, Ray Train hands each
        # worker an equal shard of the training Dataset and a share of the validation one.
        datasets={"train": datasets.train, "val": datasets.val} if streamed else None,
        dataset_config=IngestConfig() if streamed else None,
    )


class IngestConfig(ray.train.DataConfig):
    """Ray Train's data config, but the validation split is shared out without dropping a row
    (training shards stay equal, so that every worker takes the same number of steps)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if set(datasets) != {"val"}:
            return super().configure(
                datasets, world_size, worker_handles, worker_node_ids, **kwargs
            )
        splits = datasets["val"].streaming_split(world_size, equal=False)
        return [{"val": split} for split in splits]


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


def check_streamed_batch(cfg: Config, plan: Plan) -> None:
    """Streamed, every worker takes an equal local batch of every step: the global batch must
    divide by every worker count the run may have (any in an elastic range)."""
    counts = range(plan.min_workers or plan.workers, plan.workers + 1)
    uneven = [n for n in counts if cfg.train.batch_size % n]
    if not uneven:
        return
    fits = math.lcm(*counts)
    which = f"{uneven[0]} workers"
    if len(counts) > 1:
        which = (
            f"{', '.join(map(str, uneven))} workers (the elastic range is {counts[0]}-{counts[-1]})"
        )
    raise UserError(
        f"train.batch_size = {cfg.train.batch_size} cannot be dealt out equally to {which} "
        f"when the data is streamed; use a multiple of {fits}, a fixed --workers, or "
        "data.ingest=memory"
    )


def early_stop_line(cfg: Config, row: dict[str, Any]) -> str:
    """What the console says when early stopping ended the run."""
    stopped, metric = row["stopped_early"], cfg.run.checkpoint_metric
    patience, delta = cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta
    return (
        f"stopped early after epoch {row['epoch']}: {metric} has not improved by more than "
        f"{delta:g} for {patience} validation(s); the best, {stopped['best']:.4f}, was at epoch "
        f"{stopped['best_epoch']}"
    )


def stop_if_not_finite(rows: list[dict[str, Any]]) -> None:
    """TrainingStopped if the last epoch's loss became NaN or infinite (the workers stopped)."""
    if rows and "nonfinite_step" in rows[-1]:
        row = rows[-1]
        raise TrainingStopped(
            f"the loss became NaN or infinite in epoch {row['epoch']} at step "
            f"{row['nonfinite_step']} (learning rate {row['lr']:g}); try a lower --lr, "
            "--set train.grad_clip=1.0, or features on a common scale"
        )


def placement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each worker rank ran in the last epoch: node id and IP."""
    if not rows:
        return []
    return [
        {"rank": w["rank"], "node_id": w["node_id"], "node_ip": w.get("node_ip")}
        for w in sorted(rows[-1]["workers"], key=lambda w: w["rank"])
    ]


def best_checkpoint(result: ray.train.Result, cfg: Config) -> dict[str, Any]:
    """Among the checkpoints Ray Train kept, the best by ``run.checkpoint_metric``: its epoch,
    path, the metric's value and why it was chosen."""
    metric = cfg.run.checkpoint_metric
    sign = 1 if mode_of(metric) == "min" else -1
    kept = [(c, m) for c, m in result.best_checkpoints or [] if m.get(metric) is not None]
    if not kept:
        latest = result.checkpoint
        return {
            "checkpoint": latest.path,
            "epoch": None,
            "metric": metric,
            "value": None,
            "why": f"the latest checkpoint: none of them has {metric}",
        }
    chosen, metrics = min(kept, key=lambda cm: (sign * cm[1][metric], cm[1]["epoch"]))
    word = "lowest" if sign == 1 else "highest"
    return {
        "checkpoint": chosen.path,
        "epoch": metrics["epoch"],
        "metric": metric,
        "value": metrics[metric],
        "why": f"the {word} {metric} of the {len(kept)} "
        "checkpoints kept (train.checkpoints_to_keep best, and the latest)",
    }


def validate(datasets: Datasets, model, scaling: Scaling | None) -> dict[str, Any]:
    """The model's validation on all held-out rows, on the driver."""
    scale = scaling.apply if scaling is not None else (lambda x: x)
    batches = (
        (scale(b[FEATURES]), b[LABEL])
        for b in datasets.val.iter_torch_batches(batch_size=_VAL_BATCH, prefetch_batches=0)
    )
    validation = evaluate(model, batches, datasets.classes)
    validation["validated_by"] = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    return validation


def load_model(cfg: Config, datasets: Datasets, checkpoint_dir: str):
    """The model of a checkpoint, its feature scaling and its state."""
    state = checkpoint.load(checkpoint_dir)
    model = build_model(cfg.model, datasets.features, datasets.classes)
    model.load_state_dict(state["model"])
    scaling = Scaling(**state["scaling"]) if state.get("scaling") else None
    return model, scaling, state


def train(
    cfg: Config,
    plan: Plan,
    datasets: Datasets,
    run_dir: Path,
    console: Console,
    fail_at: tuple[int, int] | None,
) -> ray.train.Result:
    """fit() a fresh TorchTrainer of this session while the console follows the metrics."""
    session = secrets.token_hex(4)
    trainer = build_trainer(cfg, plan, datasets, run_dir, fail_at, session)
    # The Follower stops first (its last poll still reaches the progress bar), then the bar goes,
    # also on Ctrl-C or a failure, so that what main prints lands on a clean terminal.
    with console.training(cfg.train.epochs, session), runs.Follower(run_dir, console.show):
        return fit(trainer)


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
    datasets = build_datasets(cfg.data, plan.workers, plan.copies_per_node)
    prepared = time.perf_counter()
    console.line(
        f"{'data':>7}  {datasets.source}; {datasets.features} features, "
        f"{datasets.classes} classes; {datasets.train_rows:,} train / "
        f"{datasets.val_rows:,} held-out rows"
    )
    if datasets.ingest == "stream":
        check_streamed_batch(cfg, plan)
    fit_started = time.time()
    result = train(cfg, plan, datasets, run_dir, console, fail_at)
    stop_if_not_finite(runs.read_metrics(run_dir))
    fit_ended = time.time()
    trained = time.perf_counter()
    rows = runs.read_metrics(run_dir)
    stopped = rows[-1].get("stopped_early") if rows else None
    if stopped:
        console.line(early_stop_line(cfg, rows[-1]))
    best = best_checkpoint(result, cfg)
    model, scaling, state = load_model(cfg, datasets, best["checkpoint"])
    validation = validate(datasets, model, scaling)
    console.validation(validation, best)
    validated = time.perf_counter()

    results = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "checkpoint": best["checkpoint"],
        "latest_checkpoint": result.checkpoint.path,
        "best": best,
        "stopped_early": stopped,
        "epochs": rows[-1]["epoch"] if rows else state["epoch"],
        "train": {k: v for k, v in rows[-1].items() if k not in ("workers",)} if rows else {},
        "validation": validation,
        "workers": plan.workers_text,
        "placement": placement(rows),
        "cpus_per_worker": plan.cpus_per_worker,
        "threads_per_worker": plan.threads,
        "wall_time_s": {"train": trained - started, "total": time.perf_counter() - started},
        "phases": phases(
            rows,
            ray_start=plan.ray_start_s,
            data_preparation=prepared - started,
            fit_window=(fit_started, fit_ended),
            validation=validated - trained,
        ),
        "segments": runs.history(run_dir),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": cfg.to_dict(),
    }
    runs.write_results(run_dir, results)
    if report:
        png, html = write_report(run_dir)
        console.line(f"{'report':>7}  {runs.display(html)} ({png.name} beside it)")
    return results


def phases(
    rows: list[dict[str, Any]],
    ray_start: float,
    data_preparation: float,
    fit_window: tuple[float, float],
    validation: float,
) -> dict[str, float]:
    """Seconds per phase of this run (``runs.PHASES`` says what each one covers), measured from
    the driver's clocks and the times the workers wrote into the first row of this session."""
    fit_started, fit_ended = fit_window
    mine = [row for row in rows if row["time"] >= fit_started]  # a resumed run's epochs only
    if not mine:
        return {
            "ray_start": ray_start,
            "data_preparation": data_preparation,
            "validation": validation,
        }
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
