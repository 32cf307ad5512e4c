"""A run tracked in MLflow (``run.mlflow.tracking_uri``; off by default; the mlflow extra).

The driver opens an MLflow run when training starts, named after the run directory, with the
whole config as parameters (dotted names: ``train.lr``); every epoch row of metrics.jsonl is
logged as it arrives (step = epoch); at the end come results.json, the report and the best
checkpoint as artifacts, and the run's status. A sweep's trials are such runs, in one experiment.
The MLflow run's id is kept in the run directory (``mlflow.json``), so a resumed run logs on
into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from raytrain import runs
from raytrain.config import Config
from raytrain.errors import UserError, first_line
from raytrain.storage import Location

_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "epoch_time_s", "lr")


class TrackingError(UserError):
    """MLflow that cannot be used: not installed, or its server does not answer."""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted names, values as text."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return flat


class Tracker:
    """One MLflow run, for one raytrain run directory."""

    def __init__(self, cfg: Config, run_dir: Location):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError(
                "run.mlflow.tracking_uri is set, but mlflow is not installed: "
                'pip install -e ".[tracking]"'
            ) from None
        # MLflow retries an unreachable server for minutes by default, and prints a link to
        # every run it ends on stdout.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        uri, name = cfg.run.mlflow.tracking_uri, cfg.run.mlflow.experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run_dir
        self.lost: str | None = None  # why logging stopped, if it did
        kept = runs.read_json(run_dir / runs.MLFLOW_FILE)
        try:
            if kept and kept.get("tracking_uri") == uri:
                self.run_id = kept["run_id"]  # a resumed run goes on in its MLflow run
                self.client.update_run(self.run_id, status="RUNNING")
                return
            experiment = self._experiment(name)
            run = self.client.create_run(
                experiment, run_name=run_dir.name, tags={"raytrain.run_dir": str(run_dir)}
            )
            self.run_id = run.info.run_id
            self._params(flatten(cfg.to_dict()))
        except Exception as e:  # MLflow raises many kinds for a server that is not there
            raise TrackingError(
                f"MLflow at {uri!r} cannot be used: {type(e).__name__}: {first_line(e, 200)}"
            ) from None
        text = json.dumps({"tracking_uri": uri, "experiment": name, "run_id": self.run_id})
        (run_dir / runs.MLFLOW_FILE).write_bytes((text + "\n").encode())

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if it is new (by this run or, at the same moment, by
        another trial of a sweep)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created in the meantime: RESOURCE_ALREADY_EXISTS
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def show(self, line: dict[str, Any]) -> None:
        """A metrics.jsonl line (the Follower's callback): an epoch row is logged."""
        from mlflow.entities import Metric

        if "epoch" not in line or self.lost is not None:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(line[key]), now, int(line["epoch"]))
            for key in _METRICS
            if isinstance(line.get(key), int | float)
        ]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # a tracking server that went away does not stop training
            self.lost = f"{type(e).__name__}: {first_line(e, 200)}"

    def finish(
        self,
        results: dict[str, Any] | None,
        status: str = "FINISHED",
        error: BaseException | None = None,
    ) -> None:
        """results.json, the report and the best checkpoint as artifacts; the run's status (and
        for a failed run, the first line of its error as the tag ``raytrain.error``)."""
        if error is not None and status == "FAILED":
            text = f"{type(error).__name__}: {first_line(error, 500)}"
            self.client.set_tag(self.run_id, "raytrain.error", text)
        if results is not None:
            for name in (runs.RESULTS_FILE, runs.REPORT_PNG, runs.REPORT_HTML):
                path = self.run_dir / name
                if path.exists():
                    with path.local_file() as local:
                        self.client.log_artifact(self.run_id, str(local))
            best = Location.of(results["checkpoint"])
            with best.local_copy() as local:
                self.client.log_artifacts(self.run_id, str(local), artifact_path="best_checkpoint")
        self.client.set_terminated(self.run_id, status)


def start(cfg: Config, run_dir: Location) -> Tracker | None:
    """The run's Tracker, or None when tracking is off."""
    if cfg.run.mlflow.tracking_uri is None:
        return None
    return Tracker(cfg, run_dir)


def end_stopped(run_dir: Location) -> None:
    """Mark the MLflow run of a run that was stopped from outside (a sweep's trial that ASHA
    stopped: its process was ended before it could) as KILLED."""
    kept = runs.read_json(run_dir / runs.MLFLOW_FILE)
    if not kept:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=kept["tracking_uri"])
    # RUNNING (its process ended first), or FAILED (it saw its training torn down): the sweep
    # knows it was stopped.
    if client.get_run(kept["run_id"]).info.status != "FINISHED":
        client.set_terminated(kept["run_id"], "KILLED")
