"""Building blocks shared by the LivePortrait sub-networks.

Module and parameter names follow the official checkpoints' keys exactly, so that an official state_dict loads
strictly into these modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SameBlock2d(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU (or LeakyReLU(0.01)), resolution preserved."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1,
                 lrelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.ac = nn.LeakyReLU() if lrelu else nn.ReLU()

    def forward(self, x):
        return self.ac(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> 2x2 average pool."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x):
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class ResBlock3d(nn.Module):
    """Pre-activation 3-D residual block: x + conv2(relu(bn2(conv1(relu(bn1(x))))))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv3d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(features, features, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(features, affine=True)
        self.norm2 = nn.BatchNorm3d(features, affine=True)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class DownBlock3d(nn.Module):
    """Conv3d -> BatchNorm3d -> ReLU -> average pool over H and W only (depth kept)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x):
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), kernel_size=(1, 2, 2))


class UpBlock3d(nn.Module):
    """Nearest upsample of H and W by 2 -> Conv3d -> BatchNorm3d -> ReLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x):
        out = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(out)))


class HourglassEncoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock3d(in_features if i == 0 else min(max_features, block_expansion * 2 ** i),
                        min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_blocks))

    def forward(self, x):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            in_filters = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * 2 ** (i + 1))
            blocks.append(UpBlock3d(in_filters, min(max_features, block_expansion * 2 ** i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, skips: list):
        out = skips[-1]
        for i, block in enumerate(self.up_blocks):
            out = torch.cat([block(out), skips[-2 - i]], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    """3-D U-Net that pools H and W only."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = HourglassEncoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


class SpectralNormConv2d(nn.Module):
    """Conv2d whose weight is stored as the official spectral-norm triple (weight_orig, weight_u, weight_v).

    In eval mode the official module divides weight_orig by sigma = u . (W v) with the stored vectors and no power
    iteration. `fold()` computes that weight once (call it after loading); forward then uses the folded weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True):
        super().__init__()
        self.padding = padding
        self.weight_orig = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("weight_u", torch.empty(out_channels))
        self.register_buffer("weight_v", torch.empty(in_channels * kernel_size * kernel_size))
        self.register_buffer("weight", torch.empty(0), persistent=False)

    @torch.no_grad()
    def fold(self) -> None:
        w = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u, torch.mv(w, self.weight_v))
        self.weight = self.weight_orig / sigma

    def forward(self, x):
        if self.weight.numel() == 0:
            raise RuntimeError("SpectralNormConv2d used before fold(): load weights through liveportrait_triton.weights")
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


class SPADE(nn.Module):
    """Parameter-free InstanceNorm modulated by gamma/beta predicted from the (nearest-resized) segmentation map."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

    def activation(self, x, segmap):
        """The shared convolution's activation on the map resized (nearest) to x."""
        if segmap.shape[-2:] != x.shape[-2:]:
            segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
        return self.mlp_shared(segmap)

    def forward(self, x, segmap):
        actv = self.activation(x, segmap)
        return self.param_free_norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralNormConv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = SpectralNormConv2d(fmiddle, fout, kernel_size=3, padding=1)
        self.norm_0 = SPADE(fin, label_nc, hidden)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, kernel_size=1, bias=False)
            self.norm_s = SPADE(fin, label_nc, hidden)

    def forward(self, x, seg):
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of NCHW tensors (biased variance), as ConvNeXt-V2's stem/downsample layers use."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation on NHWC tensors."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x
