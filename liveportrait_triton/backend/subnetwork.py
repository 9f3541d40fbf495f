"""One served sub-network: the runtime plan entry its config.pbtxt reports (runtime, device, precision, artefact),
built by runtimes.create_subnetwork, checked against the spec, batched across requests. A torch entry on a CUDA
device takes and answers torch tensors on that device (its inputs arrive in GPU memory, as BLS sends them)."""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np

from .. import runtimes, spec
from ..arrays import concatenate, is_torch
from .model_config import ConfigError, check_model_config, config_parameter, config_parameters
from .outcomes import Failure


def thread_count(model_config: dict) -> int:
    """The `threads` parameter, or (0) the cores this process may use shared by `models_at_once` models."""
    name = model_config.get("name")
    values = {key: config_parameter(model_config, key, default) for key, default in
              (("threads", "0"), ("models_at_once", "1"))}
    for key, value in values.items():
        if not value.isdigit():
            raise ConfigError(f"model {name!r}: parameter {key} must be a non-negative integer, got {value!r}")
    return runtimes.served_threads(int(values["threads"]), int(values["models_at_once"]))


class Subnetwork:
    """One served sub-network on its plan entry: request batching and NaN/Inf refusal."""

    def __init__(self, runner: runtimes.SubnetworkRunner, fallback: str | None = None):
        self.runner = runner
        self.spec = runner.model_spec
        self.fallback = fallback      # why it runs another entry than its config's (runtimes.native_entry)

    @property
    def entry(self) -> runtimes.RuntimePlanEntry:
        return self.runner.entry

    @classmethod
    def load(cls, model_spec: spec.ModelSpec, entry: runtimes.RuntimePlanEntry, version_dir: str | Path,
             threads: int | None = None, machine: str | None = None) -> "Subnetwork":
        """The entry's artefact in version_dir on the entry's kind; ConfigError naming what does not fit. An entry
        whose precision this CPU cannot run natively loads its exact entry instead (runtimes.native_entry; the
        same kind in fp32 where export did not write that entry's artefact), and says so in `fallback`.
        `machine`: the CPU's class (precision.machine_class), default this machine's."""
        try:
            native, fallback = runtimes.native_entry(entry, machine)
            if fallback and not (Path(version_dir) / native.artefact).is_file():
                fallback += f"; export wrote no {native.artefact} for it, so {entry.kind}/fp32"
                native = runtimes.RuntimePlanEntry.of(model_spec.name, entry.kind, entry.device, "fp32")
            entry = native
        except runtimes.RuntimeLoadError as exc:
            raise ConfigError(f"model {model_spec.name!r}: {exc}") from exc
        path = Path(version_dir) / entry.artefact
        if not path.is_file():
            raise ConfigError(f"model {model_spec.name!r}: {path} not found (runtime {entry.kind!r}; run "
                              f"`liveportrait-triton export`)")
        try:
            return cls(runtimes.create_subnetwork(entry, model_spec, artefact=path, threads=threads), fallback)
        except runtimes.RuntimeLoadError as exc:
            raise ConfigError(f"model {model_spec.name!r}: {exc}") from exc

    @classmethod
    def from_config(cls, model_config: dict, version_dir: str | Path) -> "Subnetwork":
        """Validate a sub-network's config.pbtxt (Triton's JSON form), read its plan entry and load it."""
        name = model_config.get("name")
        specs = spec.submodel_specs(config_parameter(model_config, "network_config"), spec.SUBJECTS)
        if name not in specs:
            raise ConfigError(f"{name!r} is not a served sub-network; expected one of {list(specs)}")
        check_model_config(model_config, specs[name])
        try:
            entry = runtimes.RuntimePlanEntry.from_parameters(name, config_parameters(model_config))
        except runtimes.RuntimeLoadError as exc:
            raise ConfigError(f"model {name!r}: {exc}") from exc
        return cls.load(specs[name], entry, version_dir, thread_count(model_config))

    def run_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenate the requests' inputs along the batch axis, run once, split the outputs back per request."""
        sizes = [int(r[self.spec.inputs[0].name].shape[0]) for r in requests]
        feeds = {t.name: concatenate([r[t.name] for r in requests]) if len(requests) > 1 else requests[0][t.name]
                 for t in self.spec.inputs}
        outputs = self.runner.run(feeds)
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
