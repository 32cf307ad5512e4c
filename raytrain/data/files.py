"""A user's data files, Parquet or CSV (raytrain.data.csvfiles): find them, check them before
training, and read them as ``x``/``y`` rows.

Checks happen in two passes, both before any worker starts: the schemas (Parquet footers, CSV
headers: the columns and, for Parquet, their types), then one streaming Ray Data pass over the rows
(values that are not numbers, NaN or infinite features, ragged feature lists, labels out of range,
empty data), which runs in parallel on the cluster and keeps only a few numbers per file on the
driver (raytrain.data.checks). Every problem is one sentence naming the file and the column (for
CSV, also the line).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain.data import csvfiles
from raytrain.data.columns import Encoding, features_of, is_categorical_type, split_keys
from raytrain.data.tables import xy_table
from raytrain.errors import UserError, one_line
from raytrain.storage import Location, StorageError, check_bucket

_BUCKETS = 1_000_000  # resolution of the hashed validation split


class DataError(UserError):
    """Training data that cannot be used as it is (one sentence naming the file or column)."""


@dataclass(frozen=True)
class Source:
    """A set of Parquet or CSV files and how to read features and labels from them."""

    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    feature_columns: tuple[str, ...]  # the numeric ones (or one list column)
    label_column: str | None  # None: rows to predict, without labels
    width: int | None  # features per row when the schema fixes it (else checked by the scan)
    format: str = "parquet"  # or "csv"
    # Parquet: every row group as (file, index, rows), from the footers. Workers read these
    # pieces directly (raytrain.data.pieces); CSV has none and is read by Ray Data.
    row_groups: tuple[tuple[str, int, int], ...] = ()
    categorical: tuple[str, ...] = ()  # feature columns taken as categories
    label_names: bool = False  # the label holds names (strings, booleans), not class indexes
    regression: bool = False  # the label is a numeric target (model.task)

    @property
    def columns(self) -> list[str]:
        label = [self.label_column] if self.label_column else []
        return [*self.feature_columns, *self.categorical, *label]


# What a missing column's error advises, by default (training's config names the columns).
_COLUMNS_HINT = "set data.feature_columns and data.label_column to the right names"


def list_files(where: Location, path: str) -> list[str]:
    """The Parquet and CSV files at ``where`` (a file, or a directory searched recursively);
    a DataError in one line if there are none or the path cannot be read."""
    try:
        check_bucket(where, f"data path {path!r}")
        info = where.fs.get_file_info(where.path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data path {path!r} does not exist")
        if info.type == pafs.FileType.File:
            return [where.path]
        found = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True))
    except StorageError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"data path {path!r} cannot be read: {one_line(e)}") from None
    return sorted(
        f.path
        for f in found
        if f.is_file
        and f.path.endswith((".parquet", ".csv"))
        and not os.path.basename(f.path).startswith((".", "_"))
    )


def find(
    path: str,
    feature_columns: Sequence[str] | None,
    label_column: str | None,
    categorical: Sequence[str] | None = None,
    also: Sequence[str] = (),
    hint: str = _COLUMNS_HINT,
    plan: tuple | None = None,
    task: str = "auto",
) -> Source:
    """List the Parquet or CSV files at ``path`` and check their columns and types (footers and
    headers only): the features (None: every column but the label and ``also``), the label (if
    any) and the columns ``also`` named; ``hint`` is what an error about a missing column
    advises. Each feature column is numeric or categorical by its type in the first file
    (strings, booleans, dictionaries: categorical), or categorical if ``categorical`` names it.
    ``task``: model.task, which decides with the label's type whether it is a class or a
    regression target. ``plan``: (numeric, categorical, label_names, regression) decided
    already (the training files', for separate validation files; a trained model's, for
    prediction)."""
    try:
        where = Location.of(path)  # a local path made absolute, or a URI
    except StorageError as e:
        raise DataError(f"data path {path!r}: {e}") from None
    fs, files = where.fs, list_files(where, path)
    kinds = {os.path.splitext(f)[1] for f in files}
    if not files:
        raise DataError(f"no Parquet or CSV files (*.parquet, *.csv) under data path {path!r}")
    if len(kinds) > 1:
        raise DataError(
            f"data path {path!r} holds both Parquet and CSV files; point it at one kind"
        )
    kind = "csv" if kinds == {".csv"} else "parquet"
    schema = _read_schema(fs, files[0], kind)
    if plan is None:
        plan = _plan(
            files[0], schema, (feature_columns, label_column, categorical, also, hint), task
        )
    numeric, categories, label_names, regression = plan
    wanted = (numeric, categories, label_column, label_names or regression, tuple(also), hint)
    width, row_groups = _check_files(fs, files, wanted, kind)
    return Source(
        fs, tuple(files), numeric, label_column, width, kind, row_groups, categories,
        label_names, regression,
    )  # fmt: skip


def _check_files(
    fs: pafs.FileSystem, files: list[str], wanted: tuple, kind: str
) -> tuple[int | None, tuple[tuple[str, int, int], ...]]:
    """Every file's schema checked against ``wanted``: the features per row they agree on
    (None if the scan must tell) and every row group as (file, index, rows)."""
    width = None
    row_groups: list[tuple[str, int, int]] = []
    for file in files:
        file_width, groups = _check_schema(fs, file, wanted, kind)
        row_groups += [(file, i, rows) for i, rows in enumerate(groups)]
        if width is not None and file_width is not None and file_width != width:
            raise DataError(
                f"{file}: {file_width} features per row, but {files[0]} has {width}; every file "
                "needs the same features"
            )
        width = width if file_width is None else file_width
    return width, tuple(row_groups)


def _plan(
    file: str, schema: pa.Schema, wanted: tuple, task: str
) -> tuple[tuple[str, ...], tuple[str, ...], bool, bool]:
    """Which feature columns are numeric and which categorical, whether the label holds names
    and whether it is a regression target, from the first file's schema and the config."""
    feature_columns, label, categorical, also, hint = wanted
    names = schema.names
    for column in (*(feature_columns or ()), *([label] if label else []), *(categorical or ())):
        if column not in names:
            raise DataError(f"{file}: no column {column!r} (it has {', '.join(names)}); {hint}")
    if feature_columns is None:
        feature_columns = [c for c in names if c != label and c not in also]
        if not feature_columns:
            raise DataError(f"{file}: no column but the label {label!r}; {hint}")
    named = set(categorical or ())
    extra = named - set(feature_columns)
    if extra:
        raise DataError(
            f"data.categorical_columns names {sorted(extra)[0]!r}, which is not a feature column "
            f"({', '.join(feature_columns)})"
        )
    categories = tuple(
        c for c in feature_columns if c in named or is_categorical_type(schema.field(c).type)
    )
    numeric = tuple(c for c in feature_columns if c not in categories)
    if label is None:
        return numeric, categories, False, False
    kind = schema.field(label).type
    label_names = is_categorical_type(kind)
    if task == "auto":
        task = "regression" if pa.types.is_floating(kind) else "classification"
    if task == "regression" and not _numeric(kind):
        raise DataError(
            f"{file}: label column {label!r} is {kind}; model.task regression needs a numeric "
            "target (or set model.task=classification for class names)"
        )
    if task == "classification" and pa.types.is_floating(kind):
        raise DataError(
            f"{file}: label column {label!r} is {kind}; classification needs class indexes "
            "0..k-1 or class names (or set model.task=regression for a numeric target)"
        )
    regression = task == "regression"
    return numeric, categories, label_names and not regression, regression


def _read_schema(fs: pafs.FileSystem, file: str, kind: str) -> pa.Schema:
    try:
        if kind == "parquet":
            return pq.read_schema(file, filesystem=fs)
        return csvfiles.schema(fs, file)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{file}: not a readable {kind.upper()} file ({e})") from None


def _check_schema(
    fs: pafs.FileSystem, file: str, wanted: tuple, kind: str
) -> tuple[int | None, list[int]]:
    """The file's features per row (None if the scan must tell) and its row groups' sizes."""
    try:
        if kind == "parquet":
            footer = pq.read_metadata(file, filesystem=fs)
            schema = footer.schema.to_arrow_schema()
            groups = [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]
        else:
            schema, groups = csvfiles.schema(fs, file), []
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{file}: not a readable {kind.upper()} file ({e})") from None
    return _width(file, schema, wanted, kind), groups


def _width(file: str, schema: pa.Schema, wanted: tuple, kind: str) -> int | None:
    feature_columns, categorical, label, label_names, also, hint = wanted
    names = schema.names
    for column in (*feature_columns, *categorical, *([label] if label else []), *also):
        if column not in names:
            raise DataError(f"{file}: no column {column!r} (it has {', '.join(names)}); {hint}")
    if kind == "csv":
        return len(feature_columns)  # types are checked value by value as the rows are read
    label_type = schema.field(label).type if label else pa.int64()
    if not label_names and not pa.types.is_integer(label_type):  # label_names: or a target
        raise DataError(
            f"{file}: label column {label!r} is {label_type}; labels must be integers "
            "0..classes-1, or names (strings, booleans)"
        )
    if len(feature_columns) == 1:
        column = feature_columns[0]
        kind = schema.field(column).type
        if (
            pa.types.is_fixed_size_list(kind)
            or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
        ):
            if not _numeric(kind.value_type):
                raise DataError(
                    f"{file}: feature column {column!r} is {kind}; features must be numbers"
                )
            return kind.list_size if pa.types.is_fixed_size_list(kind) else None
    for column in feature_columns:
        kind = schema.field(column).type
        if not _numeric(kind):
            raise DataError(
                f"{file}: feature column {column!r} is {kind}; features must be numbers (one "
                "fixed-size list column, or one numeric column per feature) or categories "
                "(strings, booleans)"
            )
    return len(feature_columns)


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


_HASH_BLOCK = 1 << 15


def in_validation(x: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each row belongs to the held-out split: a hash of its feature bits, so the split is
    the same on every pass and every node, needs no row index, and holds ~fraction of the rows."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    weights = (np.arange(bits.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B1)) | np.uint64(1)
    # Sum of bits * weights, modulo 2**64: a matmul, a block of rows at a time widened to 64 bits
    # (in cache, instead of a 64-bit copy of every row).
    h = np.empty(len(bits), np.uint64)
    wide = np.empty((min(_HASH_BLOCK, len(bits)), bits.shape[1]), np.uint64)
    for start in range(0, len(bits), _HASH_BLOCK):
        block = wide[: len(bits[start : start + _HASH_BLOCK])]
        block[...] = bits[start : start + _HASH_BLOCK]
        np.matmul(block, weights, out=h[start : start + len(block)])
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return (h % np.uint64(_BUCKETS)) < np.uint64(round(fraction * _BUCKETS))


def to_xy(
    batch: pa.Table,
    source: Source,
    encoding: Encoding,
    val_fraction: float = 0.0,
    keep: str = "all",
) -> pa.Table:
    """A batch as ``x``/``y`` rows (raytrain.data.tables), encoded by ``encoding``.

    ``keep`` is "train" or "val" to keep one side of the hashed validation split, or "all".
    """
    x = encoding.encode(batch)
    y = encoding.labels(batch)
    if keep != "all":
        raw = x if encoding.plain else features_of(batch, source.feature_columns)
        held_out = in_validation(split_keys(batch, raw, source.categorical), val_fraction)
        rows = held_out if keep == "val" else ~held_out
        x, y = np.compress(rows, x, axis=0), np.compress(rows, y)
    return xy_table(x, y)


def read_xy(source: Source, encoding: Encoding, val_fraction: float = 0.0, keep: str = "all"):
    """A lazy Ray Dataset of the source's ``x``/``y`` rows (``keep`` as in ``to_xy``)."""
    return read_mapped(source, to_xy, encoding=encoding, val_fraction=val_fraction, keep=keep)


def read_mapped(source: Source, fn, include_paths: bool = False, **kwargs):
    """The source's files read by Ray Data, every batch mapped by ``fn(batch, source,
    **kwargs)`` as an Arrow table."""
    import ray.data

    if source.format == "csv":
        read = ray.data.read_csv(
            list(source.files),
            filesystem=source.filesystem,
            include_paths=include_paths,
            convert_options=csvfiles.convert_options(source),
        )
    else:
        read = ray.data.read_parquet(
            list(source.files),
            filesystem=source.filesystem,
            columns=source.columns,
            include_paths=include_paths,
        )
    return read.map_batches(
        fn,
        batch_format="pyarrow",
        fn_kwargs={"source": source, **kwargs},
    )
