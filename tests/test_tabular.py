"""A user's own tabular data, features on very different scales: scaled with the training split's
statistics by default, and trained as well as scikit-learn's logistic regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain.config import DataConfig
from raytrain.data.datasets import build_datasets
from raytrain.data.files import in_validation

from .conftest import one_error_line, run_module
from .tabular import (
    FEATURES,
    LABEL,
    features_and_labels,
    make_table,
    sklearn_accuracy,
    write_parquet,
)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def scaled_parquet(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("scaled"))


def data_flags(path) -> list[str]:
    return [f"data.path={path}", f"data.feature_columns={FEATURES}", f"data.label_column={LABEL}"]


@pytest.mark.parametrize("ingest", ["memory", "stream"])
def test_scaling_statistics_are_numpys_over_the_training_rows(ray_session, scaled_parquet, ingest):
    cfg = DataConfig(
        path=str(scaled_parquet), feature_columns=FEATURES, label_column=LABEL, ingest=ingest
    )
    scaling = build_datasets(cfg, workers=2).scaling
    x, _ = features_and_labels(make_table())
    train = x[~in_validation(x, 0.2)].astype(np.float64)
    assert np.allclose(scaling.mean, train.mean(axis=0), rtol=1e-9, atol=1e-12)
    assert np.allclose(scaling.std, train.std(axis=0), rtol=1e-9, atol=1e-12)
    assert scaling.std[-1] == 0.0  # the constant feature: centred, never divided by 0
    scaled = scaling.apply(torch.tensor(train[:5], dtype=torch.float32))
    assert bool(scaled.isfinite().all()) and float(scaled[:, -1].abs().max()) == 0.0


def test_synthetic_data_is_not_scaled_by_default(ray_session):
    assert build_datasets(DataConfig(), workers=2).scaling is None
    assert build_datasets(DataConfig(normalize="standard"), workers=2).scaling is not None


@pytest.fixture(scope="module")
def parquet_run(train, scaled_parquet):
    """raytrain with default settings, given only the data's path and columns."""
    return train(*data_flags(scaled_parquet), "scaling.workers=2")


def test_defaults_train_as_well_as_scikit_learn(parquet_run):
    trained = parquet_run
    ours = trained.results["validation"]
    theirs, rows = sklearn_accuracy(make_table())
    print(f"validation accuracy: raytrain {ours['accuracy']:.3f}, scikit-learn {theirs:.3f}")
    assert ours["rows"] == rows
    assert ours["accuracy"] >= theirs - 0.02
    assert all(np.isfinite(row["loss"]) for row in trained.metrics)
    # The statistics travel with the checkpoint, for whoever uses the model later.
    assert len(trained.state["scaling"]["mean"]) == len(FEATURES)


def test_csv_trains_exactly_as_the_same_rows_in_parquet(train, parquet_run, tmp_path):
    import pyarrow.csv as pcsv

    (tmp_path / "csv").mkdir()
    pcsv.write_csv(make_table(), tmp_path / "csv" / "data.csv")
    from_csv = train(*data_flags(tmp_path / "csv"), "scaling.workers=2")
    from_parquet = parquet_run
    assert "CSV" in from_csv.console
    # The same validation; its loss is a sum in another order (CSV rows are shared out to the
    # workers one by one, Parquet's by row groups), so equal to float32's precision.
    csv_val, parquet_val = from_csv.results["validation"], from_parquet.results["validation"]
    assert csv_val["loss"] == pytest.approx(parquet_val["loss"], rel=1e-6)
    assert {**csv_val, "loss": None} == {
        **parquet_val,
        "loss": None,
        "validated_by": csv_val["validated_by"],
    }
    assert [r["loss"] for r in from_csv.metrics] == [r["loss"] for r in from_parquet.metrics]


@pytest.mark.slow
def test_a_csv_value_that_is_not_a_number_names_file_line_and_column(tmp_path):
    lines = ["f0,f1,label", "1.5,2,0", "0.5,3,1", "2.5,x,0", "1.0,1,1"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.csv").write_text("\n".join(lines) + "\n")
    proc = run_module(
        "raytrain.main",
        "--set",
        f"data.path={tmp_path / 'data'}",
        "--set",
        "data.feature_columns=[f0, f1]",
        "--set",
        "data.label_column=label",
        "--storage-path",
        str(tmp_path / "runs"),
    )
    assert one_error_line(proc) == (
        f"raytrain: error: {tmp_path / 'data' / 'bad.csv'}, line 4, column 'f1': 'x' is not a "
        "number"
    )
