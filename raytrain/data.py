"""Training data: synthetic tensors -> Arrow tables -> Ray Datasets {"train", "val"}.

Rows are stored as two columns: ``x``, a fixed-size list of float32 features, and ``y``, an int64
class label. That is standard Arrow, so Parquet files written from it open in any Arrow tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray.data
import torch

from raytrain.config import DataConfig

FEATURES = "x"
LABEL = "y"


@dataclass(frozen=True)
class Split:
    """Held-in and held-out rows as tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def make_synthetic(cfg: DataConfig) -> Split:
    """Generate the tutorial's data with ``cfg.seed`` and hold out ``cfg.val_fraction`` of it.

    ``labels="random"`` draws exactly what the tutorial draws (``randn`` features, then ``randint``
    labels); ``labels="rule"`` labels each row by a hidden random linear map plus Gaussian noise,
    so a linear model can learn it but not perfectly.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.samples, cfg.features, generator=gen)
    if cfg.labels == "random":
        y = torch.randint(0, cfg.classes, (cfg.samples,), generator=gen)
    else:
        rule = torch.randn(cfg.features, cfg.classes, generator=gen)
        noise = cfg.label_noise * torch.randn(cfg.samples, cfg.classes, generator=gen)
        y = (x @ rule + noise).argmax(dim=1)
    order = torch.randperm(cfg.samples, generator=gen)
    n_val = math.ceil(cfg.samples * cfg.val_fraction)
    # Sorted, so both splits keep the rows in the order they were generated.
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return Split(x[train], y[train], x[val], y[val])


def to_arrow(x: torch.Tensor, y: torch.Tensor) -> pa.Table:
    """An Arrow table with a fixed-size-list ``x`` column and an int64 ``y`` column."""
    flat = pa.array(np.ascontiguousarray(x.numpy(), dtype=np.float32).reshape(-1))
    return pa.table(
        {
            FEATURES: pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
            LABEL: pa.array(y.numpy().astype(np.int64)),
        }
    )


@dataclass(frozen=True)
class Datasets:
    """The Ray Datasets a run trains and validates on, and the shape of their rows."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    features: int
    classes: int
    train_rows: int
    val_rows: int


def build_datasets(cfg: DataConfig) -> Datasets:
    """Ray Datasets for the train and validation splits (needs a connected Ray)."""
    split = make_synthetic(cfg)
    return Datasets(
        train=ray.data.from_arrow(to_arrow(split.train_x, split.train_y)),
        val=ray.data.from_arrow(to_arrow(split.val_x, split.val_y)),
        features=cfg.features,
        classes=cfg.classes,
        train_rows=len(split.train_y),
        val_rows=len(split.val_y),
    )


def read_tensors(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate torch batches (dicts with ``x`` and ``y``) into two tensors."""
    xs, ys = [], []
    for batch in batches:
        xs.append(batch[FEATURES])
        ys.append(batch[LABEL])
    if not xs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys)
