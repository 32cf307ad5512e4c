"""The optimizer and the learning-rate schedule, both torch's own, built from ``train.*``.

The schedule steps once per epoch: epoch ``e`` (0-based) of a warm-up of ``W`` epochs trains at
``lr * (e + 1) / (W + 1)``; after it, ``constant`` keeps ``lr``, ``step`` multiplies it by
``gamma`` every ``step_size`` epochs, and ``cosine`` brings it down to 0 along a half cosine by the
end of the run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

from raytrain.config import TrainConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> lr_scheduler.LRScheduler:
    """The per-epoch schedule of ``optimizer``'s learning rate: warm-up, then ``cfg.scheduler``."""
    after = cfg.epochs - cfg.warmup_epochs
    if cfg.scheduler == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=after, eta_min=0.0)
    elif cfg.scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not cfg.warmup_epochs:
        return main
    start = 1 / (cfg.warmup_epochs + 1)
    warmup = lr_scheduler.LinearLR(
        optimizer, start_factor=start, end_factor=1.0, total_iters=cfg.warmup_epochs
    )
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])
