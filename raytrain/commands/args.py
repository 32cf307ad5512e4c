"""What every command's parser shares: ``Parser`` (a usage error is one line), ``error`` (the
one error path: one line on stderr, exit code 2), the config flags derived from the schema, and
the cluster flags of the commands that run on Ray."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from raytrain import config
from raytrain.errors import EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"raytrain: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def error(message: str) -> int:
    """Print a user's error as one line; returns the exit code."""
    print(f"raytrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--section.field VALUE`` for every config field, in a group per section, plus the short
    flags the schema names; the field's description is the help."""
    for section, model in config.sections().items():
        group = parser.add_argument_group(f"{section} settings", model.__doc__)
        _add_fields(group, section, model)


def _add_fields(group, prefix: str, model) -> None:
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}"
        if hasattr(field.annotation, "model_fields"):  # a nested section: a flag per field
            _add_fields(group, dotted, field.annotation)
            continue
        default = field.default if field.default not in (None, {}, ()) else None
        help_text = (field.description or "") + (f" (default: {default})" if default else "")
        short = (field.json_schema_extra or {}).get("flag")
        names = [f"--{short}", f"--{dotted}"] if short else [f"--{dotted}"]
        if field.annotation is bool and short:  # --verbose, as well as --run.verbose true
            group.add_argument(
                names.pop(0), dest=dotted, action="store_const", const=True, help=help_text
            )
        group.add_argument(*names, dest=dotted, metavar=name.upper(), help=help_text)


def config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as flags: dotted name -> value (parsed as config.parse_value)."""
    flags = {}
    for dotted, value in vars(args).items():
        if "." in dotted and value is not None:
            flags[dotted] = value if isinstance(value, bool) else config.parse_value(value, dotted)
    return flags


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1, ``1e7`` included."""
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_address(parser: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster a command runs on."""
    parser.add_argument(
        "--address",
        help="Ray cluster to run on, HOST:PORT or auto (default: RAY_ADDRESS, else an "
        "embedded Ray on this machine).",
    )


def add_storage_path(parser: argparse.ArgumentParser, what: str) -> None:
    """``--storage-path``: where runs (or sweeps) are, with the config's default."""
    parser.add_argument(
        "--storage-path",
        default=config.RunConfig().storage_path,
        help=f"{what} (default: %(default)s).",
    )


def add_cluster_args(parser: argparse.ArgumentParser, what: str) -> None:
    """The cluster flags training has, for a command that runs on Ray."""
    parser.add_argument(
        "--workers",
        metavar="N",
        help=f"How many {what}, or an elastic range MIN-MAX (default: "
        f"{config.ScalingConfig().workers}).",
    )
    parser.add_argument(
        "--cpus-per-worker",
        metavar="X",
        help="CPUs reserved per actor; torch uses that many threads (default: 1, or a share "
        "of the cores when an embedded Ray has fewer cores than actors).",
    )
    add_address(parser)
    add_storage_path(parser, "Where runs are found by name")
    parser.add_argument("--verbose", action="store_true", help="Show Ray's own logs.")


def cluster_config(args: argparse.Namespace, data: str, writes_to: str) -> config.Config:
    """A Config for ``cluster.connect`` from the cluster flags: the scaling and address flags,
    the data read (which needs a CPU of its own on a cluster) and where the output goes (which
    every node must reach)."""
    flags: dict[str, Any] = {
        "run.address": args.address,
        "run.verbose": args.verbose or None,
        "run.storage_path": writes_to,
        "data.path": data,
    }
    if args.workers is not None:
        flags["scaling.workers"] = config.parse_value(args.workers, "scaling.workers")
    if args.cpus_per_worker is not None:
        flags["scaling.cpus_per_worker"] = config.parse_value(
            args.cpus_per_worker, "scaling.cpus_per_worker"
        )
    return config.load(flags={k: v for k, v in flags.items() if v is not None})
