"""The pass over a user's rows before training (raytrain.data.files finds the files and checks
their schemas): per-file statistics computed where the data is, in parallel, a few numbers per
file on the driver, and a one-line DataError for the first bad thing found.

Parquet is scanned a few row groups at a time, read with pyarrow: on the driver's threads when Ray
is embedded (started before Ray, beside its start-up: ``ScanAhead``), as Ray tasks on a cluster.
The same pass counts each row group's held-out rows (for dealing row groups to workers,
raytrain.data.pieces) and the training rows' feature moments (for scaling), so the data is read
once before training. CSV is scanned by Ray Data.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrain.config import DataConfig
from raytrain.data import csvfiles, files
from raytrain.data.columns import (
    Distinct,
    Encoding,
    Tally,
    features_of,
    nan_moments,
    split_keys,
    tally_block,
)
from raytrain.data.files import DataError, Source, in_validation, read_mapped
from raytrain.data.pieces import Piece
from raytrain.data.scaling import split_moments

_PATH = "path"  # the column Ray Data adds with include_paths=True


@dataclass
class FileStats:
    """What the scan learned about one file."""

    rows: int = 0
    val_rows: int = 0
    nonfinite: int = 0
    label_min: int | None = None
    label_max: int | None = None
    width_min: int | None = None
    width_max: int | None = None
    missing: int = 0  # rows with a missing numeric feature
    missing_where: str | None = None  # the first row group (or batch) with one, and its column
    null_labels: int = 0


def scan_block(
    table: pa.Table, source: Source, val_fraction: float, where: str = ""
) -> dict[str, Any]:
    """What one block of rows says (a Parquet row group, a CSV batch): its rows and held-out
    rows (and which), its labels' range, its feature widths, its rows with infinite or missing
    values, the training rows' feature moments (missing values aside) and counts
    (raytrain.data.columns.Tally). ``where`` names the block in an error."""
    found: dict[str, Any] = {"rows": table.num_rows, "val_rows": 0, "nonfinite": 0, "missing": 0}
    label = source.label_column
    if label is not None:
        found.update(_labels_found(table.column(label), source))
    x = features_of(table, source.feature_columns)
    if x is None:  # ragged lists: the widths say so, nothing else is needed
        column = table.column(source.feature_columns[0]).combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        found.update(width_min=int(lengths.min()), width_max=int(lengths.max()))
        return found
    found.update(width_min=x.shape[1], width_max=x.shape[1])
    held_out = None
    distinct = [Distinct.of(table.column(c)) for c in source.categorical]
    if val_fraction:
        keys = split_keys(table, x, source.categorical, distinct)
        held_out = in_validation(keys, val_fraction)
        found["val_rows"] = int(held_out.sum())
        found["held_out"] = np.packbits(held_out).tobytes()
    found["moments"] = split_moments(x, held_out)  # None: a value is not finite
    if found["moments"] is None:
        infinite = np.isinf(x)
        found["nonfinite"] = int(infinite.any(axis=1).sum())
        missing = np.isnan(x)
        found["missing"] = int(missing.any(axis=1).sum())
        if found["missing"]:
            column = _feature_name(source, int(np.argmax(missing.any(axis=0))))
            found["missing_where"] = f"{where}column {column!r}"
        found["moments"] = None if found["nonfinite"] else nan_moments(x, held_out)
    found["tally"] = tally_block(
        table,
        x,
        held_out,
        source.categorical,
        label,
        source.label_names,
        found["missing"] > 0,
        source.regression,
        distinct,
    )
    return found


def _labels_found(column, source: Source) -> dict[str, Any]:
    """A block's rows without a label (a regression target: also NaN or infinite) and the range
    of its class indexes (0, 0 for names and targets)."""
    found = {"null_labels": column.null_count, "label_min": 0, "label_max": 0}
    if source.regression:  # a target: a NaN or an infinity is as good as none
        values = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        found["null_labels"] = int((~np.isfinite(values)).sum())
    elif not source.label_names and 0 < len(column) > column.null_count:
        found["label_min"] = pc.min(column).as_py()
        found["label_max"] = pc.max(column).as_py()
    return found


def _feature_name(source: Source, index: int) -> str:
    columns = source.feature_columns
    return columns[index] if len(columns) > 1 else f"{columns[0]}[{index}]"


def scan_batch(batch: pa.Table, source: Source, val_fraction: float) -> pa.Table:
    """``scan_block`` of one batch, per file (a Ray Data map_batches function): a row per file
    with the file's path and what was found, pickled."""
    paths = batch.column(_PATH).to_numpy(zero_copy_only=False)
    out: dict[str, list] = {"path": [], "found": []}
    for path in np.unique(paths):
        part = batch.filter(pa.array(paths == path)).drop_columns([_PATH])
        found = scan_block(part, source, val_fraction, "a batch of rows, ")
        out["path"].append(str(path))
        out["found"].append(pickle.dumps(found))
    return pa.table(out)


_TASK_ROWS = 1_000_000  # rows per scan task (whole row groups)


@dataclass(frozen=True)
class ParquetScan:
    """What the scan of Parquet (or CSV) files found: per-file statistics, every row group with
    its held-out rows (Parquet), the (count, mean, m2) of the training rows' features per row
    group, and the training rows' counts (missing values, categories, labels)."""

    files: dict[str, FileStats]
    pieces: tuple[Piece, ...]
    moments: list[dict]
    tally: Tally = field(default_factory=Tally)


def scan_row_groups(
    filesystem, file: str, row_groups: Sequence[int], source: Source, val_fraction: float
) -> list[dict]:
    """``scan_block`` of some row groups of one file (a Ray task): one dict per row group."""
    out = []
    with pq.ParquetFile(file, filesystem=filesystem) as parquet:
        for index in row_groups:
            table = parquet.read_row_group(index, columns=source.columns)
            found = scan_block(table, source, val_fraction, f"row group {index}, ")
            found["row_group"] = index
            out.append(found)
    return out


def scan_parquet(
    source: Source,
    val_fraction: float,
    threads: int = 0,
    stop: threading.Event | None = None,
    missing_ok: bool = True,
) -> ParquetScan:
    """One parallel pass over every row group: statistics, and DataError for bad rows.

    ``threads`` > 0: in this process, on that many threads (an embedded Ray's driver is on the
    machine with the data, and starting Ray worker processes for the tasks would cost more than
    the scan); 0: as Ray tasks, wherever the cluster has CPUs. ``stop`` set: the threads read
    no further row group and CancelledError is raised. ``missing_ok``: missing feature values
    are imputed later (``data.missing: impute``), not refused.
    """
    jobs: list[tuple[str, list[int]]] = []
    by_file: dict[str, list[tuple[int, int]]] = {}
    for file, index, rows in source.row_groups:
        by_file.setdefault(file, []).append((index, rows))
    for file, groups in by_file.items():
        chunk: list[int] = []
        held = 0
        for i, (index, rows) in enumerate(groups):
            chunk.append(index)
            held += rows
            if held >= _TASK_ROWS or i == len(groups) - 1:
                jobs.append((file, chunk))
                chunk, held = [], 0
    read = (source, val_fraction)
    if threads:
        stop = stop or threading.Event()

        def work(job: tuple[str, list[int]]) -> list[dict]:
            return [] if stop.is_set() else scan_row_groups(source.filesystem, *job, *read)

        with ThreadPoolExecutor(threads, thread_name_prefix="raytrain-scan") as pool:
            results = list(pool.map(work, jobs))
        if stop.is_set():
            raise CancelledError()
    else:
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(scan_row_groups)
        results = ray.get([task.remote(source.filesystem, *job, *read) for job in jobs])
    stats = {file: FileStats() for file in source.files}
    pieces, moments, tally = [], [], Tally()
    for (file, _), found in zip(jobs, results, strict=True):
        for part in found:
            _add(stats[file], part, moments, tally)
            held_out = part.get("held_out")
            pieces.append(Piece(file, part["row_group"], part["rows"], part["val_rows"], held_out))
    _raise_for_bad_rows(source, stats, missing_ok)
    return ParquetScan(stats, tuple(pieces), moments, tally)


@dataclass(frozen=True)
class Found:
    """A run's data files and, when all of them are Parquet, their scan (CSV is scanned by Ray
    Data, once Ray runs)."""

    train: Source
    val: Source | None  # data.val_path's files
    train_scan: ParquetScan | None  # None: not all Parquet
    val_scan: ParquetScan | None
    seconds: float  # finding and scanning them


def scan_files(
    cfg: DataConfig, threads: int, stop: threading.Event | None = None, task: str = "auto"
) -> Found:
    """Find the files of ``cfg.path`` (and ``cfg.val_path``) and scan them if they are Parquet
    (``scan_parquet``: on ``threads`` threads, or as Ray tasks if 0)."""
    started = time.perf_counter()
    columns = (cfg.feature_columns, cfg.label_column, cfg.categorical_columns)
    train = files.find(cfg.path, *columns, task=task)
    plan = (train.feature_columns, train.categorical, train.label_names, train.regression)
    val = files.find(cfg.val_path, *columns, plan=plan) if cfg.val_path else None
    if train.format != "parquet" or (val is not None and val.format != "parquet"):
        return Found(train, val, None, None, time.perf_counter() - started)
    missing_ok = cfg.missing == "impute"
    train_scan = scan_parquet(train, 0.0 if val else cfg.val_fraction, threads, stop, missing_ok)
    val_scan = scan_parquet(val, 0.0, threads, stop, missing_ok) if val else None
    return Found(train, val, train_scan, val_scan, time.perf_counter() - started)


def scan_threads(embedded: bool) -> int:
    """Threads of the driver that scan Parquet: all its cores on an embedded Ray (the driver is
    on the machine with the data); none on a cluster, where Ray tasks scan the files."""
    return (os.cpu_count() or 1) if embedded else 0


class ScanAhead:
    """``scan_files`` on a thread of its own, started before torch and Ray are imported and Ray
    starts: an embedded Ray's driver scans Parquet on its own threads, which need no Ray, so
    the check runs beside the start-up instead of after it. ``result()`` waits for it and
    raises what it raised (a DataError: the same one-line error as a scan after Ray's start);
    ``cancel()`` stops it after the row groups being read."""

    def __init__(self, cfg: DataConfig, threads: int, task: str = "auto") -> None:
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix="raytrain-scan-ahead")
        self._future = pool.submit(scan_files, cfg, threads, self._stop, task)
        pool.shutdown(wait=False)

    def result(self) -> Found:
        return self._future.result()

    def raise_if_failed(self) -> None:
        """Raise now what the scan raised, if it has already failed (a path that does not
        exist fails at once: said before Ray starts)."""
        if self._future.done() and self._future.exception() is not None:
            self.result()

    def cancel(self) -> None:
        self._stop.set()


def scan_ahead(cfg: DataConfig, embedded: bool, task: str = "auto") -> ScanAhead | None:
    """The check of the data files, started now if the driver will scan them itself (files on
    an embedded Ray), so that it runs while torch and Ray load and Ray starts; else None."""
    if cfg.path is None or not embedded:
        return None
    return ScanAhead(cfg, scan_threads(embedded=True), task)


class Scanned:
    """A check already made, given as ``ScanAhead`` gives its own: a sweep checks its data files
    once and hands the result to every trial (raytrain.sweep.trials)."""

    def __init__(self, found: Found) -> None:
        self.found = found

    def result(self) -> Found:
        return self.found


def _add(s: FileStats, row: dict, moments: list[dict], tally: Tally) -> None:
    """Fold what the scan found in one block into its file's statistics, the moments and the
    counts."""
    s.rows += row["rows"]
    s.val_rows += row["val_rows"]
    s.nonfinite += row["nonfinite"]
    s.missing += row["missing"]
    s.null_labels += row.get("null_labels", 0)
    if row["missing"] and s.missing_where is None:
        s.missing_where = row["missing_where"]
    if row["rows"]:
        s.label_min = _fold(min, s.label_min, row.get("label_min", 0))
        s.label_max = _fold(max, s.label_max, row.get("label_max", 0))
        s.width_min = _fold(min, s.width_min, row["width_min"])
        s.width_max = _fold(max, s.width_max, row["width_max"])
    if row.get("moments") is not None and np.any(row["moments"]["n"]):
        moments.append(row["moments"])
    if row.get("tally") is not None:
        tally.add(row["tally"])


def scan(source: Source, val_fraction: float, missing_ok: bool = True) -> ParquetScan:
    """One streaming pass over every row of CSV files (Ray Data): what ``scan_parquet`` finds
    (without row groups), and DataError for bad rows."""
    scanned = read_mapped(source, scan_batch, include_paths=True, val_fraction=val_fraction)
    try:
        with _quiet(source.format == "csv"):
            rows = scanned.take_all()
    except Exception:  # a CSV value that does not convert: find it again to name its line
        if source.format != "csv":
            raise
        for file in source.files:
            bad = csvfiles.find_bad_value(source.filesystem, file, source)
            if bad is not None:
                raise DataError(bad) from None
        raise
    stats = {file: FileStats() for file in source.files}
    moments: list[dict] = []
    tally = Tally()
    for row in rows:
        found = pickle.loads(row["found"])
        _add(stats.setdefault(_match(row["path"], stats), FileStats()), found, moments, tally)
    _raise_for_bad_rows(source, stats, missing_ok)
    return ParquetScan(stats, (), moments, tally)


@contextmanager
def _quiet(expected: bool) -> Iterator[None]:
    """Keep Ray Data from logging, with its traceback, a failure that is expected (a CSV value that
    does not convert) and is reported in one line instead."""
    log = logging.getLogger("ray.data")
    level = log.level
    if expected:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _match(path: str, stats: dict[str, FileStats]) -> str:
    # Ray Data reports paths without a URI scheme; match them to the listed files.
    if path in stats:
        return path
    return next((f for f in stats if f.endswith(path) or path.endswith(f)), path)


def _fold(op, current, value):
    return value if current is None else op(current, value)


def _raise_for_bad_rows(source: Source, stats: dict[str, FileStats], missing_ok: bool) -> None:
    features = ", ".join(source.feature_columns)
    widths = set()
    for file, s in stats.items():
        if s.rows == 0:
            continue
        if s.width_min != s.width_max:
            raise DataError(
                f"{file}: feature column {features!r} has rows of {s.width_min} to {s.width_max} "
                "features; every row needs the same number"
            )
        if s.nonfinite:
            raise DataError(
                f"{file}: {s.nonfinite} row(s) have infinite values in feature column(s) "
                f"{features!r}; clean or drop them"
            )
        if s.missing and not missing_ok:
            raise DataError(
                f"{file}, {s.missing_where}: {s.missing} row(s) have a missing (null or NaN) "
                "value; fill them, or set data.missing=impute"
            )
        if s.null_labels:
            what = "target (null, NaN or infinite)" if source.regression else "label"
            raise DataError(
                f"{file}: {s.null_labels} row(s) have no {what} in column "
                f"{source.label_column!r}; drop them"
            )
        if s.label_min < 0:
            raise DataError(
                f"{file}: label column {source.label_column!r} has label {s.label_min}; labels "
                "must be 0..classes-1"
            )
        widths.add(s.width_min)
    if not any(s.rows for s in stats.values()):
        raise DataError(f"the Parquet files under {source.files[0]!r} and the rest hold no rows")
    if len(widths) > 1:
        raise DataError(f"files have different numbers of features per row: {sorted(widths)}")


def check_validation(scanned: ParquetScan, encoding: Encoding, classes: int) -> int:
    """Check separate validation files against the training data's encoding; returns their
    row count. (Categories they hold and training did not go to the "unknown" code.)"""
    stats = scanned.files
    for file, s in stats.items():
        if s.rows and s.width_min != encoding.width:
            raise DataError(
                f"{file}: {s.width_min} numeric features per row, but the training data has "
                f"{encoding.width}"
            )
        if encoding.class_names is None and s.rows and s.label_max >= classes:
            raise DataError(
                f"{file}: label {s.label_max} is outside the training data's classes "
                f"0..{classes - 1}"
            )
    if encoding.class_names is not None:
        unknown = sorted(scanned.tally.names - set(encoding.class_names))
        if unknown:
            raise DataError(
                f"validation label {unknown[0]!r} is not one of the training data's classes "
                f"({', '.join(encoding.class_names)})"
            )
    return sum(s.rows for s in stats.values())
