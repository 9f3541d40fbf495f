"""SPADE generator G: warped features (C, 64, 64) -> RGB image (3, 512, 512) in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SPADEResnetBlock, SpectralNormConv2d


class SPADEDecoder(nn.Module):
    def __init__(self, upscale: int, block_expansion: int, max_features: int, num_down_blocks: int,
                 out_channels: int = 64, spade_hidden: int = 128):
        super().__init__()
        if upscale != 2:
            raise ValueError(f"only upscale=2 (the official value) is supported, got {upscale}")
        label_nc = min(max_features, block_expansion * 2 ** num_down_blocks)
        self.fc = nn.Conv2d(label_nc, 2 * label_nc, 3, padding=1)
        for i in range(6):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(2 * label_nc, 2 * label_nc, label_nc, spade_hidden))
        self.up_0 = SPADEResnetBlock(2 * label_nc, label_nc, label_nc, spade_hidden)
        self.up_1 = SPADEResnetBlock(label_nc, out_channels, label_nc, spade_hidden)
        self.conv_img = nn.Sequential(nn.Conv2d(out_channels, 3 * 4, kernel_size=3, padding=1), nn.PixelShuffle(2))

    def fold_spectral_norm(self) -> None:
        for module in self.modules():
            if isinstance(module, SpectralNormConv2d):
                module.fold()

    def forward(self, feature):
        x = self.fc(feature)
        for i in range(6):
            x = getattr(self, f"G_middle_{i}")(x, feature)
        x = self.up_0(F.interpolate(x, scale_factor=2.0, mode="nearest"), feature)
        x = self.up_1(F.interpolate(x, scale_factor=2.0, mode="nearest"), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))
