"""Parquet in and out: generated files, training on them (in memory and streamed), every kind of
bad data refused up front with the file and column named, and a user's own model."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain import config
from raytrain.commands.train import main
from raytrain.config import DataConfig
from raytrain.data import checks, files, synthetic
from raytrain.data.datasets import build_datasets
from raytrain.data.files import DataError, in_validation
from raytrain.errors import EXIT_USAGE

from .conftest import one_error_line, run_module

pytestmark = pytest.mark.ray  # most start Ray; the rest are cheap


def generate(out, rows, *extra):
    proc = run_module(
        "raytrain", "data", "generate", "--rows", str(rows), "--out", str(out), *extra
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def parquet_7x3(tmp_path_factory):
    """6,000 rows, 7 features, 3 classes, in 3 files."""
    out = tmp_path_factory.mktemp("p7x3")
    generate(out, 6000, "--features", "7", "--classes", "3", "--rows-per-file", "2000")
    return out


@pytest.mark.slow
def test_generated_files_are_standard_arrow_and_reproducible(ray_session, parquet_7x3, tmp_path):
    files = sorted(parquet_7x3.glob("*.parquet"))
    assert len(files) == 3
    table = pq.read_table(parquet_7x3)  # plain pyarrow, no raytrain
    assert table.num_rows == 6000
    assert table.schema.field("x").type == pa.list_(pa.float32(), 7)
    assert table.schema.field("y").type == pa.int64()
    assert set(np.unique(table["y"].to_numpy())) == {0, 1, 2}
    frame = table.to_pandas()  # and pandas reads it
    assert len(frame) == 6000 and len(frame["x"].iloc[0]) == 7
    # The same seed writes the same rows, block by block, whatever machine or run: here again by
    # the command's own function, on the session's Ray (4 CPUs against the command's 2).
    again = tmp_path / "again"
    data = config.load(flags={"data.features": 7, "data.classes": 3}).data
    synthetic.generate(6000, str(again), 2000, data)
    assert pq.read_table(again).equals(table)


def test_ray_reads_back_what_was_written(ray_session, parquet_7x3):
    import ray.data

    back = ray.data.read_parquet(str(parquet_7x3)).to_arrow_refs()
    rows = sum(ray.get(ref).num_rows for ref in back)
    assert rows == 6000


@pytest.mark.slow
def test_generate_refuses_a_directory_with_data(parquet_7x3):
    proc = run_module("raytrain", "data", "generate", "--rows", "10", "--out", str(parquet_7x3))
    assert "already holds Parquet files" in one_error_line(proc)


def test_hashed_validation_split_is_stable_and_about_the_fraction():
    x = np.random.default_rng(0).standard_normal((100_000, 7), dtype=np.float32)
    held = in_validation(x, 0.2)
    assert abs(held.mean() - 0.2) < 0.01
    assert np.array_equal(held, in_validation(x.copy(), 0.2))


@pytest.mark.parametrize("ingest", ["memory", "stream"])
def test_training_on_parquet_with_7_features_and_3_classes(train, parquet_7x3, ingest):
    trained = train(
        f"data.path={parquet_7x3}",
        f"data.ingest={ingest}",
        "scaling.workers=2",
        "train.epochs=1",
        "train.lr=0.1",
    )
    assert tuple(trained.state["model"]["fc.weight"].shape) == (3, 7)
    val = trained.results["validation"]
    assert 1000 < val["rows"] < 1400  # ~20% held out by the hashed split
    assert val["accuracy"] > 0.6  # chance is 1/3
    assert len(val["confusion"]) == 3
    rows = trained.metrics[-1]
    assert sum(w["rows"] for w in rows["workers"]) == rows["rows"] > 4500
    assert f"{ingest} ingest" in trained.console


def test_separate_validation_path(ray_session, parquet_7x3, tmp_path):
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    table = pq.read_table(parquet_7x3 / "part-00000.parquet")
    pq.write_table(table.slice(0, 1000), val_dir / "v.parquet")
    sets = build_datasets(DataConfig(path=str(parquet_7x3), val_path=str(val_dir)), 2)
    assert (sets.train_rows, sets.val_rows, sets.features, sets.classes) == (6000, 1000, 7, 3)
    # Parquet is read by the workers, row group by row group: all of the separate files' rows.
    assert sets.val_pieces.total_rows == 1000 and sets.train_pieces.total_rows == 6000
    assert sets.val_pieces.keep == sets.train_pieces.keep == "all"


# ---- bad data ------------------------------------------------------------------------------------


def _good(rows=100, features=4):
    x = np.random.default_rng(1).standard_normal((rows, features), dtype=np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _write(path, x_column, y_column, names=("x", "y")):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({names[0]: x_column, names[1]: y_column}), path)


def _fixed(x):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def missing_column(d):
    x, y = _good()
    _write(d / "a.parquet", _fixed(x), pa.array(y), names=("x", "label"))
    return ["a.parquet", "'y'", "label"]


def wrong_label_dtype(d):
    x, y = _good()
    # (A float label is a regression target: tests/test_tabular.py.)
    _write(d / "a.parquet", _fixed(x), pa.array([b"\x01"] * len(y)))
    return ["a.parquet", "'y'", "binary", "integers"]


def wrong_feature_dtype(d):
    _, y = _good()
    _write(d / "a.parquet", pa.array([b"a"] * len(y)), pa.array(y))
    return ["a.parquet", "'x'", "binary"]


def ragged_features(d):
    x, y = _good()
    lists = [list(row[: 3 if i % 7 == 0 else 4]) for i, row in enumerate(x)]
    _write(d / "b.parquet", pa.array(lists, pa.list_(pa.float32())), pa.array(y))
    return ["b.parquet", "'x'", "3 to 4 features"]


def nan_features(d):
    x, y = _good()
    _write(d / "ok.parquet", _fixed(x), pa.array(y))
    x[5, 2] = np.nan
    _write(d / "c.parquet", _fixed(x), pa.array(y))
    return ["c.parquet", "row group 0, column 'x[2]'", "1 row(s)", "missing", "data.missing"]


def infinite_features(d):
    x, y = _good()
    x[[1, 2], 0] = np.inf
    _write(d / "c.parquet", _fixed(x), pa.array(y))
    return ["c.parquet", "2 row(s)", "infinite"]


def negative_labels(d):
    x, y = _good()
    y[3] = -1
    _write(d / "d.parquet", _fixed(x), pa.array(y))
    return ["d.parquet", "'y'", "-1", "0..classes-1"]


def empty_dataset(d):
    x, y = _good(rows=0)
    _write(d / "e.parquet", _fixed(x), pa.array(y))
    return ["hold no rows"]


def no_data_files(d):
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("a,b\n1,2\n")
    return ["no Parquet or CSV files", str(d)]


def both_kinds(d):
    x, y = _good()
    _write(d / "a.parquet", _fixed(x), pa.array(y))
    (d / "b.csv").write_text("x,y\n1,0\n")
    return ["both Parquet and CSV", str(d)]


def no_such_path(d):
    return ["does not exist", str(d)]


BAD = [
    missing_column,
    wrong_label_dtype,
    wrong_feature_dtype,
    ragged_features,
    nan_features,
    infinite_features,
    negative_labels,
    empty_dataset,
    no_data_files,
    both_kinds,
    no_such_path,
]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_data_is_refused_before_training(ray_session, tmp_path, make):
    where = tmp_path / "data"
    needles = make(where)
    with pytest.raises(DataError) as caught:
        build_datasets(DataConfig(path=str(where), missing="error"), workers=2)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_the_check_ahead_of_ray_refuses_the_same(tmp_path, make):
    """On an embedded Ray the driver's threads check the files while Ray starts (no Ray needed):
    the same one-line errors as the Ray tasks' scan above."""
    where = tmp_path / "data"
    needles = make(where)
    ahead = checks.ScanAhead(DataConfig(path=str(where), missing="error"), threads=2)
    with pytest.raises(DataError) as caught:
        ahead.result()
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_a_stopped_check_reads_no_further(tmp_path):
    x, y = _good()
    for name in ("a", "b", "c"):
        _write(tmp_path / "data" / f"{name}.parquet", _fixed(x), pa.array(y))
    source = files.find(str(tmp_path / "data"), ("x",), "y")
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        checks.scan_parquet(source, 0.2, threads=2, stop=stop)
    assert checks.scan_parquet(source, 0.2, threads=2).files  # not stopped: scanned


def test_validation_labels_outside_the_training_classes(ray_session, tmp_path):
    x, y = _good()
    _write(tmp_path / "train" / "t.parquet", _fixed(x), pa.array(y))
    _write(tmp_path / "val" / "v.parquet", _fixed(x), pa.array(y + 5))
    with pytest.raises(DataError, match=r"v\.parquet: label 6 .* classes 0\.\.1"):
        build_datasets(
            DataConfig(path=str(tmp_path / "train"), val_path=str(tmp_path / "val")), workers=2
        )


def test_bad_data_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    infinite_features(tmp_path / "data")
    proc = run_module(
        "raytrain.main",
        "--set",
        f"data.path={tmp_path / 'data'}",
        "--storage-path",
        str(tmp_path / "runs"),
    )
    assert "c.parquet" in one_error_line(proc)


def test_a_data_path_that_does_not_exist_is_said_before_ray_starts(tmp_path):
    proc = run_module(
        "raytrain.main",
        "--set",
        f"data.path={tmp_path / 'nowhere'}",
        "--storage-path",
        str(tmp_path / "runs"),
    )
    assert "does not exist" in one_error_line(proc)
    assert proc.stdout == ""  # the run's header, printed once Ray has started, never came


def test_auto_ingest_counts_one_copy_per_worker_on_a_node(ray_session, parquet_7x3):
    """4,800 training rows x (7 x 4 + 8) bytes = 0.17 MB per copy: with a 0.3 MB limit one copy
    fits in memory, two copies on one node do not."""
    cfg = DataConfig(path=str(parquet_7x3), memory_limit_mb=0.3)
    assert build_datasets(cfg, workers=2, copies_per_node=1).ingest == "memory"
    assert build_datasets(cfg, workers=2, copies_per_node=2).ingest == "stream"


@pytest.mark.slow
def test_streamed_elastic_run_needs_a_batch_every_worker_count_divides(parquet_7x3, tmp_path):
    """--workers 2-4 may start with 3 workers: a global batch of 32 cannot be dealt out in equal
    local batches to 3, and the run says so instead of training with 30."""
    proc = run_module(
        "raytrain.main",
        "--workers",
        "2-4",
        "--set",
        f"data.path={parquet_7x3}",
        "--set",
        "data.ingest=stream",
        "--storage-path",
        str(tmp_path),
    )
    line = one_error_line(proc)
    for needle in ("train.batch_size = 32", "3 workers", "2-4", "multiple of 12"):
        assert needle in line, line
    assert not any(tmp_path.iterdir())


# ---- a user's own model --------------------------------------------------------------------------


def test_custom_model_from_a_module_in_the_test_folder(train):
    trained = train(
        "model.name=tests.custom_model:TinyNet",
        "model.kwargs={width: 5}",
        "scaling.workers=2",
        "train.epochs=3",
        "train.lr=0.3",
    )
    weights = trained.state["model"]
    assert tuple(weights["body.0.weight"].shape) == (5, 10)
    assert tuple(weights["head.weight"].shape) == (2, 5)
    assert trained.results["validation"]["accuracy"] > 0.7


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("tests.no_such_module:Net", "cannot import module 'tests.no_such_module'"),
        ("tests.custom_model:NotAModule", "no nn.Module class named 'NotAModule'"),
        ("tests.custom_model:Missing", "no nn.Module class named 'Missing'"),
    ],
)
def test_custom_model_that_cannot_be_used_is_one_line(name, needle, capsys, tmp_path):
    code = main(["--set", f"model.name={name}", "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and needle in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())
