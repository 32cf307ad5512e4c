"""The row format every part of raytrain exchanges: an Arrow table with ``x``, a fixed-size list
of float32 features, and ``y``, an int64 class label. It is standard Arrow, so Parquet files
written from it open in any Arrow tool (pandas, DuckDB, Spark)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FEATURES = "x"
LABEL = "y"


def xy_table(x: np.ndarray, y: np.ndarray) -> pa.Table:
    """The table of features ``x`` (rows, features) and labels ``y`` (rows,)."""
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            FEATURES: pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
            # Class indexes as int64; a regression target stays float32.
            LABEL: pa.array(y if np.asarray(y).dtype == np.float32 else np.asarray(y, np.int64)),
        }
    )


def to_tensors(tables: list[pa.Table]):
    """The rows of ``x``/``y`` tables as two tensors of their own (copied: tables fetched from
    the object store are read-only views of it)."""
    import torch

    table = pa.concat_tables(tables)
    features = table.schema.field(FEATURES).type.list_size
    # flatten() honours a slice's offset (.values would not); to_numpy() is zero-copy here.
    x = table.column(FEATURES).combine_chunks().flatten().to_numpy()
    y = table.column(LABEL).to_numpy()
    return torch.tensor(x).view(-1, features), torch.tensor(y)


def to_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The features (rows, features) and labels of an ``x``/``y`` table as NumPy views of its
    buffers, without a copy (read-only when the table lives in Ray's object store)."""
    column = table.column(FEATURES).combine_chunks()  # one chunk: no copy
    x = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    return x, table.column(LABEL).to_numpy()
