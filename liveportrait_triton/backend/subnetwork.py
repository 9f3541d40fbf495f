"""One served sub-network on a runtime (its ONNX file on ONNX Runtime, or our PyTorch modules on a device),
checked against the spec, batched across requests."""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np

from .. import spec
from ..arrays import concatenate, is_torch
from .model_config import ConfigError, check_model_config, config_parameter
from .outcomes import Failure


RUNTIMES = ("onnxruntime", "torch")


def subnetwork_from_config(model_config: dict, version_dir: str | Path):
    """The served sub-network a config.pbtxt asks for (parameter `runtime`, default onnxruntime)."""
    runtime = config_parameter(model_config, "runtime", "onnxruntime")
    if runtime not in RUNTIMES:
        raise ConfigError(f"model {model_config.get('name')!r}: runtime must be one of {list(RUNTIMES)}, "
                          f"got {runtime!r}")
    return (TorchSubnetwork if runtime == "torch" else OnnxSubnetwork).from_config(model_config, version_dir)


def _checked_spec(model_config: dict) -> spec.ModelSpec:
    name = model_config.get("name")
    specs = spec.submodel_specs(config_parameter(model_config, "network_config"))
    if name not in specs:
        raise ConfigError(f"{name!r} is not a served sub-network; expected one of {list(specs)}")
    check_model_config(model_config, specs[name])
    return specs[name]


class BatchedSubnetwork:
    """Batching across requests and the NaN/Inf refusal, over `_run(feeds) -> {output: tensor}` of a runtime."""
    spec: spec.ModelSpec

    def _run(self, feeds: dict) -> dict:
        raise NotImplementedError

    def run_requests(self, requests: list[dict]) -> list[dict]:
        """Concatenate the requests' inputs along the batch axis, run once, split the outputs back per request."""
        sizes = [int(r[self.spec.inputs[0].name].shape[0]) for r in requests]
        feeds = {t.name: concatenate([r[t.name] for r in requests]) for t in self.spec.inputs}
        outputs = self._run(feeds)
        bounds = np.cumsum(sizes)[:-1].tolist()
        split = {name: (array.tensor_split(bounds) if is_torch(array) else np.split(array, bounds))
                 for name, array in outputs.items()}
        return [{name: split[name][i] for name in self.spec.output_names} for i in range(len(requests))]

    def non_finite_inputs(self, request: dict) -> list[str]:
        """Names of the request's float inputs holding NaN or Inf (the networks would return garbage for them)."""
        bad = []
        for t in self.spec.inputs:
            value = request[t.name]
            if t.numpy_dtype.kind == "f" and not bool((value.isfinite() if is_torch(value)
                                                        else np.isfinite(value)).all()):
                bad.append(t.name)
        return bad

    def serve_requests(self, requests: list[dict]) -> list:
        """One outcome per request: its outputs, or a Failure. Requests with NaN/Inf inputs are refused alone
        (caller fault); the others run together; a runtime error fails them with the traceback kept as detail
        for the server log."""
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


class TorchSubnetwork(BatchedSubnetwork):
    """One served sub-network on our PyTorch modules (torch_cuda.TorchCudaRunner: a CUDA device in fp16 with CUDA
    graphs, or the CPU), weights from the official checkpoint layout. Tensors stay on its device."""

    def __init__(self, model_spec: spec.ModelSpec, runner):
        self.spec = model_spec
        self.runner = runner

    @classmethod
    def from_config(cls, model_config: dict, version_dir: str | Path) -> "TorchSubnetwork":
        """Parameters: weights_dir (official layout), device (cuda, cuda:N or cpu), precision (fp32/fp16/bf16)."""
        from ..torch_cuda import PRECISIONS, TorchCudaRunner
        from ..weights import load_networks
        model_spec = _checked_spec(model_config)
        precision = config_parameter(model_config, "precision", "fp16")
        if precision not in PRECISIONS:
            raise ConfigError(f"model {model_spec.name!r}: precision must be one of {list(PRECISIONS)}")
        weights = Path(config_parameter(model_config, "weights_dir"))
        if not weights.is_dir():
            raise ConfigError(f"model {model_spec.name!r}: weights_dir {weights} does not exist")
        networks = load_networks(weights, config_parameter(model_config, "network_config"))
        return cls(model_spec, TorchCudaRunner(networks, config_parameter(model_config, "device", "cuda"), precision))

    def _run(self, feeds: dict) -> dict:
        return self.runner.run(self.spec.name, feeds)


class OnnxSubnetwork(BatchedSubnetwork):
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
        model_spec = _checked_spec(model_config)
        name = model_spec.name
        threads = config_parameter(model_config, "intra_op_threads", "0")
        if not threads.isdigit():
            raise ConfigError(f"model {name!r}: intra_op_threads must be a non-negative integer, got {threads!r}")
        onnx_file = config_parameter(model_config, "onnx_file")
        return cls(model_spec, Path(version_dir) / onnx_file, int(threads))

    def _run(self, feeds: dict) -> dict:
        feeds = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.numpy_dtype) for t in self.spec.inputs}
        return dict(zip(self.spec.output_names, self.session.run(self.spec.output_names, feeds)))
