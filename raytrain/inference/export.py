"""A trained model as one file that maps raw features to logits on its own, the feature scaling
folded in, for a service without Ray (``raytrain export``).

ONNX is written by PyTorch's exporter (``torch.onnx.export(dynamo=True)``) with a dynamic batch
dimension and checked with onnx's checker; TorchScript by ``torch.jit.script``, or
``torch.jit.trace`` for a model that cannot be scripted. Either way the written file is loaded
back (onnxruntime; ``torch.jit.load``) and compared with the PyTorch model before the command
says it is done. Both carry the feature column names, the class count and the checkpoint in their
metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from raytrain.errors import UserError, first_line

FORMATS = ("onnx", "torchscript")
INPUT, OUTPUT = "features", "logits"  # the ONNX graph's input and output names
METADATA = "raytrain.json"  # TorchScript's extra file / ONNX's metadata key
CHECK_ROWS = 1000
TOLERANCE = 1e-5  # the largest difference from the PyTorch model an export may have


class ExportError(UserError):
    """A model that cannot be exported, or an export that does not reproduce the model."""


def to_bytes(trained, fmt: str) -> tuple[bytes, float]:
    """The exported model as file contents, and its largest difference from the PyTorch model
    on sample rows. ExportError if the model cannot be exported or the file does not agree."""
    import torch

    model = trained.export_model()
    rows = sample_rows(trained)
    with torch.no_grad():
        expected = model(rows).numpy()
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")  # torch.jit and the exporters' deprecation notes
        if fmt == "onnx":
            data = _onnx(model, trained)
            got = run_onnx(data, rows.numpy())
        else:
            data = _torchscript(model, trained, rows)
            loaded = torch.jit.load(io.BytesIO(data))
            with torch.no_grad():
                got = loaded(rows).numpy()
    difference = float(abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise ExportError(
            f"the {fmt} export of model {trained.config.model.name!r} differs from the PyTorch "
            f"model by up to {difference:.2g} on {CHECK_ROWS} rows; not written"
        )
    return data, difference


def sample_rows(trained):
    """Rows like the training data: the training split's mean and spread, seeded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    encoding = trained.encoding
    if encoding is None or (encoding.plain and encoding.target is None):
        x = torch.randn(CHECK_ROWS, trained.features, generator=generator)
        if trained.scaling is not None:
            x = x * torch.tensor(trained.scaling.std) + torch.tensor(trained.scaling.mean)
        return x.float()
    # Raw rows: numeric features (a tenth of them missing), then categorical codes.
    width = encoding.width
    x = torch.randn(CHECK_ROWS, width, generator=generator)
    if trained.scaling is not None:
        x = x * torch.tensor(trained.scaling.std[:width]) + torch.tensor(
            trained.scaling.mean[:width]
        )
    x = torch.where(torch.rand(CHECK_ROWS, width, generator=generator) < 0.1, float("nan"), x)
    codes = [
        torch.randint(0, n, (CHECK_ROWS, 1), generator=generator).float()
        for n in encoding.cardinalities
    ]
    return torch.cat([x, *codes], dim=1).float()


def _onnx(model, trained) -> bytes:
    import onnx
    import torch

    example = sample_rows(trained)[:2]
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    except Exception as e:  # the exporter raises many kinds: each means "this model cannot"
        raise ExportError(_cannot(trained, "ONNX", e)) from None
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(trained.describe())
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(_cannot(trained, "ONNX", e)) from None
    return proto.SerializeToString()


def run_onnx(data: bytes, rows):
    """The logits of an ONNX model (file contents) for ``rows`` (a float32 array), by
    onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: rows})[0]


def _torchscript(model, trained, rows) -> bytes:
    import torch

    try:
        compiled = torch.jit.script(model)
    except Exception:  # not scriptable (Python the compiler does not take): trace it instead
        try:
            compiled = torch.jit.trace(model, rows[:2], check_inputs=[(rows,)])
        except Exception as e:
            raise ExportError(_cannot(trained, "TorchScript", e)) from None
    buffer = io.BytesIO()
    torch.jit.save(compiled, buffer, _extra_files={METADATA: json.dumps(trained.describe())})
    return buffer.getvalue()


def _cannot(trained, fmt: str, error: BaseException) -> str:
    while error.__cause__ is not None:  # the exporter's own error wraps the one that says why
        error = error.__cause__
    reason = re.sub(r"\x1b\[[0-9;]*m", "", first_line(error))
    if len(reason) > 200:
        reason = reason[:200].rsplit(" ", 1)[0] + " ..."
    return (
        f"model {trained.config.model.name!r} cannot be exported to {fmt}: "
        f"{type(error).__name__}: {reason} ({_NEEDS[fmt]})"
    )


_NEEDS = {
    "ONNX": "torch.export must trace forward(): no Python branch on a tensor's value "
    "(torch.where or torch.cond instead)",
    "TorchScript": "torch.jit.script must compile forward(), or torch.jit.trace reproduce it: "
    "torch operations only, no NumPy",
}


def need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"--format onnx needs the export extra ({e.name} is missing): "
            'pip install -e ".[export]" (onnx, onnxruntime, onnxscript)'
        ) from None


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """The exporters' own output: warnings about optional packages (torchvision) the ONNX
    exporter skips, and the graph it prints to stderr when it fails (the failure itself comes
    back as an exception, said in one line)."""
    from raytrain.cluster import stderr_to_devnull

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            stderr_to_devnull(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            yield
    finally:
        logger.setLevel(level)
