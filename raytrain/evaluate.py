"""Validation metrics of a model on held-out batches: accuracy, loss, per-class precision and
recall, the confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from raytrain.data.tables import FEATURES, LABEL


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], classes: int
) -> dict[str, Any]:
    """Run ``model`` over ``batches`` (dicts with ``x`` and ``y``) and summarise the predictions.

    ``confusion[i][j]`` counts rows of true class ``i`` predicted as class ``j``. Precision of a
    class that was never predicted (and recall of a class that never occurs) is reported as null.
    """
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    loss_sum, rows = 0.0, 0
    for batch in batches:
        x, y = batch[FEATURES], batch[LABEL]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        rows += len(y)
        pred = logits.argmax(dim=1)
        confusion += torch.bincount(y * classes + pred, minlength=classes * classes).view(
            classes, classes
        )
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


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None
