"""The Ray Datasets a run trains and validates on: ``build_datasets(cfg, ...) -> Datasets``.

Synthetic rows are generated on the driver; Parquet files are checked up front and then read
lazily, so the driver never holds them. Ingest is "memory" (the training split is made into Arrow
blocks in Ray's object store once; every worker fetches and copies them at start-up) or "stream"
(Ray Train hands every worker an equal shard of the Dataset, read every epoch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ray
import ray.data

from raytrain.config import DataConfig
from raytrain.data import checks, files
from raytrain.data.scaling import Scaling, fit_scaling
from raytrain.data.synthetic import make_synthetic
from raytrain.data.tables import xy_table


@dataclass(frozen=True)
class Datasets:
    """The Ray Datasets of a run and the shape of their rows."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    features: int
    classes: int
    train_rows: int
    val_rows: int
    ingest: str  # "memory" or "stream"
    source: str  # one line for the user
    # In memory: ``train``'s and ``val``'s Arrow blocks in Ray's object store, made once; every
    # worker fetches them at start-up (no Ray Data pipeline runs on the workers). Streamed: empty.
    blocks: tuple[ray.ObjectRef, ...] = ()
    val_blocks: tuple[ray.ObjectRef, ...] = ()
    scaling: Scaling | None = None  # the training split's feature statistics, when scaled


def build_datasets(cfg: DataConfig, workers: int = 1, copies_per_node: int = 1) -> Datasets:
    """Ray Datasets for the train and validation splits (needs a connected Ray), and the
    training split's feature statistics when ``cfg.normalize`` asks for scaling.

    ``copies_per_node``: how many workers (each with its own copy of an in-memory split) can
    share one node; 'auto' ingest compares that many copies with ``cfg.memory_limit_mb``.
    """
    if cfg.path is None:
        datasets = _synthetic_datasets(cfg)
    else:
        datasets = _file_datasets(cfg, workers, copies_per_node)
    train = datasets.train
    if datasets.ingest == "memory":
        blocks = tuple(datasets.train.to_arrow_refs())
        val_blocks = tuple(datasets.val.to_arrow_refs())
        datasets = dataclasses.replace(datasets, blocks=blocks, val_blocks=val_blocks)
        train = ray.data.from_arrow_refs(list(blocks))  # one pass over what is already read
    if cfg.normalize == "standard" or (cfg.normalize == "auto" and cfg.path is not None):
        datasets = dataclasses.replace(datasets, scaling=fit_scaling(train))
    return datasets


def _synthetic_datasets(cfg: DataConfig) -> Datasets:
    split = make_synthetic(cfg)
    return Datasets(
        train=ray.data.from_arrow(xy_table(split.train_x.numpy(), split.train_y.numpy())),
        val=ray.data.from_arrow(xy_table(split.val_x.numpy(), split.val_y.numpy())),
        features=cfg.features,
        classes=cfg.classes,
        train_rows=len(split.train_y),
        val_rows=len(split.val_y),
        ingest="memory",
        source=f"synthetic ({cfg.labels} labels), {cfg.samples} rows",
    )


_KINDS = {"parquet": "Parquet", "csv": "CSV"}


def _file_datasets(cfg: DataConfig, workers: int, copies_per_node: int) -> Datasets:
    train_source = files.find(cfg.path, cfg.feature_columns, cfg.label_column)
    hashed = 0.0 if cfg.val_path else cfg.val_fraction
    train_stats = checks.scan(train_source, hashed)
    rows = sum(s.rows for s in train_stats.values())
    held_out = sum(s.val_rows for s in train_stats.values())  # 0 with a separate val_path
    width = next(s.width_min for s in train_stats.values() if s.rows)
    classes = max(s.label_max for s in train_stats.values() if s.rows) + 1
    if cfg.val_path:
        val_source = files.find(cfg.val_path, cfg.feature_columns, cfg.label_column)
        val_rows = checks.check_validation(checks.scan(val_source, 0.0), width, classes)
        train = files.read_xy(train_source)
        val = files.read_xy(val_source)
    else:
        val_rows = held_out
        train = files.read_xy(train_source, hashed, keep="train")
        val = files.read_xy(train_source, hashed, keep="val")
    train_rows = rows - held_out
    if train_rows < workers or val_rows < 1:
        raise files.DataError(
            f"data path {cfg.path!r} gives {train_rows} training and {val_rows} validation rows; "
            f"need at least {workers} training rows (one per worker) and one validation row"
        )
    megabytes = train_rows * (width * 4 + 8) / 1e6
    ingest = cfg.ingest
    if ingest == "auto":
        # Every worker holds a copy of an in-memory split: count the copies one node holds.
        ingest = "memory" if megabytes * copies_per_node <= cfg.memory_limit_mb else "stream"
    return Datasets(
        train=train,
        val=val,
        features=width,
        classes=classes,
        train_rows=train_rows,
        val_rows=val_rows,
        ingest=ingest,
        source=f"{_KINDS[train_source.format]} {cfg.path} ({len(train_source.files)} files, "
        f"{rows:,} rows, "
        f"{megabytes:,.0f} MB training split, {ingest} ingest)",
    )
