"""Does Ray Train's poll interval cost a compute-bound run? raytrain sets the controller's health
check interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) to 0.05 s so that fit() ends promptly; every
poll is an RPC into each worker. This runs bench.py's compute workload (raytrain 2x1 and 1x2)
with each interval given, interleaved with torchrun x2 and plain PyTorch on 2 threads, and prints
samples/s per repetition and the ratios the issue's goals use.

    python scripts/bench_poll.py                      # intervals 0.05 and 0.5, 2 repetitions
    python scripts/bench_poll.py --intervals 0.05 2 --reps 3

Writes docs/benchmarks/poll.json (or --out): {"date", "command", "runs": [{"rep", "variant",
"interval_s", "samples_per_s"}], "ratios": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", nargs="+", default=["0.05", "0.5"])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=str(bench.ROOT / "docs" / "benchmarks" / "poll.json"))
    args = parser.parse_args()
    variants = bench.variants("compute")
    storage = Path(tempfile.mkdtemp(prefix="raytrain-bench-poll-"))
    runs = []
    try:
        for rep in range(args.reps):
            for name in ("torchrun x2", "plain 2 threads"):
                row = bench.measure(variants[name], "compute", storage, pss_every=60)
                runs.append({"rep": rep, "variant": name, "interval_s": None, **_speed(row)})
            for name in ("raytrain 2x1", "raytrain 1x2"):
                for interval in args.intervals:
                    os.environ[ENV] = interval
                    try:
                        row = bench.measure(variants[name], "compute", storage, pss_every=60)
                    finally:
                        del os.environ[ENV]
                    runs.append(
                        {"rep": rep, "variant": name, "interval_s": float(interval), **_speed(row)}
                    )
            print(f"rep {rep + 1}/{args.reps} done", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    def speed(rep: int, variant: str, interval: float | None = None) -> float:
        return next(
            r["samples_per_s"]
            for r in runs
            if (r["rep"], r["variant"], r["interval_s"]) == (rep, variant, interval)
        )

    ratios = {}
    print("variant | poll s | samples/s per repetition | x torchrun x2 | x plain 2 threads")
    print("--- | ---: | --- | --- | ---")
    for name in ("torchrun x2", "plain 2 threads"):
        each = [speed(rep, name) for rep in range(args.reps)]
        print(f"{name} | - | {', '.join(f'{v:,.0f}' for v in each)} | | ")
    for name in ("raytrain 2x1", "raytrain 1x2"):
        for interval in map(float, args.intervals):
            each = [speed(rep, name, interval) for rep in range(args.reps)]
            vs_ddp = [each[r] / speed(r, "torchrun x2") for r in range(args.reps)]
            vs_plain = [each[r] / speed(r, "plain 2 threads") for r in range(args.reps)]
            ratios[f"{name} poll {interval:g} / torchrun x2"] = vs_ddp
            ratios[f"{name} poll {interval:g} / plain 2 threads"] = vs_plain
            print(
                f"{name} | {interval:g} | {', '.join(f'{v:,.0f}' for v in each)} | "
                f"{_each(vs_ddp)} | {_each(vs_plain)}"
            )
    Path(args.out).write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "command": "python scripts/bench_poll.py " + " ".join(sys.argv[1:]),
                "runs": runs,
                "ratios": ratios,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


def _speed(row: dict) -> dict:
    return {"samples_per_s": row["samples_per_s"]}


def _each(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({', '.join(f'{v:.2f}' for v in values)})"


if __name__ == "__main__":
    main()
