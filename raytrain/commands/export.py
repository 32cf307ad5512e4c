"""``raytrain export``: a trained model as one ONNX or TorchScript file that maps raw features to
logits on its own, the feature scaling folded in (raytrain.inference.export), checked against
the PyTorch model before it is written.

    raytrain export RUN --format onnx --out model.onnx          # needs pip install raytrain[export]
    raytrain export RUN --format torchscript --out model.pt
"""

from __future__ import annotations

import argparse

from raytrain.commands.args import add_storage_path, error
from raytrain.errors import EXIT_OK, UserError, first_line
from raytrain.storage import Location, StorageError

FORMATS = ("onnx", "torchscript")


def add_parser(sub) -> None:
    """``raytrain export``."""
    parser = sub.add_parser(
        "export",
        help="write a trained model as ONNX or TorchScript",
        description="Write a trained model as one ONNX or TorchScript file that maps raw "
        "features to logits, the feature scaling folded in.",
    )
    parser.add_argument(
        "target",
        metavar="RUN|CHECKPOINT",
        help="A run (its name under --storage-path, or its directory): its best checkpoint; "
        "or a checkpoint directory.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="The file's format.")
    parser.add_argument("--out", required=True, metavar="FILE", help="The file to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    add_storage_path(parser, "Where runs are found by name")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the export command; returns the exit code."""
    try:
        out = writable(args.out, args.overwrite)
        from raytrain.inference import export

        if args.format == "onnx":
            export.need_onnx()
        from raytrain.inference.trained import load

        trained = load(args.target, args.storage_path)
        data, difference = export.to_bytes(trained, args.format)
        try:
            out.write_bytes(data)  # whole or not at all
        except OSError as e:
            raise UserError(f"--out {args.out!r}: cannot write it ({_reason(e)})") from None
    except UserError as e:
        return error(str(e))
    print(
        f"wrote {out} ({args.format}, {len(data) / 1e3:,.1f} kB): {trained.checkpoint} "
        f"(epoch {trained.epoch}, {trained.why}), {trained.raw_features} features "
        f"({', '.join(trained.feature_columns)}) -> {_outputs(trained)}; largest "
        f"difference from PyTorch on {export.CHECK_ROWS:,} rows {difference:.1e}"
    )
    return EXIT_OK


def _outputs(trained) -> str:
    encoding = trained.encoding
    if encoding is not None and encoding.target is not None:
        return f"the predicted {encoding.label!r}"
    return f"{trained.classes} logits"


def writable(text: str, overwrite: bool) -> Location:
    """The output file's Location, checked before any work: its directory exists (a local one)
    and it does not exist unless ``overwrite``. UserError otherwise."""
    try:
        out = Location.of(text)
        if out.exists() and not overwrite:
            raise UserError(f"--out {text!r} exists; pass --overwrite to replace it")
        if out.local and not out.parent.is_dir():
            raise UserError(
                f"--out {text!r}: the directory {str(out.parent)!r} does not exist; create it "
                "or write elsewhere"
            )
    except StorageError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"--out {text!r}: cannot use it ({_reason(e)})") from None
    return out


def _reason(error: OSError) -> str:
    return error.strerror or first_line(error)
