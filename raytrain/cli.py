"""The ``raytrain`` command: one parser, its subcommands, and the one error path.

    raytrain train --workers 4                    # = python -m raytrain.main --workers 4
    raytrain data generate --rows 10000000 --out data/big
    raytrain report runs/RUN                      # report.png + report.html in the run directory
    raytrain runs [STORAGE_PATH]                  # the runs under a storage path
    raytrain predict RUN --data PATH --out DIR    # = python -m raytrain.predict
    raytrain export RUN --format onnx --out FILE  # = python -m raytrain.export
    raytrain tune --config configs/sweep.yaml     # = python -m raytrain.tune

``train``'s flags are derived from the config schema (raytrain.config): ``--section.field VALUE``
for every field, and the short flags the schema names (``--workers``, ``--lr``, ...). Every error
a user can cause ends here: one line on stderr, ``raytrain: error: ...``, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from raytrain import config
from raytrain.errors import EXIT_OK, EXIT_USAGE, UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"raytrain: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def error(message: str) -> int:
    """Print a user's error as one line; returns the exit code."""
    print(f"raytrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ---- train: flags derived from the config schema -------------------------------------------------


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


_TRAIN = "Data-parallel PyTorch training on CPUs with Ray Train. " + config.PRECEDENCE


def build_train_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``python -m raytrain.main``: the same as ``raytrain train``'s."""
    parser = Parser(prog=prog, description=_TRAIN, usage="%(prog)s [options]")
    add_train_args(parser)
    return parser


def add_train_args(train: argparse.ArgumentParser) -> None:
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


# ---- data generate, report, runs -----------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


_GENERATED = ("features", "classes", "labels", "label_noise", "seed")  # DataConfig fields


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="data sets: generate the synthetic one as Parquet")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    gen = data_sub.add_parser(
        "generate",
        help="write synthetic rows as Parquet files, generated in parallel",
        description="Write the synthetic data set as Parquet files (x: fixed-size list of "
        "float32, y: int64), one seeded Ray task per file.",
    )
    gen.add_argument("--rows", type=_count, required=True, help="Rows in all (1e7 works too).")
    gen.add_argument("--out", required=True, help="Directory for the part-NNNNN.parquet files.")
    gen.add_argument(
        "--rows-per-file", type=_count, default=1_000_000, help="Rows per file (default 1e6)."
    )
    gen.add_argument("--address", help="Ray cluster to generate on (default: embedded Ray).")
    fields = config.DataConfig.model_fields
    for name in _GENERATED:
        gen.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            help=f"{fields[name].description} (default: {fields[name].default})",
        )


def add_report_parsers(sub) -> None:
    report = sub.add_parser("report", help="write report.png and report.html for a run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="A run's directory.")
    listing = sub.add_parser("runs", help="list the runs under a storage path, newest first")
    listing.add_argument(
        "storage_path",
        nargs="?",
        default=config.RunConfig().storage_path,
        metavar="STORAGE_PATH",
        help="Where the runs are (default: %(default)s).",
    )


def build_parser(prog: str = "raytrain") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="Data-parallel PyTorch training on CPUs with Ray: one command on a laptop, "
        "the same command on a cluster of CPU nodes.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    train = sub.add_parser(
        "train", help="train a model", description=_TRAIN, usage="%(prog)s [options]"
    )
    add_train_args(train)
    add_data_parser(sub)
    add_report_parsers(sub)
    add_use_parsers(sub)
    return parser


def add_use_parsers(sub) -> None:
    """``predict``, ``export`` and ``tune``: what a trained model is for, and finding the best."""
    from raytrain import export, predict, tune

    tune.add_args(
        sub.add_parser(
            "tune",
            help="a hyperparameter sweep on Ray Tune",
            description=tune.__doc__.splitlines()[0],
        )
    )

    predict.add_args(
        sub.add_parser(
            "predict",
            help="score Parquet rows with a trained model, on Ray",
            description=predict.__doc__.splitlines()[0],
        )
    )
    export.add_args(
        sub.add_parser(
            "export",
            help="write a trained model as ONNX or TorchScript",
            description=export.__doc__.splitlines()[0],
        )
    )


# ---- running a command ---------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> int:
    import time

    import ray

    from raytrain.cluster import init_ray
    from raytrain.data.synthetic import generate as write_parquet
    from raytrain.storage import Location

    given = {f"data.{name}": getattr(args, name) for name in _GENERATED}
    data = config.load(
        flags={k: config.parse_value(v, k) for k, v in given.items() if v is not None}
    ).data
    started = time.perf_counter()
    init_ray(args.address, None, verbose=False)
    try:
        written = write_parquet(args.rows, args.out, args.rows_per_file, data)
    finally:
        ray.shutdown()
    out = Location.of(args.out)
    size = sum(child.size() for child in out.children() if child.name.endswith(".parquet"))
    print(
        f"wrote {sum(n for _, n in written):,} rows in {len(written)} files, {size / 1e6:,.1f} MB, "
        f"to {out} in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    from raytrain.report.page import write_report

    for path in write_report(args.run_dir):
        print(f"wrote {path}")
    return EXIT_OK


def list_runs(args: argparse.Namespace) -> int:
    from raytrain.report.listing import print_runs

    print_runs(args.storage_path)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "raytrain") -> int:
    """Run a raytrain command; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    if args.command == "train":
        from raytrain import main as training

        return training.train(args, program=f"{prog} train")
    if args.command in ("predict", "export", "tune"):
        from raytrain import export, predict, tune

        run = {"predict": predict.predict, "export": export.export, "tune": tune.tune_command}
        return run[args.command](args)
    commands = {"data": generate, "report": report, "runs": list_runs}
    try:
        return commands[args.command](args)
    except UserError as e:
        return error(str(e))


def cli() -> None:
    """The console script ``raytrain``."""
    sys.exit(main())
