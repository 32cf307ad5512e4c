"""The ``raytrain`` command: one parser built from the subcommands in raytrain.commands, and the
dispatch to the one chosen.

    raytrain train --workers 4                    # = python -m raytrain.main --workers 4
    raytrain data generate --rows 10000000 --out data/big
    raytrain report runs/RUN                      # report.png + report.html in the run directory
    raytrain runs [STORAGE_PATH]                  # the runs under a storage path
    raytrain predict RUN --data PATH --out DIR    # score Parquet rows with a trained model
    raytrain serve RUN                            # the model over HTTP on Ray Serve
    raytrain export RUN --format onnx --out FILE  # the model as ONNX or TorchScript
    raytrain tune --config configs/sweep.yaml     # a hyperparameter sweep on Ray Tune

Every error a user can cause ends as one line on stderr, ``raytrain: error: ...``, exit code 2
(raytrain.commands.args).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raytrain.commands import data, export, predict, report, runs, serve, train, tune
from raytrain.commands.args import Parser, error
from raytrain.errors import UserError

# In the order --help lists them.
COMMANDS = (train, data, report, runs, predict, serve, export, tune)


def build_parser(prog: str = "raytrain") -> argparse.ArgumentParser:
    """The whole command line: a subparser per command module."""
    parser = Parser(
        prog=prog,
        description="Data-parallel PyTorch training on CPUs with Ray: one command on a laptop, "
        "the same command on a cluster of CPU nodes.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "raytrain") -> int:
    """Run a raytrain command; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:  # the commands that leave their errors to this one path
        return error(str(e))


def cli() -> None:
    """The console script ``raytrain``."""
    sys.exit(main())
