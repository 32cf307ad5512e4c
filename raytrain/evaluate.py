"""Validation metrics of a model on held-out rows: loss (log loss), accuracy, per-class precision
and recall, macro F1, ROC AUC (binary; one-vs-rest macro for more classes), the confusion
matrix. ``tally`` gives the sums that workers add up across the group; ``summarize`` turns sums
into the metrics.

AUC from sums: each row's score for class ``c`` (its log-odds, ``logit_c - logsumexp(other
logits)``, which ranks rows as the probability does) falls in one of ``SCORE_BINS`` bins over
[-``SCORE_RANGE``, ``SCORE_RANGE``]; per class the bins count positive (true class ``c``) and
negative rows, and the AUC is computed from the counts with a bin's own pairs counted as ties
(half). Counts add up over workers exactly, and the AUC is within 1e-3 of scikit-learn's
``roc_auc_score`` on the same scores unless many rows of both kinds share a bin (tests/
test_metrics.py checks it). F1 and log loss are exact: F1 from the confusion matrix, log loss
is the validation loss (never weighted by ``train.class_weight``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

SCORE_BINS = 4096  # bins of a class's log-odds: 0.01 wide
SCORE_RANGE = 20.0


@torch.no_grad()
def tally(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The summed cross-entropy loss of ``model`` over ``(x, y)`` batches, the confusion matrix
    (``confusion[i][j]`` counts rows of true class ``i`` predicted as class ``j``) and the
    score counts (``score_counts``)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    scores = torch.zeros(classes, 2, SCORE_BINS, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for x, y in batches:
        logits = model(x)
        loss, counts = tally_logits(logits, y, classes)
        loss_sum += loss
        confusion += counts
        scores += score_counts(logits, y, classes)
    model.train(was_training)
    return loss_sum.item(), confusion, scores


def tally_logits(
    logits: torch.Tensor, y: torch.Tensor, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy loss of one batch's ``logits`` against labels ``y``, and its
    confusion matrix (``tally``'s sums of one batch)."""
    loss = F.cross_entropy(logits, y, reduction="sum")
    confusion = torch.bincount(y * classes + logits.argmax(dim=1), minlength=classes * classes)
    return loss, confusion.view(classes, classes)


def score_counts(logits: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """``counts[c, k, b]``: rows whose log-odds of class ``c`` fall in bin ``b``, ``k`` 1 for
    rows of class ``c`` and 0 for the others."""
    logits = logits.double()
    odds = torch.empty_like(logits)
    for c in range(classes):  # the log-odds of class c: its logit against the others' together
        others = logits.clone()
        others[:, c] = float("-inf")
        odds[:, c] = logits[:, c] - torch.logsumexp(others, dim=1)
    odds = torch.nan_to_num(odds, nan=0.0)  # a loss that is not finite stops the run anyway
    scaled = (odds + SCORE_RANGE) * (SCORE_BINS / (2 * SCORE_RANGE))
    bins = scaled.floor().clamp(0, SCORE_BINS - 1).long()
    positive = (y.unsqueeze(1) == torch.arange(classes)).long()
    index = (torch.arange(classes) * 2 + positive) * SCORE_BINS + bins
    counts = torch.bincount(index.flatten(), minlength=classes * 2 * SCORE_BINS)
    return counts.view(classes, 2, SCORE_BINS)


def auc(scores: torch.Tensor) -> float | None:
    """ROC AUC from ``score_counts``: of class 1 for two classes, else the mean over classes
    (one-vs-rest, macro) of those with both positive and negative rows; None if none has."""
    scores = scores.double()
    classes = [1] if scores.shape[0] == 2 else range(scores.shape[0])
    found = []
    for c in classes:
        negative, positive = scores[c, 0], scores[c, 1]
        n, p = negative.sum(), positive.sum()
        if not n or not p:
            continue
        below = torch.cumsum(negative, 0) - negative  # negatives in lower bins
        found.append(((positive * (below + negative / 2)).sum() / (n * p)).item())
    return sum(found) / len(found) if found else None


def f1_macro(confusion: torch.Tensor) -> float:
    """Macro F1 over the classes that occur or are predicted (scikit-learn's ``f1_score(...,
    average='macro')``: a class with no true positives scores 0)."""
    hits = confusion.diag().double()
    predicted, actual = confusion.sum(dim=0).double(), confusion.sum(dim=1).double()
    seen = (predicted + actual) > 0
    f1 = torch.where(seen, 2 * hits / (predicted + actual).clamp(min=1), torch.zeros_like(hits))
    return (f1[seen].sum() / seen.sum()).item()


def summarize(
    loss_sum: float, confusion: torch.Tensor, scores: torch.Tensor | None = None
) -> dict[str, Any]:
    """Loss, accuracy, per-class precision and recall, macro F1, the confusion matrix, and the
    AUC if ``scores`` are given. Precision of a class that was never predicted (and recall of a
    class that never occurs) is null."""
    rows = int(confusion.sum().item())
    if rows == 0:
        raise ValueError("the validation split is empty")
    hits = confusion.diag()
    predicted, actual = confusion.sum(dim=0), confusion.sum(dim=1)
    out = {
        "rows": rows,
        "accuracy": hits.sum().item() / rows,
        "loss": loss_sum / rows,
        "log_loss": loss_sum / rows,
        "f1": f1_macro(confusion),
        "precision": [_ratio(h, p) for h, p in zip(hits.tolist(), predicted.tolist(), strict=True)],
        "recall": [_ratio(h, a) for h, a in zip(hits.tolist(), actual.tolist(), strict=True)],
        "confusion": confusion.tolist(),
    }
    if scores is not None:
        out["auc"] = auc(scores)
    return out


def evaluate(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int
) -> dict[str, Any]:
    """``summarize(*tally(...))``: the metrics of ``model`` on ``(x, y)`` batches."""
    return summarize(*tally(model, batches, classes))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


# ---- regression -----------------------------------------------------------------------------

PAIRS = 2000  # (actual, predicted) rows a validation keeps for the report's plots


def regression_loss(predicted: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The summed loss of standardised predictions against the standardised target: squared
    error ('mse'), or Huber's (squared within 1 standard deviation, linear beyond)."""
    if loss == "huber":
        return F.huber_loss(predicted, y, reduction="sum", delta=1.0)
    return F.mse_loss(predicted, y, reduction="sum")


@torch.no_grad()
def tally_regression(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss: str
) -> tuple[float, torch.Tensor, list[list[float]]]:
    """The summed loss of ``model`` over ``(x, y)`` batches of a standardised target, the sums
    that give RMSE, MAE and R^2 (``regression_metrics``): squared and absolute errors, the
    target and its square, the rows (float64, standardised units); and up to ``PAIRS``
    (actual, predicted) pairs, standardised."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    pairs: list[list[float]] = []
    for x, y in batches:
        predicted = model(x).squeeze(1)
        loss_sum += regression_loss(predicted, y, loss).double()
        sums += regression_sums(predicted, y)
        if len(pairs) < PAIRS:
            kept = torch.stack([y, predicted], dim=1)[: PAIRS - len(pairs)]
            pairs += kept.tolist()
    model.train(was_training)
    return loss_sum.item(), sums, pairs


def regression_sums(predicted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch's sums for ``regression_metrics``: squared and absolute errors, the target
    and its square, the rows (float64)."""
    error, target = (predicted - y).double(), y.double()
    return torch.stack(
        [
            (error * error).sum(),
            error.abs().sum(),
            target.sum(),
            (target * target).sum(),
            torch.tensor(float(len(y)), dtype=torch.float64),
        ]
    )


def regression_metrics(sums: list[float], target: tuple[float, float]) -> dict[str, float]:
    """RMSE and MAE in the target's own units, and R^2, from ``tally_regression``'s sums
    (added up over workers) and the target's (mean, std)."""
    sse, sae, sy, syy, n = sums
    std = target[1]
    total = syy - sy * sy / n  # the spread of the actual values around their mean
    return {
        "rmse": std * (sse / n) ** 0.5,
        "mae": std * sae / n,
        "r2": 1 - sse / total if total > 0 else 0.0,
    }
