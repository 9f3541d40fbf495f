"""One served sub-network: its exported file on a runtime, checked against the spec, batched across requests."""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np

from .. import spec
from .model_config import ConfigError, check_model_config, config_parameter
from .outcomes import Failure


class OnnxSubnetwork:
    """One served sub-network: its ONNX file on ONNX Runtime, checked against the spec, batched across requests."""

    def __init__(self, model_spec: spec.ModelSpec, onnx_path: str | Path, intra_op_threads: int = 0):
        import onnxruntime as ort
        path = Path(onnx_path)
        if not path.is_file():
            raise ConfigError(f"model {model_spec.name!r}: {path} not found (run `liveportrait-triton export`)")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.spec = model_spec
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_in = [i.name for i in self.session.get_inputs()]
        graph_out = [o.name for o in self.session.get_outputs()]
        if sorted(graph_in) != sorted(model_spec.input_names) or sorted(graph_out) != sorted(model_spec.output_names):
            raise ConfigError(f"model {model_spec.name!r}: {path.name} has inputs {graph_in} and outputs {graph_out}, "
                              f"the spec says {model_spec.input_names} and {model_spec.output_names}")

    @classmethod
    def from_config(cls, model_config: dict, version_dir: str | Path) -> "OnnxSubnetwork":
        """Validate a sub-network's config.pbtxt (Triton's JSON form) and load its ONNX file from version_dir."""
        name = model_config.get("name")
        network_config = config_parameter(model_config, "network_config")
        specs = spec.submodel_specs(network_config)
        if name not in specs:
            raise ConfigError(f"{name!r} is not a served sub-network; expected one of {list(specs)}")
        check_model_config(model_config, specs[name])
        threads = config_parameter(model_config, "intra_op_threads", "0")
        if not threads.isdigit():
            raise ConfigError(f"model {name!r}: intra_op_threads must be a non-negative integer, got {threads!r}")
        onnx_file = config_parameter(model_config, "onnx_file")
        return cls(specs[name], Path(version_dir) / onnx_file, int(threads))

    def run_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenate the requests' inputs along the batch axis, run once, split the outputs back per request."""
        sizes = [int(r[self.spec.inputs[0].name].shape[0]) for r in requests]
        feeds = {t.name: np.ascontiguousarray(np.concatenate([r[t.name] for r in requests]), dtype=t.numpy_dtype)
                 for t in self.spec.inputs}
        outputs = dict(zip(self.spec.output_names, self.session.run(self.spec.output_names, feeds)))
        bounds = np.cumsum(sizes)[:-1]
        split = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: split[name][i] for name in self.spec.output_names} for i in range(len(requests))]

    def non_finite_inputs(self, request: dict[str, np.ndarray]) -> list[str]:
        """Names of the request's float inputs holding NaN or Inf (the networks would return garbage for them)."""
        return [t.name for t in self.spec.inputs
                if t.numpy_dtype.kind == "f" and not np.isfinite(request[t.name]).all()]

    def serve_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | "Failure"]:
        """One outcome per request: its outputs, or a Failure. Requests with NaN/Inf inputs are refused alone
        (caller fault); the others run together; an ONNX Runtime error fails them with the traceback kept as
        detail for the server log."""
        outcomes: list = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            bad = self.non_finite_inputs(request)
            if bad:
                outcomes[i] = Failure(f"{self.spec.name}: input(s) {bad} contain NaN or Inf")
            else:
                valid.append(i)
        if valid:
            try:
                results = self.run_requests([requests[i] for i in valid])
            except Exception as exc:
                results = [Failure(f"{self.spec.name}: {exc}", False, traceback.format_exc())] * len(valid)
            for i, result in zip(valid, results):
                outcomes[i] = result
        return outcomes
