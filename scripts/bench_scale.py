"""Scaling across hosts on limited links: what DDP's all-reduce adds to a training step.

Builds 4 hosts in network namespaces on a bridge (tests/hosts.py: each its own address, no
shared /tmp) and limits every host's outgoing link with tc's token-bucket filter (tbf; this
kernel has no netem, so no added latency): unlimited (the veth pair, CPU-bound), 10 Gbit/s,
1 Gbit/s and 100 Mbit/s. For 1 host, and 2, 3 and 4 hosts with one worker each, it runs
scripts/baselines/scale_step.py: DDP over gloo with one torch thread per worker, as raytrain's
workers run it (without Ray's start-up around it), on two models: ``mlp`` (scripts/bench.py's
256-1024-1024-2, 5.3 MB of gradients) and ``large`` (256-2048x3-2, 35.7 MB), 64 rows per worker
and step. Each cell times steps with the all-reduce and without it (``no_sync``); the
difference is what the network adds. On the 1 and 0.1 Gbit/s links it also runs the two
compressions of ``train.gradient_compression`` (fp16; PowerSGD rank 2).

Then it fits the cost model of docs/scaling.md per link: all-reduce seconds = a + b x
2(N-1)/N x gradient bytes, ``a`` gloo's fixed cost per step and ``b`` the link's seconds per
byte, from the ``none`` cells; it prints predicted against measured for every cell.

This machine has 2 cores: with 3 or 4 hosts, the workers share them, so the compute column
grows with N here; on real machines it would not. The network part is what it measures.

    python scripts/bench_scale.py                 # about 10 minutes, as root
    python scripts/bench_scale.py --hosts 2 --rates 1000

Prints a table and writes docs/benchmarks/scale.json, which docs/scaling.md quotes. Removes
every namespace, link and qdisc it made, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.hosts import Hosts, HostsError, unavailable  # noqa: E402

STEP = ROOT / "scripts" / "baselines" / "scale_step.py"
RATES = {0: "unlimited", 10000: "10 Gbit/s", 1000: "1 Gbit/s", 100: "100 Mbit/s"}
PORT = 29500


def limit(hosts: Hosts, rate_mbit: int) -> None:
    """tbf on every host's eth0 (its outgoing traffic), or none for 0."""
    for ns in hosts.names:
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
            capture_output=True,
        )
        if rate_mbit:
            burst = max(64_000, rate_mbit * 1_000_000 // 8 // 100)  # 10 ms of the rate
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf"]
                + ["rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"],
                check=True,
                capture_output=True,
            )


def run_cell(hosts: Hosts, world: int, rate: int, modes: list[str], port: int) -> list[dict]:
    """scale_step.py on hosts 0..world-1; rank 0's JSON lines."""
    argv = [sys.executable, str(STEP), "--world", str(world), "--modes", *modes]
    argv += ["--master", f"{hosts.ips[0]}:{port}", "--rate-mbit", str(rate)]
    env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    procs = [
        hosts.popen(i, [*argv, "--rank", str(i)], env, cwd=ROOT, stdout=subprocess.PIPE)
        for i in range(world)
    ]
    try:
        out = procs[0].communicate(timeout=600)[0]
        for proc in procs[1:]:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"scale_step.py failed on {world} host(s) at rate {rate}")
    return [json.loads(line) | {"rate_mbit": rate} for line in out.splitlines() if line]


def fit(cells: list[dict]) -> dict[int, dict[str, float]]:
    """Per link: a (s) and b (s/byte) of allreduce = a + b x 2(N-1)/N x bytes, least squares
    over the ``none`` cells with N > 1."""
    model = {}
    for rate in sorted({c["rate_mbit"] for c in cells}):
        pts = [
            (2 * (c["world"] - 1) / c["world"] * c["grad_mb"] * 1e6, c["allreduce_s"])
            for c in cells
            if c["rate_mbit"] == rate and c["mode"] == "none" and c["world"] > 1
        ]
        if len(pts) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
        a = max(my - b * mx, 0.0)
        model[rate] = {"a_s": a, "b_s_per_byte": b, "effective_gbit_s": 8 / b / 1e9}
    return model


def predict(cell: dict, model: dict[int, dict[str, float]]) -> float | None:
    """The predicted step: the cell's compute plus the model's all-reduce (fp16: half the
    bytes); None for PowerSGD and one host."""
    m = model.get(cell["rate_mbit"])
    if m is None or cell["world"] == 1 or cell["mode"] == "powersgd":
        return None
    scale = 0.5 if cell["mode"] == "fp16" else 1.0
    moved = 2 * (cell["world"] - 1) / cell["world"] * cell["grad_mb"] * 1e6 * scale
    return cell["compute_s"] + m["a_s"] + m["b_s_per_byte"] * moved


def table(cells: list[dict], model: dict) -> None:
    head = f"{'link':<11} {'model':<6} {'mode':<9} {'N':>2} {'step ms':>9} {'compute':>9}"
    print(
        f"\n{head} {'allreduce':>10} {'comm %':>7} {'samples/s':>10} {'predicted':>10} {'err':>6}"
    )
    for c in cells:
        p = c.get("predicted_s")
        err = f"{(p - c['step_s']) / c['step_s']:+.0%}" if p else ""
        print(
            f"{RATES[c['rate_mbit']]:<11} {c['model']:<6} {c['mode']:<9} {c['world']:>2} "
            f"{c['step_s'] * 1e3:>9.1f} {c['compute_s'] * 1e3:>9.1f} "
            f"{c['allreduce_s'] * 1e3:>10.1f} {c['allreduce_s'] / c['step_s']:>7.0%} "
            f"{c['samples_per_s']:>10,.0f} {p * 1e3 if p else float('nan'):>10.1f} {err:>6}"
        )
    for rate, m in model.items():
        print(
            f"{RATES[rate]}: a = {m['a_s'] * 1e3:.1f} ms per step, effective "
            f"{m['effective_gbit_s']:.2f} Gbit/s"
        )


def measure(hosts: Hosts, counts: list[int], rates: list[int]) -> list[dict]:
    cells, port = [], PORT
    limit(hosts, 0)
    cells += run_cell(hosts, 1, 0, ["none"], port)  # one worker on one host: the baseline
    for rate in rates:
        limit(hosts, rate)
        modes = ["none", "fp16", "powersgd"] if rate in (1000, 100) else ["none"]
        for world in counts:
            port += 1  # a fresh port: the last group's may linger in TIME_WAIT
            started = time.monotonic()
            got = run_cell(hosts, world, rate, modes, port)
            cells += got
            print(f"{RATES[rate]}, {world} hosts: {time.monotonic() - started:.0f} s", flush=True)
    return cells


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rates", type=int, nargs="+", default=[0, 10000, 1000, 100])
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "scale.json"))
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"bench_scale: {reason} (it builds hosts in network namespaces)", file=sys.stderr)
        return 2
    bad = [r for r in args.rates if r not in RATES] + [n for n in args.hosts if not 2 <= n <= 4]
    if bad:
        print(f"bench_scale: {bad} not offered: --rates from {list(RATES)}, --hosts 2-4")
        return 2
    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        try:
            with Hosts(max(args.hosts), Path(tmp)) as hosts:
                cells = measure(hosts, args.hosts, args.rates)
        except KeyboardInterrupt:
            print("bench_scale: interrupted; every namespace and link removed", file=sys.stderr)
            return 130
        except HostsError as e:
            print(f"bench_scale: {e}", file=sys.stderr)
            return 1
    model = fit(cells)
    for c in cells:
        c["predicted_s"] = predict(c, model)
    table(cells, model)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2 cores, 24 GiB, Linux; hosts are network namespaces on one bridge",
        "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
        "cells": cells,
        "model": {str(k): v for k, v in model.items()},
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
