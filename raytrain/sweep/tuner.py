"""Ray Tune's side of a sweep: the search space, the search and the scheduler (ASHA), the
sweep sized against the cluster (each trial's driver included), and ``Tuner.fit()``, new or
restored for --resume."""

from __future__ import annotations

import logging
import os
from typing import Any

from raytrain import config
from raytrain.errors import UserError
from raytrain.report.console import Console
from raytrain.storage import Location
from raytrain.sweep import spec
from raytrain.sweep.layout import TUNE_DIR
from raytrain.sweep.trials import run_trial

# What a trial's driver function holds while its workers train: it mostly waits, but it builds
# the datasets and follows the metrics; counted so that trials cannot starve their workers.
DRIVER_CPUS = 0.5


def search_space(sweep: spec.SweepConfig) -> dict[str, Any]:
    """Ray Tune's param_space: a domain per dotted field."""
    from ray import tune

    make = {
        "choice": lambda v: tune.choice(v),
        "grid": lambda v: tune.grid_search(v),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),  # inclusive, as the file reads
    }
    return {
        field: make[kind](values)
        for field, spec in sweep.space.items()
        for kind, values in spec.items()
    }


def tune_config(sweep: spec.SweepConfig, epochs: int):
    """Tune's TuneConfig: how many samples, how many at once, the search and the scheduler."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError(
                'search: optuna needs the tune extra: pip install -e ".[tune]" (optuna)'
            ) from None
        search = OptunaSearch(seed=sweep.seed)
    else:
        search = BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.concurrent)
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            # One more than the last epoch: at max_t Tune stops a trial itself, which would end
            # a trial at its last epoch before its run writes results.json.
            max_t=epochs + 1,
            grace_period=min(sweep.grace_period, epochs),
            reduction_factor=sweep.reduction_factor,
        )
        if sweep.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.TuneConfig(
        metric=sweep.metric,
        mode=sweep.mode,
        num_samples=sweep.trials,
        max_concurrent_trials=sweep.concurrent,
        search_alg=search,
        scheduler=scheduler,
    )


def check_size(base: config.Config, sweep: spec.SweepConfig, cpus: float, where: str) -> None:
    """UserError unless ``sweep.concurrent`` trials, each its workers and its driver, fit into
    ``cpus``."""
    workers = base.scaling.min_workers or base.scaling.workers
    per_trial = workers * (base.scaling.cpus_per_worker or 1.0) + DRIVER_CPUS
    needed = sweep.concurrent * per_trial
    if needed > cpus:
        fits = int(cpus // per_trial)
        raise UserError(
            f"{sweep.concurrent} trials at once x ({workers} workers x "
            f"{base.scaling.cpus_per_worker or 1.0:g} CPU + {DRIVER_CPUS:g} for the trial's "
            f"driver) = {needed:g} CPUs, but {where} has {cpus:g}; set sweep.concurrent to "
            f"{max(fits, 1)}{'' if fits else ' and use fewer workers'}"
        )


def expected_trials(sweep: spec.SweepConfig) -> int:
    """How many trials the sweep makes: its samples, times every grid's points."""
    count = sweep.trials
    for domain in sweep.space.values():
        kind, values = next(iter(domain.items()))
        if kind == "grid":
            count *= len(values)
    return count


def run_tuner(setup, sweep, cfg, sweep_dir: Location, console: Console, resume: bool):
    """Tuner(...).fit(), or Tuner.restore(...).fit() for --resume; returns the ResultGrid."""
    from ray import tune

    from raytrain.sweep.callbacks import ReleaseStopped, TrialTable, close_live

    if not cfg.run.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables
        # A failed trial's traceback: sweep.json keeps its error, the console says "failed".
        for name in ("ray.tune", "ray.air"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": DRIVER_CPUS}
    )
    storage = {
        "storage_path": str(sweep_dir) if sweep_dir.local else sweep_dir.path,
        "storage_filesystem": None if sweep_dir.local else sweep_dir.fs,
    }
    if resume:
        tuner = tune.Tuner.restore(
            str(sweep_dir / TUNE_DIR) if sweep_dir.local else (sweep_dir / TUNE_DIR).path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=storage["storage_filesystem"],
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune_config(sweep, cfg.train.epochs),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                **storage,
                callbacks=[
                    TrialTable(sweep.metric, sweep.mode, cfg.train.epochs),
                    ReleaseStopped(str(sweep_dir)),
                ],
                verbose=1 if cfg.run.verbose else 0,
                # A failed trial is recorded and the sweep goes on.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        )
    try:
        return tuner.fit()
    finally:
        close_live()  # Tune ends its callbacks' experiment, but not on every way out
