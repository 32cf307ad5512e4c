"""Models: a user's model is saved whole, whatever its attributes; DDP's wrapper is removed."""

from __future__ import annotations

import torch
from torch import nn

from raytrain.model import unwrap
from raytrain.train import checkpoint


class HasModule(nn.Module):
    """A user's model that keeps its body in an attribute named ``module``, as many do."""

    def __init__(self):
        super().__init__()
        self.module = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.module(x))


def test_a_models_own_module_attribute_is_not_unwrapped(tmp_path):
    model = HasModule()
    assert unwrap(model) is model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, epoch=1, config={}, metrics={})
    saved = checkpoint.load(tmp_path)["model"]
    assert set(saved) == {"module.weight", "module.bias", "head.weight", "head.bias"}
    restored = HasModule()
    restored.load_state_dict(saved)
    x = torch.randn(5, 4)
    assert torch.equal(restored(x), model(x))


def test_ddp_is_unwrapped(tmp_path):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        inner = nn.Linear(4, 2)
        assert unwrap(nn.parallel.DistributedDataParallel(inner)) is inner
    finally:
        dist.destroy_process_group()
