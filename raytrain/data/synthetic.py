"""The one generator of synthetic rows, used both for a run's in-memory data and for the Parquet
files ``raytrain data generate`` writes: the same seed gives the same rows either way.

A data set is a sequence of blocks. Block ``b`` draws its rows from torch's generator seeded by
``seed`` for block 0 (so ``labels="random"`` is exactly the tutorial's ``torch.manual_seed(seed)``;
``torch.randn``; ``torch.randint``) and by a seed derived from ``(seed, b)`` for the others, so
blocks can be written in parallel. ``labels="rule"`` labels rows by a hidden linear map, drawn
from a generator of its own (the same for every block), plus Gaussian noise: a linear model can
learn it, but not perfectly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from raytrain.config import DataConfig
from raytrain.errors import UserError, first_line
from raytrain.storage import Location


@dataclass(frozen=True)
class Split:
    """Held-in and held-out rows as tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def _derived_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def draw(
    rows: int, cfg: DataConfig, block: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Block ``block`` of the data set ``cfg`` describes: ``rows`` features and labels, and the
    block's generator (for whatever the caller draws next)."""
    gen = torch.Generator().manual_seed(cfg.seed if block == 0 else _derived_seed(cfg.seed, block))
    x = torch.randn(rows, cfg.features, generator=gen)
    if cfg.labels == "random":
        return x, torch.randint(0, cfg.classes, (rows,), generator=gen), gen
    rule_gen = torch.Generator().manual_seed(_derived_seed(cfg.seed))
    rule = torch.randn(cfg.features, cfg.classes, generator=rule_gen)
    noise = cfg.label_noise * torch.randn(rows, cfg.classes, generator=gen)
    return x, (x @ rule + noise).argmax(dim=1), gen


def make_synthetic(cfg: DataConfig) -> Split:
    """``cfg.samples`` rows (block 0), with ``cfg.val_fraction`` of them held out at random."""
    x, y, gen = draw(cfg.samples, cfg)
    order = torch.randperm(cfg.samples, generator=gen)
    n_val = math.ceil(cfg.samples * cfg.val_fraction)
    # Sorted, so both splits keep the rows in the order they were generated.
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return Split(x[train], y[train], x[val], y[val])


def write_block(index: int, rows: int, out: str | Location, cfg: DataConfig) -> tuple[str, int]:
    """Write block ``index`` as ``out/part-NNNNN.parquet``; returns its path and row count."""
    import pyarrow.parquet as pq

    from raytrain.data.tables import xy_table

    x, y, _ = draw(rows, cfg, index)
    path = Location.of(out) / f"part-{index:05d}.parquet"
    table = xy_table(x.numpy(), y.numpy())
    pq.write_table(table, path.path, filesystem=path.fs, row_group_size=min(rows, 131072))
    return str(path), rows


def claim_out(out: str) -> Location:
    """The output directory, made if missing; UserError if it cannot be written or already holds
    Parquet files (said before Ray starts, by ``raytrain data generate``)."""
    out = Location.of(out)
    try:
        out.mkdir()
        taken = any(child.name.endswith(".parquet") for child in out.children())
    except OSError as e:
        raise UserError(f"--out {str(out)!r} cannot be written: {first_line(e)}") from None
    if taken:
        raise UserError(
            f"--out {str(out)!r} already holds Parquet files; choose an empty directory"
        )
    return out


def generate(rows: int, out: str, rows_per_file: int, cfg: DataConfig) -> list[tuple[str, int]]:
    """Write ``rows`` rows as Parquet files of ``rows_per_file`` rows, one Ray task per file
    (needs a connected Ray), so that no row passes through the driver."""
    import ray

    out = claim_out(out)
    task = ray.remote(num_cpus=1)(write_block)
    starts = range(0, rows, rows_per_file)
    refs = [
        task.remote(i, min(rows_per_file, rows - start), out, cfg) for i, start in enumerate(starts)
    ]
    return ray.get(refs)
