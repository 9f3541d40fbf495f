"""Triton Python-backend adapter of the `liveportrait` sequence model: `TritonPythonModel`, which its generated
`model.py` imports (Triton looks the class up there).

It only adapts Triton: the logic (request checks, batching across sequences, per-sequence state and its
eviction) is `backend.pipeline_model.PipelineBackend`. `triton_python_backend_utils` exists only inside a
Python-backend stub, so only the stub imports this module.
"""
import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from liveportrait_triton import spec
from liveportrait_triton.backend.bls import BlsRunner
from liveportrait_triton.backend.model_config import config_parameter
from liveportrait_triton.backend.outcomes import Failure, error_response
from liveportrait_triton.backend.pipeline_model import PipelineBackend
from liveportrait_triton.backend.requests import RawRequest, parse_parameters
from liveportrait_triton.backend.sequences import FREED_END, FREED_IDLE
from liveportrait_triton.backend.tensors import backend_array, backend_tensor

INPUT_NAMES = spec.PIPELINE_SPEC.input_names     # all optional: a request carries those it needs


class SequenceMetrics:
    """Custom metrics on Triton's metrics port: live sequences, their state's bytes, sequences freed by reason."""

    def __init__(self, model_name, version):
        labels = {"model": model_name, "version": version}
        self.families = [      # kept referenced: a family's metrics live as long as the family
            pb_utils.MetricFamily("liveportrait_live_sequences", "Sequences whose source state is held",
                                  pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily("liveportrait_sequence_state_bytes", "Bytes of per-sequence source state held",
                                  pb_utils.MetricFamily.GAUGE),
            pb_utils.MetricFamily("liveportrait_sequences_freed_total", "Sequences freed, by END or idle eviction",
                                  pb_utils.MetricFamily.COUNTER),
        ]
        live, nbytes, freed = self.families
        self.live = live.Metric(labels=labels)
        self.bytes = nbytes.Metric(labels=labels)
        self.freed = {reason: freed.Metric(labels={**labels, "reason": reason}) for reason in (FREED_END, FREED_IDLE)}

    def sequences_changed(self, live, state_bytes):
        self.live.set(live)
        self.bytes.set(state_bytes)

    def sequence_freed(self, reason):
        self.freed[reason].increment(1)


def read_request(request):
    """Controls, the optional inputs present (by name) and the parameters of one request."""
    def control(name):
        return int(backend_array(pb_utils.get_input_tensor_by_name(request, name)).reshape(-1)[0])

    tensors = {}
    for name in INPUT_NAMES:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            tensors[name] = backend_array(tensor).copy()    # a sequence may keep it (e.g. a template anchor)
    return RawRequest(corrid=control("CORRID"), start=bool(control("START")), end=bool(control("END")),
                      tensors=tensors, parameters=parse_parameters(request.parameters()))


def to_response(outcome):
    if isinstance(outcome, Failure):
        return error_response(pb_utils, outcome)
    tensors = [backend_tensor(pb_utils, "frame_index", np.array([[outcome.frame_index]], dtype=np.int64))]
    if outcome.image is not None:
        tensors.append(backend_tensor(pb_utils, "image", outcome.image[None]))
    return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.runner = BlsRunner(pb_utils, config_parameter(config, "network_config"),
                                config_parameter(config, "bls_tensors", "numpy"))
        self.metrics = SequenceMetrics(args["model_name"], args["model_version"])
        self.backend = PipelineBackend.from_config(config, self.runner, self.metrics)
        self.metrics.sequences_changed(0, 0)

    async def execute(self, requests):
        self.runner.loop = asyncio.get_running_loop()
        raws, outcomes = [], {}
        for i, request in enumerate(requests):
            try:
                raws.append((i, read_request(request)))
            except ValueError as exc:    # parameters that are not a JSON object
                outcomes[i] = Failure(f"bad request parameters: {exc}")
        for (i, _), outcome in zip(raws, await self.backend.execute([raw for _, raw in raws])):
            outcomes[i] = outcome
        return [to_response(outcomes[i]) for i in range(len(requests))]

    def finalize(self):
        self.backend.close()
        # metric objects must go while the stub can still talk to the server: freed later, at interpreter exit,
        # they crash the stub
        self.backend = self.metrics = None
