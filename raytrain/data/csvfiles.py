"""CSV files as training data: a header row, one column per feature (numbers, or categories),
a label column. What differs from Parquet: the schema comes from the header and a first block
of rows (types are inferred), every value is converted as it is read (numeric features to
float32, categories to strings, integer labels to int64), and a value that will not convert is
found again, to name its file, line and column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs


def schema(fs: pafs.FileSystem, file: str) -> pa.Schema:
    """The columns of a CSV file and their types as inferred from its first block of rows."""
    with fs.open_input_stream(file) as stream:
        return pcsv.open_csv(stream).schema


def convert_options(source) -> pcsv.ConvertOptions:
    """Read the numeric features as float32, the categorical ones as strings (an empty value is
    missing), the label as int64 (or strings, for names), and nothing else."""
    label = source.label_column
    types = {c: pa.float32() for c in source.feature_columns}
    types |= {c: pa.string() for c in source.categorical}
    if label is not None:
        types[label] = (
            pa.string() if source.label_names else pa.float64() if source.regression else pa.int64()
        )
    return pcsv.ConvertOptions(
        column_types=types, include_columns=list(types), strings_can_be_null=True
    )


def find_bad_value(fs: pafs.FileSystem, file: str, source) -> str | None:
    """'FILE, line N, column C: value V is not a number' for the first value of the file that
    does not convert, or None if all do."""
    label = source.label_column
    checked = [*source.feature_columns, *([label] if label and not source.label_names else [])]
    with fs.open_input_stream(file) as stream:
        table = pcsv.read_csv(
            stream,
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in checked},
                include_columns=checked,
                strings_can_be_null=True,
            ),
        )
    for column in checked:
        kind = pa.int64() if column == label and not source.regression else pa.float32()
        for row, value in enumerate(table[column].to_pylist()):
            if value is None:
                continue
            try:
                pa.scalar(value).cast(kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                what = "an integer label" if column == label else "a number"
                return f"{file}, line {row + 2}, column {column!r}: {value!r} is not {what}"
    return None
