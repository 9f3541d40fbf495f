"""Motion extractor M: a ConvNeXt-V2 backbone with pose-bin, translation, expression, scale and keypoint heads."""
from __future__ import annotations

import torch
from torch import nn

from ..config import NUM_BINS
from .blocks import GRN, ChannelsFirstLayerNorm

OUTPUT_NAMES = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2Detector(nn.Module):
    def __init__(self, depths, dims, num_kp: int, num_bins: int = NUM_BINS):
        super().__init__()
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(dims[0])),
            *[nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
              for i in range(3)],
        ])
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtV2Block(dims[i]) for _ in range(depths[i])])
                                    for i in range(4))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc_kp = nn.Linear(dims[-1], 3 * num_kp)
        self.fc_scale = nn.Linear(dims[-1], 1)
        self.fc_pitch = nn.Linear(dims[-1], num_bins)
        self.fc_yaw = nn.Linear(dims[-1], num_bins)
        self.fc_roll = nn.Linear(dims[-1], num_bins)
        self.fc_t = nn.Linear(dims[-1], 3)
        self.fc_exp = nn.Linear(dims[-1], 3 * num_kp)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        feat = self.norm(x.mean([-2, -1]))
        return {name: getattr(self, f"fc_{name}")(feat) for name in OUTPUT_NAMES}


class MotionExtractor(nn.Module):
    """Returns a dict of raw outputs: pitch/yaw/roll bin logits (66), t (3), exp (63), scale (1), kp (63)."""

    def __init__(self, num_kp: int, depths, dims, backbone: str = "convnextv2_tiny"):
        super().__init__()
        if backbone != "convnextv2_tiny":
            raise ValueError(f"unsupported motion-extractor backbone {backbone!r}")
        self.detector = ConvNeXtV2Detector(depths, dims, num_kp)

    def forward(self, image) -> dict[str, torch.Tensor]:
        return self.detector(image)
