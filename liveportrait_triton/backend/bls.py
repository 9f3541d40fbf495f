"""The pipeline's Runner over BLS calls to the sub-network models, tensors bound by name."""
from __future__ import annotations

import asyncio

import numpy as np

from .. import spec
from .tensors import backend_array, backend_tensor


class SubnetworkError(RuntimeError):
    """A sub-network call failed inside the server (not the caller's fault)."""


class BlsRunner:
    """pipeline.Runner over BLS: one InferenceRequest per sub-network call, inputs and outputs bound by name.

    `pb_utils` is the backend's `triton_python_backend_utils` module (only importable inside the stub). `run_many`
    sends independent calls together with `async_exec` on the backend's event loop (set `loop` before use).
    """

    def __init__(self, pb_utils, network_config: str):
        self.pb_utils = pb_utils
        self.specs = spec.submodel_specs(network_config)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _request(self, model: str, inputs: dict[str, np.ndarray]):
        model_spec = self.specs[model]
        tensors = [backend_tensor(self.pb_utils, t.name, np.asarray(inputs[t.name], dtype=t.numpy_dtype))
                   for t in model_spec.inputs]
        # outputs in CPU memory: the keypoint maths runs in numpy, also where sub-networks run on a GPU (ngc)
        cpu = self.pb_utils.PreferredMemory(self.pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        return self.pb_utils.InferenceRequest(model_name=model, requested_output_names=model_spec.output_names,
                                              inputs=tensors, preferred_memory=cpu)

    def _outputs(self, model: str, response) -> dict[str, np.ndarray]:
        if response.has_error():
            raise SubnetworkError(f"{model}: {response.error().message()}")
        outputs = {}
        for name in self.specs[model].output_names:
            tensor = self.pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise SubnetworkError(f"{model}: response has no output {name!r}")
            outputs[name] = backend_array(tensor).copy()    # the view dies with the response's shared memory
        return outputs

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._outputs(model, self._request(model, inputs).exec())

    def run_many(self, calls: list[tuple[str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
        if self.loop is None or len(calls) < 2:
            return [self.run(model, inputs) for model, inputs in calls]
        requests = [self._request(model, inputs) for model, inputs in calls]

        async def send_together():
            return await asyncio.gather(*(r.async_exec() for r in requests))

        responses = asyncio.run_coroutine_threadsafe(send_together(), self.loop).result()
        return [self._outputs(model, response) for (model, _), response in zip(calls, responses)]
