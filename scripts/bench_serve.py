"""Serving throughput and latency: raytrain serve against a plain FastAPI + uvicorn app and the
exported ONNX model in-process, on the same model and the same records, in one run.

For each of two models: tests/tabular.py's mixed data (4 numeric columns with missing values,
3 string columns, 3 classes), a run trained on it for 3 epochs with configs/tabular.yaml (one
embedding per string column) and its MLP's hidden layers: ``tabular``, the config's 64 units
(a forward pass costs microseconds), and ``wide``, 2048 x 2048 (17 MB of weights that every
forward pass reads); the run exported to ONNX. Then, in each repetition, for single records and
for lists of 100, at concurrency 1, 8 and 32:

- onnx: the exported model called in-process by onnxruntime (one intra-op thread) on rows
  already encoded, from 1, 8 or 32 threads: the floor, no HTTP and no JSON;
- plain: scripts/baselines/plain_fastapi.py under uvicorn, one worker, one torch thread: what a
  user would write by hand (no batching across requests);
- serve-R: ``raytrain serve RUN --replicas R`` on an embedded Ray (Serve's proxy, FastAPI
  validation per field, ``@serve.batch``), R = 1 and 2; haproxy-1: the same, 1 replica, with
  Ray Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, an opt-in of Ray 2.60).

The load comes from this process: asyncio with aiohttp, C requests in flight at all times for
--seconds, after a second of warm-up; each answer's status is checked. Requests per second,
records per second and the p50 and p99 latency per cell; the machine (2 cores) is shared by the
client, the server and, for Serve, its proxy.

    python scripts/bench_serve.py                       # 3 repetitions of 3 s per cell
    python scripts/bench_serve.py --reps 1 --models tabular

Prints a table of medians and every repetition's requests per second, and writes
docs/benchmarks/serve.json, which docs/serve.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.tabular import MIXED_CATEGORICAL, MIXED_NUMERIC, make_mixed_table  # noqa: E402

CONCURRENCY = (1, 8, 32)
# The model's hidden layers: the tabular config's own (a forward pass costs microseconds: the
# cost is all per request), and a wide one (a pass over 17 MB of weights per call, which a batch
# of requests shares).
MODELS = {"tabular": "[64]", "wide": "[2048,2048]"}
PAYLOADS = {"single": 1, "list100": 100}
RAYTRAIN = [sys.executable, "-m", "raytrain"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")


def prepare(work: Path, model: str) -> tuple[Path, Path]:
    """A run trained on the mixed data with ``model``'s hidden layers, and its ONNX export."""
    import pyarrow.parquet as pq

    data = work / "data"
    if not data.exists():
        data.mkdir()
        table = make_mixed_table(4000, seed=0)
        pq.write_table(table.drop_columns(["churned", "target"]), data / "data.parquet")
    print(f"training the {model} model (configs/tabular.yaml, {MODELS[model]}) ...", flush=True)
    check_call(
        [*RAYTRAIN, "train", "--config", "configs/tabular.yaml", "--data.path", str(data),
         "--data.label_column", "species", "--epochs", "3", "--workers", "1",
         "--model.hidden", MODELS[model], "--storage-path", str(work / "runs"), "--name", model]
    )  # fmt: skip
    run = work / "runs" / model
    onnx = work / f"{model}.onnx"
    check_call([*RAYTRAIN, "export", str(run), "--format", "onnx", "--out", str(onnx)])
    return run, onnx


class Server:
    """A server process on a port of its own, stopped with SIGINT (then SIGKILL) by its pid."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, cwd: Path = ROOT):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"server failed: {' '.join(cmd)}\n{self.log.read()}")
            if self._answers():
                return
            time.sleep(0.5)
        self.stop()
        sys.exit(f"server did not answer in 300 s: {' '.join(cmd)}")

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/docs", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float, record: bool) -> None:
            nonlocal errors, counter
            while time.perf_counter() < until:
                body = bodies[counter % len(bodies)]
                counter += 1
                began = time.perf_counter()
                async with session.post(
                    url, data=body, headers={"content-type": "application/json"}
                ) as reply:
                    await reply.read()
                    ok = reply.status == 200
                if record:
                    latencies.append(time.perf_counter() - began)
                    errors += not ok

        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(worker(until, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _cell(latencies, elapsed, errors)


def _cell(latencies: list[float], elapsed: float, errors: int) -> dict:
    ordered = sorted(latencies)
    return {
        "requests_per_s": len(ordered) / elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "requests": len(ordered),
        "errors": errors,
    }


def http_cell(url: str, records: list[dict], rows: int, concurrency: int, seconds: float):
    bodies = [
        json.dumps(records[i : i + rows] if rows > 1 else records[i]).encode()
        for i in range(0, len(records) - rows + 1, rows)
    ]
    return asyncio.run(_load(url + "/predict", bodies, concurrency, seconds))


def onnx_cell(onnx: Path, run: Path, records: list[dict], rows: int, concurrency: int, seconds):
    """The exported model in-process: ``concurrency`` threads calling session.run."""
    import numpy as np
    import onnxruntime as ort
    import pyarrow as pa

    from raytrain.data.columns import features_of
    from raytrain.inference.trained import load

    encoding = load(str(run)).encoding
    table = pa.Table.from_pylist(records)
    codes = [encoding.codes(table.column(c), v)[:, None] for c, v in
             zip(encoding.categorical, encoding.vocabularies, strict=True)]  # fmt: skip
    raw = np.concatenate([features_of(table, encoding.numeric), *codes], axis=1)
    raw = raw.astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = [raw[i : i + rows] for i in range(0, len(raw) - rows + 1, rows)]
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(until: float, record: bool) -> None:
        mine, i = [], 0
        while time.perf_counter() < until:
            began = time.perf_counter()
            session.run(None, {name: batches[i % len(batches)]})
            mine.append(time.perf_counter() - began)
            i += 1
        if record:
            with lock:
                latencies.extend(mine)

    for record, length in ((False, 1.0), (True, seconds)):
        until = time.perf_counter() + length
        started = time.perf_counter()
        threads = [
            threading.Thread(target=worker, args=(until, record)) for _ in range(concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return _cell(latencies, time.perf_counter() - started, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "serve.json"))
    args = parser.parse_args()
    records = make_mixed_table(1000, seed=5).select([*MIXED_NUMERIC, *MIXED_CATEGORICAL])
    cells: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            run, onnx = prepare(Path(tmp), model)
            for key, reps in serve_model(args, run, onnx, records.to_pylist()).items():
                cells[(model, *key)] = reps
    report(args, cells)


def serve_model(args, run: Path, onnx: Path, records: list[dict]) -> dict:
    """Every cell of one model, every repetition: {(system, payload, concurrency): [cell, ...]}.
    In each repetition the systems take turns, one server alive at a time (an idle embedded
    Ray's daemons would take CPU from the one measured)."""
    checkpoint = json.loads((run / "results.json").read_text())["checkpoint"]
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for rep in range(args.reps):
        for payload, rows in PAYLOADS.items():
            for concurrency in CONCURRENCY:
                cell = onnx_cell(onnx, run, records, rows, concurrency, args.seconds)
                cells.setdefault(("onnx", payload, concurrency), []).append(cell)
        for name, cmd, env, cwd in _servers(run, checkpoint):
            port = free_port()
            server = Server([*cmd, "--port", str(port)], port, env=env, cwd=cwd)
            try:
                for payload, rows in PAYLOADS.items():
                    for concurrency in CONCURRENCY:
                        cell = http_cell(server.url, records, rows, concurrency, args.seconds)
                        cells.setdefault((name, payload, concurrency), []).append(cell)
            finally:
                server.stop()
        print(
            f"{run.name} rep {rep + 1}/{args.reps}: c=32 single "
            + "  ".join(
                f"{system} {reps[-1]['requests_per_s']:,.0f}/s"
                for (system, payload, c), reps in cells.items()
                if payload == "single" and c == 32
            ),
            flush=True,
        )
    return cells


def _servers(run: Path, checkpoint: str):
    """(name, command without its port, environment, working directory) of each server."""
    yield (
        "plain",
        [sys.executable, "-m", "uvicorn", "plain_fastapi:app", "--workers", "1",
         "--log-level", "warning"],
        {"RAYTRAIN_CHECKPOINT": checkpoint},
        ROOT / "scripts" / "baselines",
    )  # fmt: skip
    for name, replicas, env in SERVES:
        yield name, [*RAYTRAIN, "serve", str(run), "--replicas", str(replicas)], env, ROOT


# raytrain serve as it comes, with 1 and 2 replicas; and with Ray Serve's HAProxy ingress (an
# opt-in of Ray 2.60: HAProxy in front of replicas that take HTTP themselves, instead of
# Serve's Python proxy), 1 replica.
SERVES = [
    ("serve-1", 1, {}),
    ("serve-2", 2, {}),
    ("haproxy-1", 1, {"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
]


def report(args, cells: dict) -> None:
    rows_out = []
    print(
        f"\n{'model':<8} {'system':<10} {'payload':>8} {'conc':>4} {'req/s':>9} {'records/s':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8}  req/s per repetition"
    )
    for model in dict.fromkeys(k[0] for k in cells):
        systems = list(dict.fromkeys(k[1] for k in cells if k[0] == model))
        for payload, rows in PAYLOADS.items():
            for concurrency in CONCURRENCY:
                for system in systems:
                    reps = cells[(model, system, payload, concurrency)]
                    rows_out.append(_row(model, system, payload, rows, concurrency, reps))
    document = {
        "command": "python scripts/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores",
        "seconds_per_cell": args.seconds,
        "reps": args.reps,
        "models": {m: f"configs/tabular.yaml, model.hidden {MODELS[m]}" for m in args.models},
        "cells": rows_out,
    }
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _row(model, system, payload, rows, concurrency, reps) -> dict:
    """One line of the table, printed; its medians and repetitions for the JSON."""
    median = {
        k: statistics.median(c[k] for c in reps) for k in ("requests_per_s", "p50_ms", "p99_ms")
    }
    errors = sum(c["errors"] for c in reps)
    every = " ".join(f"{c['requests_per_s']:.0f}" for c in reps)
    print(
        f"{model:<8} {system:<10} {payload:>8} {concurrency:>4} "
        f"{median['requests_per_s']:>9,.0f} {median['requests_per_s'] * rows:>10,.0f} "
        f"{median['p50_ms']:>8.2f} {median['p99_ms']:>8.2f}  {every}"
        + (f"  ({errors} errors)" if errors else "")
    )
    return {
        "model": model,
        "system": system,
        "payload": payload,
        "records_per_request": rows,
        "concurrency": concurrency,
        **median,
        "records_per_s": median["requests_per_s"] * rows,
        "errors": errors,
        "repetitions": reps,
    }


if __name__ == "__main__":
    main()
