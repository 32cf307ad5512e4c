"""``raytrain data generate``: write the synthetic data set as Parquet files, one seeded Ray task
per file.

    raytrain data generate --rows 1e7 --out data/big
"""

from __future__ import annotations

import argparse
import time

from raytrain import config
from raytrain.commands.args import add_address, count
from raytrain.errors import EXIT_OK

GENERATED = ("features", "classes", "labels", "label_noise", "seed")  # DataConfig fields


def add_parser(sub) -> None:
    """``raytrain data`` and its one subcommand, ``generate``."""
    data = sub.add_parser("data", help="data sets: generate the synthetic one as Parquet")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    gen = data_sub.add_parser(
        "generate",
        help="write synthetic rows as Parquet files, generated in parallel",
        description="Write the synthetic data set as Parquet files (x: fixed-size list of "
        "float32, y: int64), one seeded Ray task per file.",
    )
    gen.add_argument("--rows", type=count, required=True, help="Rows in all (1e7 works too).")
    gen.add_argument("--out", required=True, help="Directory for the part-NNNNN.parquet files.")
    gen.add_argument(
        "--rows-per-file", type=count, default=1_000_000, help="Rows per file (default 1e6)."
    )
    add_address(gen)
    fields = config.DataConfig.model_fields
    for name in GENERATED:
        gen.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            help=f"{fields[name].description} (default: {fields[name].default})",
        )
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generate the files; returns the exit code (a UserError goes to the caller)."""
    import ray

    from raytrain.cluster import init_ray
    from raytrain.data.synthetic import claim_out, generate
    from raytrain.storage import Location

    given = {f"data.{name}": getattr(args, name) for name in GENERATED}
    data = config.load(
        flags={k: config.parse_value(v, k) for k, v in given.items() if v is not None}
    ).data
    started = time.perf_counter()
    claim_out(args.out)  # a bad or taken --out is said before Ray starts
    init_ray(args.address, None, verbose=False)
    try:
        written = generate(args.rows, args.out, args.rows_per_file, data)
    finally:
        ray.shutdown()
    out = Location.of(args.out)
    size = sum(child.size() for child in out.children() if child.name.endswith(".parquet"))
    print(
        f"wrote {sum(n for _, n in written):,} rows in {len(written)} files, {size / 1e6:,.1f} MB, "
        f"to {out} in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_OK
