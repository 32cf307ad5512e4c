"""What runs in each trial of a sweep: a small driver function (``run_trial``, Train V2's
pattern) that builds raytrain's TorchTrainer for the trial's config and calls fit(), reporting
each validated epoch to Tune as the run's metrics rows arrive, so ASHA can stop a trial that
lags. Data files are checked once, by the sweep's driver, unless the space changes what the
check depends on (``CHECKED_FIELDS``); every trial takes that check."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from raytrain import config, runs
from raytrain.report.console import Console
from raytrain.storage import Location
from raytrain.sweep import spec
from raytrain.sweep.layout import trial_name


@dataclass(frozen=True)
class TrialSetup:
    """What every trial's driver function needs from the sweep's driver."""

    base: dict[str, Any]
    sweep_dir: str
    metric: str
    embedded: bool
    cores_per_trial: float  # embedded: each trial's share of this machine's cores
    address: str | None
    check: Any = None  # ObjectRef of the sweep's check of its data files (``shared_check``)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: a raytrain run named after the trial, under the sweep's directory, trained
    with the trial's config; every validated epoch goes to Tune as it is written."""
    import ray
    from ray import tune

    from raytrain import cluster
    from raytrain.train import driver

    trial = tune.get_context().get_trial_id()
    sweep_dir = Location.of(setup.sweep_dir)
    run_dir = sweep_dir / trial_name(trial)
    flags = {"run.name": run_dir.name, "run.storage_path": str(sweep_dir)}
    if (run_dir / runs.CONFIG_FILE).is_file():  # a resumed sweep: continue the trial's run
        cfg = config.load(base=runs.saved_config(run_dir))
    else:
        cfg = spec.trial_config(setup.base, params, **flags)
        run_dir = runs.claim(cfg)
        runs.save_config(run_dir, cfg)
    if setup.embedded:
        plan = cluster.plan_embedded(cfg, setup.cores_per_trial)
    else:
        plan = cluster.plan_cluster(cfg, setup.address, ray.cluster_resources(), ray.nodes())
    from raytrain.data.checks import Scanned

    ahead = Scanned(ray.get(setup.check)) if setup.check is not None else None
    with open(os.devnull, "w") as quiet:
        console = TrialConsole(quiet, setup.metric)
        driver.run(cfg, plan, run_dir, console, report=False, ahead=ahead)


class TrialConsole(Console):
    """A trial's console: nothing printed; each epoch that has the sweep's metric is reported to
    Tune (from the thread that follows metrics.jsonl; Tune's session is the process's)."""

    def __init__(self, out, metric: str):
        super().__init__(out)
        self.metric = metric

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        from ray import tune

        if self.metric in row:
            if row.get("checkpoint"):  # ASHA may stop the trial on this report: keep it first
                wait_for_checkpoint(row["checkpoint"])
            keys = ("epoch", "loss", "accuracy", "samples_per_s", *VALIDATION_KEYS)
            tune.report({k: row[k] for k in keys if k in row})


def wait_for_checkpoint(location: str, timeout: float = 60.0) -> None:
    """Wait until the checkpoint a row names is persisted (or ``timeout`` passes), so that a trial
    that ASHA stops after an epoch keeps that epoch's checkpoint, which the sweep ranks it by."""
    from raytrain.train.checkpoint import persisted

    deadline = time.monotonic() + timeout
    while not persisted(location) and time.monotonic() < deadline:
        time.sleep(0.1)


VALIDATION_KEYS = ("val_loss", "val_accuracy", "val_auc", "val_f1", "val_log_loss")

# What the check of the data files depends on (raytrain.data.checks.scan_files).
CHECKED_FIELDS = (
    "data.path",
    "data.val_path",
    "data.feature_columns",
    "data.label_column",
    "data.categorical_columns",
    "data.missing",
    "data.val_fraction",
    "model.task",
)


def checks_once(cfg: config.Config, sweep: spec.SweepConfig) -> bool:
    """Whether the sweep checks its data files once for every trial: they are files, and no
    trial's config changes what the check depends on."""
    return cfg.data.path is not None and not set(sweep.space) & set(CHECKED_FIELDS)


def shared_check(cfg: config.Config, plan, ahead):
    """The check of the sweep's data files, made once (``ahead``, started before Ray, or now)
    and put into Ray's object store for every trial: bad data is one line before any trial
    starts, and the trials skip the pass over the files."""
    import ray

    from raytrain.data.checks import scan_files, scan_threads

    found = (
        ahead.result()
        if ahead is not None
        else scan_files(cfg.data, scan_threads(plan.embedded), task=cfg.model.task)
    )
    return ray.put(found)
