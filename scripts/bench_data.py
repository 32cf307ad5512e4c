"""Data at scale: does the driver's memory stay flat as the data grows; how fast do workers ingest?

For each size it generates the synthetic data set as Parquet (raytrain data generate),
then trains one epoch with 2 workers, streaming (python -m raytrain.main ... --set
data.ingest=stream). It records the driver's peak RSS, sampled every 0.1 s, and its two parts: the
driver's own memory (anonymous + file-backed pages) and the object store's shared memory that Ray
maps into the driver while it reads validation blocks (owned by the store, bounded by its size).
From the run's results: each worker's ingest throughput (rows/s; the model is the tutorial's tiny
linear one and the batch is large, so the epoch is bound by ingest, not compute), the epoch time
and the phases.

    python scripts/bench_data.py                       # 10^5, 10^6, 10^7 rows
    python scripts/bench_data.py --sizes 1e5 1e6 1e7 1e8 --work-dir /big/disk

Prints a table and writes docs/benchmarks/data.json, which docs/performance.md quotes. Generated
data is kept in --work-dir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from raytrain.runs import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) of a process, in kB."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def run_sampled(cmd: list[str]) -> dict[str, float]:
    """Run the driver, sampling its memory every 0.1 s: peak RSS, and the peak of the part that is
    its own (anonymous + file-backed) apart from the object store's shared memory, which Ray maps
    into every process that reads a block (bounded by the store's size, not the driver's)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    peak = {"rss": 0.0, "own": 0.0, "shmem": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            kb = _status_kb(proc.pid)
            if kb:
                peak["rss"] = max(peak["rss"], kb["VmRSS"] / 1024)
                peak["own"] = max(peak["own"], (kb["RssAnon"] + kb["RssFile"]) / 1024)
                peak["shmem"] = max(peak["shmem"], kb["RssShmem"] / 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out}\n{err}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    parser.add_argument("--work-dir", default="/tmp/raytrain-bench-data")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "data.json"))
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    work = Path(args.work_dir)
    rows_out = []
    for size in args.sizes:
        rows = int(size)
        data_dir = work / f"rows-{rows}"
        if not any(data_dir.glob("*.parquet")):
            started = time.perf_counter()
            run(
                [
                    sys.executable,
                    "-m",
                    "raytrain",
                    "data",
                    "generate",
                    "--rows",
                    str(rows),
                    "--out",
                    str(data_dir),
                ]
            )
            generated = time.perf_counter() - started
        else:
            generated = None
        disk_mb = sum(f.stat().st_size for f in data_dir.glob("*.parquet")) / 1e6
        storage = work / "runs"
        name = f"bench-{rows}-{int(time.time())}"
        started = time.perf_counter()
        memory = run_sampled(
            [
                sys.executable,
                "-m",
                "raytrain.main",
                "--workers",
                "2",
                "--epochs",
                "1",
                "--batch-size",
                str(args.batch_size),
                "--set",
                f"data.path={data_dir}",
                "--set",
                "data.ingest=stream",
                "--no-report",
                "--storage-path",
                str(storage),
                "--name",
                name,
            ]
        )
        wall = time.perf_counter() - started
        results = json.loads((storage / name / "results.json").read_text())
        epoch = read_metrics(storage / name)[-1]
        per_worker = [w["samples_per_s"] for w in epoch["workers"]]
        rows_out.append(
            {
                "rows": rows,
                "parquet_mb": round(disk_mb, 1),
                "generate_s": round(generated, 1) if generated is not None else None,
                "train_rows": epoch["rows"],
                "driver_peak_rss_mb": round(results["driver_peak_rss_mb"], 1),
                "driver_peak_own_mb": round(memory["own"], 1),
                "driver_peak_object_store_mapped_mb": round(memory["shmem"], 1),
                "ingest_rows_per_s_per_worker": round(statistics.median(per_worker)),
                "epoch_s": round(epoch["epoch_time_s"], 2),
                "wall_s": round(wall, 1),
                "phases_s": {k: round(v, 2) for k, v in results["phases"].items()},
            }
        )
        print(f"done: {rows:,} rows", file=sys.stderr)
    header = (
        "rows",
        "Parquet MB",
        "driver peak RSS MB",
        "of it own MB",
        "object store mapped MB",
        "ingest rows/s/worker",
        "epoch s",
        "wall s",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows_out:
        print(
            f"{r['rows']:,} | {r['parquet_mb']:,.1f} | {r['driver_peak_rss_mb']:,.0f} | "
            f"{r['driver_peak_own_mb']:,.0f} | {r['driver_peak_object_store_mapped_mb']:,.0f} | "
            f"{r['ingest_rows_per_s_per_worker']:,} | {r['epoch_s']} | {r['wall_s']}"
        )
    growth = {
        key: max(r[key] for r in rows_out) / rows_out[0][key] - 1
        for key in ("driver_peak_rss_mb", "driver_peak_own_mb")
    }
    rss, own = growth["driver_peak_rss_mb"], growth["driver_peak_own_mb"]
    print(f"smallest to largest size: driver peak RSS {rss:+.0%}, its own memory {own:+.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "workers": 2,
        "batch_size": args.batch_size,
        "sizes": rows_out,
        "driver_rss_growth": growth["driver_peak_rss_mb"],
        "driver_own_growth": growth["driver_peak_own_mb"],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
