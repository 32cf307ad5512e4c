"""The up-front check of Parquet files (raytrain.data.checks.scan_files, on the driver's threads as
on an embedded Ray): what counting categories and missing values costs.

Three cases, each timed in a fresh process, interleaved, ``--reps`` times:

- numeric, before: 10^7 rows of `raytrain data generate` (10 features, one list column),
  checked by the code of ``--before`` (a git revision, checked out in a temporary worktree);
- numeric, now: the same files, checked by this checkout: the cost must not grow;
- categorical, now: 10^7 rows of 10 float32 columns (3 of them with 10% missing) and five
  string columns of 3, 10, 50, 200 and 1,000 values, an integer label: the scan that also
  counts every category and missing value.

    python scripts/bench_scan.py                   # 10^7 rows, 3 repetitions
    python scripts/bench_scan.py --rows 1e6 --reps 5

Prints a table of medians and every repetition, and writes docs/benchmarks/scan.json.
Generated data is kept in --work-dir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = """
import sys, time
from raytrain.config import DataConfig
from raytrain.data import checks
cfg = DataConfig(path=sys.argv[1], label_column=sys.argv[2])
started = time.perf_counter()
found = checks.scan_files(cfg, threads=int(sys.argv[3]))
print(time.perf_counter() - started)
"""

CARDINALITIES = (3, 10, 50, 200, 1000)


def write_categorical(directory: Path, rows: int) -> None:
    """The categorical case's files, a million rows per row group, written a group at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocabularies = [np.array([f"v{c}-{i}" for i in range(c)], dtype=object) for c in CARDINALITIES]
    writer = None
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        columns = {}
        for i in range(10):
            values = rng.standard_normal(n).astype(np.float32)
            mask = rng.random(n) < 0.1 if i < 3 else None
            columns[f"f{i}"] = pa.array(values, mask=mask)
        for k, vocabulary in enumerate(vocabularies):
            columns[f"c{k}"] = pa.array(
                vocabulary[rng.integers(0, len(vocabulary), n)], pa.string()
            )
        columns["y"] = pa.array(rng.integers(0, 2, n))
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(directory / "data.parquet", table.schema)
        writer.write_table(table, row_group_size=1_000_000)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1e7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", default="cf3f67b", help="the revision to compare with")
    parser.add_argument("--work-dir", default="/tmp/raytrain-bench-scan")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "scan.json"))
    args = parser.parse_args()
    rows = int(args.rows)
    work = Path(args.work_dir)
    numeric, categorical = work / f"numeric-{rows}", work / f"categorical-{rows}"
    if not numeric.exists():
        subprocess.run(
            [sys.executable, "-m", "raytrain", "data", "generate", "--rows", str(rows),
             "--out", str(numeric)],
            check=True, cwd=ROOT,
        )  # fmt: skip
    if not categorical.exists():
        write_categorical(categorical, rows)
    threads = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="raytrain-before-") as before:
        subprocess.run(
            ["git", "worktree", "add", "--detach", before, args.before],
            check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
        try:
            cases = {
                "numeric, before": (before, numeric, "y"),
                "numeric, now": (str(ROOT), numeric, "y"),
                "categorical, now": (str(ROOT), categorical, "y"),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            for rep in range(args.reps):
                for name, (tree, data, label) in cases.items():
                    env = {**os.environ, "PYTHONPATH": tree}
                    proc = subprocess.run(
                        [sys.executable, "-c", MEASURE, str(data), label, threads],
                        check=True, capture_output=True, text=True, cwd=tree, env=env,
                    )  # fmt: skip
                    times[name].append(float(proc.stdout.strip().splitlines()[-1]))
                print(f"rep {rep + 1}/{args.reps} done", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", before], cwd=ROOT, capture_output=True
            )
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["numeric, before"]
    print(f"\n{'case':<20} {'median s':>9} {'vs numeric before':>18}  every repetition (s)")
    for name, t in times.items():
        reps = ", ".join(f"{v:.2f}" for v in t)
        print(f"{name:<20} {medians[name]:9.2f} {medians[name] / base:17.2f}x  {reps}")
    result = {
        "rows": rows,
        "threads": int(threads),
        "before": args.before,
        "cardinalities": list(CARDINALITIES),
        "seconds": times,
        "median_s": medians,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
