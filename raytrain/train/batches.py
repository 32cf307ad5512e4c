"""A worker's batches under the data-parallel rule (raytrain.train.loop): the epoch's global
order, this worker's rows of every global batch from tensors in memory, from Parquet row groups
or from a streamed Ray Dataset shard, its validation batches, and the in-memory exchange of the
rows each worker read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from raytrain.data.pieces import HeldOut, PieceSet
from raytrain.data.tables import to_arrays


def epoch_order(rows: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global order of the training rows in ``epoch`` (0-based); the same on every worker."""
    if not shuffle:
        return torch.arange(rows)
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(rows, generator=torch.Generator().manual_seed(epoch_seed))


VAL_BATCH = 4096

# A streamed worker keeps the held-out rows its epochs read, for validation, up to this size.
HELD_OUT_BYTES = 256 << 20

Batches = Iterator[tuple[torch.Tensor, torch.Tensor, int]]


def memory_batches(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, rank: int, world: int
) -> Batches:
    """This worker's rows of every global batch of ``order``, with the global batch's size."""
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        mine = batch[rank::world]
        yield x[mine], y[mine], len(batch)


def local_batches(
    windows: Iterator[tuple[torch.Tensor, torch.Tensor]], local_batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of rows cut into batches of ``local_batch`` rows (the last may be
    smaller). A batch that spans two windows copies only its own rows."""
    left_x = left_y = None
    for x, y in windows:
        start = 0
        if left_y is not None and len(left_y):  # complete the batch begun in the last window
            start = min(local_batch - len(left_y), len(y))
            left_x, left_y = torch.cat([left_x, x[:start]]), torch.cat([left_y, y[:start]])
            if len(left_y) < local_batch:
                continue
            yield left_x, left_y
        end = start + (len(y) - start) // local_batch * local_batch
        for i in range(start, end, local_batch):
            yield x[i : i + local_batch], y[i : i + local_batch]
        left_x, left_y = x[end:], y[end:]
    if left_y is not None and len(left_y):
        yield left_x, left_y


def streamed_batches(
    shard, local_batch: int, seed: int, epoch: int, rank: int, world: int, scale: Callable
) -> Batches:
    """This worker's Ray Data shard, streamed in local batches, features scaled by ``scale``.

    Ray Data hands over whole blocks (a file's rows, or part of one); each is viewed without a
    copy, shuffled by a permutation seeded by ``(seed, epoch, rank)`` (the one copy of its rows)
    and scaled once. Ray Train splits the stream into equal shards, so every worker takes the
    same number of steps with batches of the same size, and the global batch is ``world`` local
    batches.
    """
    rng = np.random.default_rng([seed, epoch, rank])

    def blocks():
        for block in shard.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=1
        ):
            x, y = to_arrays(block)
            order = rng.permutation(len(y))
            yield scale(torch.from_numpy(x[order])), torch.from_numpy(y[order])

    for xb, yb in local_batches(blocks(), local_batch):
        yield xb, yb, len(yb) * world


def piece_batches(
    pieces: PieceSet,
    features: int,
    local_batch: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    scale: Callable,
    held: HeldOut | None = None,
) -> Batches:
    """This worker's deal of the row groups (``PieceSet.deal``), read in a random order seeded
    by ``(seed, epoch, rank)`` and cut into local batches, features scaled by ``scale``; with
    ``held``, the held-out rows of the row groups read are kept there.

    Every worker knows every worker's row count (the deal is the same everywhere), so all take
    the same number of steps: step ``j``'s global batch is the workers' ``j``-th local batches,
    a worker whose rows ran out contributing an empty one, and every row is seen once an epoch.
    """
    shares = pieces.deal(world)
    counts = [sum(pieces.rows(p) for p in share) for share in shares]
    steps = max(-(-n // local_batch) for n in counts)

    def global_rows(step: int) -> int:
        return sum(min(local_batch, max(0, n - step * local_batch)) for n in counts)

    def prepare(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return scale(torch.from_numpy(x)), torch.from_numpy(y)  # in the reading thread

    rng = np.random.default_rng([seed, epoch, rank])
    windows = pieces.windows(shares[rank], rng, prepare, held.pick if held else None)
    step = 0
    for step, (xb, yb) in enumerate(local_batches(windows, local_batch), start=1):
        yield xb, yb, global_rows(step - 1)
    for later in range(step, steps):  # this worker's rows ran out before the others'
        label = torch.from_numpy(np.empty(0, pieces.label_dtype)).dtype
        yield torch.zeros(0, features), torch.zeros(0, dtype=label), global_rows(later)


def val_batches_of(arrays: Iterator[tuple[np.ndarray, np.ndarray]], scale: Callable):
    """Validation rows, arrays at a time, in ``VAL_BATCH`` batches of tensors, scaled."""
    for x, y in arrays:
        for i in range(0, len(y), VAL_BATCH):
            # Copied, a batch's worth: the arrays may be the object store's read-only buffers.
            yield scale(torch.tensor(x[i : i + VAL_BATCH])), torch.tensor(y[i : i + VAL_BATCH])


def torch_empty(shape, dtype) -> np.ndarray:
    """``np.empty`` in memory from torch's allocator. NumPy asks the kernel for huge pages for
    large arrays, and the first touch of such memory can stall on compaction: receiving 160 MB
    of rows from another worker into it took 0.45 s here, 0.1 s into torch's."""
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def exchange_rows(
    tensors: tuple[torch.Tensor, ...], bounds: Sequence[tuple[int, int]], world: int
) -> None:
    """Fill in the rows other workers read: every rank's ``bounds`` rows of each tensor are
    broadcast from it to the others over the process group (gloo; 0.1-0.3 s for 400 MB on one
    machine, measured), so each worker reads only its part of the files."""
    if world == 1:
        return
    for source, (start, end) in enumerate(bounds):
        if end > start:
            for tensor in tensors:
                torch.distributed.broadcast(tensor[start:end], src=source)
