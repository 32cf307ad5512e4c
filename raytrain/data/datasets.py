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

import numpy as np
import ray
import ray.data

from raytrain.config import DataConfig
from raytrain.data import checks, files
from raytrain.data.columns import Encoding, Tally, build_encoding
from raytrain.data.pieces import PieceSet
from raytrain.data.scaling import Scaling, combine, combine_present, encoded_scaling, fit_scaling
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
    # Files: how raw rows become x and y (raytrain.data.columns); None for synthetic rows.
    encoding: Encoding | None = None
    label_counts: tuple[int, ...] = ()  # training rows per class


def build_datasets(
    cfg: DataConfig,
    workers: int = 1,
    copies_per_node: int = 1,
    scan_threads: int = 0,
    ahead: checks.ScanAhead | checks.Scanned | None = None,
    task: str = "auto",
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
        found = (
            ahead.result() if ahead is not None else checks.scan_files(cfg, scan_threads, task=task)
        )
        datasets = _file_datasets(cfg, found, workers, copies_per_node, scan_threads)
    if datasets.train is None:  # Parquet: the scan already measured what scaling needs
        return datasets
    train = datasets.train
    if datasets.ingest == "memory":
        blocks = tuple(datasets.train.to_arrow_refs())
        val_blocks = tuple(datasets.val.to_arrow_refs())
        datasets = dataclasses.replace(datasets, blocks=blocks, val_blocks=val_blocks)
        train = ray.data.from_arrow_refs(list(blocks))  # one pass over what is already read
    plain = datasets.encoding is None or (datasets.encoding.plain and datasets.scaling is None)
    if plain and (cfg.normalize == "standard" or (cfg.normalize == "auto" and cfg.path)):
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
        label_counts=tuple(np.bincount(split.train_y.numpy(), minlength=cfg.classes).tolist()),
    )


_KINDS = {"parquet": "Parquet", "csv": "CSV"}


def _file_datasets(
    cfg: DataConfig, found: checks.Found, workers: int, copies_per_node: int, scan_threads: int
) -> Datasets:
    train_source, val_source = found.train, found.val
    if found.train_scan is not None:
        return _parquet_datasets(cfg, found, workers, copies_per_node)
    hashed = 0.0 if cfg.val_path else cfg.val_fraction
    missing_ok = cfg.missing == "impute"
    scanned = checks.scan(train_source, hashed, missing_ok)
    train_stats = scanned.files
    rows = sum(s.rows for s in train_stats.values())
    held_out = sum(s.val_rows for s in train_stats.values())  # 0 with a separate val_path
    encoding, scaling = _encoding(cfg, train_source, scanned, rows - held_out)
    width, classes = encoding.features, _classes(train_stats, encoding)
    if val_source is not None:
        val_scan = (
            checks.scan_parquet(val_source, 0.0, scan_threads, missing_ok=missing_ok)
            if val_source.format == "parquet"
            else checks.scan(val_source, 0.0, missing_ok)
        )
        val_rows = checks.check_validation(val_scan, encoding, classes)
        train = files.read_xy(train_source, encoding)
        val = files.read_xy(val_source, encoding)
    else:
        val_rows = held_out
        train = files.read_xy(train_source, encoding, hashed, keep="train")
        val = files.read_xy(train_source, encoding, hashed, keep="val")
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
        scaling=scaling,
        encoding=encoding,
        label_counts=_label_counts(scanned.tally, encoding, classes),
    )


def _parquet_datasets(
    cfg: DataConfig, found: checks.Found, workers: int, copies_per_node: int
) -> Datasets:
    train_source, val_source = found.train, found.val
    scanned, val_scan = found.train_scan, found.val_scan
    hashed = 0.0 if val_source is not None else cfg.val_fraction
    rows = sum(s.rows for s in scanned.files.values())
    train_rows = rows - sum(s.val_rows for s in scanned.files.values())
    encoding, scaling = _encoding(cfg, train_source, scanned, train_rows)
    width, classes = encoding.features, _classes(scanned.files, encoding)
    read = (train_source.filesystem, train_source.feature_columns, train_source.label_column)
    if val_source is not None:
        checks.check_validation(val_scan, encoding, classes)
        train = PieceSet(*read, scanned.pieces, encoding=encoding)
        val_read = (val_source.filesystem, val_source.feature_columns, val_source.label_column)
        val = PieceSet(*val_read, val_scan.pieces, encoding=encoding)
    else:
        train = PieceSet(*read, scanned.pieces, hashed, keep="train", encoding=encoding)
        val = PieceSet(*read, scanned.pieces, hashed, keep="val", encoding=encoding)
    ingest = _ingest(cfg, train.total_rows, val.total_rows, width, workers, copies_per_node)
    return Datasets(
        train=None,
        val=None,
        features=width,
        classes=classes,
        train_rows=train.total_rows,
        val_rows=val.total_rows,
        ingest=ingest,
        source=_source_line(cfg, train_source, rows, train.total_rows, width, ingest),
        scaling=scaling,
        train_pieces=train,
        val_pieces=val,
        check_s=found.seconds,
        encoding=encoding,
        label_counts=_label_counts(scanned.tally, encoding, classes),
    )


def _encoding(
    cfg: DataConfig, source: files.Source, scanned: checks.ParquetScan, train_rows: int
) -> tuple[Encoding, Scaling | None]:
    """How the rows are encoded (raytrain.data.columns) and scaled, from the scan. Data with
    only numeric features, none missing, keeps the scaling computed as before: the scan's
    moments combined (Parquet), or a Ray Data pass over the rows (CSV, in build_datasets)."""
    present = combine_present(scanned.moments) if scanned.moments else None
    encoding = build_encoding(source, scanned.tally, present, cfg.max_categories)
    if cfg.normalize == "none":
        return encoding, None
    # Missing values only in held-out rows: plain, but the moments count present values.
    whole_rows = all(np.ndim(m["n"]) == 0 for m in scanned.moments)
    if encoding.plain and whole_rows:
        if source.format != "parquet":
            return encoding, None  # fitted on the rows by build_datasets
        return encoding, combine(scanned.moments)
    if present is None:
        present = {"n": np.zeros(encoding.width), "mean": np.zeros(encoding.width)}
        present["m2"] = present["n"]
    return encoding, encoded_scaling(present, scanned.tally.missing, train_rows, encoding)


def _classes(stats: dict[str, checks.FileStats], encoding: Encoding) -> int:
    """Classes: the trained names, or the largest integer label + 1 (regression: 1 output)."""
    if encoding.target is not None:
        return 1
    if encoding.class_names is not None:
        return len(encoding.class_names)
    return max(s.label_max for s in stats.values() if s.rows) + 1


def _label_counts(tally: Tally, encoding: Encoding, classes: int) -> tuple[int, ...]:
    """Training rows per class (for class weights), in class order."""
    if encoding.target is not None:
        return ()
    if encoding.class_names is not None:
        return tuple(tally.labels.get(name, 0) for name in encoding.class_names)
    return tuple(tally.labels.get(k, 0) for k in range(classes))


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
