"""The fast convolution algorithms (torch_fastconv, and openvino_fastconv's export) compute what the direct
convolutions compute.

Each rewrite is checked layer by layer against nn.Conv* on random inputs (including batches, 3-D volumes, the
shapes where it falls back to the direct kernel), and the converted full-size W and G against the official code's
F -> W -> G chain with the parity tolerances of tests/test_parity.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from liveportrait_triton.networks import fast_convolution as fc
from liveportrait_triton.networks.blocks import SPADE, SPADEResnetBlock, SpectralNormConv2d

from test_parity import TOL_IMAGE, TOL_VOLUME, W_OUTPUTS, assert_matches, warp

# fp32 rounding of the reordered sums, relative to the outputs' scale (Winograd's transforms amplify it most)
RELATIVE_TOLERANCE = 2e-5


def assert_same_function(fast: nn.Module, direct: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = direct(*inputs), fast(*inputs)
    assert got.shape == want.shape
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    assert diff <= RELATIVE_TOLERANCE * scale, f"max abs diff {diff:.3g} for outputs up to {scale:.3g}"


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.uniform_(p, -1.0, 1.0)
    return module.eval()


@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (2, 96, 32, 16), (1, 64, 8, 8)])
def test_winograd_2d(shape):
    n, c, h, w = shape
    conv = seeded(nn.Conv2d(c, 80, 3, padding=1))
    fast = fc.fast_convolutions(conv)
    assert isinstance(fast, fc.WinogradConvolution)
    assert_same_function(fast, conv, torch.randn(*shape))


def test_winograd_3d_depth_taps_and_batch():
    conv = seeded(nn.Conv3d(72, 64, 3, padding=1))
    fast = fc.fast_convolutions(conv)
    assert isinstance(fast, fc.WinogradConvolution) and fast.depth_taps == 3
    assert_same_function(fast, conv, torch.randn(2, 72, 5, 16, 32))


def test_winograd_spectral_norm_conv_and_fallback_sizes():
    conv = SpectralNormConv2d(64, 64, 3, padding=1)
    seeded(conv)
    nn.init.normal_(conv.weight_u)
    nn.init.normal_(conv.weight_v)
    conv.fold()
    fast = fc.fast_convolutions(conv)
    assert isinstance(fast, fc.WinogradConvolution)
    assert_same_function(fast, conv, torch.randn(1, 64, 32, 32))
    assert_same_function(fast, conv, torch.randn(1, 64, 6, 10))        # not a multiple of the tile: direct
    assert_same_function(fast, conv, torch.randn(1, 64, 256, 256))     # too large to pay: direct


def test_layers_left_direct():
    for conv in (nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.Conv2d(64, 64, 3, padding=1, groups=2),
                 nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, padding=0)):
        assert fc.fast_convolutions(conv).__class__ is conv.__class__, conv


@pytest.mark.parametrize("runtime, kind", [("torch", fc.FFTConvolution3d), ("openvino", fc.DFTConvolution3d)])
def test_fft_convolution_3d(runtime, kind):
    """torch.fft for PyTorch; for OpenVINO (through ONNX) the same product with real DFT matrices."""
    conv = seeded(nn.Conv3d(12, 5, 7, padding=3))
    fast = fc.fast_convolutions(conv, runtime)
    assert isinstance(fast, kind)
    assert_same_function(fast, conv, torch.randn(2, 12, 6, 20, 24))
    assert_same_function(fast, conv, torch.randn(1, 12, 4, 9, 9))      # another size: its own spectrum


def test_openvino_rules_take_winograd_to_128x128():
    conv = seeded(nn.Conv2d(64, 64, 3, padding=1))
    image = torch.randn(1, 64, 128, 128)
    for runtime, max_pixels in (("torch", 64 * 64), ("openvino", 128 * 128)):
        fast = fc.fast_convolutions(conv, runtime)
        assert isinstance(fast, fc.WinogradConvolution) and fast.max_pixels == max_pixels
        assert_same_function(fast, conv, image)
    with pytest.raises(ValueError, match="no fast-convolution rules for runtime 'tensorrt'"):
        fc.fast_convolutions(conv, "tensorrt")


def test_few_output_convolution_2d():
    conv = seeded(nn.Conv2d(40, 1, 7, padding=3))
    fast = fc.fast_convolutions(conv)
    assert isinstance(fast, fc.FewOutputConvolution2d)
    assert_same_function(fast, conv, torch.randn(2, 40, 24, 20))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_convolution_of_an_upsampled_map_at_low_resolution(scale):
    conv = seeded(nn.Conv2d(16, 24, 3, padding=1))
    fast = fc.UpsampledInputConvolution(conv.weight.detach(), conv.bias.detach(), scale)
    x = torch.randn(2, 16, 10, 12)
    upsampled = nn.Sequential(nn.Upsample(scale_factor=scale, mode="nearest"), conv)
    assert_same_function(fast, upsampled, x)


def test_low_resolution_spade():
    spade = seeded(SPADE(32, 16, hidden=24))
    fast = fc.fast_convolutions(spade)
    assert isinstance(fast, fc.LowResolutionSPADE)
    segmap = torch.randn(1, 16, 8, 8)
    for size in (8, 16, 32):                    # same size (plain SPADE), x2 and x4 (low-resolution path)
        assert_same_function(fast, spade, torch.randn(1, 32, size, size), segmap)


def test_folded_shortcut_block():
    block = seeded(SPADEResnetBlock(32, 16, 8, hidden=12))
    for conv in (block.conv_0, block.conv_1, block.conv_s):
        nn.init.normal_(conv.weight_u)
        nn.init.normal_(conv.weight_v)
        conv.fold()
    fast = fc.fast_convolutions(block)
    assert isinstance(fast, fc.FoldedShortcutSPADEResnetBlock)
    assert isinstance(fast.block.norm_s, fc.LowResolutionSPADE)
    assert fast.folded_beta.out_channels == 16
    segmap = torch.randn(2, 8, 8, 8)
    for size in (8, 32):
        assert_same_function(fast, block, torch.randn(2, 32, size, size), segmap)


def test_converted_copy_leaves_the_network_alone():
    net = seeded(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()))
    fast = fc.fast_convolutions(net)
    assert isinstance(fast[0], fc.WinogradConvolution) and isinstance(net[0], nn.Conv2d)


@pytest.mark.slow
@pytest.mark.parametrize("runtime, fft_kind", [("torch", fc.FFTConvolution3d), ("openvino", fc.DFTConvolution3d)])
def test_full_size_warping_and_generator_match_the_official_chain(full_networks, reference, runtime, fft_kind):
    """The converted full-size W and G (every rewrite of the runtime's rules in use at their real shapes, run
    here in PyTorch) reproduce the official F -> W -> G chain within test_parity's tolerances, G's image within
    one uint8 level."""
    import copy

    from liveportrait_triton.networks.served import parse_output
    fast = copy.copy(full_networks)
    fast.warping_module = fc.fast_convolutions(full_networks.warping_module, runtime)
    fast.spade_generator = fc.fast_convolutions(full_networks.spade_generator, runtime)
    kinds = {type(m) for net in (fast.warping_module, fast.spade_generator) for m in net.modules()}
    assert {fc.WinogradConvolution, fft_kind, fc.FewOutputConvolution2d, fc.LowResolutionSPADE,
            fc.FoldedShortcutSPADEResnetBlock} <= kinds
    with torch.no_grad():
        volume = full_networks.appearance_feature_extractor(torch.from_numpy(reference["source_tensor"]))
        warped = warp(fast, volume, reference["x_s"], reference["kp_driving_final"])
        image = fast.spade_generator(torch.from_numpy(warped["out"])).numpy()
    for key, name in W_OUTPUTS.items():
        assert_matches(reference, name, warped[key], TOL_VOLUME)
    assert_matches(reference, "G_out", image, TOL_IMAGE)
    assert_matches(reference, "G_out_uint8", parse_output(torch.from_numpy(image)).numpy(), 1)
