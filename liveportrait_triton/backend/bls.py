"""The pipeline's Runner over BLS calls to the sub-network models, tensors bound by name.

Where tensors live is the runner's `tensors` path (the pipeline config's `bls_tensors` parameter):
- `numpy`: every output in CPU memory as a NumPy array (the local CPU target).
- `torch-gpu`: the outputs of F, W and G are asked in GPU memory and handed on as torch tensors on the GPU
  (DLPack, no copy), so each sequence's feature volume stays on the device, the batch is stacked there, W's
  output goes to G without leaving it, and only the final image is copied out. The small outputs (M's keypoints,
  the stitching / retargeting deltas) come in CPU memory for the keypoint maths in NumPy.
- `torch-cpu`: the same code path with torch tensors in CPU memory (what CPU machines can run of it).
`transfers` counts the host<->device copies the runner causes on the GPU path, per tensor.
"""
from __future__ import annotations

import asyncio
import collections

import numpy as np

from .. import spec
from ..arrays import is_torch
from .model_config import ConfigError
from .tensors import backend_array, backend_tensor, backend_torch

# sub-networks whose outputs stay device-resident on the torch paths: F's volume (per-sequence state), W -> G
DEVICE_MODELS = (spec.APPEARANCE, spec.WARPING, spec.GENERATOR)


class SubnetworkError(RuntimeError):
    """A sub-network call failed inside the server (not the caller's fault)."""


class BlsRunner:
    """pipeline.Runner over BLS: one InferenceRequest per sub-network call, inputs and outputs bound by name.

    `pb_utils` is the backend's `triton_python_backend_utils` module (only importable inside the stub). `run_many`
    sends independent calls together with `async_exec` on the backend's event loop (set `loop` before use).
    """

    def __init__(self, pb_utils, network_config: str, tensors: str = "numpy"):
        if tensors not in spec.BLS_TENSOR_PATHS:
            raise ConfigError(f"bls_tensors must be one of {list(spec.BLS_TENSOR_PATHS)}, got {tensors!r}")
        self.pb_utils = pb_utils
        self.specs = spec.submodel_specs(network_config, spec.SUBJECTS)    # names of every model set
        self.tensors = tensors
        self.on_gpu = tensors == "torch-gpu"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.host_to_device: collections.Counter[str] = collections.Counter()   # "<model>.<input>" -> copies
        self.device_to_host: collections.Counter[str] = collections.Counter()   # "<model>.<output>" -> copies
        self._cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self._device = pb_utils.PreferredMemory(
            pb_utils.TRITONSERVER_MEMORY_GPU if self.on_gpu else pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def resident(self, model: str) -> bool:
        """Whether the model's outputs stay device-resident (torch tensors in the runner's device memory)."""
        return self.tensors != "numpy" and spec.role_of(model) in DEVICE_MODELS

    def _input(self, model: str, t: spec.TensorSpec, value):
        if is_torch(value):
            import torch
            want = getattr(torch, str(t.numpy_dtype))
            value = value if value.dtype == want else value.to(want)
            if self.on_gpu and not self.resident(model):
                self.device_to_host[f"{model}.{t.name}"] += 1       # the server copies it to the host model
            return backend_tensor(self.pb_utils, t.name, value)
        if self.on_gpu and self.resident(model):
            self.host_to_device[f"{model}.{t.name}"] += 1           # the server copies it to the device model
        return backend_tensor(self.pb_utils, t.name, np.asarray(value, dtype=t.numpy_dtype))

    def _request(self, model: str, inputs: dict):
        model_spec = self.specs[model]
        tensors = [self._input(model, t, inputs[t.name]) for t in model_spec.inputs]
        memory = self._device if self.resident(model) else self._cpu
        return self.pb_utils.InferenceRequest(model_name=model, requested_output_names=model_spec.output_names,
                                              inputs=tensors, preferred_memory=memory)

    def _outputs(self, model: str, response) -> dict:
        if response.has_error():
            raise SubnetworkError(f"{model}: {response.error().message()}")
        outputs = {}
        for name in self.specs[model].output_names:
            tensor = self.pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise SubnetworkError(f"{model}: response has no output {name!r}")
            # copies: the views die with the response's memory (on the device the copy stays there)
            if self.resident(model):
                outputs[name] = backend_torch(tensor).clone()
            elif tensor.is_cpu():
                outputs[name] = backend_array(tensor).copy()
            else:                       # a host model answered in GPU memory although CPU was asked
                self.device_to_host[f"{model}.{name}"] += 1
                outputs[name] = backend_torch(tensor).cpu().numpy()
        return outputs

    def run(self, model: str, inputs: dict) -> dict:
        return self._outputs(model, self._request(model, inputs).exec())

    def run_many(self, calls: list[tuple[str, dict]]) -> list[dict]:
        if self.loop is None or len(calls) < 2:
            return [self.run(model, inputs) for model, inputs in calls]
        requests = [self._request(model, inputs) for model, inputs in calls]

        async def send_together():
            return await asyncio.gather(*(r.async_exec() for r in requests))

        responses = asyncio.run_coroutine_threadsafe(send_together(), self.loop).result()
        return [self._outputs(model, response) for (model, _), response in zip(calls, responses)]

    def to_host(self, model: str, name: str, value) -> np.ndarray:
        """An output brought to the host as NumPy (the final image): the one copy out of the device per frame."""
        if not is_torch(value):
            return value
        if self.on_gpu:
            self.device_to_host[f"{model}.{name}"] += 1
        return value.cpu().numpy()
