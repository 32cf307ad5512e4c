"""Synthetic data: shapes, split sizes, determinism, the tutorial's draws, one generator for
memory and Parquet, the Arrow form."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytrain.config import DataConfig
from raytrain.data.synthetic import draw, make_synthetic, write_block
from raytrain.data.tables import to_tensors, xy_table


def test_shapes_and_split_sizes():
    split = make_synthetic(DataConfig())
    assert split.train_x.shape == (800, 10) and split.train_y.shape == (800,)
    assert split.val_x.shape == (200, 10) and split.val_y.shape == (200,)
    assert split.train_x.dtype == torch.float32 and split.train_y.dtype == torch.int64
    odd = make_synthetic(DataConfig(samples=101, features=7, classes=3, val_fraction=0.25))
    assert (len(odd.train_y), len(odd.val_y)) == (75, 26)
    assert set(odd.train_y.tolist()) == {0, 1, 2}


def test_train_and_val_are_disjoint_and_cover_the_data():
    split = make_synthetic(DataConfig(samples=300))
    rows = torch.cat([split.train_x, split.val_x])
    assert len(torch.unique(rows, dim=0)) == 300


def test_same_seed_same_data_other_seed_other_data():
    a, b = make_synthetic(DataConfig(seed=3)), make_synthetic(DataConfig(seed=3))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    c = make_synthetic(DataConfig(seed=4))
    assert not torch.equal(a.train_x, c.train_x)


def test_random_labels_are_the_tutorials_draws():
    torch.manual_seed(0)
    x, y = torch.randn(1000, 10), torch.randint(0, 2, (1000,))
    split = make_synthetic(DataConfig(labels="random", seed=0))
    got_x = torch.cat([split.train_x, split.val_x])
    got_y = torch.cat([split.train_y, split.val_y])
    # Same rows and labels as the tutorial's global-RNG draws, only split into two parts.
    order = torch.argsort(got_x[:, 0])
    ref = torch.argsort(x[:, 0])
    assert torch.equal(got_x[order], x[ref]) and torch.equal(got_y[order], y[ref])


def test_rule_labels_are_learnable_and_balanced():
    split = make_synthetic(DataConfig())
    share = split.train_y.float().mean().item()
    assert 0.3 < share < 0.7
    # The best linear fit (least squares) gets well above chance: there is something to learn.
    x1 = torch.cat([split.train_x, torch.ones(len(split.train_x), 1)], dim=1)
    w = torch.linalg.lstsq(x1, split.train_y.float().unsqueeze(1) * 2 - 1).solution
    assert ((x1 @ w).squeeze(1) > 0).long().eq(split.train_y).float().mean() > 0.85


def test_one_generator_for_a_runs_data_and_the_parquet_files(tmp_path):
    """`raytrain data generate` writes, block by block, the rows a synthetic run trains on."""
    cfg = DataConfig(samples=300, features=4, classes=3, seed=5)
    x, y, _ = draw(300, cfg)
    path, rows = write_block(0, 300, str(tmp_path), cfg)
    x_file, y_file = to_tensors([pq.read_table(path)])
    assert rows == 300 and torch.equal(x_file, x) and torch.equal(y_file, y)
    split = make_synthetic(cfg)
    held = torch.cat([split.train_x, split.val_x])
    assert torch.equal(held[torch.argsort(held[:, 0])], x[torch.argsort(x[:, 0])])
    # Other blocks are other rows of the same data set: the same hidden rule labels them.
    x1, y1, _ = draw(300, cfg, block=1)
    assert not torch.equal(x1, x)
    rule_cfg = DataConfig(samples=300, features=4, classes=3, seed=5, label_noise=0.0)
    (a, la, _), (b, lb, _) = draw(300, rule_cfg), draw(300, rule_cfg, block=1)
    w = torch.linalg.lstsq(
        torch.cat([a, b]), torch.nn.functional.one_hot(torch.cat([la, lb])).float()
    ).solution
    assert (torch.cat([a, b]) @ w).argmax(1).eq(torch.cat([la, lb])).float().mean() > 0.9


def test_arrow_table_round_trip():
    split = make_synthetic(DataConfig(samples=50))
    table = xy_table(split.train_x.numpy(), split.train_y.numpy())
    assert table.schema.field("x").type == pa.list_(pa.float32(), 10)
    assert table.schema.field("y").type == pa.int64()
    # Two blocks, the second a slice (an offset into its buffers), as the object store holds them.
    x, y = to_tensors([table.slice(0, 13), table.slice(13)])
    assert torch.equal(x, split.train_x) and torch.equal(y, split.train_y)


def test_split_moments_are_numpys_over_the_training_rows_and_refuse_non_finite_values():
    import numpy as np

    from raytrain.data import scaling

    rng = np.random.default_rng(0)
    # More rows than a block; a feature far from 0 (precision), a constant one (m2 exactly 0).
    x = rng.standard_normal((200_003, 4)) * [1.0, 3.0, 0.5, 0.0] + [0.0, 1e6, -7.0, 2.5]
    x = x.astype(np.float32)
    held = rng.random(len(x)) < 0.2
    found = scaling.split_moments(x, held)
    train = x[~held].astype(np.float64)
    assert found["n"] == len(train)
    assert np.allclose(found["mean"], train.mean(axis=0), rtol=1e-10, atol=1e-12)
    assert np.allclose(found["m2"], train.var(axis=0) * len(train), rtol=1e-9, atol=1e-9)
    assert found["m2"][-1] == 0.0
    assert scaling.split_moments(x, None)["n"] == len(x)
    for bad in (np.nan, np.inf, -np.inf):  # in a held-out row too: the check covers every row
        for row in (int(np.flatnonzero(held)[5]), int(np.flatnonzero(~held)[7])):
            y = x.copy()
            y[row, 2] = bad
            assert scaling.split_moments(y, held) is None, (bad, row)
    assert scaling.split_moments(x[:0], None)["n"] == 0
