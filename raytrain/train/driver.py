"""The driver's part of a run: build the datasets and the TorchTrainer, fit() while the console
follows the metrics, then hand over to raytrain.train.outcome for the best checkpoint's
validation and results.json."""

from __future__ import annotations

import math
import secrets
import threading
import time
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from raytrain import cluster, runs, tracking
from raytrain.cluster import Plan
from raytrain.config import Config
from raytrain.data.checks import ScanAhead, Scanned, scan_threads
from raytrain.data.datasets import Datasets, build_datasets
from raytrain.errors import UserError
from raytrain.report.console import Console
from raytrain.report.page import write_report
from raytrain.storage import Location
from raytrain.train import outcome
from raytrain.train.gloo import GlooConfig
from raytrain.train.loop import LoopArgs, train_loop_per_worker
from raytrain.train.lost_nodes import RestartOnNodesLeft
from raytrain.train.stopping import mode_of


def class_weights(cfg: Config, datasets: Datasets) -> tuple[float, ...] | None:
    """``train.class_weight: balanced``: rows / (classes x the class's training rows) per class
    (scikit-learn's rule; a class without training rows weighs 0)."""
    if cfg.train.class_weight == "none":
        return None
    counts = datasets.label_counts
    total = sum(counts)
    return tuple(total / (len(counts) * n) if n else 0.0 for n in counts)


def build_trainer(
    cfg: Config,
    plan: Plan,
    datasets: Datasets,
    run_dir: Location,
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
        run_dir=run_dir,
        session=session,
        fail_at=fail_at,
        ingest=datasets.ingest,
        blocks=datasets.blocks,
        val_blocks=datasets.val_blocks,
        scaling=datasets.scaling,
        train_pieces=datasets.train_pieces,
        val_pieces=datasets.val_pieces,
        categories=datasets.encoding.cardinalities if datasets.encoding else (),
        class_weights=class_weights(cfg, datasets),
        encoding=datasets.encoding.to_dict() if datasets.encoding else None,
        target=datasets.encoding.target if datasets.encoding else None,
    )
    # Streamed CSV: Ray Train shards the Ray Datasets. Parquet's workers read their row groups.
    streamed = datasets.ingest == "stream" and datasets.train is not None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        torch_config=GlooConfig(local_only=plan.embedded),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": plan.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=run_config(cfg, plan, run_dir),
        # In memory, every worker fetches the splits' blocks (or reads the row groups) once
        # (LoopArgs) and trains on its own rows of each global batch (raytrain.train.loop);
        # streamed CSV: Ray Train hands each worker an equal shard of the training Dataset and
        # a share of the validation one.
        datasets={"train": datasets.train, "val": datasets.val} if streamed else None,
        dataset_config=IngestConfig() if streamed else None,
    )


def run_config(cfg: Config, plan: Plan, run_dir: Location) -> ray.train.RunConfig:
    """Where the run's checkpoints go, which ones are kept, how many failures it survives and
    how much Ray Train says."""
    metric = cfg.run.checkpoint_metric
    return ray.train.RunConfig(
        name=run_dir.name,
        # An object store's path has no scheme: the filesystem object carries it (and the
        # endpoint of an S3-compatible server).
        storage_path=run_dir.parent.path,
        storage_filesystem=None if run_dir.local else run_dir.fs,
        # The best checkpoints by the metric; Ray Train always keeps the latest one too.
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.checkpoints_to_keep,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode_of(metric),
        ),
        failure_config=ray.train.FailureConfig(
            max_failures=cfg.run.max_failures,
            # The controller's own retries (a worker group that did not start) are unlimited
            # by default: a request that can never be placed would retry forever. An elastic
            # run may need one per lost node if its restart still asks for the old size
            # (raytrain.train.lost_nodes prevents that where it can).
            controller_failure_limit=1
            if plan.min_workers is None
            else max(1, cfg.run.max_failures),
        ),
        logging_config=ray.train.LoggingConfig("INFO" if cfg.run.verbose else "ERROR"),
        # An elastic run restarts on the nodes left at once, not after the start timeout.
        callbacks=[] if plan.min_workers is None else [RestartOnNodesLeft()],
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


def train(
    cfg: Config,
    plan: Plan,
    datasets: Datasets,
    run_dir: Location,
    console: Console,
    fail_at: tuple[int, int] | None,
    tracker: tracking.Tracker | None = None,
) -> ray.train.Result:
    """fit() a fresh TorchTrainer of this session while the console (and MLflow, if the run is
    tracked) follows the metrics."""
    session = secrets.token_hex(4)
    trainer = build_trainer(cfg, plan, datasets, run_dir, fail_at, session)
    follow = console.show
    if tracker is not None:

        def follow(line: dict[str, Any]) -> None:
            console.show(line)
            tracker.show(line)

    # The Follower stops first (its last poll still reaches the progress bar), then the bar goes,
    # also on Ctrl-C or a failure, so that what main prints lands on a clean terminal.
    with console.training(cfg.train.epochs, session), runs.Follower(run_dir, follow):
        return fit(trainer)


def run(
    cfg: Config,
    plan: Plan,
    run_dir: Location,
    console: Console,
    fail_at: tuple[int, int] | None = None,
    report: bool = True,
    ahead: ScanAhead | Scanned | None = None,
) -> dict[str, Any]:
    """Train (or continue training), validate the best checkpoint on the driver, write
    results.json (and the report with its plots, unless ``report`` is off). ``ahead``: the
    check of the data files, started before Ray (or a sweep's, made once for its trials)."""
    started = time.perf_counter()
    # First, so that a run that fails from here on (a sweep's trial with a model that cannot
    # be built, data that cannot be read) is in MLflow too, as FAILED, with its reason.
    tracker = tracking.start(cfg, run_dir)
    try:
        if ":" in cfg.model.name:  # a model that cannot be built fails here, not in the workers
            from raytrain.model import load_model_class

            load_model_class(cfg.model.name)
        if plan.embedded:  # its process starts while the data is prepared, not inside fit()
            cluster.start_autoscaling_coordinator()
        datasets = _prepare(cfg, plan, console, ahead)
        check_same_encoding(run_dir, datasets)
        clock = {"started": started, "prepared": time.perf_counter()}
        results = _train(cfg, plan, datasets, run_dir, console, fail_at, report, tracker, clock)
    except BaseException as e:
        if tracker is not None:
            # Ctrl-C, or the end of a sweep's trial that Tune stopped: killed, not failed.
            stopped = isinstance(e, KeyboardInterrupt | SystemExit)
            tracker.finish(None, "KILLED" if stopped else "FAILED", error=e)
        raise
    if tracker is not None:
        tracker.finish(results)
        if tracker.lost:
            console.line(f"{'mlflow':>7}  logging stopped: {tracker.lost}")
    return results


def _prepare(
    cfg: Config, plan: Plan, console: Console, ahead: ScanAhead | Scanned | None
) -> Datasets:
    """The run's datasets, said on the console."""
    datasets = build_datasets(
        cfg.data,
        plan.workers,
        plan.copies_per_node,
        scan_threads(plan.embedded),
        ahead,
        cfg.model.task,
    )
    console.line(
        f"{'data':>7}  {datasets.source}; {shape_line(cfg, datasets)}; "
        f"{datasets.train_rows:,} train / {datasets.val_rows:,} held-out rows"
    )
    if datasets.ingest == "stream":
        check_streamed_batch(cfg, plan)
    return datasets


def check_same_encoding(run_dir: Location, datasets: Datasets) -> None:
    """A resumed run must see its columns as it did: the same vocabularies, imputation values and
    classes (bit for bit) as its latest checkpoint, or the weights it resumes would read codes
    that now mean other values. UserError naming what changed otherwise."""
    from raytrain.train import checkpoint

    latest = runs.latest_checkpoint(run_dir)
    if latest is None or datasets.encoding is None:
        return
    stored = checkpoint.load_at(latest).get("encoding")
    now = datasets.encoding.to_dict()
    if stored is None or stored == now:
        return
    changed = next(k for k in now if now[k] != stored.get(k))
    raise UserError(
        f"the data's {changed} differ from those the run was trained with ({latest.name}): a "
        "resumed run must train on the same data; start a new run for new data"
    )


def shape_line(cfg: Config, datasets: Datasets) -> str:
    """What the model sees and what it learns, for the data line: the columns by type and the
    task (said as decided when model.task is auto); numeric-only data with class indexes keeps
    the short form."""
    enc = datasets.encoding
    if enc is None or (enc.plain and enc.target is None and enc.class_names is None):
        return f"{datasets.features} features, {datasets.classes} classes"
    numeric = len(enc.numeric) if len(enc.numeric) > 1 else enc.width
    columns = f"{numeric} numeric"
    if enc.indicators:
        columns += f" ({len(enc.indicators)} with missing values: imputed)"
    if enc.categorical:
        columns += f", {len(enc.categorical)} categorical"
    decided = " (model.task auto)" if cfg.model.task == "auto" else ""
    if enc.target is not None:
        mean, std = enc.target
        task = f"regression of {enc.label!r}{decided}, mean {mean:.4g} std {std:.4g}"
    elif enc.class_names is not None:
        task = f"classification{decided} into {datasets.classes} classes of {enc.label!r}"
    else:
        task = f"classification{decided} into {datasets.classes} classes"
    return f"{columns} columns -> {datasets.features} features; {task}"


def _train(cfg, plan, datasets, run_dir, console, fail_at, report, tracker, clock):
    """``run`` from fit() to results.json and the report."""
    fit_started = time.time()
    try:
        result = train(cfg, plan, datasets, run_dir, console, fail_at, tracker)
    except ray.train.TrainingFailedError as e:
        # For main's failure report, asked while Ray is still connected.
        e.lost_nodes = outcome.lost_nodes(runs.read_metrics(run_dir))
        e.workers_that_fit = outcome.workers_that_fit(cfg, plan) if e.lost_nodes else None
        raise
    fit_ended, trained = time.time(), time.perf_counter()
    rows = runs.read_metrics(run_dir)
    outcome.stop_if_not_finite(rows)
    if rows and rows[-1].get("stopped_early"):
        console.line(outcome.early_stop_line(cfg, rows[-1]))
    best = outcome.best_checkpoint(result, cfg, run_dir)
    validation = outcome.validation_of(best["checkpoint"])
    console.validation(validation, best)
    started = clock["started"]
    times = {
        "ray_start": plan.ray_start_s,
        "data_preparation": clock["prepared"] - started,
        "data_check": datasets.check_s,
        "fit_window": (fit_started, fit_ended),
        "validation": time.perf_counter() - trained,
        "wall_time_s": {"train": trained - started, "total": time.perf_counter() - started},
    }
    results = outcome.results(cfg, plan, run_dir, rows, result, best, validation, times)
    runs.write_results(run_dir, results)
    if report:
        png, html = write_report(run_dir)
        console.line(f"{'report':>7}  {runs.display(html)} ({png.name} beside it)")
    return results
