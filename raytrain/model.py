"""The models raytrain can train, chosen by name: build_model(cfg, features, classes)."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrain.config import ModelConfig
from raytrain.errors import UserError


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


def embedding_width(cardinality: int, dim: int | None) -> int:
    """``model.embedding_dim``, or by default about 1.6 x cardinality^0.56 (fast.ai's rule of
    thumb), at most 16: 4 for 5 codes, 8 for 20, 16 from about 60."""
    if dim is not None:
        return dim
    return max(2, min(16, round(1.6 * cardinality**0.56)))


class Tabular(nn.Module):
    """A model of numeric features, with a learned embedding of every categorical column in
    front: ``x`` holds the numeric features, then one integer code per categorical column
    (raytrain.data.columns); the embeddings of the codes, concatenated after the numeric
    features, are what ``inner`` receives (its ``features`` counts them)."""

    def __init__(self, inner: nn.Module, numeric: int, cardinalities, widths):
        super().__init__()
        self.numeric = numeric
        self.embeddings = nn.ModuleList(
            nn.Embedding(n, w) for n, w in zip(cardinalities, widths, strict=True)
        )
        self.inner = inner

    def forward(self, x):
        codes = x[:, self.numeric :].long()
        embedded = [e(codes[:, i]) for i, e in enumerate(self.embeddings)]
        return self.inner(torch.cat([x[:, : self.numeric], *embedded], dim=1))


class ModelError(UserError):
    """A custom model that cannot be imported or built (one sentence)."""


def load_model_class(name: str) -> type[nn.Module]:
    """The class named 'package.module:ClassName'; ModelError if it is not an nn.Module class."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(
            f"model.name {name!r}: cannot import module {module_name!r} ({e}); it must be "
            "importable from the directory you run raytrain in, or installed"
        ) from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(
            f"model.name {name!r}: {module_name} has no nn.Module class named {attr!r}"
        )
    return cls


def build_model(
    cfg: ModelConfig, features: int, classes: int, categories: tuple[int, ...] = ()
) -> nn.Module:
    """The model named by ``cfg.name``, sized for the data: ``features`` per row, of which the
    last ``len(categories)`` are codes of categorical columns with that many codes each
    (wrapped in ``Tabular``: the model itself gets the numeric features and the embeddings).

    A custom class gets ``cfg.kwargs``, plus ``features`` and ``classes`` when its constructor
    takes parameters of those names.
    """
    if categories:
        widths = [embedding_width(n, cfg.embedding_dim) for n in categories]
        numeric = features - len(categories)
        inner = build_model(cfg, numeric + sum(widths), classes)
        return Tabular(inner, numeric, categories, widths)
    if cfg.name == "simple":
        return SimpleModel(features, classes)
    if cfg.name == "mlp":
        return MLP(features, classes, cfg.hidden)
    cls = load_model_class(cfg.name)
    params = inspect.signature(cls).parameters
    sizes = {k: v for k, v in (("features", features), ("classes", classes)) if k in params}
    try:
        return cls(**sizes, **cfg.kwargs)
    except TypeError as e:
        raise ModelError(f"model.name {cfg.name!r} with model.kwargs {cfg.kwargs}: {e}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper, or the model itself (DDP wraps only when world size > 1;
    a user's model may have a ``module`` attribute of its own)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
