"""``raytrain runs [STORAGE_PATH]``: the runs under a storage path, newest first."""

from __future__ import annotations

import argparse

from raytrain import config
from raytrain.errors import EXIT_OK


def add_parser(sub) -> None:
    """``raytrain runs``."""
    listing = sub.add_parser("runs", help="list the runs under a storage path, newest first")
    listing.add_argument(
        "storage_path",
        nargs="?",
        default=config.RunConfig().storage_path,
        metavar="STORAGE_PATH",
        help="Where the runs are (default: %(default)s).",
    )
    listing.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table of runs; returns the exit code (a UserError goes to the caller)."""
    from raytrain.report.listing import print_runs

    print_runs(args.storage_path)
    return EXIT_OK
