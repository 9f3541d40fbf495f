"""Appearance feature extractor F: 256x256 RGB -> (C, D, 64, 64) feature volume."""
from __future__ import annotations

from torch import nn

from .blocks import DownBlock2d, ResBlock3d, SameBlock2d


class AppearanceFeatureExtractor(nn.Module):
    def __init__(self, image_channel: int, block_expansion: int, num_down_blocks: int, max_features: int,
                 reshape_channel: int, reshape_depth: int, num_resblocks: int):
        super().__init__()
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.first = SameBlock2d(image_channel, block_expansion)
        channels = [min(max_features, block_expansion * 2 ** i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(DownBlock2d(channels[i], channels[i + 1]) for i in range(num_down_blocks))
        self.second = nn.Conv2d(channels[-1], max_features, kernel_size=1)
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))

    def forward(self, image):
        out = self.first(image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        volume = out.reshape(out.shape[0], self.reshape_channel, self.reshape_depth, out.shape[2], out.shape[3])
        return self.resblocks_3d(volume)
