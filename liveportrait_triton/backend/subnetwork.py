"""One served sub-network: its artefact on the runtime kind its config names (or, with `runtime: torch`, our
PyTorch modules from a weights directory on a device, tensors kept there), checked against the spec, batched
across requests."""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np

from .. import runtimes, spec
from ..arrays import concatenate, is_torch
from ..repository import SERVED_KINDS
from .model_config import ConfigError, check_model_config, config_parameter
from .outcomes import Failure


def thread_count(model_config: dict) -> int:
    """The `threads` parameter, or (0) the cores this process may use shared by `models_at_once` models."""
    name = model_config.get("name")
    values = {key: config_parameter(model_config, key, default) for key, default in
              (("threads", "0"), ("models_at_once", "1"))}
    for key, value in values.items():
        if not value.isdigit():
            raise ConfigError(f"model {name!r}: parameter {key} must be a non-negative integer, got {value!r}")
    threads, sharing = int(values["threads"]), max(1, int(values["models_at_once"]))
    return threads or max(1, runtimes.default_threads() // sharing)


class Subnetwork:
    """One served sub-network on any kind of the runtime layer: request batching and NaN/Inf refusal."""

    def __init__(self, runner: runtimes.SubnetworkRunner):
        self.runner = runner
        self.spec = runner.model_spec

    @classmethod
    def load(cls, model_spec: spec.ModelSpec, kind: str, version_dir: str | Path, threads: int | None = None,
             target: str = "local") -> "Subnetwork":
        """The artefact of `kind` in version_dir on that kind; ConfigError naming what does not fit."""
        if kind not in SERVED_KINDS[target]:
            raise ConfigError(f"model {model_spec.name!r}: runtime {kind!r} is not servable here; the "
                              f"{target} target serves {list(SERVED_KINDS[target])} (see repository.py)")
        path = Path(version_dir) / runtimes.ARTEFACT[kind]
        if not path.is_file():
            raise ConfigError(f"model {model_spec.name!r}: {path} not found (runtime {kind!r}; run "
                              f"`liveportrait-triton export`)")
        try:
            return cls(runtimes.create_subnetwork(kind, model_spec, artefact=path, threads=threads))
        except runtimes.RuntimeLoadError as exc:
            raise ConfigError(f"model {model_spec.name!r}: {exc}") from exc

    @classmethod
    def from_config(cls, model_config: dict, version_dir: str | Path) -> "Subnetwork":
        """Validate a sub-network's config.pbtxt (Triton's JSON form) and load its artefact from version_dir."""
        name = model_config.get("name")
        specs = spec.submodel_specs(config_parameter(model_config, "network_config"))
        if name not in specs:
            raise ConfigError(f"{name!r} is not a served sub-network; expected one of {list(specs)}")
        check_model_config(model_config, specs[name])
        kind = config_parameter(model_config, "runtime")
        return cls.load(specs[name], kind, version_dir, thread_count(model_config))

    def _run(self, feeds: dict) -> dict:
        return self.runner.run(feeds)

    def run_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenate the requests' inputs along the batch axis, run once, split the outputs back per request."""
        sizes = [int(r[self.spec.inputs[0].name].shape[0]) for r in requests]
        feeds = {t.name: concatenate([r[t.name] for r in requests]) if len(requests) > 1 else requests[0][t.name]
                 for t in self.spec.inputs}
        outputs = self._run(feeds)
        bounds = np.cumsum(sizes)[:-1].tolist()
        split = {name: (array.tensor_split(bounds) if is_torch(array) else np.split(array, bounds))
                 for name, array in outputs.items()}
        return [{name: split[name][i] for name in self.spec.output_names} for i in range(len(requests))]

    def non_finite_inputs(self, request: dict[str, np.ndarray]) -> list[str]:
        """Names of the request's float inputs holding NaN or Inf (the networks would return garbage for them)."""
        return [t.name for t in self.spec.inputs if t.numpy_dtype.kind == "f" and not bool(
            (request[t.name].isfinite() if is_torch(request[t.name]) else np.isfinite(request[t.name])).all())]

    def serve_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | "Failure"]:
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


class TorchSubnetwork(Subnetwork):
    """One served sub-network on our PyTorch modules (torch_cuda.TorchCudaRunner: a CUDA device in fp16 with CUDA
    graphs, or the CPU), weights from the official checkpoint layout; torch tensors in and out stay on its device."""

    def __init__(self, model_spec: spec.ModelSpec, runner):
        self.spec = model_spec
        self.runner = runner

    @classmethod
    def from_config(cls, model_config: dict, version_dir: str | Path) -> "TorchSubnetwork":
        """Parameters: weights_dir (official layout), device (cuda, cuda:N or cpu), precision (fp32/fp16/bf16)."""
        from ..torch_cuda import PRECISIONS, TorchCudaRunner
        from ..weights import load_networks
        name = model_config.get("name")
        network_config = config_parameter(model_config, "network_config")
        specs = spec.submodel_specs(network_config)
        if name not in specs:
            raise ConfigError(f"{name!r} is not a served sub-network; expected one of {list(specs)}")
        check_model_config(model_config, specs[name])
        precision = config_parameter(model_config, "precision", "fp16")
        if precision not in PRECISIONS:
            raise ConfigError(f"model {name!r}: precision must be one of {list(PRECISIONS)}")
        weights = Path(config_parameter(model_config, "weights_dir"))
        if not weights.is_dir():
            raise ConfigError(f"model {name!r}: weights_dir {weights} does not exist")
        networks = load_networks(weights, network_config)
        return cls(specs[name], TorchCudaRunner(networks, config_parameter(model_config, "device", "cuda"), precision))

    def _run(self, feeds: dict) -> dict:
        return self.runner.run(self.spec.name, feeds)


def subnetwork_from_config(model_config: dict, version_dir: str | Path) -> Subnetwork:
    """The served sub-network a config.pbtxt asks for: our PyTorch modules from the official checkpoints in its
    `weights_dir` on a device (ServingOptions.subnetwork_runtime="torch"), or a kind of the runtime layer running
    the file export wrote for it."""
    if config_parameter(model_config, "weights_dir", ""):
        return TorchSubnetwork.from_config(model_config, version_dir)
    return Subnetwork.from_config(model_config, version_dir)
