"""Batch prediction at scale: raytrain predict side by side with a plain single-process loop over
the same Parquet files, and the driver's memory as the data grows.

Once: the synthetic data set at each size (raytrain data generate, 10 features; shared with
scripts/bench_data.py) and a model trained for one epoch on the smallest. Then, in each
repetition and for each size, one after the other:

- plain: one process, no Ray, one torch thread: pyarrow batches -> scaling -> the model ->
  softmax -> ParquetWriter, the label kept (scripts/baselines/plain_predict.py);
- raytrain: python -m raytrain predict RUN --data DIR --out DIR --keep y, 2 actors x 1 CPU on an
  embedded Ray (this machine's 2 cores).

Per CPU, two ways: steady (rows per second of an actor's own time reading, predicting and
writing, against the plain loop's rows per second), and whole (rows per second from the actors'
start to the last file, divided by the 2 CPUs, against the plain loop): the second includes the
actors' start-up (a Ray worker process importing torch and loading the checkpoint) but not Ray's.
The driver's peak RSS is sampled every 0.1 s.

    python scripts/bench_predict.py                      # 10^5, 10^6, 10^7 rows, 3 repetitions
    python scripts/bench_predict.py --sizes 1e8 --reps 1 --out docs/benchmarks/predict-1e8.json

Prints a table of medians and every repetition's ratios; writes docs/benchmarks/predict.json (or
--out), which docs/predict.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_data import ROOT, generate, run, run_sampled

BATCH = 65536
CPUS = 2


def train_model(work: Path, data_dir: Path) -> Path:
    """A run trained for one epoch on ``data_dir`` (kept in the work directory and reused)."""
    runs = work / "runs"
    run_dir = runs / "bench-predict"
    if not (run_dir / "results.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        run(
            [
                sys.executable,
                "-m",
                "raytrain.main",
                "--set",
                f"data.path={data_dir}",
                "--epochs",
                "1",
                "--batch-size",
                "1024",
                "--workers",
                "2",
                "--storage-path",
                str(runs),
                "--name",
                "bench-predict",
                "--no-report",
            ]
        )
    return run_dir


def plain(data_dir: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    line = run(
        [sys.executable, "scripts/baselines/plain_predict.py", str(data_dir), str(out), str(BATCH)]
    )
    wall = time.perf_counter() - started
    result = json.loads(line.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "loop_s": result["seconds"],
        "process_s": wall,
        "rows": result["rows"],
        "peak_rss_mb": result["peak_rss_mb"],
    }


def raytrain_predict(run_dir: Path, data_dir: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "raytrain",
        "predict",
        str(run_dir),
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--keep",
        "y",
        "--workers",
        str(CPUS),
        "--batch-size",
        str(BATCH),
    ]
    started = time.perf_counter()
    memory = run_sampled(cmd)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "_prediction.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    seconds = manifest["seconds"]
    return {
        "rows": manifest["rows"],
        "process_s": wall,
        "ray_start_s": seconds["ray_start"],
        "prediction_s": seconds["prediction"],
        "actors_busy_s": seconds["actors_busy"],
        "driver_peak_rss_mb": memory["rss"],
        "console_warnings": memory["warnings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="Row counts (default: %(default)s).")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work-dir", default="/tmp/raytrain-bench-data")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "predict.json"))
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    work = Path(args.work_dir)
    for rows in sizes:
        generate(work / f"rows-{rows}", rows)
    run_dir = train_model(work, work / f"rows-{min(sizes)}")
    results: dict[int, list[dict]] = {rows: [] for rows in sizes}
    for rep in range(args.reps):
        for rows in sizes:
            data_dir = work / f"rows-{rows}"
            p = plain(data_dir, work / "predict-plain")
            r = raytrain_predict(run_dir, data_dir, work / "predict-raytrain")
            assert p["rows"] == r["rows"] == rows, (p, r)
            r["steady_per_cpu_x_plain"] = p["loop_s"] / r["actors_busy_s"]
            r["whole_per_cpu_x_plain"] = p["loop_s"] / (r["prediction_s"] * CPUS)
            results[rows].append({"plain": p, "raytrain": r})
            print(
                f"rep {rep + 1} {rows:>12,} rows: plain {p['loop_s']:.2f} s, raytrain "
                f"{r['prediction_s']:.2f} s (actors busy {r['actors_busy_s']:.2f} s), per CPU "
                f"steady {r['steady_per_cpu_x_plain']:.2f}x, "
                f"whole {r['whole_per_cpu_x_plain']:.2f}x",
                flush=True,
            )
    print()
    header = (
        f"{'rows':>12} | {'plain rows/s':>12} | {'raytrain rows/s':>15} | {'steady/CPU':>22} | "
        f"{'whole/CPU':>22} | {'Ray start':>9} | {'driver peak':>11} | {'plain peak':>10}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for rows in sizes:
        reps = results[rows]
        plain_rate = statistics.median(rows / x["plain"]["loop_s"] for x in reps)
        ours = statistics.median(rows / x["raytrain"]["prediction_s"] for x in reps)
        steady = [x["raytrain"]["steady_per_cpu_x_plain"] for x in reps]
        whole = [x["raytrain"]["whole_per_cpu_x_plain"] for x in reps]
        start = statistics.median(x["raytrain"]["ray_start_s"] for x in reps)
        peak = statistics.median(x["raytrain"]["driver_peak_rss_mb"] for x in reps)
        plain_peak = statistics.median(x["plain"]["peak_rss_mb"] for x in reps)
        each = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
        print(
            f"{rows:>12,} | {plain_rate:>12,.0f} | {ours:>15,.0f} | "
            f"{statistics.median(steady):>5.2f}x ({each(steady)}) | "
            f"{statistics.median(whole):>5.2f}x ({each(whole)}) | {start:>7.1f} s | "
            f"{peak:>8.0f} MB | {plain_peak:>7.0f} MB"
        )
        summary.append(
            {
                "rows": rows,
                "plain_rows_per_s": plain_rate,
                "raytrain_rows_per_s": ours,
                "steady_per_cpu_x_plain": steady,
                "whole_per_cpu_x_plain": whole,
                "ray_start_s": start,
                "driver_peak_rss_mb": peak,
                "plain_peak_rss_mb": plain_peak,
            }
        )
    warnings = [
        w for rows in sizes for x in results[rows] for w in x["raytrain"]["console_warnings"]
    ]
    print(f"\nwarning lines on raytrain's console: {len(warnings)}")
    for line in warnings:
        print(f"  {line}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": "2 cores, 24 GiB, no GPU",
                "batch": BATCH,
                "cpus": CPUS,
                "summary": summary,
                "runs": {str(rows): results[rows] for rows in sizes},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
