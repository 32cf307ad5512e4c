"""CSV files as training data: a header row, one numeric column per feature, an integer label
column. What differs from Parquet: the schema comes from the header and a first block of rows
(types are inferred), every value is converted as it is read (features to float32, labels to
int64), and a value that will not convert is found again, to name its file, line and column."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs


def schema(fs: pafs.FileSystem, file: str) -> pa.Schema:
    """The columns of a CSV file and their types as inferred from its first block of rows."""
    with fs.open_input_stream(file) as stream:
        return pcsv.open_csv(stream).schema


def convert_options(feature_columns: Sequence[str], label_column: str) -> pcsv.ConvertOptions:
    """Read the features as float32 and the label as int64, and nothing else."""
    types = {c: pa.float32() for c in feature_columns} | {label_column: pa.int64()}
    return pcsv.ConvertOptions(column_types=types, include_columns=[*feature_columns, label_column])


def find_bad_value(
    fs: pafs.FileSystem, file: str, feature_columns: Sequence[str], label_column: str
) -> str | None:
    """'FILE, line N, column C: value V is not a number' for the first value of the file that
    does not convert, or None if all do."""
    with fs.open_input_stream(file) as stream:
        table = pcsv.read_csv(
            stream,
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in [*feature_columns, label_column]},
                include_columns=[*feature_columns, label_column],
            ),
        )
    for column in [*feature_columns, label_column]:
        kind = pa.int64() if column == label_column else pa.float32()
        for row, value in enumerate(table[column].to_pylist()):
            try:
                pa.scalar(value).cast(kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                what = "an integer label" if column == label_column else "a number"
                return f"{file}, line {row + 2}, column {column!r}: {value!r} is not {what}"
    return None
