"""A user's own tabular data, features on very different scales: scaled with the training split's
statistics by default, and trained as well as scikit-learn's logistic regression."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raytrain.config import DataConfig
from raytrain.data.datasets import build_datasets
from raytrain.data.files import in_validation

from .conftest import ROOT, one_error_line, predict_here, run_module
from .tabular import (
    FEATURES,
    LABEL,
    MIXED_CATEGORICAL,
    MIXED_LABELS,
    MIXED_NUMERIC,
    features_and_labels,
    make_mixed_table,
    make_table,
    mixed_split,
    sklearn_accuracy,
    sklearn_pipeline,
    sklearn_ridge_rmse,
    write_mixed,
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
    assert {**csv_val, "loss": None, "log_loss": None} == {
        **parquet_val,
        "log_loss": None,
        "loss": None,
        "validated_by": csv_val["validated_by"],
    }
    assert [r["loss"] for r in from_csv.metrics] == [r["loss"] for r in from_parquet.metrics]


@pytest.mark.slow
def test_a_csv_value_that_is_not_a_number_names_file_line_and_column(tmp_path):
    # Past the first block of rows, from which a CSV column's type (numeric) is inferred.
    lines = ["f0,f1,label", *["1.5,2,0", "0.5,3,1"] * 80_000, "2.5,x,0", "1.0,1,1"]
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
        f"raytrain: error: {tmp_path / 'data' / 'bad.csv'}, line 160002, column 'f1': 'x' is "
        "not a number"
    )


# ---- data as it arrives: categories, missing values, names of classes ---------------------------


@pytest.fixture(scope="module")
def mixed_species(tmp_path_factory):
    return write_mixed(tmp_path_factory.mktemp("mixed") / "species", "species")


def _training_frame(table):
    """The rows raytrain trains on (its hashed split's training side), as pandas."""
    _, _, held = mixed_split(table, "species")  # the split hashes the features, not the label
    return table.to_pandas()[~held]


@pytest.mark.parametrize(("ingest", "workers"), [("memory", 1), ("stream", 3)])
def test_vocabularies_and_imputation_are_pandas_over_the_training_rows(
    ray_session, mixed_species, ingest, workers
):
    cfg = DataConfig(path=str(mixed_species), label_column="species", ingest=ingest)
    datasets = build_datasets(cfg, workers=workers)
    assert datasets.ingest == ingest
    encoding = datasets.encoding
    frame = _training_frame(make_mixed_table())
    assert encoding.numeric == tuple(MIXED_NUMERIC)
    assert encoding.categorical == tuple(MIXED_CATEGORICAL)
    assert encoding.class_names == ("Adelie", "Chinstrap", "Gentoo")
    for name, vocabulary in zip(MIXED_CATEGORICAL, encoding.vocabularies, strict=True):
        counts = frame[name].value_counts()  # nulls aside, most frequent first
        expected = sorted(counts.index, key=lambda v: (-counts[v], v))
        assert list(vocabulary) == expected, name
    means = frame[MIXED_NUMERIC].astype("float64").mean().to_numpy()  # NaN skipped
    assert np.allclose(encoding.fill, means, rtol=1e-6)
    assert encoding.indicators == (0, 1, 2, 3)  # every numeric column had missing values
    # The scaling: each numeric feature by its present values (pandas' std, ddof 0).
    stds = frame[MIXED_NUMERIC].astype("float64").std(ddof=0).to_numpy()
    assert np.allclose(datasets.scaling.std[:4], stds, rtol=1e-6)
    share = frame[MIXED_NUMERIC].isna().mean().to_numpy()
    assert np.allclose(datasets.scaling.mean[4:8], share, rtol=1e-9)
    # What the workers read: every training row, encoded with those vocabularies.
    pieces = datasets.train_pieces
    x = np.concatenate([x for x, _ in pieces.read(pieces.pieces)])
    assert x.shape == (len(frame), 4 + 4 + 3)
    for i, (name, vocabulary) in enumerate(
        zip(MIXED_CATEGORICAL, encoding.vocabularies, strict=True)
    ):
        codes = {v: k + 2 for k, v in enumerate(vocabulary)}
        want = [0 if v is None or v != v else codes.get(v, 1) for v in frame[name]]
        assert x[:, 8 + i].tolist() == want, name
    filled = (
        frame[MIXED_NUMERIC].astype("float64").fillna(dict(zip(MIXED_NUMERIC, means, strict=True)))
    )
    assert np.allclose(x[:, :4], filled.to_numpy(), rtol=1e-6)


def test_mixed_csv_trains_as_the_same_rows_in_parquet(train, tabular_runs, tmp_path):
    """The same mixed rows as CSV (types inferred from its first block, an empty value missing):
    the same encoding and the same validation as from Parquet."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path, from_parquet = tabular_runs["species"]
    (tmp_path / "csv").mkdir()
    pcsv.write_csv(pq.read_table(path), tmp_path / "csv" / "data.csv")
    from_csv = train(
        f"data.path={tmp_path / 'csv'}",
        "data.label_column=species",
        "scaling.workers=2",
        config_file=ROOT / "configs" / "tabular.yaml",
    )
    assert "CSV" in from_csv.console
    ours, theirs = from_csv.state["encoding"], from_parquet.state["encoding"]
    assert {**ours, "fill": None} == {**theirs, "fill": None}
    assert np.allclose(ours["fill"], theirs["fill"], rtol=1e-6)  # CSV's floats, read as float32
    csv_val, parquet_val = from_csv.results["validation"], from_parquet.results["validation"]
    assert csv_val["rows"] == parquet_val["rows"]
    assert abs(csv_val["accuracy"] - parquet_val["accuracy"]) <= 0.01


def test_unseen_and_null_categories_take_their_own_codes():
    from raytrain.data.columns import Encoding

    encoding = Encoding(
        numeric=("a",),
        width=1,
        fill=(2.5,),
        indicators=(0,),
        categorical=("c",),
        vocabularies=(("x", "y"),),
    )
    table = pa.table({"a": pa.array([1.0, None, 3.0]), "c": pa.array(["y", None, "never seen"])})
    assert encoding.encode(table).tolist() == [[1.0, 0.0, 3.0], [2.5, 1.0, 0.0], [3.0, 0.0, 1.0]]


@pytest.fixture(scope="module")
def tabular_runs(tabular_run):
    """configs/tabular.yaml on the mixed data, given only the path and the label (each of the
    three), trained once each (conftest.tabular_run): {label: (data directory, Trained)}."""
    return {label: tabular_run(label) for label in MIXED_LABELS}


@pytest.mark.parametrize("label", ["species", "churned"])
def test_the_tabular_config_classifies_as_well_as_scikit_learn(tabular_runs, label):
    _, trained = tabular_runs[label]
    ours = trained.results["validation"]
    theirs = sklearn_pipeline(make_mixed_table(), label)
    print(f"{label}: raytrain {ours['accuracy']:.3f}, AUC {ours['auc']:.3f}; sklearn {theirs}")
    assert ours["rows"] == theirs["rows"]
    assert ours["accuracy"] >= theirs["accuracy"] - 0.02
    assert ours["auc"] >= theirs["auc"] - 0.02
    assert trained.state["encoding"]["categorical"] == MIXED_CATEGORICAL
    assert "classification (model.task auto) into" in trained.console


def test_the_tabular_config_fits_a_numeric_target_as_well_as_ridge(tabular_runs):
    _, trained = tabular_runs["target"]
    ours = trained.results["validation"]
    theirs = sklearn_ridge_rmse(make_mixed_table())
    print(f"target: raytrain RMSE {ours['rmse']:.4f}, R2 {ours['r2']:.3f}; Ridge {theirs}")
    assert ours["rows"] == theirs["rows"]
    assert ours["rmse"] <= theirs["rmse"] * 1.05
    assert "regression of 'target' (model.task auto)" in trained.console
    row = trained.metrics[-1]
    assert {"val_rmse", "val_mae", "val_r2"} <= set(row) and "accuracy" not in row
    assert len(ours["pairs"]) > 100  # predicted against actual, for the report


@pytest.mark.parametrize("label", ["species", "target"])
def test_predict_and_the_onnx_export_agree_on_raw_rows(tabular_runs, tmp_path, label):
    """Rows with unseen categories and missing values: ``raytrain predict`` speaks in class names
    (or the target's units), and onnxruntime on the raw rows (numbers with NaN, categorical
    codes as docs/predict.md describes) gives the same."""
    import pyarrow.parquet as pq

    from raytrain.data.columns import Encoding
    from raytrain.inference.export import run_onnx, to_bytes
    from raytrain.inference.trained import load

    _, trained_run = tabular_runs[label]
    rows = make_mixed_table(300, seed=7)  # new rows; cities beyond the vocabulary below
    city = pa.array([f"city-{i % 60:02d}" if i % 5 else None for i in range(300)])
    rows = rows.set_column(rows.schema.get_field_index("city"), "city", city)
    (tmp_path / "rows").mkdir()
    pq.write_table(rows, tmp_path / "rows" / "rows.parquet")
    run_dir = trained_run.cfg.run.storage_path + f"/{label}"
    # The command's checks and run, on the session's Ray (a process of its own would start a Ray).
    predict_here(run_dir, "--data", str(tmp_path / "rows"), "--out", str(tmp_path / "out"))
    predicted = pq.read_table(tmp_path / "out")
    trained = load(run_dir, trained_run.cfg.run.storage_path)
    encoding: Encoding = trained.encoding
    numeric = np.stack(
        [rows.column(c).to_numpy(zero_copy_only=False) for c in MIXED_NUMERIC], axis=1
    )
    codes = [Encoding.codes(rows.column(c), v) for c, v in zip(
        encoding.categorical, encoding.vocabularies, strict=True)]  # fmt: skip
    raw = np.column_stack([numeric, *codes]).astype(np.float32)
    out = run_onnx(to_bytes(trained, "onnx")[0], raw)
    if label == "target":
        assert np.allclose(out[:, 0], predicted.column("prediction").to_numpy(), atol=1e-4)
        return
    probabilities = torch.softmax(torch.from_numpy(out), dim=1).numpy()
    theirs = np.stack(predicted.column("probabilities").to_numpy(zero_copy_only=False))
    assert np.allclose(probabilities, theirs, atol=1e-6)
    names = np.array(encoding.class_names)[probabilities.argmax(axis=1)]
    assert predicted.column("prediction").to_pylist() == names.tolist()


def test_embeddings_keep_the_data_parallel_rule(train, mixed_species):
    """An MLP with embeddings on one worker and on two: the same weights (DDP averages the
    embeddings' gradients as any other)."""
    common = (
        f"data.path={mixed_species}",
        "data.label_column=species",
        "data.ingest=memory",
        "model.name=mlp",
        "model.hidden=[16]",
        "train.epochs=2",
        "train.batch_size=10",
        "train.lr=0.1",
    )
    one = train(*common, "scaling.workers=1")
    two = train(*common, "scaling.workers=2")
    assert one.state["encoding"] == two.state["encoding"]
    diff = max(
        float((one.state["model"][k] - two.state["model"][k]).abs().max())
        for k in one.state["model"]
    )
    print(f"largest weight difference, 2 workers vs 1: {diff:.3g}")
    assert diff < 1e-5
    assert any("embeddings" in k for k in one.state["model"])


def test_a_resumed_run_refuses_data_whose_vocabularies_changed(tabular_runs, tmp_path):
    """The checkpoint keeps the vocabularies; data that would give other ones is one line."""
    from raytrain.data.datasets import build_datasets
    from raytrain.errors import UserError
    from raytrain.storage import Location
    from raytrain.train.driver import check_same_encoding

    path, trained = tabular_runs["species"]
    run_dir = Location.of(trained.cfg.run.storage_path) / "species"
    same = build_datasets(DataConfig(path=str(path), label_column="species"), workers=2)
    check_same_encoding(run_dir, same)  # the same data: nothing to say
    other = write_mixed(tmp_path / "other", "species", seed=1)
    changed = build_datasets(DataConfig(path=str(other), label_column="species"), workers=2)
    with pytest.raises(UserError, match="vocabularies differ|fill differ"):
        check_same_encoding(run_dir, changed)


@pytest.mark.parametrize("classes", [2, 3])
def test_distributed_metrics_equal_scikit_learns(classes):
    """Two workers' sums added up, as the all-reduce adds them, give scikit-learn's numbers."""
    from sklearn.metrics import f1_score, log_loss, roc_auc_score

    from raytrain.evaluate import auc, f1_macro, score_counts, tally_logits

    gen = torch.Generator().manual_seed(classes)
    logits = 2 * torch.randn(3000, classes, generator=gen)
    y = torch.randint(0, classes, (3000,), generator=gen)
    logits[:, 0] += 1.5 * (y == 0)  # a model that has learned something
    loss, confusion, scores = 0.0, 0, 0
    for part in (slice(0, 1700), slice(1700, None)):
        part_loss, part_confusion = tally_logits(logits[part], y[part], classes)
        loss += part_loss.item()
        confusion = confusion + part_confusion
        scores = scores + score_counts(logits[part], y[part], classes)
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    predicted = logits.argmax(dim=1).numpy()
    want_auc = (
        roc_auc_score(y.numpy(), probabilities[:, 1])
        if classes == 2
        else roc_auc_score(y.numpy(), probabilities, multi_class="ovr")
    )
    assert abs(auc(scores) - want_auc) < 1e-3
    assert f1_macro(confusion) == pytest.approx(f1_score(y.numpy(), predicted, average="macro"))
    assert loss / 3000 == pytest.approx(log_loss(y.numpy(), probabilities), rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["data.categorical_columns=[nowhere]"],
            "no column 'nowhere'",
        ),
        (["data.max_categories=0"], "data.max_categories"),
        (["model.task=regression"], "label column 'species' is string; model.task regression"),
    ],
)
def test_bad_tabular_settings_are_one_line(mixed_species, tmp_path, flags, expected):
    args = ["--set", f"data.path={mixed_species}", "--set", "data.label_column=species"]
    for flag in flags:
        args += ["--set", flag]
    proc = run_module("raytrain.main", *args, "--storage-path", str(tmp_path / "runs"))
    assert expected in one_error_line(proc)


def test_balanced_class_weights_are_scikit_learns_from_the_scans_counts(ray_session, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    from raytrain.config import Config
    from raytrain.data.datasets import build_datasets
    from raytrain.train.driver import class_weights

    path = write_mixed(tmp_path / "churned", "churned")
    datasets = build_datasets(DataConfig(path=str(path), label_column="churned"), workers=2)
    cfg = Config().model_copy(
        update={"train": Config().train.model_copy(update={"class_weight": "balanced"})}
    )
    y = _training_frame(make_mixed_table())["churned"].to_numpy()
    assert datasets.encoding.class_names == ("false", "true")
    assert datasets.label_counts == (int((~y).sum()), int(y.sum()))
    want = compute_class_weight("balanced", classes=np.array([False, True]), y=y)
    assert np.allclose(class_weights(cfg, datasets), want, rtol=1e-12)
    assert class_weights(Config(), datasets) is None  # none: every row counts the same


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_auc", "max"), ("val_f1", "max"), ("val_log_loss", "min"), ("val_rmse", "min"),
     ("val_mae", "min"), ("val_r2", "max")],
)  # fmt: skip
def test_every_metric_can_pick_checkpoints_with_its_direction(metric, mode):
    from raytrain.config import Config
    from raytrain.train.stopping import best_of, mode_of

    cfg = Config.model_validate({"run": {"checkpoint_metric": metric}})
    assert cfg.run.checkpoint_metric == metric and mode_of(metric) == mode
    picked = best_of([("a", {metric: 0.2, "epoch": 1}), ("b", {metric: 0.3, "epoch": 2})], metric)
    assert picked[0] == ("b" if mode == "max" else "a")
