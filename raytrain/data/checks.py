"""The pass over a user's rows before training (raytrain.data.files finds the files and checks
their schemas): per-file statistics computed where the data is, in parallel, a few numbers per
file on the driver, and a one-line DataError for the first bad thing found."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raytrain.data import csvfiles
from raytrain.data.files import DataError, Source, features_of, in_validation, read_mapped

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


def scan_batch(
    batch: pa.Table, feature_columns: Sequence[str], label_column: str, val_fraction: float
) -> pa.Table:
    """Per-file statistics of one batch (a Ray Data map_batches function)."""
    keys = ("path", "rows", "val_rows", "nonfinite", "label_min", "label_max")
    out: dict[str, list] = {k: [] for k in (*keys, "width_min", "width_max")}
    paths = batch.column(_PATH).to_numpy(zero_copy_only=False)
    for path in np.unique(paths):
        part = batch.filter(pa.array(paths == path))
        labels = part.column(label_column).to_numpy(zero_copy_only=False)
        x = features_of(part, feature_columns)
        if x is None:  # ragged lists
            column = part.column(feature_columns[0]).combine_chunks()
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            widths, nonfinite, val_rows = (int(lengths.min()), int(lengths.max())), 0, 0
        else:
            widths = (x.shape[1], x.shape[1])
            nonfinite = int((~np.isfinite(x)).any(axis=1).sum())
            val_rows = int(in_validation(x, val_fraction).sum()) if val_fraction else 0
        for key, value in (
            ("path", str(path)),
            ("rows", len(labels)),
            ("val_rows", val_rows),
            ("nonfinite", nonfinite),
            ("label_min", int(labels.min()) if len(labels) else 0),
            ("label_max", int(labels.max()) if len(labels) else 0),
            ("width_min", widths[0]),
            ("width_max", widths[1]),
        ):
            out[key].append(value)
    return pa.table(out)


def scan(source: Source, val_fraction: float) -> dict[str, FileStats]:
    """One streaming pass over every row: per-file statistics, and DataError for bad rows."""
    scanned = read_mapped(source, scan_batch, include_paths=True, val_fraction=val_fraction)
    try:
        with _quiet(source.format == "csv"):
            rows = scanned.take_all()
    except Exception:  # a CSV value that does not convert: find it again to name its line
        if source.format != "csv":
            raise
        for file in source.files:
            bad = csvfiles.find_bad_value(
                source.filesystem, file, source.feature_columns, source.label_column
            )
            if bad is not None:
                raise DataError(bad) from None
        raise
    stats = {file: FileStats() for file in source.files}
    for row in rows:
        s = stats.setdefault(_match(row["path"], stats), FileStats())
        s.rows += row["rows"]
        s.val_rows += row["val_rows"]
        s.nonfinite += row["nonfinite"]
        s.label_min = _fold(min, s.label_min, row["label_min"])
        s.label_max = _fold(max, s.label_max, row["label_max"])
        s.width_min = _fold(min, s.width_min, row["width_min"])
        s.width_max = _fold(max, s.width_max, row["width_max"])
    _raise_for_bad_rows(source, stats)
    return stats


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


def _raise_for_bad_rows(source: Source, stats: dict[str, FileStats]) -> None:
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
                f"{file}: {s.nonfinite} row(s) have NaN or infinite values in feature column(s) "
                f"{features!r}; clean or drop them"
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


def check_validation(stats: dict[str, FileStats], width: int, classes: int) -> int:
    """Check separate validation files against the training data; returns their row count."""
    for file, s in stats.items():
        if s.rows and s.width_min != width:
            raise DataError(
                f"{file}: {s.width_min} features per row, but the training data has {width}"
            )
        if s.rows and s.label_max >= classes:
            raise DataError(
                f"{file}: label {s.label_max} is outside the training data's classes "
                f"0..{classes - 1}"
            )
    return sum(s.rows for s in stats.values())
