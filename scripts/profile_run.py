"""Where a run's time and memory go, process by process: the profile behind the benchmark's misses.

Runs one benchmark variant (see bench.py) and samples every process it starts, twice a second:

- a timeline: seconds since launch, cores busy in the whole tree, idle cores, and the processes
  that used the most CPU in that interval (shows the serial stretches of Ray's start-up);
- CPU seconds per process over the whole run;
- context switches per second per process: its wake-ups, and how often it was pushed off a core;
- the proportional set size (PSS) of every process at the moment the tree's total peaked.

    python scripts/profile_run.py tutorial "raytrain x4"
    python scripts/profile_run.py tutorial "ray noop x4"
    python scripts/profile_run.py compute "raytrain 2x1"

Prints the four tables and writes bench-results/profile-<workload>-<variant>.json with the same
numbers: {"command", "timeline": [[t, busy, idle, [[cpu_s, name], ...]], ...],
"cpu_s": [[cpu_s, name], ...], "switches_per_s": [[wake-ups, pushed off, name], ...],
"peak_pss_mb": total, "pss_mb": [[mb, name], ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, _children, _pss_kb, variants  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            words = f.read().split("\0")
    except OSError:
        return ""
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]  # ray::Class, not the method it runs at the moment
    # "python -m raytrain.main", ".../gcs_server", ".../dashboard/agent.py": the telling part.
    telling = [w for w in words if w and not w.startswith("-")][:3]
    return " ".join(Path(w).name if "/" in w else w for w in telling)[:60]


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _switches(pid: int) -> tuple[int, int] | None:
    """Context switches over all of a process's threads: (voluntary, involuntary). A voluntary
    one is a thread going to sleep, so about one wake-up each; an involuntary one is a running
    thread pushed off its core by another."""
    voluntary = involuntary = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        involuntary += int(line.split()[1])
    except (OSError, ValueError):
        return None
    return voluntary, involuntary


def _idle_s() -> float:
    with open("/proc/stat") as f:
        return int(f.readline().split()[4]) / TICK


def _tree(root: int) -> list[int]:
    children, todo, found = _children(), [root], []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["tutorial", "compute"])
    parser.add_argument("variant", help='as in bench.py, e.g. "raytrain x4"')
    parser.add_argument("--top", type=int, default=12, help="rows in the per-process tables")
    args = parser.parse_args()
    cmd = variants(args.workload)[args.variant]
    if "raytrain.main" in cmd:
        storage = Path(ROOT / "bench-results" / "profile-runs")
        cmd = [*cmd, "--storage-path", str(storage)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{ROOT / 'scripts' / 'baselines'}:{ROOT}"
    launched = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env
    )
    cpu: dict[int, tuple[float, str]] = {}  # last CPU seconds seen per process
    # per process: (time, voluntary, involuntary) when first and when last seen
    seen: dict[int, tuple[tuple[float, int, int], tuple[float, int, int]]] = {}
    timeline, peak, peak_rows = [], 0.0, []
    last_t, last_idle = time.time(), _idle_s()
    while proc.poll() is None:
        time.sleep(0.5)
        now, idle = time.time(), _idle_s()
        spent, rows = [], []
        for pid in _tree(proc.pid):
            seconds = _cpu_s(pid)
            if seconds is None:
                continue
            # Read again: Ray renames a worker once it knows its role; an exited one has none.
            name = _name(pid) or cpu.get(pid, (0.0, "?"))[1]
            spent.append((seconds - cpu.get(pid, (0.0, ""))[0], name))
            cpu[pid] = (seconds, name)
            rows.append((_pss_kb(pid) / 1024, name))
            switches = _switches(pid)
            if switches is not None:
                now_seen = (now, *switches)
                seen[pid] = (seen.get(pid, (now_seen,))[0], now_seen)
        total = sum(mb for mb, _ in rows)
        if total > peak:
            peak, peak_rows = total, rows
        dt = now - last_t
        top = sorted((s for s in spent if s[0] > 0.02 * dt), reverse=True)[:3]
        busy, free = sum(s for s, _ in spent) / dt, (idle - last_idle) / dt
        timeline.append(
            (
                round(now - launched, 1),
                round(busy, 2),
                round(free, 2),
                [[round(s, 2), n] for s, n in top],
            )
        )
        last_t, last_idle = now, idle

    print(f"{'t s':>6} {'busy':>5} {'idle':>5}  top processes (CPU s in the interval)")
    for t, busy, idle, top in timeline:
        print(f"{t:6.1f} {busy:5.2f} {idle:5.2f}  " + "; ".join(f"{s:.2f} {n}" for s, n in top))
    totals: dict[str, float] = {}
    for seconds, name in cpu.values():
        totals[name] = totals.get(name, 0.0) + seconds
    by_cpu = sorted(((s, n) for n, s in totals.items()), reverse=True)
    print(f"\nCPU seconds per process (all {sum(totals.values()):.1f} s):")
    for seconds, name in by_cpu[: args.top]:
        print(f"{seconds:7.2f}  {name}")
    rates: dict[str, list[float]] = {}  # per name: wake-ups/s, preemptions/s
    for pid, (first, last) in seen.items():
        span = last[0] - first[0]
        if span >= 2:  # too short-lived to give a rate
            rate = rates.setdefault(cpu[pid][1], [0.0, 0.0])
            rate[0] += (last[1] - first[1]) / span
            rate[1] += (last[2] - first[2]) / span
    print(
        f"\nContext switches per second ({sum(r[0] for r in rates.values()):,.0f} wake-ups/s in "
        "all): a wake-up of any process on a machine whose cores are all busy pushes a training "
        "thread off its core"
    )
    print(f"{'wake-ups':>9} {'pushed off':>10}  process")
    by_wakes = sorted(((r[0], r[1], n) for n, r in rates.items()), reverse=True)
    for wakes, pushed, name in by_wakes[: args.top]:
        print(f"{wakes:9,.0f} {pushed:10,.0f}  {name}")
    print(f"\nPSS at the peak ({peak:,.0f} MB in all):")
    for mb, name in sorted(peak_rows, reverse=True)[: args.top]:
        print(f"{mb:7.1f}  {name}")
    out = ROOT / "bench-results" / f"profile-{args.workload}-{args.variant.replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(cmd),
                "timeline": timeline,
                "cpu_s": [[round(s, 2), n] for s, n in by_cpu],
                "switches_per_s": [[round(w), round(p), n] for w, p, n in by_wakes],
                "peak_pss_mb": round(peak, 1),
                "pss_mb": [[round(mb, 1), n] for mb, n in sorted(peak_rows, reverse=True)],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
