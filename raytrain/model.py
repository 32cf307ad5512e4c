"""The models raytrain can train, chosen by name: build_model(cfg, features, classes)."""

from __future__ import annotations

from torch import nn

from raytrain.config import ModelConfig


class SimpleModel(nn.Module):
    """The tutorial's model: one linear layer from features to class logits."""

    def __init__(self, features: int = 10, classes: int = 2):
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        return self.fc(x)


class MLP(nn.Module):
    """Linear + ReLU layers of the given hidden sizes, then a linear layer to class logits."""

    def __init__(self, features: int, classes: int, hidden: tuple[int, ...] = (64,)):
        super().__init__()
        sizes = (features, *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build_model(cfg: ModelConfig, features: int, classes: int) -> nn.Module:
    """The model named by ``cfg.name``, sized for the data."""
    if cfg.name == "simple":
        return SimpleModel(features, classes)
    return MLP(features, classes, cfg.hidden)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper, or the model itself (DDP wraps only when world size > 1)."""
    return getattr(model, "module", model)
