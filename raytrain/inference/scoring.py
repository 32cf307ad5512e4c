"""Rows in, answers out: what every use of a trained model does with a batch of raw rows, shared
by batch prediction (raytrain.inference.batch) and serving (raytrain.inference.serving) so that
both answer the same for the same rows.

``features`` turns an Arrow table of raw columns into the model's ``x`` (the checkpoint's
encoding: missing values imputed, categories coded; a run without one reads its feature columns
as they are); ``answers`` turns the model's output into predictions: the most probable class (its
name, for a label of names) and every class's probability, or a regression's value in the
target's own units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raytrain.data.columns import features_of
from raytrain.data.files import DataError


def features(table: pa.Table, trained, where: str, before: int = 0) -> np.ndarray:
    """The rows' ``x`` (float32, C order) as the model was trained on it. DataError, naming
    ``where`` (a file, or a request) and the row (``before`` rows precede the table's first),
    for rows the model cannot take."""
    encoding, width = trained.encoding, trained.features
    if encoding is not None:
        try:
            x = encoding.encode(table)
        except ValueError:
            x = None
    else:
        x = features_of(table, trained.feature_columns)
    if x is None:
        raise DataError(f"{where}: feature lists of different lengths; the model takes {width}")
    if x.shape[1] != width:
        raise DataError(
            f"{where}: {x.shape[1]} features per row, but the model was trained on {width}"
        )
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = before + int(np.argmax(bad))
        raise DataError(
            f"{where}: row {row} has a NaN or infinite feature; predictions need numbers"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Answers:
    """A batch's answers, row by row."""

    prediction: np.ndarray  # class names (object), class indexes (int64) or values (float64)
    probabilities: np.ndarray | None  # (rows, classes) float32; None for a regression


def answers(logits, trained) -> Answers:
    """The model's output (a torch tensor) as answers."""
    import torch

    encoding = trained.encoding
    if encoding is not None and encoding.target is not None:  # the value in the target's units
        mean, std = encoding.target
        return Answers(logits.squeeze(1).double().numpy() * std + mean, None)
    probabilities = torch.softmax(logits, dim=1).numpy()
    best = probabilities.argmax(axis=1)
    if trained.class_names is not None:
        best = np.asarray(trained.class_names, dtype=object)[best]
    return Answers(best, probabilities)


def regression(trained) -> bool:
    """Whether the model answers with a value (regression) rather than a class."""
    return trained.encoding is not None and trained.encoding.target is not None
