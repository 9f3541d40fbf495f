"""Triton Python-backend adapter of one LivePortrait sub-network: `TritonPythonModel`, which every sub-network's
generated `model.py` imports (Triton looks the class up there).

It only adapts Triton: the logic (config checks, the runtime plan entry its parameters report, NaN/Inf refusal,
batching across requests) is `backend.subnetwork`. `triton_python_backend_utils` exists only inside a
Python-backend stub, so only the stub imports this module.
"""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from liveportrait_triton.backend.outcomes import Failure, error_response
from liveportrait_triton.backend.subnetwork import Subnetwork
from liveportrait_triton.backend.tensors import backend_tensor, backend_value


def to_response(outcome):
    if isinstance(outcome, Failure):
        return error_response(pb_utils, outcome)
    return pb_utils.InferenceResponse(output_tensors=[backend_tensor(pb_utils, name, array)
                                                      for name, array in outcome.items()])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.network = Subnetwork.from_config(config, Path(args["model_repository"]) / args["model_version"])
        if self.network.fallback:
            pb_utils.Logger.log_warn(f"liveportrait_triton runtime plan: {self.network.fallback}")
        pb_utils.Logger.log_info(f"liveportrait_triton runtime plan: {self.network.entry.describe()}")

    def execute(self, requests):
        inputs = [{name: backend_value(pb_utils.get_input_tensor_by_name(request, name))
                   for name in self.network.spec.input_names} for request in requests]
        return [to_response(outcome) for outcome in self.network.serve_requests(inputs)]
