"""Fast CPU algorithms for the convolutions that dominate W and G, computing the same function as nn.Conv*.

On a CPU whose direct fp32 convolutions already run near the machine's arithmetic peak (oneDNN on the 2-core
AVX-512 machines here), only fewer operations make a frame faster. These rewrites (equal up to fp32
rounding, measured in tests/test_fast_convolution.py) cut the work:

- Winograd F(4x4, 3x3) for 3x3 convolutions (and 3x3x3 ones, as three depth taps of 2-D Winograd): 36 instead
  of 144 multiplies per 4x4 output tile, through one batched GEMM per call. It pays where channels are many and
  the image small (G's 64x64 blocks, W's hourglass); at 256x256 the tile transforms cost more than they save.
- FFT over height and width for W's 7x7x7 mask convolution (142 -> 22 channels, 140 of W's 342 GFLOP): a
  per-frequency GEMM over (depth taps x channels) replaces 49 spatial taps. Its weight spectrum is cached per
  input size (about 440 MB at W's 64x64). For ONNX (no complex tensors) `DFTConvolution3d` computes the same
  product in real arithmetic, the transforms as DFT matrix products.
- A 3x3 convolution of a nearest-upsampled map, computed at the map's own resolution: each output phase of an
  s-times upsampling sees a 2x2 neighbourhood of the small map, so one 2x2 convolution with s*s phase kernels
  replaces the 3x3 one at s*s times the pixels (2.25x fewer multiplies). SPADE's shared convolution runs on the
  nearest-upsampled feature map in G's two up blocks.
- Two linear layers in a row become one: the 1x1 shortcut convolution of G's up blocks folded into the shortcut
  SPADE's beta convolution.
- Few-output convolutions with a large kernel (W's 7x7 occlusion map, one channel) as one GEMM per kernel tap.

`fast_convolutions(network, runtime)` returns a converted copy of a network (the original is left as it is, so
PyTorch eager stays the baseline) by the RULES of the runtime that will run it: `torch` for the served kind
`torch_fastconv`, `openvino` for `openvino_fastconv`, which runs the copy's ONNX export (runtimes.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SPADE, SPADEResnetBlock, SpectralNormConv2d

# Winograd F(4x4, 3x3) (Lavin & Gray): Y = A^T [(G g G^T) * (B^T d B)] A, points 0, +-1, +-2, infinity.
_BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                   dtype=torch.float64)
TILE = 4                      # output tile edge
# The input transform as a stride-4 correlation of each 6x6 patch: (36, 1, 6, 6); the output one as a matrix.
_INPUT_TRANSFORM = torch.einsum("ai,bj->abij", _BT, _BT).reshape(36, 1, 6, 6).float()
_OUTPUT_TRANSFORM = torch.kron(_AT, _AT).float()          # (16, 36)

# Where Winograd paid in layer-by-layer timings: images up to WINOGRAD_MAX_PIXELS per slice and at least
# WINOGRAD_MIN_CHANNELS input and output channels. PyTorch on the 2-core AMD EPYC: 512 -> 512 at 64x64 2x, at
# 128x128 about even, at 256x256 slower. OpenVINO on a 2-core Intel Xeon (Sapphire Rapids), the exported graph:
# at 64x64 1.6-2.0x, at 128x128 1.07-1.24x, at 256x256 0.6-0.97x (OPENVINO_WINOGRAD_MAX_PIXELS).
WINOGRAD_MAX_PIXELS = 64 * 64
OPENVINO_WINOGRAD_MAX_PIXELS = 128 * 128
WINOGRAD_MIN_CHANNELS = 64
FFT_MIN_KERNEL = 5            # 3-D kernels from this edge up go through the FFT



def _winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(co, c, kd, 3, 3) kernels -> (kd, 36, co, c): G g G^T of every 3x3 slice, in the kernels' dtype."""
    co, c, depth_taps = weight.shape[:3]
    g = _G.to(weight.dtype)
    u = torch.matmul(torch.matmul(g, weight), g.T)                                  # (co, c, kd, 6, 6)
    return u.permute(2, 3, 4, 0, 1).reshape(depth_taps, 36, co, c)


class WinogradConvolution(nn.Module):
    """A 3x3 (or 3x3x3) stride-1 'same' convolution by Winograd F(4x4, 3x3) on images of up to `max_pixels` per
    slice; other input sizes run it directly.

    Eager calls use the transformed kernels computed once (in fp64); a trace for ONNX computes them in the graph
    from the 3x3 kernels instead, which the runtime folds into constants when it compiles, so the file holds the
    3x3 kernels and not 4x larger 6x6 ones."""

    def __init__(self, conv: nn.Module, max_pixels: int = WINOGRAD_MAX_PIXELS):
        super().__init__()
        self.max_pixels = max_pixels
        weight = conv.weight.detach()
        self.register_buffer("kernel", (weight.unsqueeze(2) if weight.dim() == 4 else weight).float().clone())
        self.depth_taps = self.kernel.shape[2]
        self.register_buffer("transformed_weight", _winograd_weight(self.kernel.double()).float().contiguous(),
                             persistent=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("input_transform", _INPUT_TRANSFORM.clone())
        self.register_buffer("output_transform", _OUTPUT_TRANSFORM.clone())
        self.direct = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % TILE or w % TILE or h * w > self.max_pixels or x.dtype != torch.float32:
            return self.direct(x)
        planar = x.dim() == 4
        x5 = x.unsqueeze(2) if planar else x
        n, c, d, _, _ = x5.shape
        pad = self.depth_taps // 2
        if pad:
            x5 = F.pad(x5, (0, 0, 0, 0, pad, pad))
        padded_depth = d + 2 * pad
        th, tw = h // TILE, w // TILE
        tiles = th * tw
        v = F.conv2d(x5.reshape(n * c * padded_depth, 1, h, w), self.input_transform, stride=TILE, padding=1)
        # (36, c, depth, batch, tiles): one depth tap is a contiguous column range
        v = v.view(n, c, padded_depth, 36, tiles).permute(3, 1, 2, 0, 4).reshape(36, c, padded_depth * n * tiles)
        columns = d * n * tiles
        u = _winograd_weight(self.kernel) if torch.jit.is_tracing() else self.transformed_weight
        m = torch.bmm(u[0], v[:, :, :columns])
        for tap in range(1, self.depth_taps):
            start = tap * n * tiles
            m.baddbmm_(u[tap].to(m.dtype), v[:, :, start:start + columns].to(m.dtype))    # in place: no autocast
        co = m.shape[1]
        y = (self.output_transform @ m.view(36, -1)).view(TILE, TILE, co, d, n, th, tw)
        y = y.permute(4, 2, 3, 5, 0, 6, 1).reshape(n, co, d, h, w)
        y = y + self.bias.view(1, co, 1, 1, 1)
        return y.squeeze(2) if planar else y


class FFTConvolution3d(nn.Module):
    """A stride-1 'same' Conv3d with a large cubic kernel: FFT over height and width, direct taps over depth."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.kernel = conv.kernel_size[0]
        self.register_buffer("weight", conv.weight.detach().float().clone())     # (co, c, k, k, k)
        self.register_buffer("bias", conv.bias.detach().float().clone() if conv.bias is not None
                             else torch.zeros(conv.out_channels))
        self._spectrum: dict[tuple[int, int], torch.Tensor] = {}

    def spectrum(self, h: int, w: int) -> torch.Tensor:
        """(frequencies, depth taps, c, co) complex: the kernel's 2-D spectrum at the padded size, cached."""
        key = (h, w)
        if key not in self._spectrum:
            size = (h + self.kernel - 1, w + self.kernel - 1)
            flipped = torch.flip(self.weight, dims=(3, 4))                         # correlation -> convolution
            spectrum = torch.fft.rfft2(flipped, s=size)                           # (co, c, k, P, Q)
            co, c = spectrum.shape[:2]
            self._spectrum[key] = spectrum.permute(3, 4, 2, 1, 0).reshape(-1, self.kernel, c, co).contiguous()
        return self._spectrum[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        k, half = self.kernel, self.kernel // 2
        weights = self.spectrum(h, w)
        size = (h + k - 1, w + k - 1)
        frequencies = weights.shape[0]
        outputs = []
        for sample in x:                                                           # batch: one spectrum each
            xs = torch.fft.rfft2(F.pad(sample, (0, 0, 0, 0, half, half)), s=size)   # (c, d + k - 1, P, Q)
            xs = xs.permute(2, 3, 1, 0).reshape(frequencies, d + k - 1, c).contiguous()   # (a view otherwise)
            # row `depth` of frequency f: the k depth slices depth..depth+k-1 side by side (copied: a GEMM cannot
            # read the overlapping rows in place); one batched GEMM over the frequencies
            windows = xs.as_strided((frequencies, d, k * c), ((d + k - 1) * c, c, 1)).contiguous()
            out = torch.bmm(windows, weights.view(frequencies, k * c, -1))
            co = out.shape[-1]
            out = out.view(size[0], size[1] // 2 + 1, d, co).permute(3, 2, 0, 1)
            y = torch.fft.irfft2(out, s=size)[:, :, half:half + h, half:half + w]
            outputs.append(y)
        return torch.stack(outputs) + self.bias.view(1, -1, 1, 1, 1)


def _real_dft_matrices(size_in: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DFT of length `size` of a zero-padded signal of `size_in` samples as real matrices: (size_in,
    2 * (size // 2 + 1)) for the real transform of the last axis ([real | imaginary] columns) and (2 * size,
    2 * size_in) for the complex transform of stacked [real; imaginary] rows, both fp32 from fp64."""
    half_spectrum = torch.fft.rfft(torch.eye(size_in, dtype=torch.float64), n=size)           # (size_in, size/2+1)
    last_axis = torch.cat([half_spectrum.real, half_spectrum.imag], 1)
    full = torch.fft.fft(torch.eye(size_in, dtype=torch.float64), n=size).T                    # (size, size_in)
    rows = torch.cat([torch.cat([full.real, -full.imag], 1), torch.cat([full.imag, full.real], 1)], 0)
    return last_axis.float(), rows.float()


class DFTConvolution3d(nn.Module):
    """FFTConvolution3d's algorithm in real arithmetic, for graphs without complex tensors (ONNX): the 2-D
    transforms are matrix products with DFT matrices, each frequency's complex GEMM runs on stacked real and
    imaginary parts, one GEMM per depth tap, and the kernel's spectrum is computed in the graph from the kernel
    (a runtime folds it into a constant when it compiles; the file keeps only the kernel)."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.kernel = conv.kernel_size[0]
        flipped = torch.flip(conv.weight.detach().float(), dims=(3, 4))                  # correlation -> convolution
        self.register_buffer("flipped_weight", flipped.contiguous())                      # (co, c, k, k, k)
        self.register_buffer("bias", conv.bias.detach().float().clone() if conv.bias is not None
                             else torch.zeros(conv.out_channels))
        self._matrices: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def matrices(self, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """The DFT matrices at the padded size (h + k - 1, w + k - 1) of an h x w image, built on first use."""
        key = (h, w)
        if key not in self._matrices:
            k, half = self.kernel, self.kernel // 2
            size = (h + k - 1, w + k - 1)
            image_w, image_h = _real_dft_matrices(w, size[1]), _real_dft_matrices(h, size[0])
            kernel_w, kernel_h = _real_dft_matrices(k, size[1]), _real_dft_matrices(k, size[0])
            # the inverse transforms, kept to the output window half..half+h (x half..half+w)
            inverse = torch.fft.ifft(torch.eye(size[0], dtype=torch.float64), dim=0)[half:half + h]   # (h, P)
            inverse_h = torch.cat([torch.cat([inverse.real, -inverse.imag], 1),
                                   torch.cat([inverse.imag, inverse.real], 1)], 0)                    # (2h, 2P)
            bins = torch.eye(size[1] // 2 + 1, dtype=torch.float64)
            inverse_w = torch.cat([torch.fft.irfft(bins + 0j, n=size[1]),
                                   torch.fft.irfft(1j * bins, n=size[1])], 0)[:, half:half + w]       # (2 Q2, w)
            self._matrices[key] = (image_w[0], image_h[1], kernel_w[0], kernel_h[1], inverse_h.float(),
                                   inverse_w.float())
        return self._matrices[key]

    @staticmethod
    def _spectrum(x: torch.Tensor, along_w: torch.Tensor, along_h: torch.Tensor) -> torch.Tensor:
        """(..., rows, cols) real -> (..., 2P, Q/2+1): the 2-D spectrum, [real; imaginary] rows."""
        *lead, rows, _ = x.shape
        bins = along_w.shape[1] // 2
        y = torch.matmul(x, along_w).view(*lead, rows, 2, bins).transpose(-3, -2).reshape(*lead, 2 * rows, bins)
        return torch.matmul(along_h, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        k, half = self.kernel, self.kernel // 2
        image_w, image_h, kernel_w, kernel_h, inverse_h, inverse_w = self.matrices(int(h), int(w))
        co = self.flipped_weight.shape[0]
        p, bins = inverse_h.shape[1] // 2, inverse_w.shape[0] // 2
        # kernel spectrum per frequency and depth tap: (k, P, Q2, c, [real co | imaginary co])
        weights = self._spectrum(self.flipped_weight, kernel_w, kernel_h).view(co, c, k, 2, p, bins)
        weights = weights.permute(2, 4, 5, 1, 3, 0).reshape(k, p, bins, c, 2 * co)
        # input spectrum, frequency-major: (n, P, Q2, [real; imaginary], depth + k - 1, c)
        spectrum = self._spectrum(F.pad(x, (0, 0, 0, 0, half, half)), image_w, image_h)
        spectrum = spectrum.view(n, c, d + k - 1, 2, p, bins).permute(0, 4, 5, 3, 2, 1)
        # depth taps: rows (real, imaginary) x depth, columns (real, imaginary) x co of the products
        products = sum(torch.matmul(spectrum[:, :, :, :, tap:tap + d].reshape(n, p, bins, 2 * d, c), weights[tap])
                       for tap in range(k)).view(n, p, bins, 2, d, 2, co)
        real = products[:, :, :, 0, :, 0] - products[:, :, :, 1, :, 1]
        imaginary = products[:, :, :, 0, :, 1] + products[:, :, :, 1, :, 0]                  # (n, P, Q2, d, co)
        y = torch.stack([real, imaginary], 1).permute(0, 5, 4, 1, 2, 3).reshape(n, co, d, 2 * p, bins)
        y = torch.matmul(inverse_h, y).view(n, co, d, 2, h, bins).transpose(3, 4).reshape(n, co, d, h, 2 * bins)
        return torch.matmul(y, inverse_w) + self.bias.view(1, -1, 1, 1, 1)


class FewOutputConvolution2d(nn.Module):
    """A stride-1 'same' Conv2d with a few output channels and a large kernel: one GEMM over the input channels
    for every kernel tap, then a sum of the shifted tap planes (direct kernels are slow for this shape)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        weight = conv.weight.detach().float()                                       # (co, c, k, k)
        co, c, k, _ = weight.shape
        self.kernel = k
        self.register_buffer("tap_weight", weight.permute(0, 2, 3, 1).reshape(co * k * k, c).contiguous())
        selector = torch.eye(k * k).reshape(k * k, k, k).repeat(co, 1, 1).reshape(co, k * k, k, k)
        self.register_buffer("selector", selector)
        self.register_buffer("bias", conv.bias.detach().float().clone() if conv.bias is not None
                             else torch.zeros(co))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        half = self.kernel // 2
        padded = F.pad(x, (half, half, half, half)).reshape(n, c, -1)
        planes = torch.matmul(self.tap_weight, padded)                              # (n, co k k, padded pixels)
        planes = planes.view(n, -1, h + 2 * half, w + 2 * half)
        return F.conv2d(planes, self.selector, self.bias, groups=self.selector.shape[0])


class UpsampledInputConvolution(nn.Module):
    """conv3x3(nearest_upsample(x, s)) (stride 1, padding 1) computed from x itself.

    Counted from one pixel before each s x s block (output o = j*s + q - 1), every phase q of block j reads the
    small map's pixels j-1 and j along each axis: one 2x2 convolution of x (padding 1, so j = 0..h) with the 3x3
    kernel's taps merged per phase gives s*s phase planes, and a pixel shuffle plus a one-pixel crop interleaves
    them into the large map."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: int):
        super().__init__()
        weight = weight.double()                                                     # (co, c, 3, 3)
        co = weight.shape[0]
        self.scale = scale
        merge = torch.zeros(scale, 2, 3, dtype=torch.float64)     # phase, 2x2 tap, 3x3 tap (one axis)
        for phase in range(scale):
            for tap in range(3):
                merge[phase, (phase + tap - 2) // scale + 1, tap] = 1.0   # the small-map pixel (j-1 or j) it reads
        phases = torch.einsum("pyi,qxj,ocij->opqcyx", merge, merge, weight)          # (co, s, s, c, 2, 2)
        self.register_buffer("phase_weight", phases.reshape(co * scale * scale, weight.shape[1], 2, 2).float())
        bias = bias if bias is not None else torch.zeros(co)
        self.register_buffer("phase_bias", bias.float().repeat_interleave(scale * scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.scale
        y = F.pixel_shuffle(F.conv2d(x, self.phase_weight, self.phase_bias, padding=1), s)
        return y[:, :, 1:1 + h * s, 1:1 + w * s]


class LowResolutionSPADE(nn.Module):
    """SPADE whose shared convolution runs on the segmentation map at its own resolution when the map is
    nearest-upsampled by an integer factor (G's up blocks); otherwise exactly the SPADE it replaces. The
    low-resolution convolution of each scale is built on first use (CPU only, as the torch_fastconv kind)."""

    def __init__(self, spade: SPADE):
        super().__init__()
        shared = spade.mlp_shared[0]
        self.shared_weight = shared.weight.detach().clone()
        self.shared_bias = shared.bias.detach().clone() if shared.bias is not None else None
        self.spade = spade
        self.upsampled: dict[int, UpsampledInputConvolution] = {}

    def activation(self, x, segmap) -> torch.Tensor:
        """SPADE.activation, from the small map where x is an integer multiple of its size."""
        h, w = x.shape[-2:]
        sh, sw = segmap.shape[-2:]
        scale = int(h) // int(sh)          # a plain int: the cache key, also while tracing
        if scale == 1 or h != scale * sh or w != scale * sw:
            return self.spade.activation(x, segmap)
        if scale not in self.upsampled:
            self.upsampled[scale] = UpsampledInputConvolution(self.shared_weight, self.shared_bias, scale)
        return F.relu(self.upsampled[scale](segmap))

    def forward(self, x, segmap):
        actv = self.activation(x, segmap)
        return self.spade.param_free_norm(x) * (1 + self.spade.mlp_gamma(actv)) + self.spade.mlp_beta(actv)


class FoldedShortcutSPADEResnetBlock(nn.Module):
    """SPADEResnetBlock whose learned shortcut folds its 1x1 convolution into the shortcut SPADE's beta
    convolution: conv_s(n * (1 + gamma(a)) + beta(a)) = conv_s(n * (1 + gamma(a))) + (conv_s o beta)(a), and the
    composed 3x3 convolution has fout instead of fin output channels (G's up blocks: 2x and 4x fewer)."""

    def __init__(self, block: SPADEResnetBlock):
        super().__init__()
        shortcut = block.conv_s.weight.detach().double()[:, :, 0, 0]                 # (fout, fin)
        beta = block.norm_s.mlp_beta
        folded = nn.Conv2d(beta.in_channels, shortcut.shape[0], 3, padding=1)
        folded.weight.copy_(torch.einsum("om,mcij->ocij", shortcut, beta.weight.detach().double()).float())
        folded.bias.copy_((shortcut @ beta.bias.detach().double()).float())
        self.folded_beta = folded
        self.block = block

    def forward(self, x, seg):
        block, norm_s = self.block, self.block.norm_s
        actv = norm_s.activation(x, seg)
        x_s = block.conv_s(norm_s.spade.param_free_norm(x) * (1 + norm_s.spade.mlp_gamma(actv))) \
            + self.folded_beta(actv)
        dx = block.conv_0(F.leaky_relu(block.norm_0(x, seg), 0.2))
        dx = block.conv_1(F.leaky_relu(block.norm_1(dx, seg), 0.2))
        return x_s + dx


# The rules per runtime the converted network runs on: (large 3-D kernel class, Winograd's largest image).
# OpenVINO runs the ONNX export, which has no complex tensors: the FFT as real DFT matrix products (W's mask
# convolution 563 -> 177 ms there, against 510 -> 237 ms for torch.fft in PyTorch; 2 threads, Xeon).
RULES = {"torch": (FFTConvolution3d, WINOGRAD_MAX_PIXELS), "openvino": (DFTConvolution3d, OPENVINO_WINOGRAD_MAX_PIXELS)}


def _replacement(module: nn.Module, runtime: str) -> nn.Module | None:
    """The fast form of one layer, or None where the direct one is the right algorithm."""
    if isinstance(module, SPADE):
        return LowResolutionSPADE(module)
    if isinstance(module, SPADEResnetBlock) and module.learned_shortcut:
        return FoldedShortcutSPADEResnetBlock(module)
    if isinstance(module, (nn.Conv2d, nn.Conv3d, SpectralNormConv2d)):
        weight = module.weight
        stride = getattr(module, "stride", (1,) * (weight.dim() - 2))
        dilation = getattr(module, "dilation", (1,) * (weight.dim() - 2))
        groups = getattr(module, "groups", 1)
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,) * (weight.dim() - 2)
        kernel = tuple(weight.shape[2:])
        same = all(p == k // 2 for p, k in zip(padding, kernel)) and len(set(kernel)) == 1
        if groups != 1 or any(s != 1 for s in stride) or any(v != 1 for v in dilation) or not same:
            return None
        co, c = weight.shape[:2]
        fft_class, winograd_max_pixels = RULES[runtime]
        if weight.dim() == 5 and kernel[0] >= FFT_MIN_KERNEL:
            return fft_class(module)
        if weight.dim() == 4 and kernel[0] >= FFT_MIN_KERNEL and co <= 4:
            return FewOutputConvolution2d(module)
        if kernel[0] == 3 and min(c, co) >= WINOGRAD_MIN_CHANNELS:
            return WinogradConvolution(module, winograd_max_pixels)
    return None


def fast_convolutions(network: nn.Module, runtime: str = "torch") -> nn.Module:
    """A copy of `network` (eval mode, weights folded) with its convolutions replaced where a fast form applies,
    by the RULES of the `runtime` that will run it ('torch' or 'openvino', the latter through ONNX)."""
    if runtime not in RULES:
        raise ValueError(f"no fast-convolution rules for runtime {runtime!r}; choose one of {list(RULES)}")
    with torch.no_grad():
        return _convert(copy.deepcopy(network).eval(), runtime)


def _convert(module: nn.Module, runtime: str) -> nn.Module:
    replacement = _replacement(module, runtime)
    if replacement is None or isinstance(replacement, (LowResolutionSPADE, FoldedShortcutSPADEResnetBlock)):
        for name, child in list(module.named_children()):   # the layers inside get their own fast forms
            setattr(module, name, _convert(child, runtime))
    return module if replacement is None else replacement
