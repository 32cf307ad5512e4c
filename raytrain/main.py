"""raytrain's command line: argv -> Config -> cluster -> run -> summary and exit code.

    python -m raytrain.main --workers 4                       # embedded Ray on this machine
    python -m raytrain.main --config configs/seed.yaml        # the tutorial, exactly
    python -m raytrain.main --set model.name=mlp --set model.hidden=[64,64]
    python -m raytrain.main --address auto --workers 8        # an existing Ray cluster

Exit codes: 0 done, 1 training failed, 2 bad input or unusable cluster, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence

from raytrain import config
from raytrain.cluster import ClusterError, Plan, connect
from raytrain.config import FLAG_FIELDS, Config, ConfigError, field_help
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
    types = {"workers": int, "epochs": int, "batch_size": int, "lr": float, "seed": int}
    for dest, dotted in FLAG_FIELDS.items():
        flag = "--" + dest.replace("_", "-")
        if dest == "verbose":
            parser.add_argument(flag, action="store_true", default=None, help=field_help(dotted))
        else:
            parser.add_argument(
                flag, type=types.get(dest, str), metavar=dest.upper(), help=field_help(dotted)
            )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    flags = {FLAG_FIELDS[dest]: getattr(args, dest) for dest in FLAG_FIELDS}
    return config.load(args.config, args.set, flags)


def header(cfg: Config, plan: Plan, run_dir) -> list[tuple[str, str]]:
    where = "embedded Ray on this machine" if plan.embedded else f"Ray cluster at {plan.address}"
    per_worker = cfg.train.batch_size / plan.workers
    items = [
        (
            "workers",
            f"{plan.workers} x {plan.cpus_per_worker:g} CPU, {plan.threads} torch thread(s) each, "
            f"{where}",
        ),
        (
            "data",
            f"synthetic ({cfg.data.labels} labels), {cfg.data.samples} rows x "
            f"{cfg.data.features} features, {cfg.data.classes} classes, "
            f"{cfg.data.val_fraction:.0%} held out",
        ),
        (
            "model",
            f"{cfg.model.name}, SGD lr {cfg.train.lr:g}, global batch {cfg.train.batch_size} "
            f"({per_worker:g} per worker), {cfg.train.epochs} epochs",
        ),
        ("run", str(run_dir)),
    ]
    if plan.note:
        items.insert(1, ("note", plan.note))
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """Run raytrain; returns the exit code."""
    args = parse_args(argv)
    console = Console()
    started = time.perf_counter()
    try:
        cfg = build_config(args)
        # Imported here so that a bad flag is reported before torch and Ray are loaded.
        from raytrain import driver

        run_dir = driver.claim_run_dir(cfg)
    except ConfigError as e:
        return _error(str(e))

    import ray.train

    try:
        with connect(cfg) as plan:
            console.header(header(cfg, plan, run_dir))
            results = driver.run(cfg, plan, run_dir, console)
    except ClusterError as e:
        _discard_if_empty(run_dir)
        return _error(str(e))
    except ray.train.TrainingFailedError as e:
        console.line(f"raytrain: training failed: {_first_line(e)}")
        console.line(f"raytrain: checkpoints and metrics so far are in {run_dir}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.line(f"raytrain: interrupted; what was written is in {run_dir}")
        return EXIT_INTERRUPTED
    console.line(
        f"done in {time.perf_counter() - started:.1f} s; results in {run_dir}/results.json"
    )
    del results
    return EXIT_OK


def _error(message: str) -> int:
    print(f"raytrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _discard_if_empty(run_dir) -> None:
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
