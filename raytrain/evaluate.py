"""Validation metrics of a model on held-out rows: loss, accuracy, per-class precision and recall,
the confusion matrix. ``tally`` gives the sums that workers add up across the group;
``summarize`` turns sums into the metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def tally(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int
) -> tuple[float, torch.Tensor]:
    """The summed cross-entropy loss of ``model`` over ``(x, y)`` batches, and the confusion
    matrix: ``confusion[i][j]`` counts rows of true class ``i`` predicted as class ``j``."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for x, y in batches:
        loss, counts = tally_logits(model(x), y, classes)
        loss_sum += loss
        confusion += counts
    model.train(was_training)
    return loss_sum.item(), confusion


def tally_logits(
    logits: torch.Tensor, y: torch.Tensor, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy loss of one batch's ``logits`` against labels ``y``, and its
    confusion matrix (``tally``'s sums of one batch)."""
    loss = F.cross_entropy(logits, y, reduction="sum")
    confusion = torch.bincount(y * classes + logits.argmax(dim=1), minlength=classes * classes)
    return loss, confusion.view(classes, classes)


def summarize(loss_sum: float, confusion: torch.Tensor) -> dict[str, Any]:
    """Loss, accuracy, per-class precision and recall, and the confusion matrix. Precision of a
    class that was never predicted (and recall of a class that never occurs) is null."""
    rows = int(confusion.sum().item())
    if rows == 0:
        raise ValueError("the validation split is empty")
    hits = confusion.diag()
    predicted, actual = confusion.sum(dim=0), confusion.sum(dim=1)
    return {
        "rows": rows,
        "accuracy": hits.sum().item() / rows,
        "loss": loss_sum / rows,
        "precision": [_ratio(h, p) for h, p in zip(hits.tolist(), predicted.tolist(), strict=True)],
        "recall": [_ratio(h, a) for h, a in zip(hits.tolist(), actual.tolist(), strict=True)],
        "confusion": confusion.tolist(),
    }


def evaluate(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int
) -> dict[str, Any]:
    """``summarize(*tally(...))``: the metrics of ``model`` on ``(x, y)`` batches."""
    return summarize(*tally(model, batches, classes))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None
