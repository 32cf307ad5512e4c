"""Early stopping: watch ``run.checkpoint_metric`` at every validated epoch and stop when it has
not improved by ``train.early_stopping.min_delta`` for ``patience`` validations. Every worker
keeps its own copy and feeds it the same gathered numbers, so all stop after the same epoch."""

from __future__ import annotations

import math
from typing import Any, TypeVar

from raytrain.config import Config

T = TypeVar("T")


def mode_of(metric: str) -> str:
    """'min' for a loss or an error (RMSE, MAE), 'max' for an accuracy, AUC, F1 or R^2."""
    return "min" if metric.endswith(("loss", "rmse", "mae")) else "max"


def best_of(
    candidates: list[tuple[T, dict[str, Any]]], metric: str
) -> tuple[T, dict[str, Any]] | None:
    """The ``(item, metrics)`` with the best ``metric`` (the earliest epoch among equals); None
    if no metrics carry it. The rule that picks a run's best checkpoint, wherever it is asked."""
    kept = [(item, m) for item, m in candidates if finite(m.get(metric))]
    if not kept:
        return None
    sign = 1 if mode_of(metric) == "min" else -1
    return min(kept, key=lambda im: (sign * im[1][metric], im[1]["epoch"]))


def finite(value: Any) -> bool:
    """Whether a metric's value can rank anything: present and neither NaN nor infinite."""
    return value is not None and math.isfinite(value)


class Watch:
    """The best value of the checkpoint metric so far, and how long since it improved."""

    def __init__(self, cfg: Config, state: dict[str, Any] | None = None):
        self.metric = cfg.run.checkpoint_metric
        self.patience = cfg.train.early_stopping.patience
        self.min_delta = cfg.train.early_stopping.min_delta
        state = state or {}
        self.best: float | None = state.get("best")
        self.best_epoch: int | None = state.get("best_epoch")
        self.waited: int = state.get("waited", 0)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run goes on counting."""
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited}

    def update(self, totals: dict[str, Any]) -> bool:
        """Take an epoch's totals; True when training should stop after this epoch."""
        value = totals.get(self.metric)
        if not finite(value):
            return False  # not validated this epoch (or a value the loop stops on)
        sign = 1 if mode_of(self.metric) == "min" else -1
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_epoch, self.waited = value, totals["epoch"], 0
            return False
        self.waited += 1
        return self.patience is not None and self.waited >= self.patience
