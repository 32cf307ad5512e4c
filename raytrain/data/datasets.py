"""The Ray Datasets a run trains and validates on: ``build_datasets(cfg, ...) -> Datasets``.

Synthetic rows are generated on the driver; files are checked up front and then read where they
are needed, so the driver never holds them. Ingest is "memory" (every worker holds the whole
training split, copied once at start-up) or "stream" (every worker reads its share every epoch).

- Synthetic and CSV rows are Ray Datasets: in memory, their Arrow blocks are made once in Ray's
  object store and every worker fetches them; streamed (CSV), Ray Train hands every worker an
  equal shard of the Dataset.
- Parquet rows are row groups (raytrain.data.pieces) that each worker reads directly: in memory,
  a run of them once (the workers then exchange their rows); streamed, its deal of them every
  epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ray
import ray.data

from raytrain.config import DataConfig
from raytrain.data import checks, files
from raytrain.data.pieces import PieceSet
from raytrain.data.scaling import Scaling, combine, fit_scaling
from raytrain.data.synthetic import make_synthetic
from raytrain.data.tables import xy_table


@dataclass(frozen=True)
class Datasets:
    """The Ray Datasets of a run and the shape of their rows."""

    train: ray.data.Dataset | None  # None for Parquet: read as pieces
    val: ray.data.Dataset | None
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
    # Parquet: the row groups of each split, read by the workers themselves.
    train_pieces: PieceSet | None = None
    val_pieces: PieceSet | None = None
    check_s: float | None = None  # the up-front check of Parquet files (maybe beside Ray's start)


def build_datasets(
    cfg: DataConfig,
    workers: int = 1,
    copies_per_node: int = 1,
    scan_threads: int = 0,
    ahead: checks.ScanAhead | checks.Scanned | None = None,
) -> Datasets:
    """Ray Datasets for the train and validation splits (needs a connected Ray), and the
    training split's feature statistics when ``cfg.normalize`` asks for scaling.

    ``copies_per_node``: how many workers (each with its own copy of an in-memory split) can
    share one node; 'auto' ingest compares that many copies with ``cfg.memory_limit_mb``.
    ``scan_threads``: scan Parquet on this many threads of this process (embedded Ray), or as
    Ray tasks on the cluster (0). ``ahead``: the check of the files, already started (or made).
    """
    if cfg.path is None:
        datasets = _synthetic_datasets(cfg)
    else:
        found = ahead.result() if ahead is not None else checks.scan_files(cfg, scan_threads)
        datasets = _file_datasets(cfg, found, workers, copies_per_node, scan_threads)
    if datasets.train is None:  # Parquet: the scan already measured what scaling needs
        return datasets
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


def _file_datasets(
    cfg: DataConfig, found: checks.Found, workers: int, copies_per_node: int, scan_threads: int
) -> Datasets:
    train_source, val_source = found.train, found.val
    if found.train_scan is not None:
        return _parquet_datasets(cfg, found, workers, copies_per_node)
    hashed = 0.0 if cfg.val_path else cfg.val_fraction
    train_stats = checks.scan(train_source, hashed)
    rows = sum(s.rows for s in train_stats.values())
    held_out = sum(s.val_rows for s in train_stats.values())  # 0 with a separate val_path
    width, classes = _shape(train_stats)
    if val_source is not None:
        val_stats = (
            checks.scan_parquet(val_source, 0.0, scan_threads).files
            if val_source.format == "parquet"
            else checks.scan(val_source, 0.0)
        )
        val_rows = checks.check_validation(val_stats, width, classes)
        train = files.read_xy(train_source)
        val = files.read_xy(val_source)
    else:
        val_rows = held_out
        train = files.read_xy(train_source, hashed, keep="train")
        val = files.read_xy(train_source, hashed, keep="val")
    train_rows = rows - held_out
    ingest = _ingest(cfg, train_rows, val_rows, width, workers, copies_per_node)
    return Datasets(
        train=train,
        val=val,
        features=width,
        classes=classes,
        train_rows=train_rows,
        val_rows=val_rows,
        ingest=ingest,
        source=_source_line(cfg, train_source, rows, train_rows, width, ingest),
    )


def _parquet_datasets(
    cfg: DataConfig, found: checks.Found, workers: int, copies_per_node: int
) -> Datasets:
    train_source, val_source = found.train, found.val
    scanned, val_scan = found.train_scan, found.val_scan
    hashed = 0.0 if val_source is not None else cfg.val_fraction
    width, classes = _shape(scanned.files)
    read = (train_source.filesystem, train_source.feature_columns, train_source.label_column)
    if val_source is not None:
        checks.check_validation(val_scan.files, width, classes)
        train = PieceSet(*read, scanned.pieces)
        val_read = (val_source.filesystem, val_source.feature_columns, val_source.label_column)
        val = PieceSet(*val_read, val_scan.pieces)
    else:
        train = PieceSet(*read, scanned.pieces, hashed, keep="train")
        val = PieceSet(*read, scanned.pieces, hashed, keep="val")
    rows = sum(s.rows for s in scanned.files.values())
    ingest = _ingest(cfg, train.total_rows, val.total_rows, width, workers, copies_per_node)
    scaled = cfg.normalize in ("standard", "auto")
    return Datasets(
        train=None,
        val=None,
        features=width,
        classes=classes,
        train_rows=train.total_rows,
        val_rows=val.total_rows,
        ingest=ingest,
        source=_source_line(cfg, train_source, rows, train.total_rows, width, ingest),
        scaling=combine(scanned.moments) if scaled else None,
        train_pieces=train,
        val_pieces=val,
        check_s=found.seconds,
    )


def _shape(stats: dict[str, checks.FileStats]) -> tuple[int, int]:
    """Features per row and classes (the largest label + 1) of scanned files."""
    width = next(s.width_min for s in stats.values() if s.rows)
    return width, max(s.label_max for s in stats.values() if s.rows) + 1


def _ingest(
    cfg: DataConfig, train_rows: int, val_rows: int, width: int, workers: int, copies: int
) -> str:
    if train_rows < workers or val_rows < 1:
        raise files.DataError(
            f"data path {cfg.path!r} gives {train_rows} training and {val_rows} validation rows; "
            f"need at least {workers} training rows (one per worker) and one validation row"
        )
    if cfg.ingest != "auto":
        return cfg.ingest
    # Every worker holds a copy of an in-memory split: count the copies one node holds.
    megabytes = train_rows * (width * 4 + 8) / 1e6
    return "memory" if megabytes * copies <= cfg.memory_limit_mb else "stream"


def _source_line(
    cfg: DataConfig, source: files.Source, rows: int, train_rows: int, width: int, ingest: str
) -> str:
    megabytes = train_rows * (width * 4 + 8) / 1e6
    return (
        f"{_KINDS[source.format]} {cfg.path} ({len(source.files)} files, {rows:,} rows, "
        f"{megabytes:,.0f} MB training split, {ingest} ingest)"
    )
