"""CPU runtimes for the local target's sub-networks, behind one interface, so each can run on the fastest one.

Every candidate runtime is wrapped as a `Session` for one served sub-network: `run({input: array}) -> {output:
array}`, inputs and outputs bound by the names in `spec`, batch dimension free. `create_session(kind, model, ...)`
builds one; `RuntimeRunner` puts a session per sub-network behind the `pipeline.Runner` interface, so the same
`Animator` runs on any mix of runtimes. Which kind serves which sub-network is decided by measurement
(`liveportrait-triton bench --runtime-choice`, results in benchmarks/results/runtime_choice.md), with parity against
PyTorch eager checked by `parity`.

Kinds:
- `torch`: our PyTorch modules, eager (the parity reference).
- `torch_channels_last`: the same with weights and inputs in channels-last memory format (oneDNN's blocked paths).
- `torchscript`: `torch.jit.trace` of the served module, then `torch.jit.freeze` (folds constants, fuses ops).
- `onnxruntime`: the exported ONNX file in ONNX Runtime's CPU provider, all graph optimisations, sequential
  execution, memory arena, no spin-waiting of idle pool threads (they would steal the cores other models need).
- `openvino`: the exported ONNX file compiled by OpenVINO for CPU in f32 (no bf16 down-casting).
Torch kinds need the loaded `Networks`; ONNX kinds need the exported `model.onnx`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from . import spec

KINDS = {
    "torch": "PyTorch eager",
    "torch_channels_last": "PyTorch eager, channels-last weights and inputs",
    "torchscript": "TorchScript trace, frozen",
    "onnxruntime": "ONNX Runtime CPU, ORT_ENABLE_ALL, sequential, no spinning",
    "openvino": "OpenVINO CPU, f32",
}
TORCH_KINDS = ("torch", "torch_channels_last", "torchscript")
ONNX_KINDS = ("onnxruntime", "openvino")


class Session:
    """One sub-network on one runtime, bound by spec names."""

    def __init__(self, kind: str, model_spec: spec.ModelSpec, forward: Callable[[list[np.ndarray]], list[np.ndarray]]):
        self.kind = kind
        self.model_spec = model_spec
        self._forward = forward

    @property
    def model(self) -> str:
        return self.model_spec.name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.model_spec.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.model}: missing input(s) {missing}; it takes {self.model_spec.input_names}")
        arrays = [np.ascontiguousarray(inputs[t.name], dtype=t.numpy_dtype) for t in self.model_spec.inputs]
        batch = {a.shape[0] for a in arrays}
        if len(batch) != 1:
            raise ValueError(f"{self.model}: inputs disagree on the batch size: "
                             f"{ {t.name: a.shape for t, a in zip(self.model_spec.inputs, arrays)} }")
        for t, a in zip(self.model_spec.inputs, arrays):
            if a.shape[1:] != t.shape:
                raise ValueError(f"{self.model}: input {t.name!r} has shape {list(a.shape)}, "
                                 f"expected [batch, {', '.join(map(str, t.shape))}]")
        outputs = self._forward(arrays)
        return dict(zip(self.model_spec.output_names, outputs))


def create_session(kind: str, model: str, *, networks=None, onnx_path: str | os.PathLike | None = None,
                   threads: int | None = None) -> Session:
    """A Session running `model` (a served sub-network name) on runtime `kind` (one of KINDS).

    `networks` (weights.Networks) is needed by the torch kinds, `onnx_path` (the exported model.onnx) by the
    ONNX kinds. `threads` sets the runtime's intra-op threads; for torch kinds that is process-wide.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown runtime {kind!r}; choose one of {list(KINDS)}")
    if kind in TORCH_KINDS:
        if networks is None:
            raise ValueError(f"runtime {kind!r} runs our PyTorch modules: pass networks=load_networks(...)")
        model_spec = spec.submodel_specs(networks.params).get(model)
        if model_spec is None:
            raise KeyError(f"unknown model {model!r}; served models: {list(spec.SUBMODELS)}")
        return Session(kind, model_spec, _torch_forward(kind, networks, model_spec, threads))
    if onnx_path is None or not Path(onnx_path).is_file():
        raise FileNotFoundError(f"runtime {kind!r} needs the exported ONNX file of {model!r}, got {onnx_path!r}: "
                                "run `liveportrait-triton export` first")
    forward, model_spec = (_onnxruntime_forward if kind == "onnxruntime" else _openvino_forward)(
        model, Path(onnx_path), threads)
    return Session(kind, model_spec, forward)


class RuntimeRunner:
    """pipeline.Runner over one Session per sub-network (any mix of kinds)."""

    def __init__(self, sessions: dict[str, Session]):
        self.sessions = sessions

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if model not in self.sessions:
            raise KeyError(f"no session for model {model!r}; this runner has {sorted(self.sessions)}")
        return self.sessions[model].run(inputs)


def create_runner(choice: str | dict[str, str], *, networks=None, repository: str | os.PathLike | None = None,
                  threads: int | None = None) -> RuntimeRunner:
    """A RuntimeRunner for every served sub-network: `choice` is one kind for all, or {model: kind}."""
    kinds = {m: choice for m in spec.SUBMODELS} if isinstance(choice, str) else dict(choice)
    missing = [m for m in spec.SUBMODELS if m not in kinds]
    if missing:
        raise ValueError(f"no runtime chosen for {missing}")
    return RuntimeRunner({m: create_session(k, m, networks=networks, threads=threads,
                                            onnx_path=None if repository is None else onnx_file(repository, m))
                          for m, k in kinds.items()})


def onnx_file(repository: str | os.PathLike, model: str) -> Path:
    """Where `liveportrait-triton export` puts a sub-network's ONNX file."""
    return Path(repository) / model / "1" / "model.onnx"


def parity(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], model: str) -> dict[str, tuple]:
    """{output: (max abs diff, bound, ok)} against the reference (PyTorch eager) outputs.

    Bounds are the export's per-output tolerances (relative to max(1, max |reference|)), the same ones every
    exported graph must meet, so a runtime is accepted only where it is as faithful as the export itself.
    """
    from .export.validate import TOLERANCES
    result = {}
    for name, ref in reference.items():
        diff = float(np.max(np.abs(outputs[name].astype(np.float64) - ref))) if ref.size else 0.0
        bound = TOLERANCES[(model, name)] * max(1.0, float(np.max(np.abs(ref))))
        result[name] = (diff, bound, diff <= bound)
    return result


# ---------------------------------------------------------------------------------------------------------------
def _torch_forward(kind: str, networks, model_spec: spec.ModelSpec, threads: int | None):
    import torch

    from .export.served import ServedModel
    if threads:
        torch.set_num_threads(threads)
    if kind == "torch_channels_last":
        networks = copy.copy(networks)
        served = copy.deepcopy(ServedModel(networks, model_spec))
        _to_channels_last(served)
    else:
        served = ServedModel(networks, model_spec)
    served.eval()
    if kind == "torchscript":
        example = [torch.zeros((2, *t.shape)) for t in model_spec.inputs]
        with torch.no_grad():
            served = torch.jit.freeze(torch.jit.trace(served, tuple(example), check_trace=False).eval())
    channels_last = kind == "torch_channels_last"

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(a) for a in arrays]
        if channels_last:
            tensors = [_channels_last(t) for t in tensors]
        with torch.inference_mode():
            outputs = served(*tensors)
        return [o.contiguous().numpy() for o in outputs]
    return forward


def _channels_last(t):
    import torch
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def _to_channels_last(module) -> None:
    """Convolution weights to channels-last (2-D) / channels-last-3d (3-D) in place."""
    import torch
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            m.weight.data = _channels_last(m.weight.data)


def _onnxruntime_forward(model: str, path: Path, threads: int | None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = True
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model_spec = _spec_from_file(model, {i.name: tuple(i.shape[1:]) for i in session.get_inputs()},
                                 {o.name: tuple(o.shape[1:]) for o in session.get_outputs()})
    names = model_spec.output_names

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(names, dict(zip(model_spec.input_names, arrays)))
    return forward, model_spec


def _openvino_forward(model: str, path: Path, threads: int | None):
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    wanted = spec.submodel_specs("full").get(model)
    names = set(wanted.input_names + wanted.output_names) if wanted else set()

    def ports(port_list):
        """{spec name: port}; OpenVINO ports carry several names, one of them the ONNX graph's I/O name."""
        out = {}
        for port in port_list:
            name = next(iter(sorted(port.get_names() & names)), port.get_any_name())
            out[name] = port
        return out
    in_ports, out_ports = ports(compiled.inputs), ports(compiled.outputs)

    def shapes(by_name):
        return {n: tuple(d.get_length() if d.is_static else -1 for d in list(p.get_partial_shape())[1:])
                for n, p in by_name.items()}
    model_spec = _spec_from_file(model, shapes(in_ports), shapes(out_ports))
    request = compiled.create_infer_request()

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        request.infer({in_ports[n]: a for n, a in zip(model_spec.input_names, arrays)})
        return [np.array(request.get_tensor(out_ports[n]).data) for n in model_spec.output_names]
    return forward, model_spec


def _spec_from_file(model: str, inputs: dict[str, tuple], outputs: dict[str, tuple]) -> spec.ModelSpec:
    """The served model's spec with the per-item shapes an ONNX file declares (tiny or full export).

    Names must be the spec's; the file's shapes (batch dim dropped) replace the spec's so either configuration binds.
    """
    reference = spec.submodel_specs("full").get(model)
    if reference is None:
        raise KeyError(f"unknown model {model!r}; served models: {list(spec.SUBMODELS)}")
    if set(inputs) != set(reference.input_names) or set(outputs) != set(reference.output_names):
        raise ValueError(f"ONNX file of {model!r} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                         f"the spec says {reference.input_names} and {reference.output_names}")
    return spec.ModelSpec(model,
                          tuple(dataclasses.replace(t, shape=inputs[t.name]) for t in reference.inputs),
                          tuple(dataclasses.replace(t, shape=_static(outputs[t.name], t.shape))
                                for t in reference.outputs))


def _static(shape: tuple, fallback: tuple) -> tuple:
    """A file's declared shape if every dim is a number, else `fallback` (outputs may carry symbolic dims)."""
    return shape if all(isinstance(d, int) and d >= 0 for d in shape) else fallback
