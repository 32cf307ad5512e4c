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


# Mixed data as it arrives: numeric columns with missing values, string columns, a string class
# label, a numeric target and a rare binary label (made here; no one cleaned it).
MIXED_NUMERIC = ["bill_length", "flipper", "body_mass", "age"]
MIXED_CATEGORICAL = ["island", "sex", "city"]
MIXED_LABELS = ["species", "target", "churned"]


def make_mixed_table(rows: int = 4000, seed: int = 0) -> pa.Table:
    """``rows`` rows: four numeric columns (10% missing each; body_mass an integer column with
    nulls), island (3 values), sex (2 values and nulls), city (50 values, a long tail: the
    rarest are seen in few rows or only in validation), a species label of three names from a
    rule over all of them, a numeric target, and ``churned``, a boolean true in about 10%."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, 4))
    island = rng.choice(["Biscoe", "Dream", "Torgersen"], rows, p=[0.5, 0.35, 0.15])
    sex = rng.choice(["female", "male"], rows).astype(object)
    sex[rng.random(rows) < 0.05] = None
    weights = 1.0 / np.arange(1, 51) ** 1.2
    city_index = rng.choice(50, rows, p=weights / weights.sum())
    city = np.array([f"city-{i:02d}" for i in range(50)])[city_index]
    effect = {"Biscoe": 1.0, "Dream": -1.0, "Torgersen": 0.0}
    island_effect = np.array([effect[i] for i in island])
    city_effect = np.sin(city_index)  # something a one-hot or an embedding can learn
    score = z @ np.array([1.5, -1.0, 0.8, 0.3]) + island_effect + 0.8 * city_effect
    species = np.where(
        score + 0.5 * rng.standard_normal(rows) > 0.8,
        "Gentoo",
        np.where(score + 0.5 * rng.standard_normal(rows) < -0.8, "Adelie", "Chinstrap"),
    )
    target = 3.0 * score + 10.0 + rng.standard_normal(rows)
    churned = score + 1.0 * rng.standard_normal(rows) > 3.2
    numeric = {
        "bill_length": 44 + 5 * z[:, 0],
        "flipper": 200 + 14 * z[:, 1],
        "body_mass": np.round(4200 + 800 * z[:, 2]),
        "age": 5 + 2 * z[:, 3],
    }
    columns: dict[str, pa.Array] = {}
    for name, values in numeric.items():
        missing = rng.random(rows) < 0.10
        kind = pa.int64() if name == "body_mass" else pa.float64()
        columns[name] = pa.array(values.astype(kind.to_pandas_dtype()), kind, mask=missing)
    columns["island"] = pa.array(island)
    columns["sex"] = pa.array(sex, pa.string())
    columns["city"] = pa.array(city)
    columns["species"] = pa.array(species)
    columns["target"] = pa.array(target)
    columns["churned"] = pa.array(churned)
    return pa.table(columns)


def write_mixed(directory: Path, label: str, rows: int = 4000, seed: int = 0) -> Path:
    """The mixed table with one of its labels (the others dropped) as Parquet in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    table = make_mixed_table(rows, seed)
    keep = [c for c in table.column_names if c not in MIXED_LABELS or c == label]
    pq.write_table(table.select(keep), directory / "data.parquet", row_group_size=1000)
    return directory


def mixed_split(table: pa.Table, label: str, val_fraction: float = 0.2):
    """The mixed table's features and ``label`` as pandas, and which rows raytrain's hashed
    split holds out (its own functions, so the split is the same)."""
    from raytrain.data.columns import features_of, split_keys
    from raytrain.data.files import in_validation

    keys = split_keys(table, features_of(table, MIXED_NUMERIC), MIXED_CATEGORICAL)
    frame = table.to_pandas()
    held = in_validation(keys, val_fraction)
    return frame[MIXED_NUMERIC + MIXED_CATEGORICAL], frame[label], held


def linear_pipeline(estimator):
    """scikit-learn's usual pipeline for mixed columns in front of ``estimator``: numeric ones
    imputed with the mean (with indicators) and standardised, categorical ones imputed with a
    constant and one-hot encoded (unknown values ignored)."""
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = make_pipeline(SimpleImputer(add_indicator=True), StandardScaler())
    categorical = make_pipeline(
        SimpleImputer(strategy="constant", fill_value="missing"),
        OneHotEncoder(handle_unknown="ignore"),
    )
    columns = make_column_transformer((numeric, MIXED_NUMERIC), (categorical, MIXED_CATEGORICAL))
    return make_pipeline(columns, estimator)


def sklearn_pipeline(table: pa.Table, label: str, val_fraction: float = 0.2) -> dict:
    """``linear_pipeline`` with LogisticRegression, trained and scored on raytrain's split:
    accuracy, AUC (one-vs-rest for more than two classes) and validation rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y, held = mixed_split(table, label, val_fraction)
    model = linear_pipeline(LogisticRegression(max_iter=2000)).fit(x[~held], y[~held])
    p = model.predict_proba(x[held])
    score = (
        roc_auc_score(y[held], p[:, 1])
        if p.shape[1] == 2
        else roc_auc_score(y[held], p, multi_class="ovr")
    )
    accuracy = float(model.score(x[held], y[held]))
    return {"accuracy": accuracy, "auc": float(score), "rows": int(held.sum())}


def sklearn_ridge_rmse(table: pa.Table, label: str = "target", val_fraction: float = 0.2) -> dict:
    """``linear_pipeline`` with Ridge for the numeric target, on raytrain's split: its RMSE."""
    from sklearn.linear_model import Ridge

    x, y, held = mixed_split(table, label, val_fraction)
    model = linear_pipeline(Ridge(alpha=1.0)).fit(x[~held], y[~held])
    error = model.predict(x[held]) - y[held].to_numpy()
    return {"rmse": float(np.sqrt(np.mean(error**2))), "rows": int(held.sum())}


def sklearn_boosting(table: pa.Table, label: str, val_fraction: float = 0.2) -> dict:
    """HistGradientBoosting (classifier or regressor, by the label) on the mixed table, with
    its own handling of missing values and the string columns as categories, on raytrain's
    split: accuracy and AUC, or RMSE."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OrdinalEncoder

    x, y, held = mixed_split(table, label, val_fraction)
    codes = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan)
    prepare = make_column_transformer(
        (codes, MIXED_CATEGORICAL), remainder="passthrough", verbose_feature_names_out=False
    )
    categorical = list(range(len(MIXED_CATEGORICAL)))
    regression = label == "target"
    boost = (HistGradientBoostingRegressor if regression else HistGradientBoostingClassifier)(
        categorical_features=categorical, random_state=0
    )
    model = make_pipeline(prepare, boost).fit(x[~held], y[~held])
    if regression:
        error = model.predict(x[held]) - y[held].to_numpy()
        return {"rmse": float(np.sqrt(np.mean(error**2)))}
    p = model.predict_proba(x[held])
    score = (
        roc_auc_score(y[held], p[:, 1])
        if p.shape[1] == 2
        else roc_auc_score(y[held], p, multi_class="ovr")
    )
    return {"accuracy": float(model.score(x[held], y[held])), "auc": float(score)}
