"""Gradient compression (``train.gradient_compression``) through torch's DDP communication
hooks, for networks too slow for float32 gradients.

- ``none``: no hook. DDP's own all-reduce of float32 buckets: the data-parallel rule holds
  exactly (1, 2 or 4 workers reach one process's weights).
- ``fp16``: ``default_hooks.fp16_compress_hook``: each bucket rounded to float16, all-reduced
  (half the bytes), and cast back. Gloo all-reduces float16 on CPUs; torch's bf16 hook needs
  NCCL.
- ``powersgd``: ``powerSGD_hook.powerSGD_hook`` (Vogels et al., 2019): each gradient matrix sent
  as two rank-r factors, with error feedback (what the approximation left out is added to the
  next step's gradient, per worker) and, with warm start, the last step's right factor Q as the
  next power iteration's start. After ``train.powersgd.start_iter`` steps of exact all-reduce.
  Each bucket's two all-reduces finish before the next bucket's begin (torch's hook, left
  asynchronous, deadlocks gloo once a model's gradients fill more than one DDP bucket, 1 MiB).

PowerSGD's state lives across steps, so it goes into every checkpoint: the step count, the
random generator, each parameter's Q (the same on every worker) and each worker's error
feedback (rank 0 gathers them). torch keeps the last two per DDP bucket, flat, in the bucket's
order of parameters; DDP lays its buckets out again after a process's first step, so a resumed
run's first step has another order than the step that was saved. ``PowerSGD`` therefore keeps
them per parameter name across a change of layout and in checkpoints: a resumed run continues
exactly; one that resumes on another number of workers keeps Q and the step count and starts
the error feedback afresh.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from raytrain.config import TrainConfig

Layout = list[tuple[str, torch.Size]]  # a bucket's parameters (name, shape) in its order


def register(model: torch.nn.Module, cfg: TrainConfig, rank: int, saved: Any = None):
    """Register the configured hook on ``model`` (a DDP module; a single worker's plain module
    has nothing to send and gets none). Returns the ``PowerSGD`` hook, or None."""
    from torch.nn.parallel import DistributedDataParallel

    mode = cfg.gradient_compression
    if mode == "none" or not isinstance(model, DistributedDataParallel):
        return None
    if mode == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    hook = PowerSGD(model, cfg)
    if saved is not None:
        hook.restore(saved, rank, dist.get_world_size())
    model.register_comm_hook(hook.state, hook.hook)
    return hook


class PowerSGD:
    """torch's PowerSGD hook, with its per-bucket memory kept per parameter whenever DDP lays a
    bucket out differently (and in checkpoints)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=cfg.powersgd.rank,
            start_powerSGD_iter=cfg.powersgd.start_iter,
            warm_start=cfg.powersgd.warm_start,
            use_error_feedback=True,
            random_seed=cfg.seed,
        )
        self.names = {id(p): name for name, p in model.module.named_parameters()}
        self.layouts: dict[int, Layout] = {}  # bucket index -> the layout its memory has
        self.loose: dict[str, dict[str, torch.Tensor]] = {"error": {}, "q": {}}

    def hook(self, state, bucket):
        index = bucket.index()
        layout = [(self.names[id(p)], p.shape) for p in bucket.parameters()]
        if self.layouts.get(index) != layout:
            if index in self.layouts:  # DDP rebuilt its buckets: every bucket's memory moves
                self.loose = self.per_parameter()
                self.layouts.clear()
                for memory in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
                    memory.clear()
            self._place(index, layout)
        # torch's hook all-reduces P, then Q, in callbacks on gloo's threads; with two buckets
        # or more they interleave in another order on each worker and gloo waits forever.
        # Finishing each bucket before DDP hands over the next keeps one order everywhere.
        reduced = powerSGD_hook.powerSGD_hook(state, bucket).wait()
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(reduced)
        return done

    def _place(self, index: int, layout: Layout) -> None:
        """Give bucket ``index`` its parameters' loose memory, flat in ``layout``'s order."""
        self.layouts[index] = layout
        errors = [self.loose["error"].pop(name, None) for name, _ in layout]
        if any(e is not None for e in errors):
            zero = [torch.zeros(shape.numel()) for _, shape in layout]
            parts = [z if e is None else e for e, z in zip(errors, zero, strict=True)]
            self.state.error_dict[index] = torch.cat(parts)
        compressed = self._compressed(layout)
        qs = [self.loose["q"].pop(name, None) for name, *_ in compressed]
        if compressed and all(q is not None for q in qs):  # else torch draws Q afresh
            self.state.q_memory_dict[index] = torch.cat(qs)
            self.state.p_memory_dict[index] = torch.zeros(sum(n * r for _, n, _, r in compressed))

    def _compressed(self, layout: Layout) -> list[tuple[str, int, int, int]]:
        """The matrices torch's hook compresses in a bucket of ``layout``, in the order of its
        P and Q memory (grouped by shape, as the hook does): (name, rows, columns, rank)."""
        groups: dict[tuple[int, int], list[tuple[str, int, int, int]]] = {}
        for name, shape in layout:
            n = shape[0] if len(shape) else 1
            m = shape.numel() // n
            r = min(n, m, self.state.matrix_approximation_rank)
            if powerSGD_hook._should_compress(n, m, r, self.state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((name, n, m, r))
        return [entry for group in groups.values() for entry in group]

    def per_parameter(self) -> dict[str, dict[str, torch.Tensor]]:
        """The error feedback and Q of every parameter, by name (a copy)."""
        out = {kind: {k: v.clone() for k, v in self.loose[kind].items()} for kind in self.loose}
        for index, layout in self.layouts.items():
            error = self.state.error_dict.get(index)
            if error is not None:
                sizes = [shape.numel() for _, shape in layout]
                for (name, _), part in zip(layout, error.split(sizes), strict=True):
                    out["error"][name] = part.clone()
            q = self.state.q_memory_dict.get(index)
            compressed = self._compressed(layout)
            if q is not None and compressed:
                parts = q.split([m * r for _, _, m, r in compressed])
                for (name, *_), part in zip(compressed, parts, strict=True):
                    out["q"][name] = part.clone()
        return out

    def gather(self, rank: int, world: int) -> dict[str, Any] | None:
        """The state for a checkpoint, on rank 0 (None on the others): the shared parts once,
        each worker's error feedback gathered. Every rank must call it."""
        memory = self.per_parameter()
        everyone: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(memory["error"], everyone, dst=0)
        if rank != 0:
            return None
        kind, keys, position, has_gauss, gauss = self.state.rng.get_state()
        return {
            "iter": self.state.iter,
            "q": memory["q"],
            "rng": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "errors": everyone,
        }

    def restore(self, saved: dict[str, Any], rank: int, world: int) -> None:
        """Put ``gather``'s state back: this worker's own error feedback if the run has as many
        workers as when it was saved, else none."""
        self.state.iter = saved["iter"]
        kind, keys, position, has_gauss, gauss = saved["rng"]
        self.state.rng.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        errors = saved["errors"]
        self.loose = {
            "error": dict(errors[rank]) if len(errors) == world else {},
            "q": dict(saved["q"]),
        }


def gather(hook: PowerSGD | None, rank: int, world: int) -> dict[str, Any] | None:
    """``hook.gather`` when there is a PowerSGD hook (every rank calls it), else None."""
    return None if hook is None else hook.gather(rank, world)
