"""Data at scale: raytrain's data path side by side with a plain single-thread loop over the same
Parquet files, and the driver's memory as the data grows.

For each size it generates the synthetic data set as Parquet (raytrain data generate, 10 features),
then, in each repetition, one after the other:

- plain train: one plain process, no Ray, one thread: pyarrow.dataset batches -> torch.from_numpy
  -> a Linear(10, 2) SGD step, one epoch (scripts/baselines/plain_parquet.py);
- plain scan: the same batches turned into arrays, no model: the cost of reading the data once;
- raytrain stream: python -m raytrain.main, 2 workers, one epoch, the same global batch,
  data.ingest=stream;
- raytrain memory (sizes up to --memory-max): the same with data.ingest=memory;
- tutorial (once per repetition): raytrain's default run with 2 workers, whose first step is the
  start-up floor the data runs are compared with.

From each raytrain run: its epoch time, the up-front data check (its own time, results.json's
data_check_s; on an embedded Ray it runs beside Ray's start-up) and what of it the run waited for
after Ray had started (the data_preparation phase: the check on the critical path), the
workers' validation of the held-out rows (val_time_s, the slowest worker), the driver's final
validation, the copy into the workers (worker_data_copy, memory ingest), the time from launch to
the first training step, and the driver's peak RSS (sampled every 0.1 s; also its own part,
anonymous + file-backed pages, apart from shared memory Ray maps into it).

    python scripts/bench_data.py                                  # 10^5, 10^6, 10^7 rows, 3 reps
    python scripts/bench_data.py --sizes 1e8 --reps 1 --work-dir /big/disk

Prints a table of medians (and every repetition's ratios) and writes docs/benchmarks/data.json
(or --out), which docs/performance.md quotes. Generated data is kept in --work-dir and reused.
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


def plain(data_dir: Path, batch: int, mode: str) -> dict:
    """The plain single-thread loop (or scan) over the files: its BENCH line, and its launch."""
    launched = time.time()
    out = run(
        [sys.executable, "scripts/baselines/plain_parquet.py", str(data_dir), str(batch), mode]
    )
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    found = json.loads(line[len("BENCH ") :])
    if found["first_step_at"] is not None:
        found["first_step_s"] = found["first_step_at"] - launched
    return found


def raytrain_run(storage: Path, name: str, *flags: str) -> dict:
    """One raytrain run of one epoch with 2 workers: its figures from results and metrics."""
    cmd = [sys.executable, "-m", "raytrain.main", "--workers", "2", "--epochs", "1"]
    cmd += [*flags, "--no-report", "--storage-path", str(storage), "--name", name]
    launched = time.time()
    memory = run_sampled(cmd)
    wall = time.time() - launched
    results = json.loads((storage / name / "results.json").read_text())
    epoch = read_metrics(storage / name)[-1]
    phases = results["phases"]
    return {
        "wall_s": wall,
        "first_step_s": min(w["started_at"] for w in epoch["workers"]) - launched,
        "epoch_s": epoch["epoch_time_s"],
        "rows": epoch["rows"],
        "data_check_s": results["data_check_s"],
        "data_wait_s": phases["data_preparation"],
        "worker_data_copy_s": phases.get("worker_data_copy"),
        "workers_validation_s": epoch.get("val_time_s"),
        "val_rows": epoch.get("val_rows"),
        "driver_validation_s": phases["validation"],
        "driver_peak_rss_mb": results["driver_peak_rss_mb"],
        "driver_peak_own_mb": memory["own"],
        "console_warnings": memory["warnings"],
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
    }


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
    # A default run prints no warning of Ray's (or anyone's): keep any line that does.
    peak["warnings"] = [line for line in (out + err).splitlines() if "warn" in line.lower()]
    return peak


def generate(data_dir: Path, rows: int) -> float | None:
    if any(data_dir.glob("*.parquet")):
        return None
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
    return time.perf_counter() - started


def med(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--memory-max", type=float, default=1e7, help="largest size run in memory")
    parser.add_argument("--work-dir", default="/tmp/raytrain-bench-data")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "data.json"))
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()
    work = Path(args.work_dir)
    storage = work / "runs"
    sizes = [int(size) for size in args.sizes]
    generated = {rows: generate(work / f"rows-{rows}", rows) for rows in sizes}
    runs: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        stamp = f"{int(time.time())}-{rep}"
        runs.setdefault("tutorial", []).append(raytrain_run(storage, f"tutorial-{stamp}"))
        for rows in sizes:
            data_dir = work / f"rows-{rows}"
            batch = ["--batch-size", str(args.batch_size), "--set", f"data.path={data_dir}"]
            runs.setdefault(f"{rows} plain train", []).append(
                plain(data_dir, args.batch_size, "train")
            )
            runs.setdefault(f"{rows} plain scan", []).append(
                plain(data_dir, args.batch_size, "scan")
            )
            runs.setdefault(f"{rows} stream", []).append(
                raytrain_run(
                    storage, f"stream-{rows}-{stamp}", *batch, "--set", "data.ingest=stream"
                )
            )
            if rows <= args.memory_max:
                runs.setdefault(f"{rows} memory", []).append(
                    raytrain_run(
                        storage, f"memory-{rows}-{stamp}", *batch, "--set", "data.ingest=memory"
                    )
                )
            print(f"rep {rep + 1}/{args.reps}: {rows:,} rows done", file=sys.stderr)
    tutorial_first = med(runs["tutorial"], "first_step_s")
    table = []
    for rows in sizes:
        stream, memory = runs[f"{rows} stream"], runs.get(f"{rows} memory", [])
        plain_train, plain_scan = runs[f"{rows} plain train"], runs[f"{rows} plain scan"]
        epoch_ratios = [
            s["epoch_s"] / p["epoch_s"][0] for s, p in zip(stream, plain_train, strict=True)
        ]
        check_ratios = [
            s["data_check_s"] / p["epoch_s"][0] for s, p in zip(stream, plain_scan, strict=True)
        ]
        copy_ratios = [  # no memory runs above --memory-max
            m["worker_data_copy_s"] / p["epoch_s"][0]
            for m, p in zip(memory, plain_scan[: len(memory)], strict=True)
        ]
        table.append(
            {
                "rows": rows,
                "parquet_mb": round(
                    sum(f.stat().st_size for f in (work / f"rows-{rows}").glob("*.parquet")) / 1e6,
                    1,
                ),
                "generate_s": generated[rows],
                "plain_epoch_s": statistics.median(p["epoch_s"][0] for p in plain_train),
                "plain_scan_s": statistics.median(p["epoch_s"][0] for p in plain_scan),
                "stream_epoch_s": med(stream, "epoch_s"),
                "epoch_ratio": statistics.median(epoch_ratios),
                "epoch_ratios": epoch_ratios,
                "data_check_s": med(stream, "data_check_s"),
                "check_ratio": statistics.median(check_ratios),
                "check_ratios": check_ratios,
                "data_wait_s": med(stream, "data_wait_s"),
                "first_step_s": med(stream, "first_step_s"),
                "first_step_over_tutorial_s": med(stream, "first_step_s") - tutorial_first,
                "first_step_over_tutorial_each_s": [
                    s["first_step_s"] - t["first_step_s"]
                    for s, t in zip(stream, runs["tutorial"], strict=True)
                ],
                "workers_validation_s": med(stream, "workers_validation_s"),
                "val_rows": stream[0]["val_rows"],
                "driver_validation_s": med(stream, "driver_validation_s"),
                "memory_copy_s": med(memory, "worker_data_copy_s"),
                "copy_ratio": statistics.median(copy_ratios) if copy_ratios else None,
                "copy_ratios": copy_ratios,
                "memory_epoch_s": med(memory, "epoch_s"),
                "driver_peak_rss_mb": med(stream, "driver_peak_rss_mb"),
                "driver_peak_own_mb": med(stream, "driver_peak_own_mb"),
            }
        )
    header = (
        "rows",
        "plain epoch s",
        "stream epoch s",
        "x plain",
        "plain scan s",
        "data check s",
        "x scan",
        "check waited for s",
        "first step s",
        "vs tutorial s",
        "workers' validation s",
        "driver validation s",
        "memory copy s",
        "x scan",
        "driver peak RSS MB",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in table:
        cells = [
            f"{r['rows']:,}",
            _f(r["plain_epoch_s"]),
            _f(r["stream_epoch_s"]),
            _f(r["epoch_ratio"], "x"),
            _f(r["plain_scan_s"]),
            _f(r["data_check_s"]),
            _f(r["check_ratio"], "x"),
            _f(r["data_wait_s"]),
            _f(r["first_step_s"], "", 1),
            _f(r["first_step_over_tutorial_s"], "", 1, sign=True),
            _f(r["workers_validation_s"]),
            _f(r["driver_validation_s"]),
            _f(r["memory_copy_s"]),
            _f(r["copy_ratio"], "x"),
            _f(r["driver_peak_rss_mb"], "", 0),
        ]
        print(" | ".join(cells))
    print(f"tutorial (2 workers) first step: {tutorial_first:.1f} s")
    warned = [w for group in runs.values() for r in group for w in r.get("console_warnings", [])]
    print(f"warning lines on the consoles of the raytrain runs: {len(warned)}")
    for line in sorted(set(warned)):
        print(f"  {line}")
    for r in table:
        for what, key, form in (
            ("stream epoch / plain epoch", "epoch_ratios", "{:.2f}"),
            ("data check / plain scan", "check_ratios", "{:.2f}"),
            ("memory copy / plain scan", "copy_ratios", "{:.2f}"),
            ("first step - tutorial's (s)", "first_step_over_tutorial_each_s", "{:+.1f}"),
        ):
            if r[key]:
                each = ", ".join(form.format(x) for x in r[key])
                print(f"{r['rows']:,} rows: {what} in each repetition: {each}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "command": " ".join(["python", *sys.argv]),
        "workers": 2,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "tutorial_first_step_s": tutorial_first,
        "sizes": table,
        "runs": runs,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _f(value, unit: str = "", digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:{'+' if sign else ''}.{digits}f}{unit}"


if __name__ == "__main__":
    main()
