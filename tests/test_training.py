"""Real Ray Train runs on the session's Ray: learning, and data parallelism that equals one process.

The reference is the tutorial's own loop (DataLoader, nn.CrossEntropyLoss, SGD), written here
without Ray. raytrain with W workers must produce the same weights, because every global batch is
dealt out across the workers and DDP averages their gradients (see raytrain/train/loop.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raytrain.config import Config
from raytrain.data.synthetic import make_synthetic
from raytrain.evaluate import evaluate
from raytrain.model import build_model
from raytrain.train.loop import epoch_order

TOLERANCE = 1e-5


def tutorial_loop(cfg: Config):
    """The tutorial's single-process training, with raytrain's seeded epoch order.

    Returns the model and, per epoch, the mean training loss and accuracy over all rows.
    """
    split = make_synthetic(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.features, cfg.data.classes)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    history = []
    for epoch in range(cfg.train.epochs):
        order = epoch_order(len(split.train_y), cfg.train.seed, epoch, cfg.train.shuffle)
        data = TensorDataset(split.train_x[order], split.train_y[order])
        loss_sum = correct = 0.0
        for inputs, labels in DataLoader(data, batch_size=cfg.train.batch_size, shuffle=False):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (outputs.argmax(1) == labels).sum().item()
        history.append((loss_sum / len(order), correct / len(order)))
    return model, history, split


def max_weight_difference(state: dict, model: nn.Module) -> float:
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    return max((state[k] - reference[k]).abs().max().item() for k in state)


# 131 training rows with a global batch of 10: the last batch of every epoch has 1 row, fewer rows
# than workers, and 10 does not divide by 4: the uneven cases the rule must still get exactly right.
UNEVEN = ("data.samples=164", "data.val_fraction=0.2", "train.batch_size=10", "train.epochs=3")


@pytest.fixture(scope="module")
def four_workers_uneven(train):
    return train("scaling.workers=4", "train.lr=0.2", *UNEVEN)


@pytest.mark.ray
@pytest.mark.parametrize(
    "overrides",
    [
        ("scaling.workers=1", "train.shuffle=false"),
        ("scaling.workers=2", "model.name=mlp", "model.hidden=[16, 8]", "train.momentum=0.9"),
    ],
    ids=["1-worker-simple-unshuffled", "2-workers-mlp-momentum"],
)
def test_workers_compute_what_one_process_computes(train, overrides):
    trained = train(*overrides, "train.lr=0.2", *UNEVEN)
    model, _, _ = tutorial_loop(trained.cfg)
    assert max_weight_difference(trained.state["model"], model) < TOLERANCE


@pytest.mark.ray
def test_four_workers_compute_what_one_process_computes(four_workers_uneven):
    model, _, _ = tutorial_loop(four_workers_uneven.cfg)
    diff = max_weight_difference(four_workers_uneven.state["model"], model)
    print(f"largest weight difference, 4 workers vs one process: {diff:.3g}")
    assert diff < TOLERANCE


@pytest.mark.ray
def test_epoch_metrics_average_all_workers_weighted_by_rows(four_workers_uneven):
    _, history, split = tutorial_loop(four_workers_uneven.cfg)
    rows = four_workers_uneven.metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row, (loss, accuracy) in zip(rows, history, strict=True):
        workers = row["workers"]
        assert sorted(w["rank"] for w in workers) == [0, 1, 2, 3]
        # Every training row was used exactly once per epoch, split across the four workers.
        assert sum(w["rows"] for w in workers) == row["rows"] == len(split.train_y)
        assert len({w["rows"] for w in workers}) > 1  # uneven shares, so weighting matters
        assert row["loss"] == pytest.approx(loss, abs=1e-6)
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        weighted = sum(w["loss"] * w["rows"] for w in workers) / row["rows"]
        assert row["loss"] == pytest.approx(weighted, abs=1e-9)


@pytest.mark.ray
def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not(train):
    args = ("scaling.workers=2", "train.epochs=3")
    first, second = train(*args), train(*args)
    for key, tensor in first.state["model"].items():
        assert torch.equal(tensor, second.state["model"][key])
    strip = [{k: r[k] for k in ("epoch", "loss", "accuracy", "rows")} for r in first.metrics]
    assert strip == [
        {k: r[k] for k in ("epoch", "loss", "accuracy", "rows")} for r in second.metrics
    ]
    other = train(*args, "train.seed=1")
    assert not torch.equal(other.state["model"]["fc.weight"], first.state["model"]["fc.weight"])


def test_epoch_order_is_seeded_per_epoch():
    first = [epoch_order(100, 7, e, True) for e in range(3)]
    again = [epoch_order(100, 7, e, True) for e in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert not torch.equal(first[0], epoch_order(100, 8, 0, True))
    assert torch.equal(epoch_order(5, 7, 3, False), torch.arange(5))
    assert torch.equal(first[0].sort().values, torch.arange(100))


@pytest.mark.ray
def test_default_run_learns_and_validates_on_the_driver(train):
    """The tutorial's defaults with 2 workers: well above chance on held-out rows, and within a
    point of the same model trained by the plain loop."""
    trained = train("scaling.workers=2")
    val = trained.results["validation"]
    assert val["rows"] == 200
    assert val["accuracy"] > 0.75
    assert sum(map(sum, val["confusion"])) == 200
    assert len(val["precision"]) == len(val["recall"]) == 2
    assert len(trained.metrics) == 10 and trained.state["epoch"] == 10
    model, _, split = tutorial_loop(trained.cfg)
    plain = evaluate(model, [{"x": split.val_x, "y": split.val_y}], classes=2)
    assert abs(val["accuracy"] - plain["accuracy"]) <= 0.01
    assert "validation  acc" in trained.console
