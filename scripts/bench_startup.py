"""What starting Ray Train's autoscaling coordinator early saves a run on an embedded Ray.

Every Ray Train controller sends its resource request to a detached actor right after it starts,
and creates that actor on first use: on a fresh embedded Ray, a process started on the critical
path of fit(). raytrain's driver starts it before it prepares the data (raytrain.train.driver,
raytrain.cluster.start_autoscaling_coordinator). This runs the README's kind of run (2
workers, 2 epochs, synthetic data) in a fresh process each time, with the early start ("early")
and without it ("on first use": the function patched out in that process only), interleaved,
and prints the phases that change.

    python scripts/bench_startup.py              # 3 repetitions of each
    python scripts/bench_startup.py --reps 5

Writes docs/benchmarks/startup.json (or --out): {"date", "command", "runs": [{"rep", "variant",
"worker_startup_s", "train_s", "ray_start_s"}], "medians": {...}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = """
import sys
from raytrain import cluster
if sys.argv[1] == "on first use":
    cluster.start_autoscaling_coordinator = lambda: None
from raytrain.commands.train import main
sys.exit(main(["--workers", "2", "--epochs", "2", "--storage-path", sys.argv[2],
               "--name", "r", "--no-report"]))
"""
VARIANTS = ("early", "on first use")


def measure(variant: str, storage: Path) -> dict[str, float]:
    shutil.rmtree(storage, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-c", RUN, variant, str(storage)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    results = json.loads((storage / "r" / "results.json").read_text())
    return {
        "worker_startup_s": results["phases"]["worker_startup"],
        "train_s": results["wall_time_s"]["train"],
        "ray_start_s": results["phases"]["ray_start"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "startup.json"))
    args = parser.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="raytrain-bench-startup-"))
    runs = []
    try:
        for rep in range(args.reps):
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                runs.append({"rep": rep, "variant": variant, **measure(variant, storage / "s")})
            print(f"rep {rep + 1}/{args.reps} done", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    keys = ("worker_startup_s", "train_s", "ray_start_s")
    medians = {
        v: {k: statistics.median(r[k] for r in runs if r["variant"] == v) for k in keys}
        for v in VARIANTS
    }
    print(f"\n{'variant':<14}" + "".join(f"{k:>18}" for k in keys))
    for variant in VARIANTS:
        print(f"{variant:<14}" + "".join(f"{medians[variant][k]:>18.2f}" for k in keys))
    print("\nevery repetition (worker_startup_s, train_s):")
    for r in runs:
        print(
            f"  rep {r['rep']}  {r['variant']:<14} {r['worker_startup_s']:6.2f} {r['train_s']:6.2f}"
        )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python scripts/bench_startup.py " + " ".join(sys.argv[1:]),
        "runs": runs,
        "medians": medians,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
