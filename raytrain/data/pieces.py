"""Parquet row groups as the unit of work: scanned in parallel before training
(raytrain.data.checks), dealt to the workers by their rows, and read by each worker directly with
pyarrow, at the speed of the disk.

Why not a Ray Data pipeline per epoch: Ray Data's ``streaming_split`` decides while the epoch runs
which worker gets which block (so a seed cannot fix the order), and every pass pays its start-up
(listing the files, starting read tasks) and a copy of every row through the object store. A row
group is already a block: its size is in the footer, and reading it needs only the file.
"""

from __future__ import annotations

import dataclasses
import heapq
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain.data.columns import Encoding, features_of, split_keys
from raytrain.data.files import in_validation

# Rows shuffled together: row groups are read until the window holds this many rows, then
# permuted as one, so that a batch mixes several row groups (files sorted by label still give
# mixed batches) while a worker holds only a window, not its shard.
MIX_ROWS = 1 << 20


@dataclass(frozen=True)
class Piece:
    """One row group, how many of its rows the hashed split holds out and which ones (a bit per
    row, as the scan found them: reading the piece again needs no hashing)."""

    file: str
    row_group: int
    rows: int
    val_rows: int = 0
    held_out: bytes | None = None  # np.packbits of the held-out mask; None: hash again

    def held_out_mask(self) -> np.ndarray | None:
        if self.held_out is None:
            return None
        bits = np.frombuffer(self.held_out, dtype=np.uint8)
        return np.unpackbits(bits, count=self.rows).view(bool)


@dataclass(frozen=True)
class PieceSet:
    """The row groups of one split and how to read its ``x``/``y`` rows from them.

    ``keep``: "train" or "val" for one side of the hashed split (``val_fraction``), or "all".
    """

    filesystem: pafs.FileSystem
    feature_columns: tuple[str, ...]
    label_column: str
    pieces: tuple[Piece, ...]
    val_fraction: float = 0.0
    keep: str = "all"
    # How raw rows become x and y (categories, missing values, names of classes); None: the
    # feature columns' numbers and the label's integers as they are.
    encoding: Encoding | None = None

    def rows(self, piece: Piece) -> int:
        """How many of the piece's rows belong to this split."""
        if self.keep == "val":
            return piece.val_rows
        return piece.rows - piece.val_rows if self.keep == "train" else piece.rows

    @property
    def label_dtype(self) -> type:
        """float32 for a regression target, else int64 class indexes."""
        return self.encoding.label_dtype if self.encoding is not None else np.int64

    @property
    def total_rows(self) -> int:
        return sum(self.rows(p) for p in self.pieces)

    def deal(self, world: int) -> list[list[Piece]]:
        """The pieces shared out to ``world`` workers, each piece to the one with the fewest rows
        so far (in file order, so the deal is the same on every worker and every run)."""
        shares: list[list[Piece]] = [[] for _ in range(world)]
        loads = [(0, rank) for rank in range(world)]
        for piece in self.pieces:
            rows, rank = heapq.heappop(loads)
            shares[rank].append(piece)
            heapq.heappush(loads, (rows + self.rows(piece), rank))
        return shares

    def held_out(self, piece: Piece, x: np.ndarray) -> np.ndarray:
        """Which of a piece's rows (features ``x``) the hashed split holds out."""
        mask = piece.held_out_mask()
        return mask if mask is not None else in_validation(x, self.val_fraction)

    def select(self, piece: Piece, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This split's rows of a piece's rows ``x``, ``y``: a copy of its own, writable."""
        if self.keep == "all" or not self.val_fraction:
            if self.keep == "val":
                return x[:0].copy(), y[:0].copy()
            return np.array(x), np.array(y, dtype=self.label_dtype)
        held_out = self.held_out(piece, x)
        rows = held_out if self.keep == "val" else ~held_out
        return _take(rows, x), _take(rows, y).astype(self.label_dtype, copy=False)

    def read(
        self, pieces: Sequence[Piece], ahead: bool = True, pick: Callable | None = None
    ) -> Iterator[Any]:
        """The split's rows of each piece in turn, as ``(x, y)`` arrays (or what
        ``pick(piece, x, y)`` makes of the piece's rows, views of Arrow's buffers); with
        ``ahead``, the next piece is read in the background while the caller works on this one
        (pyarrow and NumPy release the GIL)."""
        encoding = self.encoding
        categorical = encoding.categorical if encoding is not None else ()
        columns = [*self.feature_columns, *categorical, self.label_column]
        files: dict[str, pq.ParquetFile] = {}
        pick = pick or self.select

        def load(piece: Piece):
            if piece.file not in files:
                files[piece.file] = pq.ParquetFile(piece.file, filesystem=self.filesystem)
            table = files[piece.file].read_row_group(piece.row_group, columns=columns)
            if encoding is None:
                x = features_of(table, self.feature_columns)
                y = table.column(self.label_column).to_numpy(zero_copy_only=False)
                return pick(piece, x, y)
            if not encoding.plain and piece.held_out is None and self.val_fraction:
                # The split hashes the raw rows (raytrain.data.columns.split_keys).
                raw = split_keys(table, features_of(table, self.feature_columns), categorical)
                mask = in_validation(raw, self.val_fraction)
                piece = dataclasses.replace(piece, held_out=np.packbits(mask).tobytes())
            x, y = encoding.encode(table), encoding.labels(table)
            return pick(piece, x, y)

        try:
            if not ahead:
                for piece in pieces:
                    yield load(piece)
                return
            with ThreadPoolExecutor(1, thread_name_prefix="raytrain-read") as pool:
                ahead = pool.submit(load, pieces[0]) if pieces else None
                for i in range(len(pieces)):
                    current = ahead.result()
                    ahead = pool.submit(load, pieces[i + 1]) if i + 1 < len(pieces) else None
                    yield current
        finally:
            for file in files.values():
                file.close()

    def windows(
        self,
        pieces: Sequence[Piece],
        rng: np.random.Generator,
        prepare: Callable[[np.ndarray, np.ndarray], Any] = lambda x, y: (x, y),
        pick: Callable | None = None,
    ) -> Iterator[Any]:
        """The pieces in a random order, read into windows of at least ``MIX_ROWS`` rows (or
        what is left), each window's rows in a random order (a copy: writable) and handed to
        ``prepare``. A background thread reads, mixes and prepares the next window while the
        caller works on this one. ``pick`` as for ``read``."""
        order = rng.permutation(len(pieces))
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def hand_over(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                held_x: list[np.ndarray] = []
                held_y: list[np.ndarray] = []
                held = 0
                parts = self.read([pieces[j] for j in order], ahead=False, pick=pick)
                for i, (x, y) in enumerate(parts):
                    held_x.append(x)
                    held_y.append(y)
                    held += len(y)
                    if held >= MIX_ROWS or i == len(pieces) - 1:
                        x = held_x[0] if len(held_x) == 1 else np.concatenate(held_x)
                        y = held_y[0] if len(held_y) == 1 else np.concatenate(held_y)
                        mixed = rng.permutation(len(y))
                        if not hand_over(prepare(x[mixed], y[mixed])):
                            return
                        held_x, held_y, held = [], [], 0
                hand_over(_DONE)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                hand_over(_Failed(e))

        producer = threading.Thread(target=produce, name="raytrain-windows", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            producer.join()


class HeldOut:
    """The validation rows of the hashed split, kept as training reads them.

    The hashed split holds its validation rows out of the same row groups the training rows come
    from, so a worker that reads its row groups for an epoch has its validation rows in hand:
    kept, validating reads nothing. A worker validates the held-out rows of the row groups it
    trains on (``share``; the workers' shares cover every row group once), read again only where
    an epoch has not read them yet. Used only when every worker's held-out rows fit in
    ``budget`` bytes (``for_split`` decides alike on every worker)."""

    def __init__(self, split: PieceSet, share: Sequence[Piece]):
        self.split, self.share = split, tuple(share)
        self.kept: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def for_split(
        cls, train: PieceSet, val: PieceSet, world: int, rank: int, features: int, budget: int
    ) -> HeldOut | None:
        """The cache of worker ``rank``, or None where validation reads ``val`` itself: a
        validation split of its own (``data.val_path``), or held-out rows over the budget."""
        hashed = (train.keep, val.keep) == ("train", "val") and train.pieces == val.pieces
        if not hashed or not train.val_fraction:
            return None
        shares = train.deal(world)
        row_bytes = 4 * features + 8  # float32 features, an int64 label (or float32 target)
        largest = max(sum(p.val_rows for p in share) for share in shares) * row_bytes
        return cls(train, shares[rank]) if largest <= budget else None

    def pick(self, piece: Piece, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``PieceSet.read``'s pick for the training split: its rows of the piece, and the
        piece's held-out rows kept."""
        held_out = self.split.held_out(piece, x)
        key = (piece.file, piece.row_group)
        if key not in self.kept:
            label = _take(held_out, y).astype(self.split.label_dtype, copy=False)
            self.kept[key] = (_take(held_out, x), label)
        train = ~held_out
        return _take(train, x), _take(train, y).astype(self.split.label_dtype, copy=False)

    def rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The held-out rows of the share, piece by piece: kept, or read now (and kept)."""
        missing = [p for p in self.share if (p.file, p.row_group) not in self.kept]
        for _ in self.split.read(missing, ahead=False, pick=self.pick):
            pass
        for piece in self.share:
            yield self.kept[(piece.file, piece.row_group)]


def _take(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[rows]`` for a boolean ``rows``: np.compress, several times faster on 2-D rows."""
    return np.compress(rows, values, axis=0)


_DONE = object()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def runs_of(split: PieceSet, world: int) -> list[tuple[int, int]]:
    """The split's pieces cut into ``world`` runs of consecutive pieces with about equal rows:
    ``(first, end)`` piece indexes per worker (a run may be empty if pieces are few)."""
    cum = np.cumsum([split.rows(p) for p in split.pieces], dtype=np.int64)
    total = int(cum[-1]) if len(cum) else 0
    cuts = [0]
    for k in range(1, world):
        target = total * k / world
        i = int(np.searchsorted(cum, target))  # the first piece that reaches the target
        before = int(cum[i - 1]) if i > 0 else 0
        if i < len(cum) and cum[i] - target < target - before:
            i += 1  # ending after piece i lands closer to an equal share
        cuts.append(max(cuts[-1], min(i, len(cum))))
    cuts.append(len(cum))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@dataclass(frozen=True)
class MemoryShare:
    """What one worker reads of the splits held in memory (``read_share``): the whole training
    split's arrays, of which only its own rows are filled until the workers exchange them, each
    worker's row range in them, and its share of the validation rows."""

    x: np.ndarray
    y: np.ndarray
    bounds: list[tuple[int, int]]  # per rank: (start, end) rows of x, y read by that rank
    val_x: np.ndarray
    val_y: np.ndarray


def read_share(
    train: PieceSet,
    val: PieceSet,
    features: int,
    rank: int = 0,
    world: int = 1,
    empty: Callable[..., np.ndarray] = np.empty,
) -> MemoryShare:
    """This worker's run of consecutive pieces (``runs_of``) read into place: its training rows
    into arrays of the whole split's size, in file order, and the validation rows of its run
    (of the validation pieces' run, with separate validation files), copied once. When the two
    splits are sides of the same row groups (the hashed split), each row group is read once for
    both. With ``world`` 1 every row is read. ``empty(shape, dtype)`` allocates the arrays."""
    train_runs = runs_of(train, world)
    starts = np.cumsum([0, *(train.rows(p) for p in train.pieces)])
    bounds = [(int(starts[a]), int(starts[b])) for a, b in train_runs]
    first, end = train_runs[rank]
    same = train.pieces == val.pieces and (train.keep, val.keep) == ("train", "val")
    val_first, val_end = (first, end) if same else runs_of(val, world)[rank]
    val_rows = sum(val.rows(p) for p in val.pieces[val_first:val_end])
    label = train.label_dtype
    x, y = empty((train.total_rows, features), np.float32), empty(train.total_rows, label)
    val_x, val_y = empty((val_rows, features), np.float32), empty(val_rows, label)
    arrays = [(x, y), (val_x, val_y)]
    filled = [bounds[rank][0], 0]

    def put(which: int, part_x: np.ndarray, part_y: np.ndarray, rows=None) -> None:
        """Rows ``part_x``, ``part_y`` (those where ``rows`` is true) into place."""
        count = len(part_y) if rows is None else int(rows.sum())
        start, stop = filled[which], filled[which] + count
        if rows is None:
            arrays[which][0][start:stop] = part_x
            arrays[which][1][start:stop] = part_y
        else:  # straight into place, no copy in between
            np.compress(rows, part_x, axis=0, out=arrays[which][0][start:stop])
            np.compress(rows, part_y, out=arrays[which][1][start:stop])
        filled[which] = stop

    if same:

        def both(piece: Piece, part_x: np.ndarray, part_y: np.ndarray) -> None:
            held_out = train.held_out(piece, part_x)
            put(0, part_x, part_y, ~held_out)
            put(1, part_x, part_y, held_out)

        # Not ahead: ``both`` does all the work, so a reading thread would only add a hand-over.
        for _ in train.read(train.pieces[first:end], ahead=False, pick=both):
            pass
    else:
        for which, (split, pieces) in enumerate(
            ((train, train.pieces[first:end]), (val, val.pieces[val_first:val_end]))
        ):
            for part_x, part_y in split.read(pieces):
                put(which, part_x, part_y)
    return MemoryShare(x, y, bounds, val_x, val_y)
