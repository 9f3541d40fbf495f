"""Stitching and eye/lip retargeting MLPs S."""
from __future__ import annotations

from torch import nn


class StitchingRetargetingNetwork(nn.Module):
    """Linear/ReLU stack; keys mlp.0, mlp.2, ... as in the official checkpoint."""

    def __init__(self, input_size: int, hidden_sizes, output_size: int):
        super().__init__()
        sizes = [input_size, *hidden_sizes]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], output_size))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)
