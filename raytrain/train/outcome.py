"""What a finished driver session records: whether training stopped itself (a loss that is not
finite, early stopping), the best checkpoint and its validation on the driver, the phases of the
session, where each rank ran, and all of it as results.json (format: docs/run-directory.md)."""

from __future__ import annotations

import resource
from typing import Any

import ray
import ray.train
import torch

from raytrain import runs
from raytrain.cluster import DATA_CPUS, Plan
from raytrain.config import Config
from raytrain.errors import TrainingStopped
from raytrain.evaluate import summarize
from raytrain.storage import Location
from raytrain.train import checkpoint
from raytrain.train.stopping import best_of, mode_of

_VAL_BATCH = 4096


def stop_if_not_finite(rows: list[dict[str, Any]]) -> None:
    """TrainingStopped if the last epoch's loss, or its validation loss, became NaN or infinite
    (the workers stopped, and that epoch wrote no checkpoint)."""
    if rows and rows[-1].get("nonfinite_validation"):
        row = rows[-1]
        raise TrainingStopped(
            f"the validation loss became {row['val_loss']} in epoch {row['epoch']} (training "
            f"loss {row['loss']:.4g}, learning rate {row['lr']:g}): the model diverged; try a "
            "lower --lr, --set train.grad_clip=1.0, or features on a common scale"
        )
    if rows and "nonfinite_step" in rows[-1]:
        row = rows[-1]
        raise TrainingStopped(
            f"the loss became NaN or infinite in epoch {row['epoch']} at step "
            f"{row['nonfinite_step']} (learning rate {row['lr']:g}); try a lower --lr, "
            "--set train.grad_clip=1.0, or features on a common scale"
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


def _located(checkpoint: ray.train.Checkpoint, run_dir: Location) -> str:
    """A checkpoint's path or URI (Ray Train's path on an object store has no scheme)."""
    return str(run_dir / checkpoint.path.rstrip("/").rpartition("/")[2])


def best_checkpoint(result: ray.train.Result, cfg: Config, run_dir: Location) -> dict[str, Any]:
    """Among the checkpoints Ray Train kept, the best by ``run.checkpoint_metric``: its epoch,
    path, the metric's value and why it was chosen."""
    metric = cfg.run.checkpoint_metric
    chosen = best_of(result.best_checkpoints or [], metric)
    kept = [m for _, m in result.best_checkpoints or [] if m.get(metric) is not None]
    if chosen is None:
        latest = result.checkpoint
        return {
            "checkpoint": _located(latest, run_dir),
            "epoch": None,
            "metric": metric,
            "value": None,
            "why": f"the latest checkpoint: none of them has {metric}",
        }
    chosen, metrics = chosen
    word = "lowest" if mode_of(metric) == "min" else "highest"
    return {
        "checkpoint": _located(chosen, run_dir),
        "epoch": metrics["epoch"],
        "metric": metric,
        "value": metrics[metric],
        "why": f"the {word} {metric} of the {len(kept)} "
        "checkpoints kept (train.checkpoints_to_keep best, and the latest)",
    }


def validation_of(checkpoint_dir: str) -> dict[str, Any]:
    """The validation a checkpoint (a path or URI) carries: its workers measured it on all
    held-out rows in the epoch that wrote it, each a share, added up in one all-reduce."""
    state = checkpoint.load_at(checkpoint_dir)
    found = state.get("validation")
    if found is None:
        raise checkpoint.CheckpointError(
            f"checkpoint {checkpoint_dir!r} carries no validation (written by an older "
            "raytrain); train the run again"
        )
    if found.get("task") == "regression":
        rows = int(found["sums"][4])
        validation = {"rows": rows, "loss": found["loss_sum"] / rows}
        validation.update({k: found[k] for k in ("rmse", "mae", "r2", "pairs")})
    else:
        validation = summarize(found["loss_sum"], torch.tensor(found["confusion"]))
        validation["auc"] = found.get("auc")
        names = (state.get("encoding") or {}).get("class_names")
        if names:
            validation["class_names"] = names
    validation["validated_by"] = {"epoch": found["epoch"], "workers": found["workers"]}
    return validation


def results(
    cfg: Config,
    plan: Plan,
    run_dir: Location,
    rows: list[dict[str, Any]],
    result: ray.train.Result,
    best: dict[str, Any],
    validation: dict[str, Any],
    times: dict[str, Any],
) -> dict[str, Any]:
    """results.json of this session."""
    return {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "checkpoint": best["checkpoint"],
        "latest_checkpoint": _located(result.checkpoint, run_dir),
        "best": best,
        "stopped_early": rows[-1].get("stopped_early") if rows else None,
        "epochs": rows[-1]["epoch"] if rows else 0,
        "train": {k: v for k, v in rows[-1].items() if k != "workers"} if rows else {},
        # What the gradient all-reduce cost a step in the last epoch (two workers or more).
        "communication": rows[-1].get("communication") if rows else None,
        "validation": validation,
        "workers": plan.workers_text,
        "placement": placement(rows),
        "cpus_per_worker": plan.cpus_per_worker,
        "threads_per_worker": plan.threads,
        "wall_time_s": times["wall_time_s"],
        "phases": phases(
            rows,
            ray_start=times["ray_start"],
            data_preparation=times["data_preparation"],
            fit_window=times["fit_window"],
            validation=times["validation"],
        ),
        # The up-front check of Parquet files on its own; on an embedded Ray it runs beside the
        # start-up, and only what is left of it when Ray has started is in data_preparation.
        "data_check_s": times["data_check"],
        "segments": runs.history(run_dir),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": cfg.to_dict(),
    }


def placement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each worker rank ran in the last epoch: node id and IP."""
    if not rows:
        return []
    return [
        {"rank": w["rank"], "node_id": w["node_id"], "node_ip": w.get("node_ip")}
        for w in sorted(rows[-1]["workers"], key=lambda w: w["rank"])
    ]


def workers_that_fit(cfg: Config, plan: Plan) -> int:
    """How many workers the cluster's live CPUs hold now (after a node was lost)."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cfg.data.path is not None:
        cpus -= DATA_CPUS
    return max(0, int(cpus // plan.cpus_per_worker))


def lost_nodes(rows: list[dict[str, Any]]) -> list[str]:
    """The nodes the last epoch's workers ran on that the cluster no longer has alive, as
    'IP (node id)'; asked of Ray while the driver is still connected."""
    if not rows:
        return []
    alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    used = {(w["node_id"], w.get("node_ip")) for w in rows[-1]["workers"]}
    return sorted(f"{ip} ({node[:8]})" for node, ip in used if node not in alive)


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
