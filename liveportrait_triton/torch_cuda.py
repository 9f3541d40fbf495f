"""Our PyTorch sub-networks on a CUDA device: fp16 autocast like the official default, CUDA graphs per batch size.

`TorchCudaRunner` is a pipeline Runner (`run(model, inputs) -> outputs`, names from `spec`) and the GPU engine of
the runtime layer's `torch` kind. It is the GPU runtime that needs nothing but PyTorch.

- Precision: `fp16` (the official default, `flag_use_half_precision`) runs each forward under
  `torch.autocast(float16)`; the 5-D grid sample inside W keeps its index maths in fp32 (networks.grid_sample).
  `fp32` runs plain; `bf16` exists for CPUs that have it. Outputs are returned in the spec's dtype (FP32).
- CUDA graphs: for each batch size in `graph_batch_sizes` (by default every size the dynamic batcher can form,
  1..MAX_BATCH_SIZE), the first call of a model at that size warms it up on a side stream and captures one
  graph over static input buffers; later calls copy their inputs in and replay it. All graphs of a runner share
  one memory pool, which is safe because a runner replays them one at a time (its lock) on one stream. Sizes
  outside the set, and any device without CUDA, run eagerly; `graphs_unavailable` says why there are none.
- Tensors: torch tensors in go as they are (moved to the device only if elsewhere) and outputs stay on the
  device; NumPy inputs get NumPy outputs (for in-process use and benchmarks).
"""
from __future__ import annotations

import collections
import threading

import numpy as np
import torch

from . import spec
from .arrays import is_torch

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_CALLS = 3                    # eager calls before a capture (cuDNN algorithm choice, lazy initialisation)


def graphs_unavailable(device: torch.device) -> str | None:
    """Why CUDA graphs cannot run on device; None where they can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this runner is on {device}"
    if not torch.cuda.is_available():
        return "this PyTorch sees no CUDA device"
    return None


class _Captured:
    """One captured forward of a model at one batch size: static input buffers, the graph, its static outputs."""

    def __init__(self, inputs: dict, graph, outputs: dict):
        self.inputs, self.graph, self.outputs = inputs, graph, outputs


class TorchCudaRunner:
    """pipeline.Runner over our PyTorch modules on `device`, in `precision`, with CUDA graphs per batch size."""

    def __init__(self, networks, device: str | torch.device = "cuda", precision: str = "fp16",
                 graph_batch_sizes=range(1, spec.MAX_BATCH_SIZE + 1)):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision]
        from .export.served import served_models
        self.specs = spec.submodel_specs(networks.params)
        self.served = {name: model.eval().to(self.device) for name, model in served_models(networks).items()}
        self.graphs_unavailable = graphs_unavailable(self.device)
        self.graph_batch_sizes = frozenset() if self.graphs_unavailable else frozenset(graph_batch_sizes)
        self.graphs: dict[tuple[str, int], _Captured] = {}
        self.calls = collections.Counter()          # ("eager" | "replay" | "capture", model) -> calls
        self._pool = None
        self._lock = threading.Lock()

    def run(self, model: str, inputs: dict) -> dict:
        model_spec = self.specs[model]
        on_host = not any(is_torch(v) for v in inputs.values())
        tensors = {t.name: self._device_tensor(inputs[t.name], t) for t in model_spec.inputs}
        batch = int(tensors[model_spec.inputs[0].name].shape[0])
        with self._lock:
            if batch in self.graph_batch_sizes:
                outputs = self._replay(model, batch, tensors)
            else:
                self.calls["eager", model] += 1
                outputs = self._forward(model, tensors)
        return {k: v.cpu().numpy() for k, v in outputs.items()} if on_host else outputs

    def _device_tensor(self, value, t: spec.TensorSpec) -> torch.Tensor:
        tensor = value if is_torch(value) else torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(self.device, getattr(torch, str(t.numpy_dtype)))

    def _forward(self, model: str, tensors: dict) -> dict:
        """One eager forward; outputs in the spec's dtypes (autocast leaves some in fp16)."""
        enabled = self.autocast_dtype is not None
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                                    enabled=enabled, cache_enabled=False):
            out = self.served[model].named_outputs(tensors)
        want = {t.name: getattr(torch, str(t.numpy_dtype)) for t in self.specs[model].outputs}
        return {name: out[name].to(dtype) for name, dtype in want.items()}

    def _replay(self, model: str, batch: int, tensors: dict) -> dict:
        captured = self.graphs.get((model, batch))
        if captured is None:
            captured = self.graphs[model, batch] = self._capture(model, tensors)
        for name, buffer in captured.inputs.items():
            buffer.copy_(tensors[name])
        captured.graph.replay()
        self.calls["replay", model] += 1
        # the next replay overwrites the static outputs: hand out copies (device to device)
        return {name: out.clone() for name, out in captured.outputs.items()}

    def _capture(self, model: str, tensors: dict) -> _Captured:
        static = {name: t.clone() for name, t in tensors.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._forward(model, static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self._forward(model, static)
        self.calls["capture", model] += 1
        return _Captured(static, graph, outputs)
