"""One served sub-network's PyTorch module on a device: the session of the runtime layer's torch kinds.

`TorchEngine` runs a `networks.served.ServedModel` (tensors bound by spec name) on the CPU or a CUDA device;
runtimes.create_subnetwork builds it from a plan entry (kind `torch` or `torch_fastconv`, device, precision).

- Precision: `fp32` runs plain (the exact numerics); `fp16` (the official GPU default,
  `flag_use_half_precision`) and `bf16` run each forward under `torch.autocast`; the 5-D grid sample inside W
  keeps its index maths in fp32 (networks.grid_sample). Outputs are returned in the spec's dtype (FP32).
- CUDA graphs: on a CUDA device, for each batch size in `graph_batch_sizes` (by default every size the dynamic
  batcher can form, 1..MAX_BATCH_SIZE), the first call at that size warms up on a side stream and captures one
  graph over static input buffers; later calls copy their inputs in and replay it. An engine replays its graphs
  one at a time (its lock) on one stream. Other sizes, and the CPU, run eagerly; `graphs_unavailable` says why
  there are none.
- Tensors: torch tensors in go as they are (moved to the device only if elsewhere) and outputs stay on the
  device; NumPy inputs get NumPy outputs.
"""
from __future__ import annotations

import collections
import threading

import numpy as np
import torch

from . import spec
from .arrays import is_torch

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_CALLS = 3                    # eager calls before a capture (cuDNN algorithm choice, lazy initialisation)


def graphs_unavailable(device: torch.device) -> str | None:
    """Why CUDA graphs cannot run on device; None where they can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this engine is on {device}"
    if not torch.cuda.is_available():
        return "this PyTorch sees no CUDA device"
    return None


class _Captured:
    """One captured forward at one batch size: static input buffers, the graph, its static outputs."""

    def __init__(self, inputs: dict, graph, outputs: dict):
        self.inputs, self.graph, self.outputs = inputs, graph, outputs


class TorchEngine:
    """A ServedModel on `device`, in `precision`, with CUDA graphs per batch size where CUDA is."""

    def __init__(self, served, device: str | torch.device = "cpu", precision: str = "fp32",
                 graph_batch_sizes=range(1, spec.MAX_BATCH_SIZE + 1)):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.model_spec: spec.ModelSpec = served.model_spec
        self.served = served.eval().to(self.device)
        self.graphs_unavailable = graphs_unavailable(self.device)
        self.graph_batch_sizes = frozenset() if self.graphs_unavailable else frozenset(graph_batch_sizes)
        self.graphs: dict[int, _Captured] = {}
        self.calls = collections.Counter()          # "eager" | "replay" | "capture" -> calls
        self._pool = None
        self._lock = threading.Lock()

    def run(self, inputs: dict) -> dict:
        on_host = not any(is_torch(v) for v in inputs.values())
        tensors = {t.name: self._device_tensor(inputs[t.name], t) for t in self.model_spec.inputs}
        batch = int(tensors[self.model_spec.inputs[0].name].shape[0])
        with self._lock:
            if batch in self.graph_batch_sizes:
                outputs = self._replay(batch, tensors)
            else:
                self.calls["eager"] += 1
                outputs = self._forward(tensors)
        return {k: v.cpu().numpy() for k, v in outputs.items()} if on_host else outputs

    def _device_tensor(self, value, t: spec.TensorSpec) -> torch.Tensor:
        tensor = value if is_torch(value) else torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(self.device, getattr(torch, str(t.numpy_dtype)))

    def _forward(self, tensors: dict) -> dict:
        """One eager forward; outputs in the spec's dtypes (autocast leaves some in fp16)."""
        enabled = self.autocast_dtype is not None
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                                    enabled=enabled, cache_enabled=False):
            out = self.served.named_outputs(tensors)
        return {t.name: out[t.name].to(getattr(torch, str(t.numpy_dtype))) for t in self.model_spec.outputs}

    def _replay(self, batch: int, tensors: dict) -> dict:
        captured = self.graphs.get(batch)
        if captured is None:
            captured = self.graphs[batch] = self._capture(tensors)
        for name, buffer in captured.inputs.items():
            buffer.copy_(tensors[name])
        captured.graph.replay()
        self.calls["replay"] += 1
        # the next replay overwrites the static outputs: hand out copies (device to device)
        return {name: out.clone() for name, out in captured.outputs.items()}

    def _capture(self, tensors: dict) -> _Captured:
        static = {name: t.clone() for name, t in tensors.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self._forward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self._forward(static)
        self.calls["capture"] += 1
        return _Captured(static, graph, outputs)
