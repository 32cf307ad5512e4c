"""The resume state: save() on rank 0, load() anywhere. A checkpoint is a directory holding

- ``state.pt``: model, optimizer and learning-rate schedule state, the epoch, the torch RNG state
  and the config, saved with
  ``torch.save`` and loaded with ``weights_only=True``, so a file carrying pickled code is refused,
  never executed;
- ``meta.json``: a small readable summary (format, epoch, metrics, the SHA-256 of ``state.pt``).

Rank 0 writes it and hands it to Ray Train (``report``), which persists it as
``RUN_DIR/checkpoint_epoch_NNNNNN`` and keeps the latest ``train.checkpoints_to_keep``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytrain.errors import UserError, first_line
from raytrain.model import unwrap
from raytrain.runs import checkpoint_name
from raytrain.storage import Location

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# Raised when state.pt changes shape (2: with the learning-rate schedule); load() refuses others.
FORMAT = 2


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or tampered with (one sentence, names the path)."""


def save(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, Any],
    scheduler: Any = None,
    **extra: Any,
) -> Path:
    """Write the state after ``epoch`` finished epochs to ``directory``; ``extra`` (plain data:
    the feature scaling, early stopping's state) is stored beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
        "config": config,
        **extra,
    }
    torch.save(state, directory / STATE_FILE)
    meta = {
        "format": FORMAT,
        "epoch": epoch,
        "metrics": metrics,
        "sha256": _sha256(directory / STATE_FILE),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load(directory: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint directory; CheckpointError says what is wrong with it."""
    directory = Path(directory)
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} does not exist or is not a directory")
    for path in (state_path, meta_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {path.name}")
    try:
        meta = json.loads(meta_path.read_text())
        expected, found = meta["sha256"], meta.get("format")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint metadata {str(meta_path)!r} is not readable") from None
    if found != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has format {found!r}, but this raytrain reads "
            f"format {FORMAT}; use the raytrain version that wrote it"
        )
    if _sha256(state_path) != expected:
        raise CheckpointError(
            f"checkpoint {str(state_path)!r} does not match its recorded SHA-256 "
            "(truncated or modified); refusing to load it"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(state_path)!r} cannot be loaded safely: {first_line(e)}"
        ) from None
    state["meta"] = meta
    return state


def load_at(location: str | Path | Location) -> dict[str, Any]:
    """``load`` a checkpoint by its path or URI (one on an object store is downloaded first)."""
    location = Location.of(location)
    if location.local:
        return load(location.path)
    if not location.is_dir():
        raise CheckpointError(f"checkpoint {str(location)!r} does not exist or is not a directory")
    with location.local_copy() as directory:
        try:
            return load(directory)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(directory), str(location))) from None


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Load the run's latest checkpoint (Ray Train's, inside the worker loop) into ``model``,
    ``optimizer``, ``scheduler`` and torch's RNG; returns its state (``{"epoch": 0}`` without a
    checkpoint)."""
    import ray.train

    saved = ray.train.get_checkpoint()
    if saved is None:
        return {"epoch": 0}
    with saved.as_directory() as directory:
        state = load(directory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def report(rank: int, epoch: int, metrics: dict[str, Any], **state: Any) -> None:
    """Hand the checkpoint after ``epoch`` epochs to Ray Train. A barrier: every rank calls it;
    rank 0 writes the checkpoint (``state``: ``save``'s arguments), the others pass none."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as tmp:
        save(tmp, epoch=epoch, metrics=metrics, **state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_name(epoch),
        )


def persisted(location: str | Location) -> bool:
    """Whether the checkpoint a metrics row names has been written whole where it belongs (rank
    0 writes the row first, then Ray Train persists the checkpoint's files)."""
    where = Location.of(location)
    return (where / META_FILE).is_file() and (where / STATE_FILE).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
