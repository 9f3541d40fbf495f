"""The one runtime layer: (sub-network spec, artefact or networks, runtime kind, device, threads) -> a runner.

Everything that runs a sub-network goes through `create_subnetwork`: the served sub-network models
(backend/subnetwork.py), the in-process pipeline (`pipeline.TorchRunner`, `pipeline.OnnxRunner`), export
validation, the TensorRT checks and the benchmarks. A `SubnetworkRunner` takes and returns tensors bound by the
spec's names (`run({input: array}) -> {output: array}`, batch dimension free); `ModelRunner` puts one per
sub-network behind the `pipeline.Runner` interface, so the same `Animator` runs on any mix of kinds.

Kinds:
- `onnxruntime`: the exported model.onnx in ONNX Runtime's CPU provider; all graph optimisations, sequential
  execution, explicit intra-op threads, one inter-op thread, and no spin-waiting of idle pool threads (spinning
  threads steal the cores the other models' processes need).
- `openvino`: the exported model.onnx compiled by OpenVINO for CPU in f32 (no bf16 down-casting: it breaks the
  grid-sample gather indices), latency hint, explicit thread count, threads not pinned to cores, compiled at batch 1 and run
  item by item (batches gain nothing per item on the CPU).
- `openvino_fastconv`: OpenVINO as above on model_fastconv.onnx, the export of our modules with the fast
  convolution forms ONNX can express (Winograd, low-resolution SPADE; no FFT), export/onnx_export.py
  `export_fastconv_model`. Built from `networks` (a temporary export) when no file is given.
- `torch`: our PyTorch modules (export/served.py `ServedModel`, the same call the ONNX export traces), eager, on
  `device`. `_torch_forward` is the one place that builds it (a CUDA flavour hooks in there).
- `torch_fastconv`: the same modules with their heavy convolutions rewritten as faster algorithms computing the
  same function (networks/fast_convolution.py: Winograd, FFT, low-resolution SPADE), CPU. Served from the network
  file export writes (`model.pt`), as is `torch`.
- `tensorrt`: a model.plan engine on a CUDA GPU (needs `tensorrt` and a CUDA build of PyTorch; see
  export/tensorrt_build.py).

`threads=None` means `default_threads()`: every core this process may use. Torch's thread count is process-wide.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from . import spec

KINDS = {
    "onnxruntime": "ONNX Runtime CPU, ORT_ENABLE_ALL, sequential, no spinning",
    "openvino": "OpenVINO CPU, f32, latency hint",
    "openvino_fastconv": "OpenVINO CPU, f32, the graph with Winograd / DFT / low-resolution SPADE convolutions",
    "torch": "PyTorch eager (our modules)",
    "torch_fastconv": "PyTorch eager, convolutions by Winograd / FFT / low-resolution SPADE (CPU)",
    "tensorrt": "TensorRT engine (CUDA GPU)",
}
ONNX_KINDS = ("onnxruntime", "openvino", "openvino_fastconv")    # run an exported ONNX file
TORCH_KINDS = ("torch", "torch_fastconv")    # run our PyTorch modules
NETWORK_KINDS = TORCH_KINDS + ("openvino_fastconv",)              # can be built from loaded networks alone
ONNX_FILENAME = "model.onnx"
FASTCONV_ONNX_FILENAME = "model_fastconv.onnx"
PLAN_FILENAME = "model.plan"
TORCH_FILENAME = "model.pt"                  # weights.save_network_file
ARTEFACT = {"onnxruntime": ONNX_FILENAME, "openvino": ONNX_FILENAME, "openvino_fastconv": FASTCONV_ONNX_FILENAME,
            "tensorrt": PLAN_FILENAME,
            "torch": TORCH_FILENAME, "torch_fastconv": TORCH_FILENAME}


class RuntimeLoadError(ValueError):
    """A runner that cannot be built: unknown kind, missing artefact, a graph that is not the spec, no GPU."""


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def available_kinds() -> list[str]:
    """The kinds that can run on this machine (tensorrt only with the package and a CUDA GPU)."""
    import importlib.util
    kinds = ["onnxruntime", *TORCH_KINDS]
    if importlib.util.find_spec("openvino") is not None:
        kinds[1:1] = ["openvino", "openvino_fastconv"]
    if importlib.util.find_spec("tensorrt") is not None:
        import torch
        if torch.cuda.is_available():
            kinds.append("tensorrt")
    return kinds


def artefact_path(repository: str | os.PathLike, model: str, kind: str) -> Path:
    """Where `liveportrait-triton export` (or `tensorrt`) puts the file kind `kind` runs for `model`."""
    return Path(repository) / model / "1" / ARTEFACT[kind]


class SubnetworkRunner:
    """One sub-network on one runtime kind, tensors bound by spec name."""

    def __init__(self, kind: str, model_spec: spec.ModelSpec, device: str, threads: int,
                 forward: Callable[[list[np.ndarray]], list[np.ndarray]], session=None):
        self.kind = kind
        self.model_spec = model_spec
        self.device = device
        self.threads = threads
        self.session = session     # the runtime's own object (ONNX Runtime session, compiled model, engine, module)
        self._forward = forward

    @property
    def model(self) -> str:
        return self.model_spec.name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.model_spec.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.model}: missing input(s) {missing}; it takes {self.model_spec.input_names}")
        arrays = [np.ascontiguousarray(inputs[t.name], dtype=t.numpy_dtype) for t in self.model_spec.inputs]
        if len({a.shape[0] for a in arrays}) != 1:
            raise ValueError(f"{self.model}: inputs disagree on the batch size: "
                             f"{ {t.name: a.shape for t, a in zip(self.model_spec.inputs, arrays)} }")
        for t, a in zip(self.model_spec.inputs, arrays):
            if a.shape[1:] != t.shape:
                raise ValueError(f"{self.model}: input {t.name!r} has shape {list(a.shape)}, "
                                 f"expected [batch, {', '.join(map(str, t.shape))}]")
        return dict(zip(self.model_spec.output_names, self._forward(arrays)))


def create_subnetwork(kind: str, model_spec: spec.ModelSpec, *, artefact: str | os.PathLike | bytes | None = None,
                      networks=None, device: str = "cpu", threads: int | None = None,
                      precision: str = "fp32") -> SubnetworkRunner:
    """A runner of `model_spec` on `kind`: ONNX kinds need `artefact` (the ONNX file's path; openvino_fastconv
    may instead export it from `networks`), `tensorrt` a model.plan (path or bytes), the torch kinds the loaded
    `networks` (weights.Networks) or their network file (model.pt); `torch` on a CUDA device runs in `precision`, fp16 being the official default, with CUDA graphs
    (torch_cuda). RuntimeLoadError otherwise."""
    if kind not in KINDS:
        raise RuntimeLoadError(f"unknown runtime {kind!r}; choose one of {list(KINDS)}")
    threads = threads or default_threads()
    if kind in TORCH_KINDS:
        if networks is None:
            networks = _network_file(model_spec, artefact, kind)
        if kind == "torch_fastconv" and device != "cpu":
            raise RuntimeLoadError(f"runtime 'torch_fastconv' is a CPU runtime, not for {device!r}")
        forward, session = _torch_forward(networks, model_spec, device, threads, precision,
                                          fast_convolutions=kind == "torch_fastconv")
        return SubnetworkRunner(kind, model_spec, device, threads, forward, session)
    if kind == "tensorrt":
        forward, session = _tensorrt_forward(model_spec, artefact)
        return SubnetworkRunner(kind, model_spec, "cuda", threads, forward, session)
    if device != "cpu":
        raise RuntimeLoadError(f"runtime {kind!r} runs on the CPU here, not on {device!r}")
    if kind == "openvino_fastconv" and artefact is None and networks is not None:
        forward, session = _openvino_fastconv_from_networks(model_spec, networks, threads)
        return SubnetworkRunner(kind, model_spec, device, threads, forward, session)
    if artefact is None or not Path(artefact).is_file():
        raise RuntimeLoadError(f"runtime {kind!r} needs the exported ONNX file of {model_spec.name!r}, got "
                               f"{str(artefact)!r}: run `liveportrait-triton export` first")
    build = _onnxruntime_forward if kind == "onnxruntime" else _openvino_forward
    forward, session = build(model_spec, Path(artefact), threads)
    return SubnetworkRunner(kind, model_spec, device, threads, forward, session)


class ModelRunner:
    """pipeline.Runner over one SubnetworkRunner per sub-network (any mix of kinds)."""

    def __init__(self, runners: dict[str, SubnetworkRunner]):
        self.runners = runners

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runner = self.runners.get(model)
        if runner is None:
            raise KeyError(f"no runner for model {model!r}; this one has {sorted(self.runners)}")
        return runner.run(inputs)


def create_runner(choice: str | dict[str, str], config: str | dict, *, networks=None,
                  repository: str | os.PathLike | None = None, device: str = "cpu",
                  threads: int | None = None) -> ModelRunner:
    """A ModelRunner for every served sub-network of network `config`: `choice` is one kind for all, or
    {model: kind}; artefacts come from `repository` (`<model>/1/model.onnx|plan`)."""
    kinds = {m: choice for m in spec.SUBMODELS} if isinstance(choice, str) else dict(choice)
    missing = [m for m in spec.SUBMODELS if m not in kinds]
    if missing:
        raise RuntimeLoadError(f"no runtime chosen for {missing}")
    specs = spec.submodel_specs(config)
    return ModelRunner({m: create_subnetwork(k, specs[m], networks=networks, device=device, threads=threads,
                                             artefact=None if repository is None
                                             or (k in TORCH_KINDS and networks is not None)
                                             else artefact_path(repository, m, k))
                        for m, k in kinds.items()})


# ---------------------------------------------------------------------------------------------------------------
def _check_names(model_spec: spec.ModelSpec, inputs, outputs, what: str) -> None:
    if sorted(inputs) != sorted(model_spec.input_names) or sorted(outputs) != sorted(model_spec.output_names):
        raise RuntimeLoadError(f"model {model_spec.name!r}: {what} has inputs {list(inputs)} and outputs "
                               f"{list(outputs)}, the spec says {model_spec.input_names} and "
                               f"{model_spec.output_names}")


def _network_file(model_spec: spec.ModelSpec, artefact, kind: str):
    """The networks of a torch kind's model.pt (weights.load_network_file), checked to hold `model_spec`'s."""
    from .export.served import NETWORK_FIELD
    from .weights import WeightsError, load_network_file
    if artefact is None or not Path(artefact).is_file():
        raise RuntimeLoadError(f"runtime {kind!r} runs our PyTorch modules: pass networks=load_networks(...) or "
                               f"the network file ({TORCH_FILENAME}) of {model_spec.name!r}, got {str(artefact)!r}: "
                               f"run `liveportrait-triton export` with {model_spec.name} on {kind}")
    try:
        networks = load_network_file(artefact)
    except WeightsError as exc:
        raise RuntimeLoadError(str(exc)) from exc
    if getattr(networks, NETWORK_FIELD[model_spec.name]) is None:
        raise RuntimeLoadError(f"{artefact} does not hold the network of {model_spec.name!r}")
    return networks


def _torch_forward(networks, model_spec: spec.ModelSpec, device: str, threads: int, precision: str = "fp32",
                   fast_convolutions: bool = False):
    """The torch kinds: the served module on `device` (moved there in place), inference mode, with its heavy
    convolutions rewritten (a converted copy) for torch_fastconv; on CUDA the PyTorch-CUDA runtime
    (torch_cuda.TorchCudaRunner: autocast in `precision`, CUDA graphs per batch size)."""
    import torch
    if device.startswith("cuda"):
        from .torch_cuda import TorchCudaRunner
        runner = TorchCudaRunner(networks, device, precision)

        def forward_cuda(arrays: list[np.ndarray]) -> list[np.ndarray]:
            outputs = runner.run(model_spec.name, dict(zip(model_spec.input_names, arrays)))
            return [outputs[name] for name in model_spec.output_names]
        return forward_cuda, runner

    from .export.served import ServedModel
    torch.set_num_threads(threads)
    served = ServedModel(networks, model_spec).eval().to(device)
    if fast_convolutions:
        from .networks.fast_convolution import fast_convolutions as convert
        served = convert(served)

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            outputs = served(*(torch.from_numpy(a).to(device) for a in arrays))
        return [o.cpu().numpy() for o in outputs]
    return forward, served


def _onnxruntime_forward(model_spec: spec.ModelSpec, path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise RuntimeLoadError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    _check_names(model_spec, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()],
                 path.name)
    names = model_spec.output_names
    input_names = model_spec.input_names

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(names, dict(zip(input_names, arrays)))
    return forward, session


def _openvino_forward(model_spec: spec.ModelSpec, path: Path, threads: int):
    """OpenVINO compiles the graph once at batch 1 (static shapes) and runs a batch item by item into the
    batch's output arrays. Measured on the 2-core Xeon, full size: a batch of 2-4 is no cheaper per item than
    single items (W 0.85-0.91 s/item, G 1.65-1.74 s/item with the fast convolutions), while every further
    compiled batch size costs 0.7-1.6 GB and seconds of compilation, and a dynamic-batch graph pays seconds at
    the first call of each new size and runs W 7% slower."""
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False}
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise RuntimeLoadError(f"OpenVINO cannot read {path}: {exc}") from exc
    names = set(model_spec.input_names + model_spec.output_names)

    def spec_names(port_list) -> list[str]:
        """An OpenVINO port carries several names, one of them the ONNX graph's I/O name."""
        return [next(iter(sorted(p.get_names() & names)), p.get_any_name()) for p in port_list]
    _check_names(model_spec, spec_names(model.inputs), spec_names(model.outputs), path.name)
    try:
        model.reshape({t.name: ov.PartialShape([1, *t.shape]) for t in model_spec.inputs})
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:
        raise RuntimeLoadError(f"OpenVINO cannot compile {path}: {exc}") from exc
    request = compiled.create_infer_request()
    feed_ports = [compiled.input(n) for n in model_spec.input_names]
    fetch_ports = [compiled.output(n) for n in model_spec.output_names]

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        batch = arrays[0].shape[0]
        outputs = [np.empty((batch, *t.shape), t.numpy_dtype) for t in model_spec.outputs]
        for item in range(batch):
            request.infer({port: a[item:item + 1] for port, a in zip(feed_ports, arrays)})
            for out, port in zip(outputs, fetch_ports):      # the request reuses its buffers: copy out
                out[item] = request.get_tensor(port).data[0]
        return outputs
    return forward, compiled


def _openvino_fastconv_from_networks(model_spec: spec.ModelSpec, networks, threads: int):
    """openvino_fastconv without an exported file (the benchmarks): export it to a temporary folder that lives
    as long as the runner."""
    import tempfile
    from .export.onnx_export import export_fastconv_model
    folder = tempfile.TemporaryDirectory(prefix="liveportrait-fastconv-")
    path = export_fastconv_model(networks, model_spec.name, Path(folder.name) / FASTCONV_ONNX_FILENAME)
    forward, model = _openvino_forward(model_spec, path, threads)

    def forward_keeping_folder(arrays: list[np.ndarray], _folder=folder) -> list[np.ndarray]:
        return forward(arrays)
    return forward_keeping_folder, model


def _tensorrt_forward(model_spec: spec.ModelSpec, artefact):
    from .export.tensorrt_build import EngineRunner, TensorRTError, import_tensorrt
    if artefact is None:
        raise RuntimeLoadError(f"runtime 'tensorrt' needs the engine (model.plan) of {model_spec.name!r}: run "
                               "`liveportrait-triton tensorrt` first")
    if isinstance(artefact, bytes):
        plan = artefact
    elif Path(artefact).is_file():
        plan = Path(artefact).read_bytes()
    else:
        raise RuntimeLoadError(f"runtime 'tensorrt': {artefact} not found (run `liveportrait-triton tensorrt`)")
    try:
        import_tensorrt()
        engine = EngineRunner(plan, model_spec)
    except TensorRTError as exc:
        raise RuntimeLoadError(str(exc)) from exc
    names = model_spec.input_names

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        outputs = engine.run(dict(zip(names, arrays)))
        return [outputs[n] for n in model_spec.output_names]
    return forward, engine
