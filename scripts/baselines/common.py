"""The two benchmark workloads, shared by the plain, torchrun and Ray Train no-op baselines.

Each baseline prints one JSON line on stdout: {"first_step_at": unix time, "epoch_s": [...],
"compute_s": [...], "samples_per_s": float}.
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

WORKLOADS = {
    # The tutorial: tiny and overhead-bound.
    "tutorial": {
        "rows": 800,
        "features": 10,
        "hidden": (),
        "classes": 2,
        "batch": 32,
        "epochs": 10,
        "lr": 0.01,
    },
    # Compute-bound: an MLP 256 -> 1024 -> 1024 -> 2 on 200,000 rows, one epoch, 256 rows per
    # worker per step.
    "compute": {
        "rows": 200_000,
        "features": 256,
        "hidden": (1024, 1024),
        "classes": 2,
        "batch": 256,
        "epochs": 1,
        "lr": 0.01,
    },
}


def data(w: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(w["rows"], w["features"], generator=gen)
    y = torch.randint(0, w["classes"], (w["rows"],), generator=gen)
    return x, y


def model(w: dict) -> nn.Module:
    torch.manual_seed(0)
    sizes = (w["features"], *w["hidden"])
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], w["classes"]))
    return nn.Sequential(*layers)


def train(net, x, y, w, batch: int) -> dict:
    """The tutorial's loop over (x, y) in batches of ``batch``; times every epoch and its steps."""
    optimizer = torch.optim.SGD(net.parameters(), lr=w["lr"])
    criterion = nn.CrossEntropyLoss()
    first = None
    epoch_s, compute_s = [], []
    for _ in range(w["epochs"]):
        started = time.perf_counter()
        compute = 0.0
        for i in range(0, len(y), batch):
            if first is None:
                first = time.time()
            t = time.perf_counter()
            optimizer.zero_grad()
            criterion(net(x[i : i + batch]), y[i : i + batch]).backward()
            optimizer.step()
            compute += time.perf_counter() - t
        epoch_s.append(time.perf_counter() - started)
        compute_s.append(compute)
    return {
        "first_step_at": first,
        "epoch_s": epoch_s,
        "compute_s": compute_s,
        "samples_per_s": len(y) * w["epochs"] / sum(epoch_s),
    }


def train_share(w: dict, rank: int, world: int, wrap) -> dict:
    """``train`` on this process's contiguous share of the rows with the per-worker batch (256
    per worker for compute, the global batch split for the tutorial), the model passed through
    ``wrap`` (DDP); samples/s over all ``world`` processes."""
    x, y = data(w)
    share = len(y) // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    batch = w["batch"] if w["epochs"] == 1 else w["batch"] // world
    result = train(wrap(model(w)), x, y, w, batch)
    result["samples_per_s"] *= world
    return result


def emit(result: dict) -> None:
    print("BENCH " + json.dumps(result), flush=True)
