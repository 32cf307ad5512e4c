"""``raytrain report RUN_DIR``: (re)write a run's report.png and report.html."""

from __future__ import annotations

import argparse

from raytrain.errors import EXIT_OK


def add_parser(sub) -> None:
    """``raytrain report``."""
    report = sub.add_parser("report", help="write report.png and report.html for a run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="A run's directory.")
    report.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the report; returns the exit code (a UserError goes to the caller)."""
    from raytrain.report.page import write_report

    for path in write_report(args.run_dir):
        print(f"wrote {path}")
    return EXIT_OK
