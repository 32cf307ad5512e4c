"""Training data: synthetic tensors -> Arrow tables -> Ray Datasets {"train", "val"}.

Rows are stored as two columns: ``x``, a fixed-size list of float32 features, and ``y``, an int64
class label. That is standard Arrow, so Parquet files written from it open in any Arrow tool.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from raytrain import parquet
from raytrain.config import DataConfig
from raytrain.errors import UserError
from raytrain.parquet import FEATURES, LABEL


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
    ingest: str  # "memory" or "stream"
    source: str  # for the console header
    # In memory: ``train``'s Arrow blocks in Ray's object store, made once; every worker fetches
    # them at start-up (no Ray Data pipeline runs on the workers). Streamed: empty, and Ray Train
    # hands each worker a shard of ``train``.
    blocks: tuple[ray.ObjectRef, ...] = ()


def build_datasets(cfg: DataConfig, workers: int = 1) -> Datasets:
    """Ray Datasets for the train and validation splits (needs a connected Ray).

    Synthetic data is generated on the driver; Parquet data is checked up front (DataError) and
    then read lazily, so the driver never holds it. In memory, the training split is made into
    blocks in the object store here, once (Parquet: read and converted once, not by every worker).
    """
    datasets = _synthetic_datasets(cfg) if cfg.path is None else _parquet_datasets(cfg, workers)
    if datasets.ingest == "memory":
        datasets = dataclasses.replace(datasets, blocks=tuple(datasets.train.to_arrow_refs()))
    return datasets


def _synthetic_datasets(cfg: DataConfig) -> Datasets:
    split = make_synthetic(cfg)
    return Datasets(
        train=ray.data.from_arrow(to_arrow(split.train_x, split.train_y)),
        val=ray.data.from_arrow(to_arrow(split.val_x, split.val_y)),
        features=cfg.features,
        classes=cfg.classes,
        train_rows=len(split.train_y),
        val_rows=len(split.val_y),
        ingest="memory",
        source=f"synthetic ({cfg.labels} labels), {cfg.samples} rows",
    )


def _parquet_datasets(cfg: DataConfig, workers: int) -> Datasets:
    train_source = parquet.find(cfg.path, cfg.feature_columns, cfg.label_column)
    hashed = 0.0 if cfg.val_path else cfg.val_fraction
    train_stats = parquet.scan(train_source, hashed)
    rows = sum(s.rows for s in train_stats.values())
    held_out = sum(s.val_rows for s in train_stats.values())  # 0 with a separate val_path
    val_rows = held_out  # or counted in val_path, below
    width = next(s.width_min for s in train_stats.values() if s.rows)
    classes = max(s.label_max for s in train_stats.values() if s.rows) + 1
    kwargs = {"feature_columns": train_source.feature_columns,
              "label_column": train_source.label_column}  # fmt: skip
    train = _read(train_source).map_batches(
        parquet.to_xy, batch_format="pyarrow",
        fn_kwargs={**kwargs, "val_fraction": hashed, "keep": "train" if hashed else "all"},
    )  # fmt: skip
    if cfg.val_path:
        val_source = parquet.find(cfg.val_path, cfg.feature_columns, cfg.label_column)
        val_stats = parquet.scan(val_source, 0.0)
        val_rows = sum(s.rows for s in val_stats.values())
        for file, s in val_stats.items():
            if s.rows and s.width_min != width:
                raise parquet.DataError(
                    f"{file}: {s.width_min} features per row, but the training data has {width}"
                )
            if s.rows and s.label_max >= classes:
                raise parquet.DataError(
                    f"{file}: label {s.label_max} in column {cfg.label_column!r} is outside the "
                    f"training data's classes 0..{classes - 1}"
                )
        val = _read(val_source).map_batches(
            parquet.to_xy, batch_format="pyarrow", fn_kwargs=kwargs
        )
    else:
        val = _read(train_source).map_batches(
            parquet.to_xy, batch_format="pyarrow",
            fn_kwargs={**kwargs, "val_fraction": hashed, "keep": "val"},
        )  # fmt: skip
    train_rows = rows - held_out
    if train_rows < workers or val_rows < 1:
        raise parquet.DataError(
            f"data path {cfg.path!r} gives {train_rows} training and {val_rows} validation rows; "
            f"need at least {workers} training rows (one per worker) and one validation row"
        )
    megabytes = train_rows * (width * 4 + 8) / 1e6
    ingest = cfg.ingest
    if ingest == "auto":
        ingest = "memory" if megabytes <= cfg.memory_limit_mb else "stream"
    return Datasets(
        train=train,
        val=val,
        features=width,
        classes=classes,
        train_rows=train_rows,
        val_rows=val_rows,
        ingest=ingest,
        source=f"Parquet {cfg.path} ({len(train_source.files)} files, {rows:,} rows, "
        f"{megabytes:,.0f} MB training split, {ingest} ingest)",
    )


def _read(source: parquet.Source) -> ray.data.Dataset:
    return ray.data.read_parquet(
        list(source.files), filesystem=source.filesystem, columns=source.columns
    )


def to_tensors(tables: list[pa.Table]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of Arrow tables with ``x`` and ``y`` columns as two tensors of their own (copied:
    tables fetched from the object store are read-only views of it)."""
    table = pa.concat_tables(tables)
    features = table.schema.field(FEATURES).type.list_size
    x = table.column(FEATURES).combine_chunks().flatten().to_numpy()
    y = table.column(LABEL).to_numpy()
    return torch.tensor(x).view(-1, features), torch.tensor(y)


# ---- generating Parquet data: python -m raytrain.data generate --rows N --out DIR ---------------


def generate_block(
    index: int,
    rows: int,
    out: str,
    features: int,
    classes: int,
    seed: int,
    labels: str,
    label_noise: float,
) -> tuple[str, int]:
    """Write block ``index`` as ``out/part-NNNNN.parquet``, seeded by ``(seed, index)``.

    Every block applies the same hidden rule (seeded by ``seed`` alone), so the blocks together
    are one data set whatever their number.
    """
    rule = np.random.default_rng([seed]).standard_normal((features, classes), dtype=np.float32)
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal((rows, features), dtype=np.float32)
    if labels == "random":
        y = rng.integers(0, classes, rows)
    else:
        noise = label_noise * rng.standard_normal((rows, classes), dtype=np.float32)
        y = (x @ rule + noise).argmax(axis=1)
    table = pa.table(
        {
            FEATURES: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features),
            LABEL: pa.array(y.astype(np.int64)),
        }
    )
    path = f"{out}/part-{index:05d}.parquet"
    pq.write_table(table, path, row_group_size=min(rows, 131072))
    return path, rows


def generate(args) -> list[tuple[str, int]]:
    """Write ``args.rows`` synthetic rows as Parquet files, one Ray task per file."""
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if any(name.endswith(".parquet") for name in os.listdir(out)):
        raise UserError(f"--out {out!r} already holds Parquet files; choose an empty directory")
    blocks = [
        (i, min(args.rows_per_file, args.rows - start))
        for i, start in enumerate(range(0, args.rows, args.rows_per_file))
    ]
    task = ray.remote(num_cpus=1)(generate_block)
    refs = [
        task.remote(i, n, out, args.features, args.classes, args.seed, args.labels, args.noise)
        for i, n in blocks
    ]
    return ray.get(refs)


def main(argv=None) -> int:
    import argparse
    import sys
    import time

    from raytrain.cluster import init_ray

    parser = argparse.ArgumentParser(
        prog="python -m raytrain.data",
        description="Write the synthetic data set as Parquet files, generated in parallel.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write synthetic rows as Parquet files")
    gen.add_argument("--rows", type=int, required=True, help="rows in all")
    gen.add_argument("--out", required=True, help="directory for the part-NNNNN.parquet files")
    gen.add_argument("--features", type=int, default=10, help="features per row (default 10)")
    gen.add_argument("--classes", type=int, default=2, help="label classes (default 2)")
    gen.add_argument("--labels", choices=("rule", "random"), default="rule")
    gen.add_argument("--noise", type=float, default=0.5, help="noise on the rule's logits")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--rows-per-file", type=int, default=1_000_000, help="rows per file (default 1,000,000)"
    )
    gen.add_argument("--address", help="Ray cluster to generate on (default: embedded Ray)")
    args = parser.parse_args(argv)
    for name in ("rows", "features", "rows_per_file"):
        if getattr(args, name) < 1:
            flag = name.replace("_", "-")
            print(f"raytrain: error: --{flag} must be at least 1", file=sys.stderr)
            return 2
    if args.classes < 2:
        print("raytrain: error: --classes must be at least 2", file=sys.stderr)
        return 2
    started = time.perf_counter()
    init_ray(args.address, None, verbose=False)
    try:
        written = generate(args)
    except UserError as e:
        print(f"raytrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    size = sum(os.path.getsize(path) for path, _ in written)
    print(
        f"wrote {sum(n for _, n in written):,} rows in {len(written)} files, {size / 1e6:,.1f} MB, "
        f"to {os.path.abspath(args.out)} in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
