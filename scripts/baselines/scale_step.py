"""One host's part of scripts/bench_scale.py: DDP over gloo as raytrain's workers run it (one
process per host, one torch thread, raytrain's compression hooks), timing training steps with
and without the all-reduce.

For each model and each compression mode, after warm-up steps: REPS steps that synchronise
(forward, backward with DDP's all-reduce of the gradients, optimizer step) alternating with REPS
that do not (the same inside ``no_sync()``: the arithmetic alone). Rank 0 prints one JSON line
per cell: the median step and compute times, their difference (what the all-reduce adds to a
step), and the gradient's bytes.

    python scripts/baselines/scale_step.py --rank R --world N --master IP:PORT \\
        --models mlp large --modes none fp16 powersgd --rate-mbit 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrain import config
from raytrain.model import MLP
from raytrain.train import compression

MODELS = {  # hidden widths: scripts/bench.py's compute MLP, and one with tens of MB of gradients
    "mlp": (1024, 1024),
    "large": (2048, 2048, 2048),
}
FEATURES, CLASSES = 256, 2
BATCH = 64  # rows per worker and step
POWERSGD_RANK = 2


def steps_for(grad_bytes: int, world: int, rate_mbit: float | None) -> int:
    """Repetitions: 10, fewer where one all-reduce takes seconds (the same on every rank)."""
    if not rate_mbit:
        return 10
    seconds = 2 * (world - 1) / world * grad_bytes * 8 / (rate_mbit * 1e6)
    return max(3, min(10, int(6 / max(seconds, 1e-3))))


def cell(name: str, mode: str, world: int, rate_mbit: float | None) -> dict:
    torch.manual_seed(0)
    model = DistributedDataParallel(MLP(FEATURES, CLASSES, MODELS[name]))  # raytrain's
    settings = [f"train.gradient_compression={mode}", f"train.powersgd.rank={POWERSGD_RANK}"]
    cfg = config.load(overrides=[*settings, "train.powersgd.start_iter=2"]).train
    compression.register(model, cfg, dist.get_rank())  # raytrain's hooks, as its workers use
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(BATCH, FEATURES)
    y = torch.randint(0, CLASSES, (BATCH,))
    loss_fn = nn.CrossEntropyLoss()

    def step(sync: bool) -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        if sync:
            loss_fn(model(x), y).backward()
        else:
            with model.no_sync():
                loss_fn(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    grad_bytes = sum(p.numel() * 4 for p in model.parameters())
    for _ in range(3):  # warm-up; PowerSGD compresses from its third step
        step(True)
    reps = steps_for(grad_bytes, world, rate_mbit)
    synced, local = [], []
    for _ in range(reps):
        dist.barrier()
        synced.append(step(True))
        dist.barrier()
        local.append(step(False))
    step_s, compute_s = statistics.median(synced), statistics.median(local)
    return {
        "model": name,
        "mode": mode,
        "world": world,
        "grad_mb": grad_bytes / 1e6,
        "reps": reps,
        "step_s": step_s,
        "compute_s": compute_s,
        "allreduce_s": max(step_s - compute_s, 0.0),
        "samples_per_s": BATCH * world / step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["none"])
    parser.add_argument("--rate-mbit", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(minutes=5),
    )
    for name in args.models:
        for mode in args.modes:
            result = cell(name, mode, args.world, args.rate_mbit)
            if args.rank == 0:
                print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
