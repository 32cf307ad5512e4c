"""raytrain predict: a trained run scores Parquet rows on a pool of Ray Data actors. Checked
against a plain PyTorch forward pass over the same rows, against the run's own validation, for
row order across files and units, for outputs that are never half there, and for every bad input
(one line, exit 2, before any actor starts)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytrain import cli, config
from raytrain.data.scaling import Scaling
from raytrain.errors import UserError
from raytrain.inference import batch as inference
from raytrain.model import build_model
from raytrain.train import checkpoint
from tests.conftest import one_error_line, predict_here, run_module, save_checkpoint
from tests.tabular import FEATURES, LABEL, make_table

pytestmark = pytest.mark.ray

GROUP_ROWS = 500


def write_rows(path: Path, rows: int, seed: int, first_id: int) -> pa.Table:
    """Tabular rows with an ``id`` column, in row groups of 500."""
    table = make_table(rows, seed).append_column("id", pa.array(np.arange(rows) + first_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=GROUP_ROWS)
    return table


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-data")
    write_rows(root / "train" / "a.parquet", 3000, seed=0, first_id=0)
    write_rows(root / "train" / "b.parquet", 3000, seed=1, first_id=3000)
    write_rows(root / "val" / "v.parquet", 1000, seed=2, first_id=6000)
    return root


@pytest.fixture(scope="module")
def run(train, data):
    """A run trained on the two training files, validated on the separate validation file."""
    return train(
        f"data.path={data / 'train'}",
        f"data.val_path={data / 'val'}",
        f"data.feature_columns={FEATURES}",
        f"data.label_column={LABEL}",
        "model.name=mlp",
        "model.hidden=[8]",
        "train.epochs=2",
        "scaling.workers=2",
    )


def plain_forward(checkpoint_dir: str, table: pa.Table) -> np.ndarray:
    """The checkpoint's model applied by hand: its weights, training's Scaling.apply, softmax."""
    state = checkpoint.load(checkpoint_dir)
    cfg = config.load(base=state["config"])
    model = build_model(cfg.model, len(FEATURES), 2)
    model.load_state_dict(state["model"])
    scaling = Scaling(tuple(state["scaling"]["mean"]), tuple(state["scaling"]["std"]))
    x = torch.tensor(np.stack([table[c].to_numpy() for c in FEATURES], axis=1))
    with torch.no_grad():
        return torch.softmax(model.eval()(scaling.apply(x)), dim=1).numpy()


def read_output(out: Path) -> pa.Table:
    names = sorted(p.name for p in out.glob("*.parquet"))
    return pa.concat_tables(pq.read_table(out / name) for name in names)


def test_predictions_equal_a_plain_forward_pass_in_input_order(run, data, tmp_path, monkeypatch):
    # Units of two row groups: three per file, so order across files and units is tested.
    monkeypatch.setattr(inference, "UNIT_ROWS", 2 * GROUP_ROWS)
    out = tmp_path / "scored"
    manifest, metrics, console = predict_here(
        str(run.run_dir), "--data", str(data / "train"), "--out", str(out), "--keep", "id,f3"
    )
    assert metrics is None and "6,000 rows in 2 Parquet file(s)" in console
    assert [f["name"] for f in manifest["files"]] == [f"part-{i:05d}.parquet" for i in range(6)]
    assert {p.name for p in out.iterdir()} == {
        *(f["name"] for f in manifest["files"]),
        "_prediction.json",
    }
    got = read_output(out)
    assert got.column_names == ["id", "f3", "prediction", "probabilities"]
    source = pa.concat_tables(
        pq.read_table(data / "train" / name) for name in ("a.parquet", "b.parquet")
    )
    # Every row once, in input order, its kept columns beside its own prediction.
    assert got["id"].to_pylist() == list(range(6000))
    assert got["f3"].equals(source["f3"])
    expected = plain_forward(manifest["model"]["checkpoint"], source)
    probabilities = np.stack(got["probabilities"].to_numpy(zero_copy_only=False))
    assert np.abs(probabilities - expected).max() < 1e-6
    assert (got["prediction"].to_numpy() == expected.argmax(axis=1)).all()
    assert manifest["rows"] == 6000 and manifest["model"]["checkpoint"] == run.results["checkpoint"]
    assert json.loads((out / "_prediction.json").read_text())["rows"] == 6000


def test_label_metrics_equal_the_runs_validation_on_the_validation_file(run, data, tmp_path):
    out = tmp_path / "val-scored"
    manifest, metrics, _ = predict_here(
        run.run_dir.name,
        "--storage-path",
        str(run.run_dir.parent),
        "--data",
        str(data / "val"),
        "--out",
        str(out),
        "--label",
        LABEL,
        "--workers",
        "1",
    )
    validation = run.results["validation"]  # the best checkpoint's, measured by the workers
    assert manifest["model"]["checkpoint"] == run.results["checkpoint"]
    assert metrics["rows"] == validation["rows"] == 1000
    assert metrics["confusion"] == validation["confusion"]
    assert metrics["accuracy"] == validation["accuracy"]
    assert metrics["loss"] == pytest.approx(validation["loss"], rel=1e-5)
    assert json.loads((out / "_metrics.json").read_text())["confusion"] == validation["confusion"]


def test_a_failed_prediction_leaves_nothing_and_keeps_what_was_there(run, data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data / "train", bad)
    table = make_table(1000, seed=5).append_column("id", pa.array(np.arange(1000)))
    f0 = table["f0"].to_numpy().copy()
    f0[623] = np.inf  # a missing value (NaN) would take the training mean: see test_tabular.py
    pq.write_table(table.set_column(0, "f0", pa.array(f0)), bad / "c.parquet", row_group_size=100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"c\.parquet: row 623 has a NaN"):
        predict_here(str(run.run_dir), "--data", str(bad), "--out", str(out), "--overwrite")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # Given good data, --overwrite replaces the old output whole.
    predict_here(str(run.run_dir), "--data", str(data / "val"), "--out", str(out), "--overwrite")
    assert not (out / "mine.txt").exists() and (out / "_prediction.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _tampered(run, tmp_path) -> str:
    copy = tmp_path / "ckpt"
    shutil.copytree(run.results["checkpoint"], copy)
    state = copy / "state.pt"
    state.write_bytes(state.read_bytes()[:-1] + b"x")
    return str(copy)


def _with_table(tmp_path, table: pa.Table) -> str:
    pq.write_table(table, tmp_path / "d.parquet")
    return str(tmp_path / "d.parquet")


def _renamed(run, data, tmp_path):
    table = make_table(50)
    return (
        str(run.run_dir),
        ["--data", _with_table(tmp_path, table.rename_columns(["g0", *table.column_names[1:]]))],
        "no column 'f0'",
    )


def _strings(run, data, tmp_path):
    table = make_table(50)
    text = pa.array([str(v) for v in table["f1"].to_pylist()])
    return (
        str(run.run_dir),
        ["--data", _with_table(tmp_path, table.set_column(1, "f1", text))],
        "'f1' is string",
    )


BAD = {
    "no such run": lambda run, data, tmp: (
        "nothere",
        ["--data", str(data / "val")],
        "is not a checkpoint",
    ),
    "tampered checkpoint": lambda run, data, tmp: (
        _tampered(run, tmp),
        ["--data", str(data / "val")],
        "SHA-256",
    ),
    "missing feature": _renamed,
    "feature of the wrong type": _strings,
    "output exists": lambda run, data, tmp: (
        str(run.run_dir),
        ["--data", str(data / "val"), "--out", str(data)],
        "exists; pass --overwrite",
    ),
    "kept column missing": lambda run, data, tmp: (
        str(run.run_dir),
        ["--data", str(data / "val"), "--keep", "id,nope"],
        "no column 'nope'",
    ),
    "label not integer": lambda run, data, tmp: (
        str(run.run_dir),
        ["--data", str(data / "val"), "--label", "f2"],
        "labels must be integers",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_exit_2_before_any_actor(run, data, tmp_path, capsys, case):
    target, extra, needle = BAD[case](run, data, tmp_path)
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "out")]
    assert cli.main(["predict", target, *extra]) == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raytrain: error: ") and needle in lines[0], (
        lines
    )
    assert err.out == ""  # said before the header: nothing started
    assert not (tmp_path / "out").exists()


def test_data_narrower_than_the_model_is_refused(tmp_path, capsys):
    """A model trained on 10 features (a list column ``x``) given rows of 8."""
    save_checkpoint(tmp_path / "ckpt")
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8 * 5, dtype=np.float32)), 8)
    data = _with_table(tmp_path, pa.table({"x": x}))
    code = cli.main(
        ["predict", str(tmp_path / "ckpt"), "--data", data, "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "8 features per row in x, but the model was trained on 10" in capsys.readouterr().err


def test_the_command_line_says_bad_input_in_one_line(run, tmp_path):
    proc = run_module(
        "raytrain",
        "predict",
        str(run.run_dir),
        "--data",
        str(tmp_path / "nothing"),
        "--out",
        str(tmp_path / "o"),
    )
    assert "does not exist" in one_error_line(proc)


def test_units_follow_the_input_order_and_row_numbers():
    source = argparse.Namespace(
        row_groups=(("a", 0, 500), ("a", 1, 500), ("a", 2, 100), ("b", 0, 700), ("b", 1, 700))
    )
    units = inference.units_of(source, 1000)
    assert [(u.file, u.row_groups, u.rows, u.first_row) for u in units] == [
        ("a", (0, 1), 1000, 0),
        ("a", (2,), 100, 1000),
        ("b", (0,), 700, 0),
        ("b", (1,), 700, 700),
    ]


def test_the_exported_onnx_model_predicts_what_predict_does(run, data, tmp_path, capsys):
    """Raw feature columns, in the run's order, into the exported file: the same probabilities
    as raytrain predict wrote for the same rows."""
    import onnxruntime

    out = tmp_path / "scored"
    predict_here(str(run.run_dir), "--data", str(data / "val"), "--out", str(out))
    onnx_file = tmp_path / "model.onnx"
    assert cli.main(["export", str(run.run_dir), "--format", "onnx", "--out", str(onnx_file)]) == 0
    table = pq.read_table(data / "val" / "v.parquet")
    x = np.stack([table[c].to_numpy() for c in FEATURES], axis=1).astype(np.float32)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"features": x})[0]
    from_onnx = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    written = np.stack(read_output(out)["probabilities"].to_numpy(zero_copy_only=False))
    assert np.abs(from_onnx - written).max() < 1e-5


@pytest.mark.slow
def test_an_interrupted_prediction_leaves_nothing_behind(tmp_path):
    """Ctrl-C while the actors write: exit 130, no output and no staging directory left."""
    import signal
    import subprocess
    import sys
    import time

    from raytrain.data.synthetic import draw
    from raytrain.data.tables import xy_table
    from tests.conftest import ROOT

    save_checkpoint(tmp_path / "ckpt", "tests.custom_model:SlowNet")
    x, y, _ = draw(4000, config.DataConfig(), 0)
    (tmp_path / "data").mkdir()
    for i in range(4):
        part = slice(i * 1000, (i + 1) * 1000)
        table = xy_table(x[part].numpy(), y[part].numpy())
        pq.write_table(table, tmp_path / "data" / f"p{i}.parquet")
    args = [
        str(tmp_path / "ckpt"),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "raytrain", "predict", *args, "--batch-size", "50"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.partial-*/part-*.parquet")):  # an actor is writing
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted; nothing was written" in out and "Traceback" not in err, out + err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())
