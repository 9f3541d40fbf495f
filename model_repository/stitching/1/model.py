"""Triton Python-backend adapter of one LivePortrait sub-network (the same file for every one).

Generated into the repository by liveportrait_triton.repository; the logic (config checks, the runtime kind its
`runtime` parameter names, NaN/Inf refusal, batching across requests) is
liveportrait_triton.backend.subnetwork.Subnetwork.
"""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from liveportrait_triton.backend.outcomes import Failure
from liveportrait_triton.backend.subnetwork import Subnetwork
from liveportrait_triton.backend.tensors import backend_array, backend_tensor


def to_response(outcome):
    if isinstance(outcome, Failure):
        if outcome.detail:
            pb_utils.Logger.log_error(f"{outcome.message}\n{outcome.detail}")
        code = pb_utils.TritonError.INVALID_ARG if outcome.caller_fault else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(outcome.message, code))
    return pb_utils.InferenceResponse(output_tensors=[backend_tensor(pb_utils, name, array)
                                                      for name, array in outcome.items()])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.network = Subnetwork.from_config(config, Path(args["model_repository"]) / args["model_version"])

    def execute(self, requests):
        inputs = [{name: backend_array(pb_utils.get_input_tensor_by_name(request, name))
                   for name in self.network.spec.input_names} for request in requests]
        return [to_response(outcome) for outcome in self.network.serve_requests(inputs)]
