"""What Ray Train costs: raytrain side by side with the alternatives a user would pick instead.

For two workloads (the tutorial's, tiny and overhead-bound; and a compute-bound MLP 256-1024-1024-2
on 200,000 rows) it runs, interleaved so that machine noise hits all alike, REPS repetitions of:

  plain     the tutorial as one plain PyTorch process (scripts/baselines/plain.py)
  torchrun  the same under torchrun --nproc_per_node=N, DDP over gloo (scripts/baselines/ddp.py)
  noop      a Ray Train TorchTrainer with raytrain's Ray settings whose loop only reports once:
            the engine's fixed cost, the floor raytrain cannot go below (scripts/baselines/noop.py)
  noop+DDP  the same, whose loop also wraps the tutorial's model in DDP and builds its optimizer
            first (tutorial only): the floor of any DDP program on Ray Train
  ray plain / ray DDP
            the same, whose workers run plain's loop (1 worker x 2 threads) or torchrun's DDP loop
            (2 workers x 1 thread) (compute only): the floor of training inside Ray Train
  raytrain  python -m raytrain.main --workers N

and reports medians of: wall time, time from launch to the first training step (and the share of it
that is Ray start-up), per-epoch time, per-epoch overhead (all epochs' wall time minus all the time
spent in forward/backward/step, per epoch), samples/second, and peak memory: the proportional set
size (PSS) summed over every process of the run, sampled every --pss-every seconds (0.2).

    python scripts/bench.py                          # both workloads, 5 repetitions
    python scripts/bench.py --reps 3 --workloads tutorial

Prints a table and writes docs/benchmarks/bench.json, which docs/performance.md quotes:
{"date", "machine", "command", "reps", "runs": [{"workload", "variant", "rep", "wall_s",
"first_step_s", "ray_start_s", "epoch_s", "overhead_per_epoch_s", "samples_per_s",
"peak_pss_mb"}], "medians": {workload: {variant: {...}}}, "ratios": {...}}. Values a variant
cannot measure are null.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from raytrain.runs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "scripts" / "baselines"
PY = sys.executable


def variants(workload: str) -> dict[str, list[str]]:
    """The commands to compare for a workload."""
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone"]
    if workload == "tutorial":
        return {
            "plain": [PY, str(BASE / "plain.py"), "tutorial", "1"],
            "torchrun x4": [*torchrun, "--nproc_per_node=4", str(BASE / "ddp.py"), "tutorial"],
            "ray noop x4": [PY, str(BASE / "noop.py"), "4"],
            "ray noop+DDP x4": [PY, str(BASE / "noop.py"), "4", "ddp"],
            "raytrain x4": [PY, "-m", "raytrain.main", "--workers", "4", "--no-report"],
            # The same with validation only when a checkpoint is written (epochs 5 and 10):
            # what validating every epoch costs.
            "raytrain x4 val@ckpt": [
                PY,
                "-m",
                "raytrain.main",
                "--workers",
                "4",
                "--no-report",
                "--set",
                "train.validate_every=0",
            ],
        }
    mlp = [
        "--set",
        "model.name=mlp",
        "--set",
        "model.hidden=[1024,1024]",
        "--set",
        "data.samples=250000",
        "--set",
        "data.features=256",
        "--epochs",
        "1",
        "--set",
        "train.shuffle=false",
        "--no-report",
    ]
    return {
        "plain 1 thread": [PY, str(BASE / "plain.py"), "compute", "1"],
        "plain 2 threads": [PY, str(BASE / "plain.py"), "compute", "2"],
        "torchrun x2": [*torchrun, "--nproc_per_node=2", str(BASE / "ddp.py"), "compute"],
        # plain.py's and ddp.py's loops inside Ray Train: what training beside a running Ray
        # costs a loop that has nothing of raytrain's.
        "ray plain 1x2": [PY, str(BASE / "noop.py"), "1", "train", "compute", "2"],
        "ray DDP 2x1": [PY, str(BASE / "noop.py"), "2", "train", "compute", "1"],
        "raytrain 2x1": [PY, "-m", "raytrain.main", "--workers", "2", "--batch-size", "512", *mlp],
        "raytrain 1x2": [
            PY,
            "-m",
            "raytrain.main",
            "--workers",
            "1",
            "--batch-size",
            "256",
            "--set",
            "scaling.cpus_per_worker=2",
            *mlp,
        ],
    }


# raytrain, the same loop without raytrain inside Ray Train, and the same loop without Ray: the
# first two apart are what raytrain costs, the last two apart what training beside Ray costs.
FLOORS = [
    ("raytrain 1x2", "ray plain 1x2", "plain 2 threads"),
    ("raytrain 2x1", "ray DDP 2x1", "torchrun x2"),
]


# ---- memory: PSS summed over the process tree ----------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo += tree.get(pid, [])
    return total / 1024


# ---- one measured run ----------------------------------------------------------------------------


def measure(cmd: list[str], workload: str, storage: Path, pss_every: float = 0.2) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{BASE}:{ROOT}"
    raytrain = "raytrain.main" in cmd
    name = f"bench-{time.time_ns()}"
    if raytrain:
        cmd = [*cmd, "--storage-path", str(storage), "--name", name]
    launched = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
    )
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(pss_every):
            peak = max(peak, tree_pss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    row = {
        "wall_s": wall,
        "peak_pss_mb": peak,
        "first_step_s": None,
        "ray_start_s": None,
        "epoch_s": None,
        "overhead_per_epoch_s": None,
        "samples_per_s": None,
    }
    if raytrain:
        run_dir = storage / name
        results = json.loads((run_dir / "results.json").read_text())
        epochs = read_metrics(run_dir)
        first = min(w["started_at"] for w in epochs[0]["workers"])
        compute = [max(w["compute_s"] for w in e["workers"]) for e in epochs]
        span = epochs[-1]["time"] - first
        row.update(
            first_step_s=first - launched,
            ray_start_s=results["phases"].get("ray_start"),
            epoch_s=statistics.median(e["epoch_time_s"] for e in epochs),
            # Both sides summed over the same epochs: a median of one against a mean of the
            # other charged a slow epoch's forward and backward (the first's warm-up, a noisy
            # moment on a shared machine) as overhead.
            overhead_per_epoch_s=(span - sum(compute)) / len(epochs),
            samples_per_s=sum(e["rows"] for e in epochs) / sum(e["epoch_time_s"] for e in epochs),
        )
    else:
        line = next(x for x in out.splitlines() if x.startswith("BENCH "))
        bench = json.loads(line[len("BENCH ") :])
        row["first_step_s"] = bench["first_step_at"] - launched
        if "epoch_s" in bench:
            row.update(
                epoch_s=statistics.median(bench["epoch_s"]),
                overhead_per_epoch_s=(sum(bench["epoch_s"]) - sum(bench["compute_s"]))
                / len(bench["epoch_s"]),
                samples_per_s=bench["samples_per_s"],
            )
    return row


def median_of(rows: list[dict], key: str):
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--workloads", nargs="+", default=["tutorial", "compute"], choices=["tutorial", "compute"]
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "bench.json"))
    parser.add_argument(
        "--pss-every",
        type=float,
        default=0.2,
        help="seconds between memory samples; reading every process's smaps_rollup is not free "
        "(raytrain 1x2 did 0.68x of plain 2 threads sampled every 0.2 s, 0.80x every 5 s)",
    )
    parser.add_argument(
        "--keep-runs",
        metavar="DIR",
        help="keep raytrain's run directories (metrics.jsonl of every epoch) under DIR; by "
        "default they go with a temporary directory when the benchmark ends",
    )
    args = parser.parse_args()
    if args.keep_runs:
        storage = Path(args.keep_runs).resolve()
        storage.mkdir(parents=True, exist_ok=True)
    else:
        storage = Path(tempfile.mkdtemp(prefix="raytrain-bench-"))
    runs = []
    try:
        for rep in range(args.reps):
            for workload in args.workloads:
                for variant, cmd in variants(workload).items():
                    row = measure(cmd, workload, storage, args.pss_every)
                    runs.append({"workload": workload, "variant": variant, "rep": rep, **row})
                    print(
                        f"rep {rep + 1}/{args.reps} {workload:8} {variant:16} "
                        f"{row['wall_s']:6.1f} s {row['peak_pss_mb']:7.0f} MB",
                        file=sys.stderr,
                    )
    finally:
        if not args.keep_runs:
            shutil.rmtree(storage, ignore_errors=True)
    keys = [
        "wall_s",
        "first_step_s",
        "ray_start_s",
        "epoch_s",
        "overhead_per_epoch_s",
        "samples_per_s",
        "peak_pss_mb",
    ]
    medians: dict = {}
    for workload in args.workloads:
        medians[workload] = {}
        for variant in variants(workload):
            mine = [r for r in runs if r["workload"] == workload and r["variant"] == variant]
            medians[workload][variant] = {k: median_of(mine, k) for k in keys}
    ratios = {}
    if "tutorial" in medians:
        t = medians["tutorial"]
        ours, noop, peer = t["raytrain x4"], t["ray noop x4"], t["torchrun x4"]
        ratios["tutorial: raytrain / noop wall"] = ours["wall_s"] / noop["wall_s"]
        ratios["tutorial: raytrain / torchrun wall"] = ours["wall_s"] / peer["wall_s"]
        ratios["tutorial: raytrain / noop peak PSS"] = ours["peak_pss_mb"] / noop["peak_pss_mb"]
        ddp = t["ray noop+DDP x4"]
        ratios["tutorial: raytrain / noop+DDP wall"] = ours["wall_s"] / ddp["wall_s"]
        ratios["tutorial: raytrain / noop+DDP peak PSS"] = ours["peak_pss_mb"] / ddp["peak_pss_mb"]
        fewer = t["raytrain x4 val@ckpt"]
        ratios["tutorial: raytrain / raytrain val@ckpt wall"] = ours["wall_s"] / fewer["wall_s"]
    if "compute" in medians:
        c = medians["compute"]
        two, one, peer = c["raytrain 2x1"], c["raytrain 1x2"], c["torchrun x2"]
        ratios["compute: raytrain 2x1 / torchrun x2 samples/s"] = (
            two["samples_per_s"] / peer["samples_per_s"]
        )
        ratios["compute: raytrain 1x2 / raytrain 2x1 samples/s"] = (
            one["samples_per_s"] / two["samples_per_s"]
        )
        for ours, floor, theirs in FLOORS:
            ratios[f"compute: {floor} / {theirs} samples/s"] = (
                c[floor]["samples_per_s"] / c[theirs]["samples_per_s"]
            )
            ratios[f"compute: {ours} / {floor} samples/s"] = (
                c[ours]["samples_per_s"] / c[floor]["samples_per_s"]
            )

    # The goals hold in every repetition, not only in the medians: each repetition's own ratios.
    def per_rep(workload: str, ours: str, theirs: str, key: str) -> list[float]:
        by = {(r["variant"], r["rep"]): r[key] for r in runs if r["workload"] == workload}
        return [by[ours, rep] / by[theirs, rep] for rep in range(args.reps)]

    each = {}
    if "tutorial" in medians:
        each["tutorial: raytrain / noop wall"] = per_rep(
            "tutorial", "raytrain x4", "ray noop x4", "wall_s"
        )
        each["tutorial: raytrain / noop+DDP wall"] = per_rep(
            "tutorial", "raytrain x4", "ray noop+DDP x4", "wall_s"
        )
    if "compute" in medians:
        each["compute: raytrain 2x1 / torchrun x2 samples/s"] = per_rep(
            "compute", "raytrain 2x1", "torchrun x2", "samples_per_s"
        )
        each["compute: raytrain 1x2 / plain 2 threads samples/s"] = per_rep(
            "compute", "raytrain 1x2", "plain 2 threads", "samples_per_s"
        )
        for ours, floor, theirs in FLOORS:
            each[f"compute: {floor} / {theirs} samples/s"] = per_rep(
                "compute", floor, theirs, "samples_per_s"
            )
            each[f"compute: {ours} / {floor} samples/s"] = per_rep(
                "compute", ours, floor, "samples_per_s"
            )
        c = medians["compute"]
        ratios["compute: raytrain 1x2 / plain 2 threads samples/s"] = (
            c["raytrain 1x2"]["samples_per_s"] / c["plain 2 threads"]["samples_per_s"]
        )
    print_table(medians)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for name, values in each.items():
        print(f"{name}, each repetition: {', '.join(f'{v:.2f}x' for v in values)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "command": " ".join(["python", *sys.argv]),
        "reps": args.reps,
        "pss_every_s": args.pss_every,
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
        "ratios_per_rep": each,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(medians: dict) -> None:
    print(
        "workload | variant | wall s | first step s | Ray start s | epoch s | "
        "overhead/epoch ms | samples/s | peak PSS MB"
    )
    print("--- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
    for workload, by_variant in medians.items():
        for variant, m in by_variant.items():
            per_epoch = m["overhead_per_epoch_s"]
            overhead = None if per_epoch is None else per_epoch * 1000
            print(
                f"{workload} | {variant} | {_fmt(m['wall_s'], '.1f')} | "
                f"{_fmt(m['first_step_s'], '.1f')} | {_fmt(m['ray_start_s'], '.1f')} | "
                f"{_fmt(m['epoch_s'], '.3f')} | {_fmt(overhead, '.1f')} | "
                f"{_fmt(m['samples_per_s'], ',.0f')} | {_fmt(m['peak_pss_mb'], ',.0f')}"
            )


if __name__ == "__main__":
    main()
