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
