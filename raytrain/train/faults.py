"""Fault injection, for rehearsing recovery: ``RAYTRAIN_FAIL_AT=RANK:EPOCH`` makes that worker
kill itself with SIGKILL a second into that epoch (1-based), once per run, on any cluster."""

from __future__ import annotations

import json
import os
import signal
import time

from raytrain import runs
from raytrain.errors import UserError

ENV = "RAYTRAIN_FAIL_AT"


def parse_fail_at(text: str | None) -> tuple[int, int] | None:
    """``RANK:EPOCH`` -> (rank, epoch); None for an empty or missing value."""
    if not text:
        return None
    rank, sep, epoch = text.partition(":")
    if not (sep and rank.isdigit() and epoch.isdigit() and int(epoch) >= 1):
        raise UserError(
            f"{ENV}={text!r} should be RANK:EPOCH, e.g. 1:3 (rank 1 dies when it starts epoch 3)"
        )
    return int(rank), int(epoch)


def die_if_due(fail_at: tuple[int, int] | None, rank: int, epoch: int, run_dir) -> None:
    """SIGKILL this worker if ``fail_at`` is (rank, epoch) and it has not died there before."""
    if fail_at != (rank, epoch):
        return
    marker = runs.fault_marker(run_dir, rank, epoch)
    if marker.exists():
        return
    time.sleep(1.0)  # a moment into the epoch, as a real failure would
    marker.write_bytes(
        json.dumps({"rank": rank, "epoch": epoch, "killed_at": time.time()}).encode()
    )
    os.kill(os.getpid(), signal.SIGKILL)
