"""raytrain's command line: argv -> Config -> cluster -> run -> summary and exit code.

    python -m raytrain.main --workers 4                       # embedded Ray on this machine
    python -m raytrain.main --config configs/seed.yaml        # the tutorial, exactly
    python -m raytrain.main --set model.name=mlp --set model.hidden=[64,64]
    python -m raytrain.main --address auto --workers 8        # an existing Ray cluster

Exit codes: 0 done, 1 training failed, 2 bad input or unusable cluster, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from raytrain import config, runs
from raytrain.cluster import Plan, connect
from raytrain.config import FLAG_FIELDS, Config, field_help
from raytrain.errors import UserError
from raytrain.metrics import read_metrics
from raytrain.report import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raytrain.main",
        description="Data-parallel PyTorch training on CPUs with Ray Train. Settings come from "
        "the defaults, then --config FILE, then --set overrides, then the flags below.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with config sections.")
    parser.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="Override any config field, e.g. --set model.name=mlp (repeatable).",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN",
        help="Continue the run of that name under --storage-path (or at that path) from its "
        "latest checkpoint, with the config it started with.",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="Skip writing report.png and report.html into the run directory at the end.",
    )
    types = {"epochs": int, "batch_size": int, "lr": float, "seed": int}
    for dest, dotted in FLAG_FIELDS.items():
        flag = "--" + dest.replace("_", "-")
        if dest == "verbose":
            parser.add_argument(flag, action="store_true", default=None, help=field_help(dotted))
        else:
            parser.add_argument(
                flag, type=types.get(dest, str), metavar=dest.upper(), help=field_help(dotted)
            )
    return parser.parse_args(argv)


def flag_values(args: argparse.Namespace) -> dict:
    """The dedicated flags as dotted config keys; --workers MIN-MAX sets an elastic range."""
    flags = {FLAG_FIELDS[dest]: getattr(args, dest) for dest in FLAG_FIELDS}
    workers = args.workers
    if workers is not None:
        low, sep, high = workers.partition("-")
        if not (low.isdigit() and (not sep or high.isdigit())):
            raise UserError(
                f"--workers {workers!r} should be a count (4) or an elastic range MIN-MAX (2-8)"
            )
        flags["scaling.workers"] = int(high if sep else low)
        if sep:
            flags["scaling.min_workers"] = int(low)
    return flags


def build_config(args: argparse.Namespace) -> Config:
    return config.load(args.config, args.set, flag_values(args))


def header(cfg: Config, plan: Plan, run_dir: Path, resumed: bool) -> list[tuple[str, str]]:
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
        ("run", f"{run_dir}{' (resumed)' if resumed else ''}"),
    ]
    if plan.note:
        items.insert(1, ("note", plan.note))
    return items


def prepare(args: argparse.Namespace) -> tuple[Config, Path]:
    """The run's config and directory: a fresh run, or the run named by --resume after checking
    that its latest checkpoint is intact. Raises UserError."""
    if args.resume is None:
        cfg = build_config(args)
        run_dir = runs.claim(cfg)
        runs.save_config(run_dir, cfg)
        return cfg, run_dir
    for flag, value in (("--config", args.config), ("--name", args.name)):
        if value is not None:
            raise UserError(f"{flag} cannot be combined with --resume (the run keeps its own)")
    run_dir = runs.locate(args.resume, args.storage_path or Config().run.storage_path)
    saved = runs.saved_config(run_dir)
    flags = flag_values(args)
    flags |= {"run.name": run_dir.name, "run.storage_path": str(run_dir.parent)}
    cfg = config.load(None, args.set, flags, base=saved)
    for section in ("data", "model"):
        if getattr(cfg, section).model_dump(mode="json") != saved.get(section):
            raise UserError(
                f"--resume keeps the run's {section} settings; drop the changes to {section}.* "
                "or start a fresh run"
            )
    latest = runs.latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(
            f"run {run_dir.name!r} has no checkpoint to resume from in {str(run_dir)!r}; "
            "start a fresh run instead"
        )
    from raytrain import checkpoint  # torch: loaded only when there is a checkpoint to read

    done = checkpoint.load(latest)["epoch"]  # refuses a missing, truncated or tampered one
    if done >= cfg.train.epochs:
        raise UserError(
            f"run {run_dir.name!r} has already trained {done} epochs; pass --epochs with more "
            f"than {done} to continue it"
        )
    return cfg, run_dir


def parse_fail_at(text: str | None) -> tuple[int, int] | None:
    """RAYTRAIN_FAIL_AT=RANK:EPOCH -> (rank, epoch)."""
    if not text:
        return None
    rank, sep, epoch = text.partition(":")
    if not (sep and rank.isdigit() and epoch.isdigit() and int(epoch) >= 1):
        raise UserError(
            f"RAYTRAIN_FAIL_AT={text!r} should be RANK:EPOCH, e.g. 1:3 (rank 1 dies when it "
            "starts epoch 3)"
        )
    return int(rank), int(epoch)


def failure_report(error: BaseException, cfg: Config, run_dir: Path) -> str:
    """One paragraph on a run that gave up: who failed, in which epoch, why, what is left."""
    done = max((row["epoch"] for row in read_metrics(run_dir)), default=0)
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        described = [_describe_failure(rank, exc) for rank, exc in sorted(failures.items())]
        # The worker that died first, then the ones that lost their connection to it.
        who = "; ".join(sorted(described, key=lambda text: " died: " not in text))
    else:
        who = _first_line(getattr(error, "controller_failure", error))
    latest = runs.latest_checkpoint(run_dir)
    if latest is not None and latest.exists():
        left = f"The last good checkpoint is {latest}; continue: {runs.resume_command(run_dir)}"
    else:
        left = "No checkpoint was written."
    return (
        f"raytrain: training failed in epoch {done + 1} after {cfg.run.max_failures} "
        f"restart(s) allowed by run.max_failures. {who}. {left}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run raytrain; returns the exit code."""
    args = parse_args(argv)
    console = Console()
    started = time.perf_counter()
    try:
        fail_at = parse_fail_at(os.environ.get("RAYTRAIN_FAIL_AT"))
        cfg, run_dir = prepare(args)
    except UserError as e:
        return _error(str(e))
    if ":" in cfg.model.name:
        from raytrain.model import load_model_class

        try:  # a model that cannot be imported is said before Ray starts
            load_model_class(cfg.model.name)
        except UserError as e:
            if args.resume is None:
                _discard_if_unused(run_dir)
            return _error(str(e))

    # Imported here so that bad input is reported before torch and Ray are loaded.
    import ray.train

    from raytrain import driver

    try:
        with connect(cfg) as plan:
            # After ray.init, which installs a SIGTERM handler of its own that just dies.
            signal.signal(signal.SIGTERM, _interrupt)
            console.header(header(cfg, plan, run_dir, resumed=args.resume is not None))
            driver.run(cfg, plan, run_dir, console, fail_at, report=not args.no_report)
    except UserError as e:
        if args.resume is None:
            _discard_if_unused(run_dir)
        return _error(str(e))
    except ray.train.TrainingFailedError as e:
        console.line(failure_report(e, cfg, run_dir))
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.line(
            f"raytrain: interrupted; checkpoints are kept in {run_dir}\n"
            f"raytrain: continue with: {runs.resume_command(run_dir)}"
        )
        return EXIT_INTERRUPTED
    console.line(
        f"done in {time.perf_counter() - started:.1f} s; results in {run_dir}/results.json"
    )
    return EXIT_OK


def _interrupt(signum, frame) -> None:
    # SIGTERM takes the same way out as Ctrl-C: stop Ray, keep the checkpoints, say how to resume.
    raise KeyboardInterrupt


def _error(message: str) -> int:
    print(f"raytrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _describe_failure(rank: int, error: BaseException) -> str:
    """'worker rank 1 died: ...' for a lost process, else 'worker rank 0 failed: Type: message'."""
    text = str(error)
    died = re.search(r"The actor is dead because ([^.]*)\.", text)
    if died:
        exit_type = re.search(r"Worker exit type: (\w+)", text)
        how = f" (exit type {exit_type.group(1)})" if exit_type else ""
        return f"worker rank {rank} died: {died.group(1)}{how}"
    # gloo prefixes its messages with a source path that means nothing to a user.
    message = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(error))
    return f"worker rank {rank} failed: {type(error).__name__}: {message[:160]}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _discard_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but the config this run just wrote."""
    if {p.name for p in run_dir.iterdir()} <= {runs.CONFIG_FILE}:
        (run_dir / runs.CONFIG_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
