"""The streamed Parquet path without Ray: row groups dealt to workers, read directly, cut into the
batches of every step. Every training row once per epoch across the workers, every step's global
batch what the workers' local batches add up to, the same seed the same order."""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing

from raytrain.data import pieces as pieces_module
from raytrain.data.files import in_validation
from raytrain.data.pieces import HeldOut, Piece, PieceSet, read_share, runs_of
from raytrain.train.batches import exchange_rows, piece_batches

FEATURES = 3


@pytest.fixture(scope="module")
def row_groups(tmp_path_factory):
    """1,000 rows in two files with row groups of uneven sizes. Feature 0 is the row's id."""
    where = tmp_path_factory.mktemp("pieces")
    x = np.random.default_rng(0).standard_normal((1000, FEATURES), dtype=np.float32)
    x[:, 0] = np.arange(1000)
    found = []
    for name, (lo, hi), group in (("a", (0, 640), 100), ("b", (640, 1000), 37)):
        flat = pa.array(x[lo:hi].reshape(-1))
        table = pa.table(
            {
                "x": pa.FixedSizeListArray.from_arrays(flat, FEATURES),
                "y": pa.array(np.arange(lo, hi) % 2),
            }
        )
        path = str(where / f"{name}.parquet")
        pq.write_table(table, path, row_group_size=group)
        footer = pq.read_metadata(path)
        start = lo
        for i in range(footer.num_row_groups):
            rows = footer.row_group(i).num_rows
            held = int(in_validation(x[start : start + rows], 0.2).sum())
            found.append(Piece(path, i, rows, held))
            start += rows
    return x, tuple(found)


def piece_set(row_groups, keep="train") -> PieceSet:
    _, found = row_groups
    return PieceSet(pafs.LocalFileSystem(), ("x",), "y", found, 0.2, keep)


def epoch_of(pieces: PieceSet, world: int, epoch: int = 0, seed: int = 0, local: int = 32):
    """Every worker's batches of one epoch: lists of (row ids, global rows)."""
    return [
        [
            (xb[:, 0].long().tolist(), global_rows)
            for xb, _, global_rows in piece_batches(
                pieces, FEATURES, local, seed, epoch, rank, world, lambda t: t
            )
        ]
        for rank in range(world)
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("local", [32, 200])  # batches within windows, and across several
def test_every_training_row_once_an_epoch_in_equal_steps(row_groups, world, local, monkeypatch):
    monkeypatch.setattr(pieces_module, "MIX_ROWS", 150)  # several windows per worker
    x, _ = row_groups
    train_ids = set(np.flatnonzero(~in_validation(x, 0.2)).tolist())
    workers = epoch_of(piece_set(row_groups), world, local=local)
    assert len({len(batches) for batches in workers}) == 1  # the same number of steps
    seen = [i for batches in workers for ids, _ in batches for i in ids]
    assert sorted(seen) == sorted(train_ids)  # every training row, once
    for step in zip(*workers, strict=True):
        assert len({global_rows for _, global_rows in step}) == 1
        assert step[0][1] == sum(len(ids) for ids, _ in step)
        assert all(len(ids) <= local for ids, _ in step)
    assert all(len(ids) == local for batches in workers for ids, _ in batches[:-3])


def test_the_same_seed_gives_the_same_order_and_epochs_differ(row_groups):
    pieces = piece_set(row_groups)
    first = epoch_of(pieces, 2, epoch=0)
    assert epoch_of(pieces, 2, epoch=0) == first
    assert epoch_of(pieces, 2, epoch=1) != first
    assert epoch_of(pieces, 2, epoch=0, seed=1) != first


def test_the_deal_balances_rows_and_validation_covers_the_held_out_rows(row_groups):
    x, _ = row_groups
    train = piece_set(row_groups)
    shares = train.deal(3)
    loads = [sum(train.rows(p) for p in share) for share in shares]
    assert max(loads) - min(loads) <= 100  # at most about one row group apart
    val = piece_set(row_groups, keep="val")
    ids = [int(i) for share in val.deal(2) for xb, _ in val.read(share) for i in xb[:, 0]]
    assert sorted(ids) == np.flatnonzero(in_validation(x, 0.2)).tolist()
    assert val.total_rows + train.total_rows == 1000


def test_batches_are_tensors_of_the_rows_labels(row_groups):
    (batches,) = [list(piece_batches(piece_set(row_groups), FEATURES, 64, 0, 0, 0, 1, lambda t: t))]
    for xb, yb, global_rows in batches:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.equal(yb, xb[:, 0].long() % 2) and global_rows == len(yb)


def test_the_scans_held_out_bits_split_rows_as_hashing_does(row_groups):
    x, found = row_groups
    marked = []
    for piece in found:
        table = pq.read_table(piece.file)
        start = sum(p.rows for p in found if p.file == piece.file and p.row_group < piece.row_group)
        ids = table.column("x").combine_chunks().flatten().to_numpy()[::FEATURES]
        held = in_validation(x[ids[start : start + piece.rows].astype(int)], 0.2)
        marked.append(dataclasses.replace(piece, held_out=np.packbits(held).tobytes()))
    for keep in ("train", "val"):
        hashed = piece_set(row_groups, keep)
        bits = dataclasses.replace(hashed, pieces=tuple(marked))
        for a, b in zip(hashed.read(hashed.pieces), bits.read(bits.pieces), strict=True):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_both_splits_in_one_pass_equal_each_read_on_its_own(row_groups):
    train, val = piece_set(row_groups), piece_set(row_groups, keep="val")
    share = read_share(train, val, FEATURES)  # one worker: all of it
    both = ((share.x, share.y), (share.val_x, share.val_y))
    for split, (x, y) in zip((train, val), both, strict=True):
        parts = list(split.read(split.pieces))
        assert np.array_equal(x, np.concatenate([p[0] for p in parts]))
        assert np.array_equal(y, np.concatenate([p[1] for p in parts]))
        assert x.flags.writeable and y.dtype == np.int64


@pytest.mark.parametrize("world", [1, 2, 3])
def test_held_out_rows_kept_from_the_epoch_cover_validation_once(row_groups, world, monkeypatch):
    monkeypatch.setattr(pieces_module, "MIX_ROWS", 150)
    x, _ = row_groups
    train, val = piece_set(row_groups), piece_set(row_groups, keep="val")
    held_ids = np.flatnonzero(in_validation(x, 0.2)).tolist()
    kept = [HeldOut.for_split(train, val, world, rank, FEATURES, 1 << 20) for rank in range(world)]
    for rank, held in enumerate(kept):
        batches = piece_batches(train, FEATURES, 32, 0, 0, rank, world, lambda t: t, held)
        plain = piece_batches(train, FEATURES, 32, 0, 0, rank, world, lambda t: t)
        for (a, ya, ga), (b, yb, gb) in zip(batches, plain, strict=True):  # training unchanged
            assert torch.equal(a, b) and torch.equal(ya, yb) and ga == gb
        assert len(held.kept) == len(held.share)  # the epoch read every held-out row
    ids = [int(i) for held in kept for xb, yb in held.rows() for i in xb[:, 0]]
    assert sorted(ids) == held_ids  # every held-out row once, across the workers
    labels = [(int(i), int(label)) for held in kept for xb, yb in held.rows() for i, label in
              zip(xb[:, 0], yb, strict=True)]  # fmt: skip
    assert all(label == i % 2 for i, label in labels)
    # Before any epoch read them, the rows are read on demand: the same rows.
    fresh = HeldOut.for_split(train, val, world, 0, FEATURES, 1 << 20)
    first = [int(i) for xb, _ in fresh.rows() for i in xb[:, 0]]
    assert first == [int(i) for xb, _ in kept[0].rows() for i in xb[:, 0]]


def test_held_out_rows_are_read_again_past_the_budget_or_from_a_split_of_their_own(row_groups):
    train, val = piece_set(row_groups), piece_set(row_groups, keep="val")
    per_row = 4 * FEATURES + 8
    largest = max(sum(p.val_rows for p in share) for share in train.deal(2)) * per_row
    assert HeldOut.for_split(train, val, 2, 0, FEATURES, largest) is not None
    assert HeldOut.for_split(train, val, 2, 1, FEATURES, largest - 1) is None  # on every rank
    assert HeldOut.for_split(train, val, 2, 0, FEATURES, largest - 1) is None
    own = piece_set(row_groups, keep="all")  # data.val_path: other files
    assert (
        HeldOut.for_split(piece_set(row_groups, keep="all"), own, 2, 0, FEATURES, 1 << 30) is None
    )


def _exchange(rank: int, world: int, port: int, train: PieceSet, val: PieceSet, out) -> None:
    """One worker of ``test_workers_read_a_run_each_and_exchange_the_rest`` (a process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        share = read_share(train, val, FEATURES, rank, world)
        start, end = share.bounds[rank]
        read_ids = share.x[start:end, 0].copy()
        exchange_rows((torch.from_numpy(share.x), torch.from_numpy(share.y)), share.bounds, world)
        np.savez(out / f"{rank}.npz", x=share.x, y=share.y, read=read_ids, val=share.val_x[:, 0])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("keep", ["hashed", "separate"])
def test_workers_read_a_run_each_and_exchange_the_rest(row_groups, tmp_path, world, keep):
    """In memory, each worker reads a run of the row groups and gets the rest from the others
    over gloo (real processes): every worker ends with the whole training split, exactly as
    one worker reading all of it; every validation row is some worker's, once."""
    train, val = piece_set(row_groups), piece_set(row_groups, keep="val")
    if keep == "separate":  # validation files of their own: the first file's row groups
        found = row_groups[1]
        train = dataclasses.replace(train, keep="all", val_fraction=0.0)
        val = dataclasses.replace(train, pieces=tuple(p for p in found if "a.parquet" in p.file))
    runs = runs_of(train, world)
    assert runs[0][0] == 0 and runs[-1][1] == len(train.pieces)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))  # consecutive, all of them
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_exchange, (world, port, train, val, tmp_path), nprocs=world)
    whole = read_share(train, val, FEATURES)
    got = [np.load(tmp_path / f"{rank}.npz") for rank in range(world)]
    for found in got:
        assert np.array_equal(found["x"], whole.x) and np.array_equal(found["y"], whole.y)
    read = np.concatenate([found["read"] for found in got])
    assert np.array_equal(read, whole.x[:, 0])  # each row read by one worker only
    sizes = [len(found["read"]) for found in got]
    assert max(sizes) - min(sizes) <= max(p.rows for p in train.pieces)  # about equal runs
    val_ids = np.concatenate([found["val"] for found in got])
    assert np.array_equal(val_ids, whole.val_x[:, 0])  # every validation row once, in order
