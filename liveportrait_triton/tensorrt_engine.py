"""A TensorRT engine (`model.plan`) run on PyTorch CUDA buffers: the runtime layer's `tensorrt` kind.

Building engines is the exporter's job (export/tensorrt_build.py); running one is the runtime layer's, so this
module needs nothing from `export`. `tensorrt` is imported lazily: only a machine with a CUDA GPU has it.
"""
from __future__ import annotations

import statistics

import numpy as np

from . import spec

# spec dtype -> (TensorRT dtype name, torch dtype name) of engine I/O buffers
ENGINE_DTYPES = {"FP32": ("float32", "float32"), "UINT8": ("uint8", "uint8")}


class TensorRTError(RuntimeError):
    """TensorRT unavailable, no GPU, a parse or build failure, or an engine that fails its check."""


def import_tensorrt():
    """The tensorrt module, or TensorRTError saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTError("tensorrt is not installed: on a machine with an NVIDIA GPU and driver, "
                            "`pip install tensorrt==10.16.1.11` (or `pip install liveportrait-triton[tensorrt]`)"
                            ) from exc
    return tensorrt


def require_cuda_torch() -> None:
    """Engines are run on PyTorch CUDA buffers: fail early, with the remedy, where PyTorch has no CUDA."""
    import torch
    if not torch.cuda.is_available():
        raise TensorRTError("checking and timing engines needs a CUDA build of PyTorch and a GPU "
                            "(torch.cuda.is_available() is False); pass --no-check to only build engines")


class TensorRTEngine:
    """One deserialized engine run on PyTorch CUDA buffers, tensors bound by name: the session of the runtime
    layer's `tensorrt` kind (runtimes.create_subnetwork builds it from a plan entry)."""

    def __init__(self, plan: bytes, model_spec: spec.ModelSpec):
        import torch
        require_cuda_torch()
        trt = import_tensorrt()
        self._torch = torch
        self._trt = trt
        self.model_spec = model_spec
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TensorRTError(f"{model_spec.name}: the engine cannot be deserialized")
        self.context = self.engine.create_execution_context()
        self._stream = torch.cuda.Stream()   # not the default stream, which makes TensorRT synchronise extra
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        got_in = sorted(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        got_out = sorted(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        if got_in != sorted(model_spec.input_names) or got_out != sorted(model_spec.output_names):
            raise TensorRTError(f"{model_spec.name}: engine I/O {got_in} -> {got_out} differs from the spec")
        for t in (*model_spec.inputs, *model_spec.outputs):
            if self.engine.get_tensor_dtype(t.name) != getattr(trt, ENGINE_DTYPES[t.dtype][0]):
                raise TensorRTError(f"{model_spec.name}: engine tensor {t.name!r} is "
                                    f"{self.engine.get_tensor_dtype(t.name)}, the spec says {t.dtype}")

    def _bind(self, inputs: dict[str, np.ndarray]) -> dict:
        """Device buffers for inputs (copied) and outputs, their addresses set; keep the dict alive while running."""
        torch = self._torch
        buffers = {}
        for t in self.model_spec.inputs:
            arr = np.ascontiguousarray(inputs[t.name], dtype=t.numpy_dtype)
            buffers[t.name] = torch.from_numpy(arr).cuda()
            self.context.set_input_shape(t.name, arr.shape)
        for t in self.model_spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            buffers[t.name] = torch.empty(shape, dtype=getattr(torch, ENGINE_DTYPES[t.dtype][1]), device="cuda")
        for name, buffer in buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        torch.cuda.synchronize()   # copies done before the engine's own stream reads the inputs
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise TensorRTError(f"{self.model_spec.name}: engine execution failed")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        buffers = self._bind(inputs)
        self._execute()
        self._stream.synchronize()
        return {t.name: buffers[t.name].cpu().numpy() for t in self.model_spec.outputs}

    def latency_ms(self, inputs: dict[str, np.ndarray], repeats: int = 20, warmup: int = 3) -> float:
        """Median GPU time of one execution (inputs already on the device), measured with CUDA events."""
        torch = self._torch
        buffers = self._bind(inputs)
        for _ in range(warmup):
            self._execute()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            self._execute()
            end.record(self._stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        del buffers
        return statistics.median(times)
