"""A user's own model, trained by raytrain with --set model.name=tests.custom_model:TinyNet."""

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, features: int, classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, width), nn.Tanh())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


class NotAModule:
    pass


class NumpyNet(nn.Module):
    """A model whose forward leaves torch for NumPy: it trains, but no exporter can follow it."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        import numpy as np
        import torch

        return self.head(torch.from_numpy(np.tanh(x.detach().numpy())))


class BranchNet(nn.Module):
    """A model that takes a Python branch on its data's values: TorchScript can script it, but
    torch.export (the ONNX exporter) cannot follow a branch on a value it does not know."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        if x.sum().item() > 0:
            return self.head(x)
        return -self.head(x)


class SlowNet(nn.Module):
    """A linear model that takes a tenth of a second per batch: a prediction that lasts long
    enough to be interrupted half-way."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        import time

        time.sleep(0.1)
        return self.head(x)
