"""``raytrain train`` (and ``python -m raytrain.main``, the tutorial's entry point):
argv -> Config -> cluster -> run (raytrain.train.driver) -> summary and exit code.

    raytrain train --workers 4                       # embedded Ray on this machine
    raytrain train --config configs/seed.yaml        # the tutorial, exactly
    raytrain train --set model.name=mlp --set model.hidden=[64,64]
    raytrain train --address auto --workers 8        # an existing Ray cluster

Exit codes: 0 done, 1 training failed, 2 bad input or unusable cluster, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

from raytrain import config, runs
from raytrain.cluster import Plan, cluster_address, connect
from raytrain.commands.args import Parser, add_config_flags, config_flags, error
from raytrain.config import Config
from raytrain.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    TrainingStopped,
    UserError,
    first_line,
)
from raytrain.report.console import Console
from raytrain.storage import Location
from raytrain.train.faults import ENV as FAIL_AT_ENV
from raytrain.train.faults import parse_fail_at

PROG = "python -m raytrain.main"
DESCRIPTION = "Data-parallel PyTorch training on CPUs with Ray Train. " + config.PRECEDENCE


def add_parser(sub) -> None:
    """``raytrain train``."""
    train = sub.add_parser(
        "train", help="train a model", description=DESCRIPTION, usage="%(prog)s [options]"
    )
    add_args(train)
    train.set_defaults(run=lambda args: run(args, program="raytrain train"))


def build_parser(prog: str = PROG) -> Parser:
    """The parser of ``python -m raytrain.main``: the same as ``raytrain train``'s."""
    parser = Parser(prog=prog, description=DESCRIPTION, usage="%(prog)s [options]")
    add_args(parser)
    return parser


def add_args(train: argparse.ArgumentParser) -> None:
    train.add_argument("--config", metavar="FILE", help="YAML file with config sections.")
    train.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="Override any config field, e.g. --set model.name=mlp (repeatable).",
    )
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="Continue the run of that name under --storage-path (or at that path) from its "
        "latest checkpoint, with the config it started with.",
    )
    train.add_argument(
        "--no-report",
        action="store_true",
        help="Skip writing report.png and report.html into the run directory at the end.",
    )
    add_config_flags(train)


def header(cfg: Config, plan: Plan, run_dir: Location, resumed: bool) -> list[tuple[str, str]]:
    where = (
        "embedded Ray on this machine"
        if plan.embedded
        else f"Ray cluster at {plan.address} ({plan.nodes} nodes)"
    )
    low, high = divmod(cfg.train.batch_size, plan.workers)
    per_worker = f"{low}" if high == 0 else f"{low}-{low + 1}"
    items = [
        (
            "workers",
            f"{plan.workers_text} x {plan.cpus_per_worker:g} CPU, {plan.threads} torch thread(s) "
            "each, "
            f"{where}",
        ),
        (
            "model",
            f"{cfg.model.name}, SGD lr {cfg.train.lr:g}, global batch {cfg.train.batch_size} "
            f"({per_worker} per worker), {cfg.train.epochs} epochs",
        ),
        ("run", f"{runs.display(run_dir)}{' (resumed)' if resumed else ''}"),
    ]
    if plan.note:
        items.insert(1, ("note", plan.note))
    return items


def prepare(args: argparse.Namespace) -> tuple[Config, Location]:
    """The run's config and directory: a fresh run, or the run named by --resume after checking
    that its latest checkpoint is intact. Raises UserError."""
    flags = config_flags(args)
    if args.resume is None:
        cfg = config.load(args.config, args.set, flags)
        run_dir = runs.claim(cfg)
        runs.save_config(run_dir, cfg)
        return cfg, run_dir
    for flag, value in (("--config", args.config), ("--name", flags.get("run.name"))):
        if value is not None:
            raise UserError(f"{flag} cannot be combined with --resume (the run keeps its own)")
    storage = flags.get("run.storage_path") or Config().run.storage_path
    run_dir = runs.locate(args.resume, storage)
    saved = runs.saved_config(run_dir)
    flags |= {"run.name": run_dir.name, "run.storage_path": str(run_dir.parent)}
    cfg = config.load(None, args.set, flags, base=saved)
    for section in ("data", "model"):
        if getattr(cfg, section).model_dump(mode="json") != saved.get(section):
            raise UserError(
                f"--resume keeps the run's {section} settings; drop the changes to {section}.* "
                "or start a fresh run"
            )
    rows = runs.read_metrics(run_dir)
    if rows and rows[-1].get("stopped_early"):
        raise UserError(
            f"run {run_dir.name!r} stopped early after epoch {rows[-1]['epoch']} "
            f"({cfg.run.checkpoint_metric} had stopped improving); resuming would only stop "
            "again: start a fresh run, with a larger train.early_stopping.patience if you like"
        )
    latest = runs.latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(
            f"run {run_dir.name!r} has no checkpoint to resume from in {str(run_dir)!r}; "
            "start a fresh run instead"
        )
    from raytrain.train import checkpoint  # torch: loaded only when there is a checkpoint to read

    done = checkpoint.load_at(latest)["epoch"]  # refuses a missing, truncated or tampered one
    if done >= cfg.train.epochs:
        raise UserError(
            f"run {run_dir.name!r} has already trained {done} epochs; pass --epochs with more "
            f"than {done} to continue it"
        )
    return cfg, run_dir


def failure_report(error: BaseException, cfg: Config, run_dir: Location, program: str) -> str:
    """One paragraph on a run that gave up: who failed, in which epoch, why, what is left."""
    done = max((row["epoch"] for row in runs.read_metrics(run_dir)), default=0)
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        described = [_describe_failure(rank, exc) for rank, exc in sorted(failures.items())]
        # The worker that died first, then the ones that lost their connection to it.
        who = "; ".join(sorted(described, key=lambda text: " died: " not in text))
    else:
        who = _sentence(first_line(getattr(error, "controller_failure", error)))
    lost = getattr(error, "lost_nodes", None)
    if lost:
        who = f"Lost node(s): {', '.join(lost)}. {who}"
    fit = getattr(error, "workers_that_fit", None)
    fewer = ["--workers", str(fit)] if lost and fit and fit < cfg.scaling.workers else []
    left = what_is_left(run_dir, program, fewer)
    return (
        f"raytrain: training failed in epoch {done + 1} (run.max_failures allows "
        f"{cfg.run.max_failures} restart(s)). {who}. {left}"
    )


def what_is_left(run_dir: Location, program: str, more: Sequence[str] = ()) -> str:
    """The last good checkpoint of a run that stopped, and the command that continues it (with
    ``more`` arguments: fewer workers on the nodes left)."""
    latest = runs.latest_checkpoint(run_dir)
    if latest is None or not latest.exists():
        return "No checkpoint was written."
    resume = runs.resume_command(run_dir, program, more)
    where = " on the nodes left" if more else ""
    return f"The last good checkpoint is {runs.display(latest)}; continue{where}: {resume}"


def run(args: argparse.Namespace, program: str = PROG) -> int:
    """Run the training command; returns the exit code."""
    console = Console()
    started = time.perf_counter()
    run_dir = ahead = None
    try:
        fail_at = parse_fail_at(os.environ.get(FAIL_AT_ENV))
        cfg, run_dir = prepare(args)
        if ":" in cfg.model.name:  # a model that cannot be imported is said before Ray starts
            from raytrain.model import load_model_class

            load_model_class(cfg.model.name)
        from raytrain.data.checks import scan_ahead  # numpy and pyarrow: after bad input

        ahead = scan_ahead(cfg.data, cluster_address(cfg) is None, cfg.model.task)
        # Imported here so that bad input is reported before torch and Ray are loaded.
        from raytrain.train import driver

        if ahead is not None:
            ahead.raise_if_failed()  # bad data found already (no such path): said before Ray
        with connect(cfg) as plan:
            console.header(header(cfg, plan, run_dir, resumed=args.resume is not None))
            driver.run(cfg, plan, run_dir, console, fail_at, not args.no_report, ahead)
    except UserError as e:
        if run_dir is not None and args.resume is None:
            runs.discard_if_unused(run_dir)
        return error(str(e))
    except KeyboardInterrupt:
        if run_dir is None:
            return EXIT_INTERRUPTED  # before anything was started
        console.line(
            f"raytrain: interrupted; checkpoints are kept in {run_dir}\n"
            f"raytrain: continue with: {runs.resume_command(run_dir, program)}"
        )
        return EXIT_INTERRUPTED
    except TrainingStopped as e:
        console.line(f"raytrain: training stopped: {e}. {what_is_left(run_dir, program)}")
        return EXIT_FAILED
    except Exception as e:
        if not _training_failed(e):
            raise  # a bug: keep its traceback
        console.line(failure_report(e, cfg, run_dir, program))
        return EXIT_FAILED
    finally:
        if ahead is not None:
            ahead.cancel()  # if Ray did not start, or the run ended before it needed the scan
    results = runs.display(run_dir / runs.RESULTS_FILE)
    console.line(f"done in {time.perf_counter() - started:.1f} s; results in {results}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m raytrain.main ARGS``: the same as ``raytrain train ARGS``."""
    return run(build_parser(PROG).parse_args(argv), PROG)


def _training_failed(error: Exception) -> bool:
    """Whether Ray Train gave up on the run (it raises TrainingFailedError subclasses)."""
    train = sys.modules.get("ray.train")  # not imported: the error came before Ray started
    return train is not None and isinstance(error, train.TrainingFailedError)


def _describe_failure(rank: int, error: BaseException) -> str:
    """'worker rank 1 died: ...' for a lost process, else 'worker rank 0 failed: Type: message'."""
    text = str(error)
    died = re.search(r"The actor is dead because ([^.]*)\.", text)
    if died:
        exit_type = re.search(r"Worker exit type: (\w+)", text)
        how = f" (exit type {exit_type.group(1)})" if exit_type else ""
        return f"worker rank {rank} died: {died.group(1)}{how}"
    # gloo prefixes its messages with a source path that means nothing to a user.
    message = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))
    return f"worker rank {rank} failed: {type(error).__name__}: {_sentence(message)}"


def _sentence(text: str, limit: int = 160) -> str:
    """The first sentence of ``text``, cut at a word if it is longer than ``limit``."""
    first = re.split(r"(?<=\.)\s+(?=[A-Z(])", text, maxsplit=1)[0].rstrip(". ")
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0] + " ..."
