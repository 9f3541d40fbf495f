"""How close a runtime comes to the machine's limit: the convolution and linear FLOPs of each sub-network per call,
and the machine's fp32 GEMM rate measured with torch matmul, so a time becomes a fraction of that rate.

FLOPs count 2 per multiply-add of every convolution (nn.Conv*, transposed ones, and the generator's spectral-norm
convolutions) and Linear layer, as they run on the given inputs (forward hooks); the rest (normalisation, activations, the warping module's grid sample and keypoint
Gaussians) is memory traffic more than arithmetic and is left out, which is why such modules stay below the rate.
"""
from __future__ import annotations

import math
import time

import numpy as np


def layer_flops(networks, model_spec, inputs: dict[str, np.ndarray]) -> float:
    """Conv and linear FLOPs of one call of the served sub-network on `inputs` (counted, not estimated)."""
    import torch
    from torch import nn

    from ..networks.served import ServedModel
    from ..networks.blocks import SpectralNormConv2d
    served = ServedModel(networks, model_spec).eval()
    total = [0.0]

    def conv(module, inputs, output):
        weight = module.weight     # (out, in / groups, *kernel); transposed: (in, out / groups, *kernel)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            total[0] += 2.0 * inputs[0].numel() * math.prod(weight.shape[1:])
        else:
            total[0] += 2.0 * output.numel() * math.prod(weight.shape[1:])

    def linear(module, _inputs, output):
        total[0] += 2.0 * output.numel() * module.in_features

    hooks = []
    for module in served.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, SpectralNormConv2d)):   # the latter: G's folded convs
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
    try:
        with torch.inference_mode():
            served(*(torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32))
                     for n in model_spec.input_names))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def gemm_rate(threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """The machine's fp32 GEMM rate in FLOP/s: the best of repeated torch matmuls of size x size on `threads`
    threads (the process-wide torch thread count is restored afterwards)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)     # warm-up: thread pool and packing buffers
        best, deadline = math.inf, time.perf_counter() + seconds
        runs = 0
        while runs < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
            runs += 1
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size ** 3 / best
