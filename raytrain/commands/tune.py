"""``raytrain tune``: a hyperparameter sweep on Ray Tune, each trial an ordinary raytrain run
directory under the sweep's directory (raytrain.sweep).

    raytrain tune --config configs/sweep.yaml                  # on an embedded Ray
    raytrain tune --config sweep.yaml --address auto --storage-path s3://bucket/sweeps
    raytrain tune --resume SWEEP                               # finish an interrupted sweep
"""

from __future__ import annotations

import argparse
import os
import time

from raytrain import config, runs
from raytrain.cluster import cluster_address
from raytrain.commands.args import add_address, add_storage_path, error
from raytrain.errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from raytrain.report.console import Console
from raytrain.storage import Location
from raytrain.sweep import layout
from raytrain.sweep.layout import BEST_FILE, RESULTS_CSV, RESULTS_JSON, SWEEP_FILE, params_text


def add_parser(sub) -> None:
    """``raytrain tune``."""
    parser = sub.add_parser(
        "tune",
        help="a hyperparameter sweep on Ray Tune",
        description="A hyperparameter sweep on Ray Tune, each trial an ordinary raytrain run.",
    )
    parser.add_argument("--config", metavar="SWEEP.yaml", help="The sweep file (docs/sweeps.md).")
    parser.add_argument(
        "--resume",
        metavar="SWEEP",
        help="Finish an interrupted sweep (its name under --storage-path, or its directory): "
        "trials that had not finished run again, from their runs' latest checkpoints.",
    )
    add_storage_path(parser, "Where the sweep's directory goes: a directory or s3://bucket/prefix")
    parser.add_argument(
        "--name", help="The sweep directory's name (default: sweep-DATE-TIME-xxxx)."
    )
    add_address(parser)
    parser.add_argument("--verbose", action="store_true", help="Show Ray's and Tune's own logs.")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the tune command; returns the exit code."""
    console = Console()
    started = time.perf_counter()
    sweep_dir = ahead = None
    try:
        sweep_dir, base, sweep = open_sweep(args)
        cfg = config.load(
            base=base,
            flags={
                "run.address": args.address,
                "run.verbose": args.verbose or None,
                "run.storage_path": str(sweep_dir.parent),  # every node must reach it
            },
        )
        from raytrain.sweep.trials import checks_once

        once = checks_once(cfg, sweep)
        if once:  # beside Ray's start, as a run's
            from raytrain.data.checks import scan_ahead

            ahead = scan_ahead(cfg.data, cluster_address(cfg) is None, cfg.model.task)
        from ray import tune  # noqa: F401  (loaded while the check runs, as a run's driver)

        if ahead is not None:
            ahead.raise_if_failed()  # bad data found already: said before Ray starts
        summary, interrupted, ray_start = sweep_on_ray(
            args, cfg, base, sweep, sweep_dir, console, ahead, once
        )
        finish(cfg, sweep, sweep_dir, summary, time.perf_counter() - started, ray_start)
        print_summary(console, sweep_dir, sweep, summary, interrupted)
        return EXIT_INTERRUPTED if interrupted else EXIT_OK
    except UserError as e:
        if sweep_dir is not None and args.resume is None:
            layout.discard_if_unused(sweep_dir)
        return error(str(e))
    finally:
        if ahead is not None:
            ahead.cancel()  # if Ray did not start


def open_sweep(args: argparse.Namespace):
    """The sweep's directory (claimed, or found for --resume), its base config and its sweep
    section. UserError for a bad sweep file or name."""
    from raytrain.sweep import spec

    if (args.config is None) == (args.resume is None):
        raise UserError("give --config SWEEP.yaml for a new sweep, or --resume SWEEP")
    if args.resume is not None:
        sweep_dir = layout.locate_sweep(args.resume, args.storage_path)
        base, sweep = spec.load(str(sweep_dir / SWEEP_FILE))
        return sweep_dir, base, sweep
    base, sweep = spec.load(args.config)
    sweep_dir = layout.claim_sweep(args.storage_path, args.name)
    (sweep_dir / SWEEP_FILE).write_bytes(Location.of(args.config).read_bytes())
    return sweep_dir, base, sweep


def sweep_on_ray(args, cfg, base, sweep, sweep_dir: Location, console: Console, ahead, once):
    """Connect (or start Ray), check the sweep fits, run the trials; returns the summary rows,
    whether the sweep was interrupted, and Ray's start time."""
    from raytrain.cluster import DATA_CPUS, connect
    from raytrain.sweep import results, trials, tuner

    cores = os.cpu_count() or 1
    # An embedded Ray shares this machine's cores among the trials at once (each trial's
    # workers get a share, as --workers beyond the cores do), plus logical CPUs for the
    # trials' drivers and their data reading; a cluster is checked once connected.
    asked = cfg.scaling.workers * (cfg.scaling.cpus_per_worker or 0)  # none: shares
    extra = sweep.concurrent * (tuner.DRIVER_CPUS + DATA_CPUS) + (sweep.concurrent - 1) * asked
    with connect(cfg, extra_cpus=extra) as plan:
        if not plan.embedded:
            import ray

            where = f"the cluster at {plan.address}"
            tuner.check_size(cfg, sweep, ray.cluster_resources().get("CPU", 0.0), where)
        resumed = args.resume is not None
        console.header(header(cfg, sweep, sweep_dir, plan, cores, resumed=resumed))
        setup = trials.TrialSetup(
            base=base,
            sweep_dir=str(sweep_dir),
            metric=sweep.metric,
            embedded=plan.embedded,
            cores_per_trial=cores / sweep.concurrent,
            address=plan.address,
            check=trials.shared_check(cfg, plan, ahead) if once else None,
        )
        grid = tuner.run_tuner(setup, sweep, cfg, sweep_dir, console, resume=resumed)
        # Trials not yet created when the sweep was interrupted are not in the grid; one that
        # was pending is, as TERMINATED, but it never ran.
        interrupted = results.trials_done(sweep_dir, grid) < tuner.expected_trials(sweep)
        summary = results.summarize(sweep_dir, sweep, cfg.train.epochs, grid, interrupted)
    return summary, interrupted, plan.ray_start_s


def finish(cfg, sweep, sweep_dir: Location, summary, wall: float, ray_start: float) -> None:
    """End the MLflow runs of trials that ASHA ended, and write the sweep's results."""
    from raytrain.sweep import results

    if cfg.run.mlflow.tracking_uri is not None:
        from raytrain.tracking import end_stopped

        for row in summary:  # ASHA ended these trials' processes before they could
            if row["status"] in ("stopped early", "unfinished"):
                end_stopped(Location.of(row["run_dir"]))
    results.write_results(sweep_dir, sweep, summary, wall, ray_start)


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
    from raytrain.sweep.results import best_trial

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
