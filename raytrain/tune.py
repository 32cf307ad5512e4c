"""``raytrain tune`` (also ``python -m raytrain.tune``): a hyperparameter sweep on Ray Tune, each
trial an ordinary raytrain run directory under the sweep's directory.

    raytrain tune --config configs/sweep.yaml                  # on an embedded Ray
    raytrain tune --config sweep.yaml --address auto --storage-path s3://bucket/sweeps
    raytrain tune --resume SWEEP                               # finish an interrupted sweep

Train V2's pattern: every trial is a small driver function (``run_trial``) that builds raytrain's
TorchTrainer for its config and calls fit(); it reports each validated epoch to Tune as the
run's metrics rows arrive (the workers report nothing more than in any run), so ASHA can stop
a trial that lags. The sweep is sized against the cluster before anything starts, the trial
drivers' own CPU included. Data files are checked once, by the sweep's driver, unless the space
changes what the check depends on (``CHECKED_FIELDS``); every trial takes that check.

The sweep directory holds ``sweep.yaml`` (the file it started from), ``trial-*/`` (the runs),
``tune/`` (Ray Tune's state, for --resume) and, at the end, ``sweep.json``, ``sweep.csv`` and
``best.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from raytrain import cli, config, runs
from raytrain import sweep as sweeps
from raytrain.errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from raytrain.report.console import Console
from raytrain.storage import Location

PROG = "python -m raytrain.tune"
SWEEP_FILE, RESULTS_JSON, RESULTS_CSV, BEST_FILE = (
    "sweep.yaml",
    "sweep.json",
    "sweep.csv",
    "best.yaml",
)
TUNE_DIR = "tune"
TRIAL_PREFIX = "trial-"
# What a trial's driver function holds while its workers train: it mostly waits, but it builds
# the datasets and follows the metrics; counted so that trials cannot starve their workers.
DRIVER_CPUS = 0.5


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="SWEEP.yaml", help="The sweep file (docs/sweeps.md).")
    parser.add_argument(
        "--resume",
        metavar="SWEEP",
        help="Finish an interrupted sweep (its name under --storage-path, or its directory): "
        "trials that had not finished run again, from their runs' latest checkpoints.",
    )
    parser.add_argument(
        "--storage-path",
        default=config.RunConfig().storage_path,
        help="Where the sweep's directory goes: a directory or s3://bucket/prefix "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--name", help="The sweep directory's name (default: sweep-DATE-TIME-xxxx)."
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to run on, HOST:PORT or auto (default: RAY_ADDRESS, else an embedded "
        "Ray on this machine).",
    )
    parser.add_argument("--verbose", action="store_true", help="Show Ray's and Tune's own logs.")


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

    from raytrain import cluster, driver

    trial = tune.get_context().get_trial_id()
    sweep_dir = Location.of(setup.sweep_dir)
    run_dir = sweep_dir / trial_name(trial)
    flags = {"run.name": run_dir.name, "run.storage_path": str(sweep_dir)}
    if (run_dir / runs.CONFIG_FILE).is_file():  # a resumed sweep: continue the trial's run
        cfg = config.load(base=runs.saved_config(run_dir))
    else:
        cfg = sweeps.trial_config(setup.base, params, **flags)
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
            keys = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s")
            tune.report({k: row[k] for k in keys if k in row})


# ---- the sweep's driver ------------------------------------------------------------------------


def search_space(sweep: sweeps.SweepConfig) -> dict[str, Any]:
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


def tune_config(sweep: sweeps.SweepConfig, epochs: int):
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


# What the check of the data files depends on (raytrain.data.checks.scan_files).
CHECKED_FIELDS = (
    "data.path",
    "data.val_path",
    "data.feature_columns",
    "data.label_column",
    "data.val_fraction",
)


def checks_once(cfg: config.Config, sweep: sweeps.SweepConfig) -> bool:
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
        ahead.result() if ahead is not None else scan_files(cfg.data, scan_threads(plan.embedded))
    )
    return ray.put(found)


def check_size(base: config.Config, sweep: sweeps.SweepConfig, cpus: float, where: str) -> None:
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


def expected_trials(sweep: sweeps.SweepConfig) -> int:
    """How many trials the sweep makes: its samples, times every grid's points."""
    count = sweep.trials
    for spec in sweep.space.values():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            count *= len(values)
    return count


def trial_name(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


def params_text(params: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def claim_sweep(storage: str, name: str | None) -> Location:
    """A fresh sweep directory; UserError if the name is taken."""
    name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    sweep_dir = Location.of(storage) / name
    if sweep_dir.exists() and sweep_dir.children():
        raise UserError(
            f"sweep {name!r} already exists in {storage!r}; pick another --name, or "
            f"--resume {name} to finish it"
        )
    sweep_dir.mkdir()
    return sweep_dir


def locate_sweep(resume: str, storage: str) -> Location:
    for place in (Location.of(storage) / resume, Location.of(resume)):
        if (place / SWEEP_FILE).is_file() and (place / TUNE_DIR).is_dir():
            return place
    raise UserError(
        f"--resume {resume!r}: no sweep of that name in {storage!r} and no sweep directory "
        f"(with {SWEEP_FILE} and {TUNE_DIR}/) at that path"
    )


def tune_command(args: argparse.Namespace) -> int:
    """Run the tune command; returns the exit code."""
    console = Console()
    started = time.perf_counter()
    sweep_dir = ahead = None
    try:
        if (args.config is None) == (args.resume is None):
            raise UserError("give --config SWEEP.yaml for a new sweep, or --resume SWEEP")
        if args.resume is not None:
            sweep_dir = locate_sweep(args.resume, args.storage_path)
            base, sweep = sweeps.load(str(sweep_dir / SWEEP_FILE))
        else:
            base, sweep = sweeps.load(args.config)
            sweep_dir = claim_sweep(args.storage_path, args.name)
            (sweep_dir / SWEEP_FILE).write_bytes(Location.of(args.config).read_bytes())
        cfg = config.load(
            base=base,
            flags={
                "run.address": args.address,
                "run.verbose": args.verbose or None,
                "run.storage_path": str(sweep_dir.parent),  # every node must reach it
            },
        )
        from raytrain.cluster import DATA_CPUS, connect
        from raytrain.main import scan_ahead

        once = checks_once(cfg, sweep)
        ahead = scan_ahead(cfg) if once else None  # beside Ray's start, as a run's
        from ray import tune  # noqa: F401  (loaded while the check runs, as a run's driver)

        if ahead is not None:
            ahead.raise_if_failed()  # bad data found already: said before Ray starts
        cores = os.cpu_count() or 1
        # An embedded Ray shares this machine's cores among the trials at once (each trial's
        # workers get a share, as --workers beyond the cores do), plus logical CPUs for the
        # trials' drivers and their data reading; a cluster is checked once connected.
        asked = cfg.scaling.workers * (cfg.scaling.cpus_per_worker or 0)  # none: shares
        extra = sweep.concurrent * (DRIVER_CPUS + DATA_CPUS) + (sweep.concurrent - 1) * asked
        with connect(cfg, extra_cpus=extra) as plan:
            if not plan.embedded:
                import ray

                check_size(
                    cfg,
                    sweep,
                    ray.cluster_resources().get("CPU", 0.0),
                    f"the cluster at {plan.address}",
                )
            console.header(
                header(cfg, sweep, sweep_dir, plan, cores, resumed=args.resume is not None)
            )
            setup = TrialSetup(
                base=base,
                sweep_dir=str(sweep_dir),
                metric=sweep.metric,
                embedded=plan.embedded,
                cores_per_trial=cores / sweep.concurrent,
                address=plan.address,
                check=shared_check(cfg, plan, ahead) if once else None,
            )
            grid = run_tuner(setup, sweep, cfg, sweep_dir, console, resume=args.resume is not None)
            # Trials not yet created when the sweep was interrupted are not in the grid.
            interrupted = grid.num_terminated + grid.num_errors < expected_trials(sweep)
            summary = summarize(sweep_dir, sweep, cfg.train.epochs, grid, interrupted)
        if cfg.run.mlflow.tracking_uri is not None:
            from raytrain.tracking import end_stopped

            for row in summary:  # ASHA ended these trials' processes before they could
                if row["status"] in ("stopped early", "unfinished"):
                    end_stopped(Location.of(row["run_dir"]))
        write_results(sweep_dir, sweep, summary, time.perf_counter() - started, plan.ray_start_s)
        print_summary(console, sweep_dir, sweep, summary, interrupted)
        return EXIT_INTERRUPTED if interrupted else EXIT_OK
    except UserError as e:
        if sweep_dir is not None and args.resume is None:
            discard_if_unused(sweep_dir)
        return cli.error(str(e))
    finally:
        if ahead is not None:
            ahead.cancel()  # if Ray did not start


def discard_if_unused(sweep_dir: Location) -> None:
    """Remove a sweep directory that holds nothing but the sweep file its command just wrote."""
    if {child.name for child in sweep_dir.children()} <= {SWEEP_FILE}:
        sweep_dir.delete_dir()


def run_tuner(setup, sweep, cfg, sweep_dir: Location, console: Console, resume: bool):
    """Tuner(...).fit(), or Tuner.restore(...).fit() for --resume; returns the ResultGrid."""
    from ray import tune

    from raytrain.tune_callbacks import ReleaseStopped, TrialTable, close_live

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


_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})")


def summarize(sweep_dir: Location, sweep, epochs: int, grid, interrupted: bool) -> list[dict]:
    """Every trial's parameters, best metric, epochs, status and run directory, from its run
    directory (its config and metrics rows) and Tune's results (errors)."""
    errors, seconds = {}, {}
    for result in grid:
        found = _TRIAL_ID.search(os.path.basename(str(result.path).rstrip("/")))
        trial = (result.metrics or {}).get("trial_id") or (found.group(1) if found else None)
        if trial and result.error is not None:
            errors[trial] = _first_line(result.error)
        if trial and (result.metrics or {}).get("time_total_s") is not None:
            seconds[trial] = result.metrics["time_total_s"]  # to its last validated epoch
    rows = []
    sign = 1 if sweep.mode == "min" else -1
    for run_dir in sorted(sweep_dir.children(), key=lambda loc: loc.name):
        if not run_dir.name.startswith(TRIAL_PREFIX) or not (run_dir / runs.CONFIG_FILE).is_file():
            continue
        trial = run_dir.name.removeprefix(TRIAL_PREFIX)
        saved = runs.saved_config(run_dir)
        params = {field: _get(saved, field) for field in sweep.space}
        metrics = [row for row in runs.read_metrics(run_dir) if sweep.metric in row]
        best = min(metrics, key=lambda r: (sign * r[sweep.metric], r["epoch"])) if metrics else None
        done = max((row["epoch"] for row in runs.read_metrics(run_dir)), default=0)
        finished = (run_dir / runs.RESULTS_FILE).is_file()
        if trial in errors:
            status = "failed"
        elif finished:
            status = "finished"
        elif interrupted:
            status = "unfinished"
        else:
            status = "stopped early"
        rows.append(
            {
                "trial": run_dir.name,
                "status": status,
                "params": params,
                "best": best[sweep.metric] if best else None,
                "best_epoch": best["epoch"] if best else None,
                "epochs": done,
                "stopped_early": status == "stopped early",
                "error": errors.get(trial),
                "seconds": seconds.get(trial),
                "run_dir": str(run_dir),
            }
        )
    return rows


def _get(saved: dict, dotted: str) -> Any:
    section, _, field = dotted.partition(".")
    value = saved.get(section, {})
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _first_line(error: BaseException) -> str:
    text = str(error)
    for line in reversed(text.splitlines()):  # the trial's own error, after Ray's traceback
        if re.match(r"^[\w.]+(Error|Exception|Stopped)\b", line.strip()):
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def best_trial(sweep, summary: list[dict]) -> dict | None:
    sign = 1 if sweep.mode == "min" else -1
    ranked = [row for row in summary if row["best"] is not None and row["status"] != "failed"]
    return min(ranked, key=lambda r: (sign * r["best"], r["trial"])) if ranked else None


def write_results(
    sweep_dir: Location, sweep, summary: list[dict], wall: float, ray_start: float
) -> None:
    """sweep.json, sweep.csv and best.yaml (the best trial's full config, to train again), and
    the sweep's report."""
    best = best_trial(sweep, summary)
    data = {
        "metric": sweep.metric,
        "mode": sweep.mode,
        "sweep": sweep.model_dump(mode="json"),
        "best": best,
        "trials": summary,
        "wall_time_s": wall,
        "ray_start_s": ray_start,
        # Trials' own time (each from its start to its last validated epoch), summed: against
        # (wall - ray_start) x concurrent, how busy the slots for trials were.
        "trials_time_s": sum(row["seconds"] or 0 for row in summary),
    }
    (sweep_dir / RESULTS_JSON).write_bytes((json.dumps(data, indent=2) + "\n").encode())
    table = io.StringIO()
    fields = list(sweep.space)
    writer = csv.writer(table)
    writer.writerow(["trial", "status", *fields, sweep.metric, "best_epoch", "epochs", "run_dir"])
    for row in summary:
        writer.writerow(
            [
                row["trial"],
                row["status"],
                *(row["params"][f] for f in fields),
                row["best"],
                row["best_epoch"],
                row["epochs"],
                row["run_dir"],
            ]
        )
    (sweep_dir / RESULTS_CSV).write_bytes(table.getvalue().encode())
    from raytrain.report.sweep import write_report

    write_report(sweep_dir, data)
    if best is not None:
        saved = runs.saved_config(Location.of(best["run_dir"]))
        saved["run"] = {k: v for k, v in saved["run"].items() if k not in ("name", "storage_path")}
        if best["status"] == "stopped early":
            saved["train"]["epochs"] = best["epochs"]
        text = (
            f"# The best trial of sweep {sweep_dir.name}: {best['trial']}, {sweep.metric} "
            f"{best['best']:.6g} at epoch {best['best_epoch']}.\n"
            f"# raytrain train --config best.yaml trains it again, the same way.\n"
        ) + yaml.safe_dump(saved, sort_keys=False)
        (sweep_dir / BEST_FILE).write_bytes(text.encode())


def header(cfg, sweep, sweep_dir, plan, cores, resumed: bool) -> list[tuple[str, str]]:
    where = (
        f"embedded Ray on this machine ({cores} cores, {cores / sweep.concurrent:g} per trial)"
        if plan.embedded
        else f"Ray cluster at {plan.address}"
    )
    scheduler = "ASHA early stopping" if sweep.scheduler == "asha" else "no early stopping"
    return [
        ("sweep", f"{runs.display(sweep_dir)}{' (resumed)' if resumed else ''}"),
        (
            "trials",
            f"{sweep.trials} x {cfg.scaling.workers} workers x {cfg.train.epochs} epochs, "
            f"{sweep.concurrent} at once; {where}",
        ),
        (
            "search",
            f"{sweep.search} over {', '.join(sweep.space)}; {scheduler}, "
            f"by {sweep.metric} ({sweep.mode})",
        ),
    ]


def print_summary(console, sweep_dir, sweep, summary, interrupted: bool) -> None:
    console.line("")
    width = max((len(r["trial"]) for r in summary), default=5)
    for row in summary:
        value = f"{row['best']:.4f}" if row["best"] is not None else "-"
        console.line(
            f"{row['trial']:<{width}}  {row['status']:<13}  {sweep.metric} {value:>8}  "
            f"epochs {row['epochs']}  {params_text(row['params'])}"
            + (f"  ({row['error']})" if row["error"] else "")
        )
    best = best_trial(sweep, summary)
    if best is not None:
        console.line(
            f"best  {best['trial']}: {sweep.metric} {best['best']:.4f} at epoch "
            f"{best['best_epoch']} ({params_text(best['params'])}); train it again: "
            f"raytrain train --config {runs.display(sweep_dir / BEST_FILE)}"
        )
    if interrupted:
        console.line(
            f"raytrain: interrupted; finish the sweep with: raytrain tune --resume "
            f"{sweep_dir.name} --storage-path {sweep_dir.parent}"
        )
    console.line(
        f"results in {runs.display(sweep_dir / RESULTS_JSON)} ({RESULTS_CSV}, {BEST_FILE}, "
        "sweep.png, sweep.html beside it)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    add_args(parser)
    return tune_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
