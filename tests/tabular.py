"""Tabular data as users bring it: numeric feature columns whose scales run from 0.001 to 1,000
(plus a constant one), and a label from a noisy linear rule on the unscaled features. Used by the
tests and by scripts/compare_sklearn.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = [f"f{i}" for i in range(12)] + ["constant"]
LABEL = "label"


def make_table(rows: int = 4000, seed: int = 0, noise: float = 0.5) -> pa.Table:
    """``rows`` rows: 12 features with scales 0.001..1000 and offsets, a constant feature, and a
    binary label that a linear model can learn up to the noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, 12))
    scales = np.logspace(-3, 3, 12)
    x = z * scales + rng.uniform(-5, 5, 12) * scales
    label = (z @ rng.standard_normal(12) + noise * rng.standard_normal(rows) > 0).astype(np.int64)
    columns = {name: x[:, i].astype(np.float32) for i, name in enumerate(FEATURES[:-1])}
    columns["constant"] = np.full(rows, 7.0, dtype=np.float32)
    return pa.table({**columns, LABEL: label})


def write_parquet(directory: Path, rows: int = 4000, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(make_table(rows, seed), directory / "data.parquet")
    return directory


def features_and_labels(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([table[c].to_numpy() for c in FEATURES], axis=1).astype(np.float32)
    return x, table[LABEL].to_numpy()


def sklearn_accuracy(table: pa.Table, val_fraction: float = 0.2) -> tuple[float, int]:
    """scikit-learn's LogisticRegression on a standardised copy, trained and scored on the same
    split raytrain makes (its hashed validation split); returns accuracy and validation rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from raytrain.data.files import in_validation

    x, y = features_and_labels(table)
    held = in_validation(x, val_fraction)
    scaler = StandardScaler().fit(x[~held])
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x[~held]), y[~held])
    return float(model.score(scaler.transform(x[held]), y[held])), int(held.sum())
