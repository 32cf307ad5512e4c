"""Real Ray Train runs on the session's Ray: learning, and data parallelism that equals one process.

The reference is the tutorial's own loop (DataLoader, nn.CrossEntropyLoss, SGD), written here
without Ray. raytrain with W workers must produce the same weights, because every global batch is
dealt out across the workers and DDP averages their gradients (see raytrain/train/loop.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raytrain import runs
from raytrain.config import Config
from raytrain.data.synthetic import make_synthetic
from raytrain.evaluate import evaluate
from raytrain.model import build_model
from raytrain.train.batches import epoch_order

from .conftest import run_module

TOLERANCE = 1e-5


def reference_optimizer(model: nn.Module, cfg: Config):
    """torch's optimizer and per-epoch schedule for ``cfg.train``, written out here."""
    t = cfg.train
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=t.lr,
            momentum=t.momentum,
            nesterov=t.nesterov,
            weight_decay=t.weight_decay,
        )
    else:
        kind = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        optimizer = kind(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    w = t.warmup_epochs

    def factor(epoch: int) -> float:
        if epoch < w:
            return (epoch + 1) / (w + 1)
        if t.scheduler == "cosine":
            return (1 + math.cos(math.pi * (epoch - w) / (t.epochs - w))) / 2
        if t.scheduler == "step":
            return t.gamma ** ((epoch - w) // t.step_size)
        return 1.0

    return optimizer, factor


def tutorial_loop(cfg: Config):
    """The tutorial's single-process training, with raytrain's seeded epoch order and the
    configured optimizer, schedule and gradient clipping.

    Returns the model and, per epoch, the mean training loss and accuracy over all rows.
    """
    split = make_synthetic(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.features, cfg.data.classes)
    criterion = nn.CrossEntropyLoss()
    optimizer, factor = reference_optimizer(model, cfg)
    history = []  # per epoch: training loss, accuracy; validation loss, accuracy (all rows)
    for epoch in range(cfg.train.epochs):
        order = epoch_order(len(split.train_y), cfg.train.seed, epoch, cfg.train.shuffle)
        data = TensorDataset(split.train_x[order], split.train_y[order])
        loss_sum = correct = 0.0
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * factor(epoch)
        for inputs, labels in DataLoader(data, batch_size=cfg.train.batch_size, shuffle=False):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            if cfg.train.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (outputs.argmax(1) == labels).sum().item()
        val = evaluate(model, [(split.val_x, split.val_y)], cfg.data.classes)
        history.append((loss_sum / len(order), correct / len(order), val["loss"], val["accuracy"]))
    return model, history, split


def max_weight_difference(state: dict, model: nn.Module) -> float:
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    return max((state[k] - reference[k]).abs().max().item() for k in state)


# 131 training rows with a global batch of 10: the last batch of every epoch has 1 row, fewer rows
# than workers, and 10 does not divide by 4: the uneven cases the rule must still get exactly right.
UNEVEN = ("data.samples=164", "data.val_fraction=0.2", "train.batch_size=10", "train.epochs=3")
# AdamW with weight decay, a warm-up epoch, then a cosine schedule, and gradient clipping tight
# enough to clip most steps.
ADAMW = (
    "train.optimizer=adamw",
    "train.weight_decay=0.05",
    "train.scheduler=cosine",
    "train.warmup_epochs=1",
    "train.grad_clip=0.05",
)


@pytest.fixture(scope="module")
def four_workers_uneven(train):
    """4 workers with AdamW, warm-up, cosine and clipping on the uneven split: one run for the
    weights (test_four_workers_...) and the epoch rows (test_epoch_metrics_...)."""
    return train("scaling.workers=4", *ADAMW, "train.lr=0.2", *UNEVEN)


@pytest.mark.ray
@pytest.mark.parametrize(
    "overrides",
    [
        ("scaling.workers=1", "train.shuffle=false"),
        ("scaling.workers=2", "model.name=mlp", "model.hidden=[16, 8]", *ADAMW),
        (  # momentum and the MLP: one run with the step schedule (a run costs ~10 s of starts)
            "scaling.workers=2",
            "model.name=mlp",
            "model.hidden=[16, 8]",
            "train.momentum=0.9",
            "train.nesterov=true",
            "train.scheduler=step",
            "train.step_size=1",
            "train.gamma=0.5",
            "train.weight_decay=0.01",
        ),
    ],
    ids=[
        "1-worker-simple-unshuffled",
        "2-workers-mlp-adamw-cosine",
        "2-workers-mlp-nesterov-step",
    ],
)
def test_workers_compute_what_one_process_computes(train, overrides):
    same_as_one_process(train(*overrides, "train.lr=0.2", *UNEVEN))


def same_as_one_process(trained) -> None:
    """The run's weights are one process's within TOLERANCE, and each epoch's row has the
    learning rate that process used."""
    model, _, _ = tutorial_loop(trained.cfg)
    diff = max_weight_difference(trained.state["model"], model)
    workers = trained.cfg.scaling.workers
    print(f"largest weight difference, {workers} workers vs one process: {diff:.3g}")
    assert diff < TOLERANCE
    _, factor = reference_optimizer(model, trained.cfg)
    lrs = [row["lr"] for row in trained.metrics]
    assert lrs == pytest.approx([0.2 * factor(e) for e in range(3)], rel=1e-9)


@pytest.mark.ray
def test_four_workers_compute_what_one_process_computes(four_workers_uneven):
    same_as_one_process(four_workers_uneven)


@pytest.mark.ray
def test_epoch_metrics_average_all_workers_weighted_by_rows(four_workers_uneven):
    _, history, split = tutorial_loop(four_workers_uneven.cfg)
    rows = four_workers_uneven.metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row, (loss, accuracy, val_loss, val_accuracy) in zip(rows, history, strict=True):
        workers = row["workers"]
        assert sorted(w["rank"] for w in workers) == [0, 1, 2, 3]
        # Every training row was used exactly once per epoch, split across the four workers.
        assert sum(w["rows"] for w in workers) == row["rows"] == len(split.train_y)
        assert len({w["rows"] for w in workers}) > 1  # uneven shares, so weighting matters
        assert row["loss"] == pytest.approx(loss, abs=1e-6)
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        weighted = sum(w["loss"] * w["rows"] for w in workers) / row["rows"]
        assert row["loss"] == pytest.approx(weighted, abs=1e-9)
        # Validated every epoch, each worker its share of the held-out rows: together exactly
        # what one process evaluating all of them gets.
        assert row["val_rows"] == len(split.val_y)
        assert row["val_loss"] == pytest.approx(val_loss, abs=TOLERANCE)
        assert row["val_accuracy"] == pytest.approx(val_accuracy, abs=1e-9)


@pytest.fixture(scope="module")
def two_workers(train):
    """The tutorial's defaults on 2 workers, trained once for the module."""
    return train("scaling.workers=2")


@pytest.mark.ray
def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not(train, two_workers):
    args = ("scaling.workers=2",)
    first, second = two_workers, train(*args)
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
def test_default_run_learns_and_validates_on_the_workers(two_workers):
    """The tutorial's defaults with 2 workers: well above chance on held-out rows, and within a
    point of the same model trained by the plain loop. The validation the workers add up in the
    epoch of a checkpoint is what one process computes with that checkpoint's model."""
    trained = two_workers
    val = trained.results["validation"]
    assert val["rows"] == 200
    assert val["accuracy"] > 0.75
    assert sum(map(sum, val["confusion"])) == 200
    assert len(val["precision"]) == len(val["recall"]) == 2
    assert len(trained.metrics) == 10 and trained.state["epoch"] == 10
    model, _, split = tutorial_loop(trained.cfg)
    plain = evaluate(model, [(split.val_x, split.val_y)], classes=2)
    assert abs(val["accuracy"] - plain["accuracy"]) <= 0.01
    assert "validation  acc" in trained.console and "held-out rows, on 2 workers" in trained.console
    carried = trained.state["validation"]
    assert carried["epoch"] == trained.state["epoch"] and len(carried["workers"]) == 2
    same = build_model(trained.cfg.model, 10, 2)
    same.load_state_dict(trained.state["model"])
    one_process = evaluate(same, [(split.val_x, split.val_y)], classes=2)
    assert carried["confusion"] == one_process["confusion"]
    assert carried["loss_sum"] / 200 == pytest.approx(one_process["loss"], abs=1e-6)
    best = trained.results["best"]["epoch"]
    row = next(r for r in trained.metrics if r["epoch"] == best)
    assert (val["loss"], val["accuracy"]) == pytest.approx((row["val_loss"], row["val_accuracy"]))


@pytest.mark.ray
@pytest.mark.slow
def test_a_loss_that_is_not_finite_stops_every_worker_with_one_line(tmp_path):
    proc = run_module(
        "raytrain.main",
        "--workers",
        "2",
        "--lr",
        "1e38",
        "--set",
        "model.name=mlp",
        "--set",
        "train.checkpoint_every=1",
        "--storage-path",
        str(tmp_path),
        "--name",
        "nan",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("raytrain:")]
    rows = runs.read_metrics(tmp_path / "nan")
    last = rows[-1]
    assert line.startswith(
        f"raytrain: training stopped: the loss became NaN or infinite in epoch {last['epoch']} "
        f"at step {last['nonfinite_step']} (learning rate 1e+38); try a lower --lr"
    ), line
    assert all("nonfinite_step" not in row for row in rows[:-1])
    assert not (tmp_path / "nan" / runs.checkpoint_name(last["epoch"])).exists()
    assert not (tmp_path / "nan" / runs.RESULTS_FILE).exists()


# Random labels and a large learning rate: the validation loss is lowest early, then rises.
OVERFIT = (
    "data.labels=random",
    "data.samples=400",
    "model.name=mlp",
    "model.hidden=[64]",
    "train.lr=0.5",
    "train.epochs=8",
    "train.checkpoint_every=1",
    "scaling.workers=2",
)


@pytest.mark.ray
def test_the_best_checkpoint_is_the_epoch_with_the_lowest_validation_loss(train):
    trained = train(*OVERFIT)
    losses = {row["epoch"]: row["val_loss"] for row in trained.metrics}
    best = min(losses, key=losses.get)
    assert best < 8, losses  # not simply the last epoch: the choice matters here
    chosen = trained.results["best"]
    assert (chosen["epoch"], chosen["metric"]) == (best, "val_loss")
    assert chosen["value"] == pytest.approx(losses[best])
    assert chosen["checkpoint"].endswith(runs.checkpoint_name(best))
    # The driver validated that checkpoint: the same numbers the workers measured at that epoch.
    assert trained.results["validation"]["loss"] == pytest.approx(losses[best], abs=TOLERANCE)
    from raytrain.train import checkpoint

    assert checkpoint.load(chosen["checkpoint"])["epoch"] == best


@pytest.mark.ray
def test_a_validation_loss_that_is_not_finite_stops_the_run_and_keeps_no_checkpoint(
    train, tmp_path
):
    """lr 1e38 on the simple model: training losses stay finite (about 3e36), but the validation
    loss overflows. The run stops there as on a non-finite training loss; no checkpoint of that
    epoch, so none with an infinite metric can be the best."""
    from raytrain.errors import TrainingStopped

    args = ("train.lr=1e38", "train.epochs=3", "train.checkpoint_every=1", "run.name=nf")
    with pytest.raises(TrainingStopped) as stopped:
        train(*args, storage=tmp_path)
    rows = runs.read_metrics(tmp_path / "nf")
    last = rows[-1]
    assert last["nonfinite_validation"] and not math.isfinite(last["val_loss"])
    assert math.isfinite(last["loss"])
    assert str(stopped.value).startswith(
        f"the validation loss became {last['val_loss']} in epoch {last['epoch']}"
    )
    assert all(math.isfinite(row["val_loss"]) for row in rows[:-1])
    assert last["checkpoint"] is None
    assert not (tmp_path / "nf" / runs.checkpoint_name(last["epoch"])).exists()
    assert not (tmp_path / "nf" / runs.RESULTS_FILE).exists()


@pytest.mark.ray
def test_checkpoint_best_keeps_the_best_epoch_validated(train):
    """train.checkpoint_best: a checkpoint at every new best of the checkpoint metric, so the
    best checkpoint is the best epoch even when no regular checkpoint fell on it."""
    trained = train(*OVERFIT, "train.checkpoint_every=0", "train.checkpoint_best=true")
    losses = {row["epoch"]: row["val_loss"] for row in trained.metrics}
    best = min(losses, key=losses.get)
    assert best < 8, losses
    running, improved = math.inf, []
    for epoch, loss in sorted(losses.items()):
        if loss < running:
            running, improved = loss, [*improved, epoch]
    saved = [row["epoch"] for row in trained.metrics if row["checkpoint"]]
    assert saved == sorted({*improved, 8})  # each new best, and the last epoch
    chosen = trained.results["best"]
    assert chosen["epoch"] == best and chosen["value"] == pytest.approx(losses[best])
    assert trained.results["validation"]["loss"] == pytest.approx(losses[best], abs=TOLERANCE)


@pytest.mark.ray
def test_early_stopping_stops_every_worker_after_the_same_epoch(train, capsys):
    trained = train(*OVERFIT, "scaling.workers=3", "train.early_stopping.patience=2")
    rows = trained.metrics
    last = rows[-1]
    assert last["epoch"] < 8 and last["stopped_early"]["best_epoch"] == last["epoch"] - 2
    assert all("stopped_early" not in row for row in rows[:-1])
    # Every worker trained every epoch up to the last one, and none after it.
    assert all(len(row["workers"]) == 3 for row in rows)
    assert trained.results["stopped_early"] == last["stopped_early"]
    assert f"stopped early after epoch {last['epoch']}" in trained.console
    # A checkpoint at the stop, so the run's latest state is kept.
    assert (trained.run_dir / runs.checkpoint_name(last["epoch"])).is_dir()
    # Resuming a run that stopped early is a clear message, not a silent extra epoch.
    from raytrain.commands.train import main

    assert main(["--resume", str(trained.run_dir), "--epochs", "20"]) == 2
    err = capsys.readouterr().err
    assert f"stopped early after epoch {last['epoch']}" in err and err.count("\n") == 1
