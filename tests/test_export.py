"""raytrain export: ONNX and TorchScript files that map raw features to logits on their own,
checked by loading them (onnxruntime, torch.jit.load) against the PyTorch model with its scaling
applied the way training applies it. The checkpoints are written by the function rank 0 uses
(raytrain.train.checkpoint.save), so no Ray is needed."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from raytrain import cli
from raytrain.data.scaling import Scaling
from tests.conftest import ROOT, save_checkpoint

FEATURES, CLASSES = 6, 3


def write_checkpoint(directory, model_name: str, **model_fields) -> tuple[torch.nn.Module, Scaling]:
    """A checkpoint as training writes it, for a model of random weights with a scaling whose
    means and spreads differ per feature (one constant feature)."""
    scaling = Scaling(
        mean=tuple(float(m) for m in np.linspace(-50, 300, FEATURES)),
        std=(0.01, 0.5, 3.0, 40.0, 1000.0, 0.0),
    )
    model = save_checkpoint(directory, model_name, FEATURES, CLASSES, scaling, **model_fields)
    return model, scaling


def raw_rows(scaling: Scaling, rows: int = 257) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(rows, FEATURES, generator=generator, dtype=torch.float64)
    return (x * torch.tensor(scaling.std) * 3 + torch.tensor(scaling.mean)).float()


def expected_logits(model, scaling, x) -> np.ndarray:
    with torch.no_grad():
        return model(scaling.apply(x)).numpy()


MODELS = [
    ("simple", {}),
    ("mlp", {"hidden": [16, 8]}),
    ("tests.custom_model:TinyNet", {"kwargs": {"width": 5}}),
]


@pytest.mark.parametrize("name, fields", MODELS, ids=["simple", "mlp", "custom"])
def test_onnx_maps_raw_features_to_the_models_logits(tmp_path, capsys, name, fields):
    model, scaling = write_checkpoint(tmp_path / "ckpt", name, **fields)
    out = tmp_path / "model.onnx"
    code = cli.main(["export", str(tmp_path / "ckpt"), "--format", "onnx", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["raytrain.json"])
    assert (meta["features"], meta["classes"], meta["feature_columns"]) == (
        FEATURES,
        CLASSES,
        ["x"],
    )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    assert isinstance(batch, str), "the batch dimension is dynamic"
    x = raw_rows(scaling)
    for rows in (x[:1], x):  # one row and many: the same graph
        got = session.run(None, {"features": rows.numpy()})[0]
        assert np.abs(got - expected_logits(model, scaling, rows)).max() < 1e-5
    assert "largest difference from PyTorch" in capsys.readouterr().out


@pytest.mark.parametrize("name, fields", MODELS, ids=["simple", "mlp", "custom"])
def test_torchscript_maps_raw_features_to_the_models_logits(tmp_path, capsys, name, fields):
    model, scaling = write_checkpoint(tmp_path / "ckpt", name, **fields)
    out = tmp_path / "model.pt"
    code = cli.main(
        ["export", str(tmp_path / "ckpt"), "--format", "torchscript", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    files = {"raytrain.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files["raytrain.json"])["classes"] == CLASSES
    x = raw_rows(scaling)
    with torch.no_grad():
        got = loaded(x).numpy()
    assert np.abs(got - expected_logits(model, scaling, x)).max() < 1e-5


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytrain: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "fmt, name", [("onnx", "BranchNet"), ("torchscript", "NumpyNet")], ids=["onnx", "torchscript"]
)
def test_a_model_the_exporter_cannot_follow_is_one_line_and_nothing_is_written(
    tmp_path, capsys, fmt, name
):
    write_checkpoint(tmp_path / "ckpt", f"tests.custom_model:{name}")
    out = tmp_path / "model.bin"
    code = cli.main(["export", str(tmp_path / "ckpt"), "--format", fmt, "--out", str(out)])
    assert code == 2
    line = _one_line(capsys)
    assert f"tests.custom_model:{name}" in line and (
        "cannot be exported" in line or "differs" in line
    )
    assert not out.exists()


def test_an_existing_file_is_kept_unless_overwrite(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", "simple")
    out = tmp_path / "model.pt"
    out.write_bytes(b"mine")
    args = ["export", str(tmp_path / "ckpt"), "--format", "torchscript", "--out", str(out)]
    assert cli.main(args) == 2
    assert "exists; pass --overwrite" in _one_line(capsys) and out.read_bytes() == b"mine"
    assert cli.main([*args, "--overwrite"]) == 0
    assert torch.jit.load(io.BytesIO(out.read_bytes())) is not None


@pytest.mark.parametrize(
    "where, fmt, said",
    [
        ("missing/m.onnx", "onnx", "does not exist; create it or write elsewhere"),
        ("a-file/m.pt", "torchscript", "does not exist; create it or write elsewhere"),
        ("a-dir", "torchscript", "cannot write it (Is a directory)"),
    ],
    ids=["missing-directory", "under-a-file", "a-directory"],
)
def test_an_out_path_that_cannot_be_written_is_one_line(tmp_path, capsys, where, fmt, said):
    write_checkpoint(tmp_path / "ckpt", "simple")
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-dir").mkdir()
    out = str(tmp_path / where)
    args = ["export", str(tmp_path / "ckpt"), "--format", fmt, "--out", out, "--overwrite"]
    assert cli.main(args) == 2
    line = _one_line(capsys)
    assert f"--out {out!r}" in line and said in line, line
    assert (tmp_path / "a-file").read_text() == "mine" and not list((tmp_path / "a-dir").iterdir())


def test_a_damaged_or_missing_checkpoint_is_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", "simple")
    state = tmp_path / "ckpt" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    for target, needle in (
        (tmp_path / "ckpt", "SHA-256"),
        (tmp_path / "nothing", "is not a checkpoint"),
    ):
        code = cli.main(["export", str(target), "--format", "onnx", "--out", str(tmp_path / "m")])
        assert code == 2 and needle in _one_line(capsys)


def test_onnx_without_the_export_extra_says_how_to_install_it(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "simple")
    code = (
        "import sys; sys.modules['onnxruntime'] = None; from raytrain.cli import main; "
        f"sys.exit(main(['export', {str(tmp_path / 'ckpt')!r}, '--format', 'onnx', '--out', "
        f"{str(tmp_path / 'm.onnx')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert 'pip install -e ".[export]"' in proc.stderr and "onnxruntime" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()
