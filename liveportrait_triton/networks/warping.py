"""Warping module W: dense motion (with occlusion) from the implicit keypoints, then warp and decode features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Hourglass, SameBlock2d
from .grid_sample import grid_sample_3d

KP_VARIANCE = 0.01


def coordinate_grid(d: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(d, h, w, 3) grid of (x, y, z) in [-1, 1] with the endpoints on the first and last voxel centres."""
    def axis(n):
        return 2 * (torch.arange(n, dtype=like.dtype, device=like.device) / (n - 1)) - 1
    z = axis(d).view(d, 1, 1).expand(d, h, w)
    y = axis(h).view(1, h, 1).expand(d, h, w)
    x = axis(w).view(1, 1, w).expand(d, h, w)
    return torch.stack([x, y, z], dim=-1)


class DenseMotionNetwork(nn.Module):
    def __init__(self, block_expansion: int, num_blocks: int, max_features: int, num_kp: int,
                 feature_channel: int, reshape_depth: int, compress: int, estimate_occlusion_map: bool = True):
        super().__init__()
        self.num_kp = num_kp
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
                          if estimate_occlusion_map else None)
        self.grid_sample_mode = "native"

    def forward(self, feature, kp_driving, kp_source) -> dict[str, torch.Tensor]:
        feature = F.relu(self.norm(self.compress(feature)))
        bs, c, d, h, w = feature.shape
        k = self.num_kp + 1
        identity = coordinate_grid(d, h, w, kp_source)                                  # (d, h, w, 3)
        kp_d = kp_driving.reshape(bs, self.num_kp, 1, 1, 1, 3)
        kp_s = kp_source.reshape(bs, self.num_kp, 1, 1, 1, 3)
        # Background motion is the identity; keypoint k moves driving-space points by (kp_s - kp_d).
        driving_to_source = identity - kp_d + kp_s                                      # (bs, kp, d, h, w, 3)
        sparse_motion = torch.cat([identity.unsqueeze(0).unsqueeze(0).expand(bs, 1, d, h, w, 3),
                                   driving_to_source], dim=1)                            # (bs, k, d, h, w, 3)
        repeated = feature.unsqueeze(1).expand(bs, k, c, d, h, w).reshape(bs * k, c, d, h, w)
        deformed = grid_sample_3d(repeated, sparse_motion.reshape(bs * k, d, h, w, 3), self.grid_sample_mode)
        deformed = deformed.reshape(bs, k, c, d, h, w)

        def gaussian(kp):
            diff = identity - kp                                                          # (bs, kp, d, h, w, 3)
            return torch.exp(-0.5 * (diff ** 2).sum(-1) / KP_VARIANCE)
        heatmap = gaussian(kp_d) - gaussian(kp_s)                                         # (bs, kp, d, h, w)
        heatmap = torch.cat([torch.zeros_like(heatmap[:, :1]), heatmap], dim=1).unsqueeze(2)

        hourglass_in = torch.cat([heatmap, deformed], dim=2).reshape(bs, k * (c + 1), d, h, w)
        prediction = self.hourglass(hourglass_in)
        mask = F.softmax(self.mask(prediction), dim=1)                                   # (bs, k, d, h, w)
        deformation = (sparse_motion * mask.unsqueeze(-1)).sum(dim=1)                    # (bs, d, h, w, 3)
        out = {"mask": mask, "deformation": deformation}
        if self.occlusion is not None:
            flat = prediction.reshape(bs, -1, h, w)
            out["occlusion_map"] = torch.sigmoid(self.occlusion(flat))
        return out


class WarpingNetwork(nn.Module):
    """forward(feature_volume, kp_source, kp_driving) -> dict(out, occlusion_map, deformation, mask)."""

    def __init__(self, num_kp: int, block_expansion: int, max_features: int, num_down_blocks: int,
                 reshape_channel: int, estimate_occlusion_map: bool, dense_motion_params: dict):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=reshape_channel,
                                                       estimate_occlusion_map=estimate_occlusion_map,
                                                       **dense_motion_params)
        out_channels = block_expansion * 2 ** num_down_blocks
        self.third = SameBlock2d(max_features, out_channels, lrelu=True)
        self.fourth = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    @property
    def grid_sample_mode(self) -> str:
        return self.dense_motion_network.grid_sample_mode

    @grid_sample_mode.setter
    def grid_sample_mode(self, mode: str) -> None:
        self.dense_motion_network.grid_sample_mode = mode

    def forward(self, feature_volume, kp_source, kp_driving) -> dict[str, torch.Tensor]:
        dense = self.dense_motion_network(feature_volume, kp_driving=kp_driving, kp_source=kp_source)
        warped = grid_sample_3d(feature_volume, dense["deformation"], self.grid_sample_mode)
        bs, c, d, h, w = warped.shape
        out = self.fourth(self.third(warped.reshape(bs, c * d, h, w)))
        occlusion = dense.get("occlusion_map")
        if occlusion is not None:
            out = out * occlusion
        return {"out": out, "occlusion_map": occlusion, "deformation": dense["deformation"], "mask": dense["mask"]}
