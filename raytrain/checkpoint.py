"""The resume state: save() on rank 0, load() anywhere. A checkpoint is a directory holding

- ``state.pt``: model and optimizer state, the epoch, the torch RNG state and the config, saved with
  ``torch.save`` and loaded with ``weights_only=True``, so a file carrying pickled code is refused,
  never executed;
- ``meta.json``: a small readable summary (epoch, metrics, the SHA-256 of ``state.pt``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytrain.errors import UserError
from raytrain.model import unwrap

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT = 1


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
) -> Path:
    """Write the state after ``epoch`` finished epochs to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
        "config": config,
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
        expected = meta["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint metadata {str(meta_path)!r} is not readable") from None
    if _sha256(state_path) != expected:
        raise CheckpointError(
            f"checkpoint {str(state_path)!r} does not match its recorded SHA-256 "
            "(truncated or modified); refusing to load it"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(state_path)!r} cannot be loaded safely: {reason}"
        ) from None
    state["meta"] = meta
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
