"""A user's columns as they arrive, turned into the numbers a model takes: numeric features
(missing values imputed, a 0/1 "was missing" feature beside each column that had any), integer
codes of categorical columns (for the model's embeddings), and class indexes of a label that may
be integers, strings or booleans.

Two steps, so that the data is read once before training:

- ``scan_table``: what one block of rows (a Parquet row group, a CSV batch) says, computed where
  the block is read (raytrain.data.checks): which rows the hashed split holds out, the training
  rows' feature moments (ignoring missing values), how often each category and each label occurs
  in the training rows, and what is wrong with the block, if anything.
- ``build_encoding``: the vocabularies (most frequent first, up to ``data.max_categories`` per
  column), the imputation values (the training mean) and the class names, from all the blocks'
  counts, on the driver. ``Encoding.encode`` then turns any block of raw rows into the ``x`` the
  model takes, in training, validation, prediction alike; a checkpoint stores it.

A row's features are, in order: the numeric features, the "was missing" features, then one code
per categorical column (stored as float32; exact below 2**24). Code 0 is a null, code 1 a value
outside the vocabulary (too rare in training, or never seen there), code ``2 + i`` the
vocabulary's ``i``-th value. Numeric-only data without missing values and with an integer label
is encoded exactly as before this module existed (``features_of``).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raytrain.data.scaling import split_moments

NULL_CODE, UNKNOWN_CODE = 0, 1  # the two buckets before every vocabulary's values


def is_categorical_type(kind: pa.DataType) -> bool:
    """Strings, booleans and dictionary-encoded columns are categories; numbers are not."""
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_dictionary(kind)
    )


def as_strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A categorical column's values as strings (booleans as 'true'/'false', integer codes as
    their digits), nulls kept: the one form in which vocabularies hold them."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return column


@dataclass(frozen=True)
class Distinct:
    """A categorical column of a block as its distinct values (strings) and, per row, the index
    of its value (``len(values)`` for a null): what both the split's hash and the counts need,
    made once per column and block."""

    values: list[str]
    indices: np.ndarray

    @classmethod
    def of(cls, column) -> Distinct:
        encoded = pc.dictionary_encode(as_strings(column))
        values = encoded.dictionary.to_pylist()
        indices = encoded.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)
        return cls(values, indices)

    def keys(self) -> np.ndarray:
        """A stable 32-bit hash of each row's value (CRC-32 of its UTF-8 bytes; null: 0), for
        the hashed validation split: the same row lands on the same side on every node and
        every run. Hashes each distinct value once."""
        words = [zlib.crc32(v.encode()) | 1 for v in self.values]
        return np.array([*words, 0], dtype=np.uint32)[self.indices]

    def counts(self, rows: np.ndarray | None) -> Counter:
        """How often each value occurs among ``rows`` (a mask; None: all), nulls under None."""
        indices = self.indices if rows is None else self.indices[rows]
        counts = np.bincount(indices, minlength=len(self.values) + 1)
        found = Counter({v: int(n) for v, n in zip(self.values, counts, strict=False) if n})
        if counts[-1]:
            found[None] = int(counts[-1])
        return found


def features_of(batch: pa.Table, feature_columns: Sequence[str]) -> np.ndarray | None:
    """The numeric features of a batch as a float32 (rows, features) array (nulls as NaN); None
    if lists are ragged."""
    if len(feature_columns) == 1:
        column = batch.column(feature_columns[0]).combine_chunks()
        kind = column.type
        if pa.types.is_fixed_size_list(kind):
            values = column.flatten().to_numpy(zero_copy_only=False)
            return values.astype(np.float32, copy=False).reshape(len(column), kind.list_size)
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if len(lengths) and lengths.min() != lengths.max():
                return None
            width = int(lengths[0]) if len(lengths) else 0
            values = column.flatten().to_numpy(zero_copy_only=False)
            return values.astype(np.float32, copy=False).reshape(len(column), width)
    if not feature_columns:
        return np.empty((batch.num_rows, 0), dtype=np.float32)
    return np.stack([_numbers(batch.column(c)) for c in feature_columns], axis=1).astype(
        np.float32, copy=False
    )


def _numbers(column) -> np.ndarray:
    """A numeric column's values, a null as NaN: floats filled in their own type (no float64
    copy, which NumPy makes of a column with nulls)."""
    if column.null_count and pa.types.is_floating(column.type):
        column = pc.fill_null(column, float("nan"))
    return column.to_numpy(zero_copy_only=False)


def split_keys(
    batch: pa.Table,
    x: np.ndarray,
    categorical: Sequence[str],
    distinct: Sequence[Distinct] | None = None,
) -> np.ndarray:
    """What the hashed split hashes: the numeric features' bits (``x``), then each categorical
    column's ``Distinct.keys``, as one float32 array of bits (numeric-only data: ``x`` itself).
    ``distinct``: the columns' ``Distinct``, if made already."""
    if not categorical:
        return x
    distinct = distinct or [Distinct.of(batch.column(c)) for c in categorical]
    keys = [d.keys().view(np.float32) for d in distinct]
    return np.concatenate([x, np.stack(keys, axis=1)], axis=1)


@dataclass
class Tally:
    """What the scan counts over the training rows, beside the feature moments: missing values
    per numeric feature, each categorical column's values, and the labels."""

    missing: np.ndarray | None = None  # per numeric feature, training rows
    missing_any: np.ndarray | None = None  # per numeric feature, any row (for missing: error)
    categories: list[Counter] = field(default_factory=list)  # per categorical column; None: null
    labels: Counter = field(default_factory=Counter)  # class (int, or name) -> training rows
    names: set = field(default_factory=set)  # a label of names: every name, held out or not
    targets: list = field(default_factory=list)  # regression: the target's moments per block

    def add(self, other: Tally) -> None:
        for name in ("missing", "missing_any"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.copy() if mine is None else mine + theirs)
        if not self.categories:
            self.categories = [Counter() for _ in other.categories]
        for mine, theirs in zip(self.categories, other.categories, strict=True):
            mine.update(theirs)
        self.labels.update(other.labels)
        self.names |= other.names
        self.targets += other.targets


def tally_block(
    batch: pa.Table,
    x: np.ndarray,
    held_out: np.ndarray | None,
    categorical: Sequence[str],
    label: str | None,
    label_names: bool,
    any_missing: bool,
    regression: bool = False,
    distinct: Sequence[Distinct] | None = None,
) -> Tally:
    """The training rows' counts of one block (``held_out``: the rows the split holds out;
    ``any_missing``: whether ``x`` has a NaN, else it is not looked at again)."""
    train = None if held_out is None else ~held_out
    tally = Tally()
    if any_missing:
        missing = np.isnan(x)
        tally.missing_any = missing.sum(axis=0)
        tally.missing = (missing if train is None else missing[train]).sum(axis=0)
    mask = None if train is None or not label_names else pa.array(train)
    distinct = distinct or [Distinct.of(batch.column(c)) for c in categorical]
    for column in distinct:
        tally.categories.append(column.counts(train))
    if label is None:
        return tally
    column = batch.column(label)
    if regression:
        y = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        y = y if train is None else y[train]
        mean = float(y.mean()) if len(y) else 0.0
        tally.targets.append({"n": len(y), "mean": [mean], "m2": [float(((y - mean) ** 2).sum())]})
        return tally
    if label_names:
        values = as_strings(column)
        tally.labels = _value_counts(values if mask is None else values.filter(mask))
        tally.labels.pop(None, None)
        tally.names = {v for v in pc.unique(values).to_pylist() if v is not None}
    elif column.null_count == 0 and len(column):
        y = column.to_numpy()
        y = y if train is None else y[train]
        low = int(y.min()) if len(y) else 0
        if low >= 0:  # negative labels are refused by the scan
            counts = np.bincount(y.astype(np.int64, copy=False))
            tally.labels = Counter({k: int(n) for k, n in enumerate(counts) if n})
    return tally


def _value_counts(values: pa.Array) -> Counter:
    counts = pc.value_counts(values)
    found = Counter(
        dict(zip(counts.field(0).to_pylist(), counts.field(1).to_pylist(), strict=True))
    )
    if values.null_count:
        found[None] = values.null_count
    return found


def nan_moments(x: np.ndarray, held_out: np.ndarray | None) -> dict:
    """The training rows' count, mean and sum of squared deviations per feature, each feature
    over its own values that are not missing (NaN): counts differ between features."""
    missing = np.isnan(x)
    held = held_out if held_out is not None else np.zeros(len(x), dtype=bool)
    absent = missing[~held].sum(axis=0)  # training rows without a value, per feature
    # A missing value filled with its column's first value present (a value near the others:
    # no precision lost), the moments of the filled rows taken in one fast pass, then the
    # filled values taken out again from the sums, which split_moments shifts by the first row.
    first = np.argmax(~missing, axis=0)
    stand_in = np.where(missing.all(axis=0), 0.0, x[first, np.arange(x.shape[1])])
    filled = np.where(missing, stand_in.astype(np.float32), x)
    whole = split_moments(filled, held_out)
    rows = whole["n"]
    if not rows:
        zeros = np.zeros(x.shape[1])
        return {"n": zeros, "mean": zeros, "m2": zeros}
    shift = filled[0].astype(np.float64)
    s1 = rows * (whole["mean"] - shift)
    s2 = whole["m2"] + s1 * s1 / rows
    gap = stand_in.astype(np.float32).astype(np.float64) - shift
    n = rows - absent
    s1 = s1 - absent * gap
    s2 = s2 - absent * gap * gap
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, shift + s1 / np.maximum(n, 1), 0.0)
        m2 = np.where(n > 0, np.maximum(s2 - s1 * s1 / np.maximum(n, 1), 0.0), 0.0)
    return {"n": n, "mean": mean, "m2": m2}


@dataclass(frozen=True)
class Encoding:
    """How raw rows become the model's ``x`` and ``y`` (see the module's docstring); stored in
    every checkpoint (``to_dict``) and used wherever the model is."""

    numeric: tuple[str, ...]  # the numeric feature columns (or one list column)
    width: int  # numeric features per row
    fill: tuple[float, ...] = ()  # per numeric feature: the value a missing one takes
    indicators: tuple[int, ...] = ()  # numeric features with a "was missing" feature
    categorical: tuple[str, ...] = ()
    vocabularies: tuple[tuple[str, ...], ...] = ()
    label: str | None = None
    class_names: tuple[str, ...] | None = None  # a label of names; None: integers 0..k-1
    target: tuple[float, float] | None = None  # regression: the training target's mean, std

    @property
    def features(self) -> int:
        """Features per row of ``x``: numeric, "was missing", categorical codes."""
        return self.width + len(self.indicators) + len(self.categorical)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Codes per categorical column: null, unknown, then the vocabulary."""
        return tuple(len(v) + 2 for v in self.vocabularies)

    @property
    def plain(self) -> bool:
        """Whether rows are only numeric features (nothing to impute or code)."""
        return not self.categorical and not self.indicators

    @property
    def label_dtype(self) -> type:
        """The dtype of ``labels``: float32 targets for regression, else int64 class indexes."""
        return np.float32 if self.target is not None else np.int64

    def encode(self, batch: pa.Table) -> np.ndarray:
        """The rows' ``x`` (float32). A missing numeric value takes its fill value (an infinite
        one is the caller's to refuse); a category outside the vocabulary takes code 1."""
        x = features_of(batch, self.numeric)
        if x is None:
            raise ValueError("feature lists of different lengths")
        if self.plain and not (self.fill and np.isnan(x).any()):
            return x
        missing = np.isnan(x)
        parts = [np.where(missing, np.asarray(self.fill, dtype=np.float32), x)]
        if self.indicators:
            parts.append(missing[:, list(self.indicators)].astype(np.float32))
        for name, vocabulary in zip(self.categorical, self.vocabularies, strict=True):
            parts.append(self.codes(batch.column(name), vocabulary)[:, None])
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    @staticmethod
    def codes(column, vocabulary: Sequence[str]) -> np.ndarray:
        values = as_strings(column)
        index = pc.index_in(values, value_set=pa.array(list(vocabulary), pa.string()))
        codes = pc.add(index, 2).fill_null(UNKNOWN_CODE).to_numpy(zero_copy_only=False)
        null = values.is_null().to_numpy(zero_copy_only=False)
        return np.where(null, NULL_CODE, codes).astype(np.float32)

    def labels(self, batch: pa.Table, column: str | None = None) -> np.ndarray:
        """The rows' class indexes (int64); -1 for a name outside the trained classes."""
        values = batch.column(column or self.label)
        if self.target is not None:  # standardised: the model learns a target of scale 1
            y = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            return ((y - self.target[0]) / self.target[1]).astype(np.float32)
        if self.class_names is None:
            return values.to_numpy(zero_copy_only=False)
        index = pc.index_in(as_strings(values), value_set=pa.array(list(self.class_names)))
        return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            "width": self.width,
            "fill": list(self.fill),
            "indicators": list(self.indicators),
            "categorical": list(self.categorical),
            "vocabularies": [list(v) for v in self.vocabularies],
            "label": self.label,
            "class_names": None if self.class_names is None else list(self.class_names),
            "target": None if self.target is None else list(self.target),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Encoding:
        names = d.get("class_names")
        return cls(
            numeric=tuple(d["numeric"]),
            width=int(d["width"]),
            fill=tuple(d.get("fill", ())),
            indicators=tuple(d.get("indicators", ())),
            categorical=tuple(d.get("categorical", ())),
            vocabularies=tuple(tuple(v) for v in d.get("vocabularies", ())),
            label=d.get("label"),
            class_names=None if names is None else tuple(names),
            target=None if d.get("target") is None else tuple(d["target"]),
        )


def vocabulary(counts: Counter, limit: int) -> tuple[str, ...]:
    """The ``limit`` most frequent values (ties: in sorted order), nulls aside."""
    ranked = sorted(((-n, v) for v, n in counts.items() if v is not None))
    return tuple(v for _, v in ranked[:limit])


def build_encoding(source, tally: Tally, moments: dict | None, max_categories: int) -> Encoding:
    """The encoding of a training ``source`` from its scan: its counts (``tally``) and the
    training rows' combined feature moments (``moments``: n, mean per feature, each over the
    values present). A missing value takes the training mean; a "was missing" feature is added
    for each numeric feature that had a missing value in the training rows."""
    width = source.width if source.width is not None else len(moments["mean"])
    mean = np.zeros(width) if moments is None else np.asarray(moments["mean"], dtype=np.float64)
    missing = tally.missing if tally.missing is not None else np.zeros(width, dtype=np.int64)
    indicators = tuple(int(i) for i in np.flatnonzero(missing))
    names = tuple(sorted(tally.names)) if source.label_names else None
    target = None
    if source.regression:
        n, m, m2 = 0, 0.0, 0.0  # Chan et al., as the features' moments combine
        for part in tally.targets:
            k = part["n"]
            if k:
                delta = part["mean"][0] - m
                m += delta * k / (n + k)
                m2 += part["m2"][0] + delta**2 * n * k / (n + k)
                n += k
        std = (m2 / n) ** 0.5 if n else 1.0
        target = (m, std if std > 0 else 1.0)
    return Encoding(
        numeric=tuple(source.feature_columns),
        width=width,
        fill=tuple(float(np.float32(m)) for m in mean),
        indicators=indicators,
        categorical=tuple(source.categorical),
        vocabularies=tuple(vocabulary(c, max_categories) for c in tally.categories)
        or tuple(() for _ in source.categorical),
        label=source.label_column,
        class_names=names,
        target=target,
    )
