"""5-D trilinear grid sampling (zeros padding, align_corners=False), two interchangeable implementations.

`native` calls F.grid_sample, which exports to ONNX GridSample (opset 20; not in TensorRT 10).
`decomposed` gathers the eight corners explicitly with GatherElements, which exports at opset 17 and builds in
TensorRT without plugins. Both compute the same function (see tests/test_grid_sample.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("decomposed", "native")


def grid_sample_3d(volume: torch.Tensor, grid: torch.Tensor, mode: str = "native") -> torch.Tensor:
    """Sample volume (N, C, D, H, W) at grid (N, Do, Ho, Wo, 3) holding (x, y, z) in [-1, 1].

    Under autocast (reduced precision) the sampling runs in fp32: the corner indices and weights computed from
    the grid in fp16/bf16 land on wrong or out-of-range voxels (OpenVINO bf16 measured out-of-range gathers).
    """
    if torch.is_autocast_enabled(volume.device.type):
        with torch.autocast(volume.device.type, enabled=False):
            return grid_sample_3d(volume.float(), grid.float(), mode)
    if mode == "native":
        return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mode == "decomposed":
        return _grid_sample_3d_gather(volume, grid)
    raise ValueError(f"unknown grid-sample mode {mode!r}; choose one of {MODES}")


def _grid_sample_3d_gather(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    n, c, d, h, w = volume.shape
    out_spatial = grid.shape[1:4]
    flat = volume.reshape(n, c, d * h * w)
    g = grid.reshape(n, -1, 3)
    # Unnormalise exactly as PyTorch does for align_corners=False: ((coord + 1) * size - 1) / 2.
    ix = ((g[..., 0] + 1) * w - 1) / 2
    iy = ((g[..., 1] + 1) * h - 1) / 2
    iz = ((g[..., 2] + 1) * d - 1) / 2
    ix0, iy0, iz0 = torch.floor(ix), torch.floor(iy), torch.floor(iz)
    # Weights of the low and high corner along each axis, in PyTorch's form (high - p, p - low).
    wx = ((ix0 + 1) - ix, ix - ix0)
    wy = ((iy0 + 1) - iy, iy - iy0)
    wz = ((iz0 + 1) - iz, iz - iz0)
    out = None
    for dz in (0, 1):
        zi = iz0 + dz
        z_ok = (zi >= 0) & (zi <= d - 1)
        for dy in (0, 1):
            yi = iy0 + dy
            y_ok = (yi >= 0) & (yi <= h - 1)
            for dx in (0, 1):
                xi = ix0 + dx
                ok = z_ok & y_ok & (xi >= 0) & (xi <= w - 1)
                weight = wx[dx] * wy[dy] * wz[dz] * ok.to(volume.dtype)
                index = ((zi.clamp(0, d - 1) * h + yi.clamp(0, h - 1)) * w + xi.clamp(0, w - 1)).long()
                values = torch.gather(flat, 2, index.unsqueeze(1).expand(n, c, index.shape[1]))
                term = values * weight.unsqueeze(1)
                out = term if out is None else out + term
    return out.reshape(n, c, *out_spatial)
