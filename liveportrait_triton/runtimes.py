"""The one runtime layer: the runtime plan (which kind, device, precision and artefact runs each served
sub-network) and the runners it builds.

`runtime_plan` is the one place the plan is made: the committed choice per target (`runtime_choice.json`,
measured by `liveportrait-triton bench --runtime-choice`), then `export --runtime MODEL=KIND` overrides. Every
runner of a sub-network is built by `create_subnetwork` from a `RuntimePlanEntry`: the served sub-network models
(backend/subnetwork.py, which read their entry back from config.pbtxt), the in-process pipeline
(`pipeline.TorchRunner`, `pipeline.OnnxRunner`), export validation, the TensorRT checks, the benchmarks and the
device check. A `SubnetworkRunner` takes and returns tensors bound by the spec's names (`run({input: array}) ->
{output: array}`, batch dimension free); `PlanRunner` puts one per sub-network behind the `pipeline.Runner`
interface, so the same `Animator` runs on any plan.

Kinds:
- `onnxruntime`: the exported model.onnx in ONNX Runtime's CPU provider; all graph optimisations, sequential
  execution, explicit intra-op threads, one inter-op thread, and no spin-waiting of idle pool threads (spinning
  threads steal the cores the other models' processes need).
- `openvino`: the exported model.onnx compiled by OpenVINO for CPU in the entry's precision (f32, or bf16 through
  `INFERENCE_PRECISION_HINT`; bf16 breaks W's decomposed grid-sample gather indices, so W's reduced choice is
  torch), latency hint, explicit thread count, threads not pinned to cores, compiled at batch 1 and run item by
  item (batches gain nothing per item on the CPU).
- `openvino_fastconv`: OpenVINO as above on model_fastconv.onnx, the export of our modules with the fast
  convolution forms ONNX can express (Winograd, low-resolution SPADE; no FFT), export/onnx_export.py
  `export_fastconv_model`.
- `torch`: our PyTorch modules (networks/served.py `ServedModel`, the same call the ONNX export traces) on the
  entry's device and precision (torch_engine.TorchEngine: autocast below fp32, CUDA graphs on a CUDA device).
- `torch_fastconv`: the same modules with their heavy convolutions rewritten as faster algorithms computing the
  same function (networks/fast_convolution.py: Winograd, FFT, low-resolution SPADE), CPU. Served from the network
  file export writes (`model.pt`), as is `torch`.
- `tensorrt`: a model.plan engine on a CUDA GPU (tensorrt_engine.TensorRTEngine; built by
  export/tensorrt_build.py).

`threads=None` means `default_threads()`: every core this process may use. Torch's thread count is process-wide.

Precision (precision.py): the plan of a CPU target has two policies. `exact` (fp32 everywhere: today's numerics,
within one uint8 level of the official code; what `runtime_plan` gives by default and the committed
model_repository renders) and `reduced` (the choice measured for the machine's class: `amx`, `avx512_bf16` or
`fp32`; bf16 where it pays and its drift is within precision.BOUNDS; what `export` renders by default). M and
the MLPs are always fp32. At load, an entry whose precision the CPU cannot run natively falls back to its exact
entry (`native_entry`), never to emulated bf16.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import precision as precisions
from . import spec
from .arrays import is_torch

KINDS = {
    "onnxruntime": "ONNX Runtime CPU, ORT_ENABLE_ALL, sequential, no spinning",
    "openvino": "OpenVINO CPU, f32 or bf16, latency hint",
    "openvino_fastconv": "OpenVINO CPU, f32 or bf16, the graph with Winograd / DFT / low-resolution SPADE convolutions",
    "torch": "PyTorch eager (our modules), CPU or CUDA",
    "torch_fastconv": "PyTorch eager, convolutions by Winograd / FFT / low-resolution SPADE (CPU)",
    "tensorrt": "TensorRT engine (CUDA GPU)",
}
ONNX_KINDS = ("onnxruntime", "openvino", "openvino_fastconv")    # run an exported ONNX file
TORCH_KINDS = ("torch", "torch_fastconv")    # run our PyTorch modules
ONNX_FILENAME = "model.onnx"
FASTCONV_ONNX_FILENAME = "model_fastconv.onnx"
PLAN_FILENAME = "model.plan"
TORCH_FILENAME = "model.pt"                  # weights.save_network_file
ARTEFACT = {"onnxruntime": ONNX_FILENAME, "openvino": ONNX_FILENAME, "openvino_fastconv": FASTCONV_ONNX_FILENAME,
            "tensorrt": PLAN_FILENAME,
            "torch": TORCH_FILENAME, "torch_fastconv": TORCH_FILENAME}
# Numeric precision of a runner: fp32 is the exact numerics (every kind); fp16 is the official GPU default
# (torch on CUDA under autocast; TensorRT engines built in fp16, export/tensorrt_build.py keeping M and the MLPs
# in fp32); bf16 runs torch under bf16 autocast (its grid sample stays fp32) and OpenVINO with the bf16 inference
# precision hint. ONNX Runtime's CPU provider has no bf16 convolutions: fp32 only.
PRECISIONS = ("fp32", "fp16", "bf16")
PRECISIONS_OF_KIND = {"tensorrt": ("fp32", "fp16"), "torch": PRECISIONS, "torch_fastconv": ("fp32", "bf16"),
                      "openvino": ("fp32", "bf16"), "openvino_fastconv": ("fp32", "bf16")}   # others: fp32 only
CUDA_KINDS = ("torch", "tensorrt")           # kinds that run on a CUDA device (tensorrt only there)
RUNTIME_CHOICE_FILE = Path(__file__).parent / "runtime_choice.json"
class RuntimeLoadError(ValueError):
    """A runner that cannot be built: unknown kind, a plan entry that cannot run, missing artefact, a graph that is
    not the spec, no GPU."""


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def served_threads(threads: int, models_at_once: int) -> int:
    """Threads of one served sub-network: `threads`, or (0) the cores this process may use shared by the
    `models_at_once` sub-network executions that can run at the same time."""
    return threads or max(1, default_threads() // max(1, models_at_once))


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


# ---------------------------------------------------------------------------------------------------------------
# The runtime plan.

@dataclasses.dataclass(frozen=True)
class RuntimePlanEntry:
    """How one served sub-network runs: its runtime kind, device (cpu, cuda, cuda:N), numeric precision and the
    artefact it loads (the file in `<model>/1/` that export writes for the kind)."""
    model: str
    kind: str
    device: str = "cpu"
    precision: str = "fp32"
    artefact: str = ""

    def __post_init__(self):
        if self.model not in spec.ALL_SUBMODELS:
            raise RuntimeLoadError(f"no served sub-network {self.model!r}; served: {list(spec.ALL_SUBMODELS)}")
        if self.kind not in KINDS:
            raise RuntimeLoadError(f"{self.model}: unknown runtime {self.kind!r}; choose one of {list(KINDS)}")
        if not self.artefact:
            object.__setattr__(self, "artefact", ARTEFACT[self.kind])
        if self.artefact != ARTEFACT[self.kind]:
            raise RuntimeLoadError(f"{self.model}: runtime {self.kind!r} loads {ARTEFACT[self.kind]}, "
                                   f"not {self.artefact!r}")
        on_cuda = self.device == "cuda" or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        if not (on_cuda or self.device == "cpu"):
            raise RuntimeLoadError(f"{self.model}: device must be cpu, cuda or cuda:N, got {self.device!r}")
        if on_cuda and self.kind not in CUDA_KINDS:
            raise RuntimeLoadError(f"{self.model}: runtime {self.kind!r} runs on the CPU, not on {self.device!r}")
        if self.kind == "tensorrt" and not on_cuda:
            raise RuntimeLoadError(f"{self.model}: runtime 'tensorrt' runs on a CUDA device, not on {self.device!r}")
        allowed = PRECISIONS_OF_KIND.get(self.kind, ("fp32",))
        if self.precision not in allowed:
            raise RuntimeLoadError(f"{self.model}: runtime {self.kind!r} runs in {list(allowed)}, "
                                   f"not {self.precision!r}")
        if self.precision != "fp32" and spec.role_of(self.model) in precisions.ALWAYS_FP32:
            raise RuntimeLoadError(f"{self.model}: always fp32 ({precisions.ALWAYS_FP32[spec.role_of(self.model)]}), "
                                   f"not {self.precision!r}")

    @classmethod
    def of(cls, model: str, kind: str, device: str | None = None,
           precision: str | None = None) -> "RuntimePlanEntry":
        """An entry with the kind's defaults: tensorrt on cuda, everything else on the CPU; fp16 on a CUDA device
        (the official GPU default), fp32 (exact) on the CPU; M and the MLPs always fp32 (precision.ALWAYS_FP32)."""
        device = device or ("cuda" if kind == "tensorrt" else "cpu")
        precision = precision or ("fp32" if device == "cpu" else "fp16")
        return cls(model, kind, device, "fp32" if spec.role_of(model) in precisions.ALWAYS_FP32 else precision)

    @property
    def exact(self) -> bool:
        return self.precision == "fp32"

    def parameters(self) -> dict[str, str]:
        """The entry as config.pbtxt parameters (what a served model reads back and reports)."""
        return {"runtime": self.kind, "device": self.device, "precision": self.precision, "artefact": self.artefact}

    @classmethod
    def from_parameters(cls, model: str, parameters: Mapping[str, str]) -> "RuntimePlanEntry":
        """The entry a served model's config.pbtxt parameters give (RuntimeLoadError naming a missing one)."""
        missing = [key for key in ("runtime", "device", "precision", "artefact") if not parameters.get(key)]
        if missing:
            raise RuntimeLoadError(f"{model}: config.pbtxt lacks the runtime plan parameter(s) {missing}: "
                                   "re-render it with `liveportrait-triton export`")
        return cls(model, parameters["runtime"], parameters["device"], parameters["precision"],
                   parameters["artefact"])

    def path(self, repository: str | os.PathLike) -> Path:
        """Where `liveportrait-triton export` (or `tensorrt`) puts this entry's artefact."""
        return Path(repository) / self.model / "1" / self.artefact

    def describe(self) -> str:
        return f"{self.model} runs {self.kind} on {self.device} in {self.precision} from {self.artefact}"

    def label(self) -> str:
        """kind/precision, e.g. openvino/bf16 (tables)."""
        return f"{self.kind}/{self.precision}"


RuntimePlan = dict     # {sub-network: RuntimePlanEntry}, in spec.ALL_SUBMODELS order


def plan_of(kinds: Mapping[str, str | RuntimePlanEntry], models: tuple[str, ...] = spec.SUBMODELS) -> RuntimePlan:
    """A plan naming every served sub-network of `models` (default: the human set; spec.subject_models gives
    those of several model sets) ({model: kind or entry}), else RuntimeLoadError naming the fault."""
    missing = [m for m in models if m not in kinds]
    unknown = sorted(set(kinds) - set(models))
    if missing or unknown:
        raise RuntimeLoadError("runtime plan: " + "; ".join(
            part for part in (missing and f"no kind for {missing}", unknown and f"unknown sub-networks {unknown}")
            if part))
    plan = {m: k if isinstance(k, RuntimePlanEntry) else RuntimePlanEntry.of(m, k) for m, k in
            ((m, kinds[m]) for m in models)}
    wrong = [m for m, entry in plan.items() if entry.model != m]
    if wrong:
        raise RuntimeLoadError(f"runtime plan: entries of {wrong} name another sub-network")
    return plan


def choice_entry(model: str, value) -> RuntimePlanEntry:
    """A choice file's value: a kind (fp32 on the CPU) or {"kind": ..., "precision": ...}."""
    if isinstance(value, str):
        return RuntimePlanEntry.of(model, value)
    return RuntimePlanEntry.of(model, value["kind"], precision=value.get("precision", "fp32"))


def runtime_choice(target: str = "local", path: str | os.PathLike = RUNTIME_CHOICE_FILE,
                   policy: str = precisions.EXACT, machine: str | None = None) -> RuntimePlan:
    """The plan committed for `target` (measured by `liveportrait-triton bench --runtime-choice`): its `exact`
    entries (fp32, every machine class), or for the `reduced` policy the entries chosen for machine class
    `machine` (default: this machine's, precision.machine_class) over them."""
    if policy not in precisions.POLICIES:
        raise RuntimeLoadError(f"unknown precision policy {policy!r}; choose one of {list(precisions.POLICIES)}")
    choices = json.loads(Path(path).read_text())["targets"]
    if target not in choices:
        raise RuntimeLoadError(f"{path} has no runtime choice for target {target!r} (it has {sorted(choices)})")
    exact = {m: choice_entry(m, v) for m, v in choices[target]["exact"].items()}
    if policy == precisions.EXACT:
        return plan_of(exact)
    machine = machine or precisions.machine_class()
    reduced = choices[target].get("reduced", {})
    if machine not in reduced:
        raise RuntimeLoadError(f"{path} has no reduced-precision choice of target {target!r} for machine class "
                               f"{machine!r} (it has {sorted(reduced)})")
    return plan_of({**exact, **{m: choice_entry(m, v) for m, v in reduced[machine]["plan"].items()}})


def runtime_plan(target: str = "local", overrides: Mapping[str, str | RuntimePlanEntry] | None = None,
                 path: str | os.PathLike = RUNTIME_CHOICE_FILE, policy: str = precisions.EXACT,
                 machine: str | None = None, subjects=(spec.HUMAN,)) -> RuntimePlan:
    """THE runtime plan of a repository of `target` holding the model sets `subjects`: the committed choice of
    `policy` (exact: fp32 everywhere; reduced: the choice of machine class `machine`, default this machine's; an
    animal sub-network, the same architecture as its human one, gets its role's), then `overrides` ({model: kind
    or entry}, e.g. `export --runtime MODEL=KIND`)."""
    choice = runtime_choice(target, path, policy, machine)
    models = spec.subject_models(subjects)
    return plan_of({**{m: _as_model(choice[spec.role_of(m)], m) for m in models}, **(overrides or {})}, models)


def _as_model(entry: RuntimePlanEntry, model: str) -> RuntimePlanEntry:
    """A role's entry for the served model `model` that runs it (`animal_warping_module` runs `warping_module`)."""
    return entry if entry.model == model else dataclasses.replace(entry, model=model)


def native_entry(entry: RuntimePlanEntry, machine: str | None = None,
                 path: str | os.PathLike = RUNTIME_CHOICE_FILE) -> tuple[RuntimePlanEntry, str | None]:
    """The entry a runner loads on this machine: `entry` where its device computes its precision natively
    (precision.native_precisions of machine class `machine`, default this machine's), else the exact plan's entry
    of its sub-network (never emulated bf16), with the line saying so (None when unchanged)."""
    if entry.precision in precisions.native_precisions(entry.device, machine):
        return entry, None
    machine = machine or precisions.machine_class()
    fallback = _as_model(runtime_choice("local", path)[spec.role_of(entry.model)], entry.model)
    return fallback, (f"{entry.model}: this CPU (machine class {machine}) has no native {entry.precision}: "
                      f"running the exact choice {fallback.label()} instead of {entry.label()}")


def uniform_plan(kind: str, device: str | None = None, precision: str | None = None,
                 subjects=(spec.HUMAN,)) -> RuntimePlan:
    """Every sub-network of the model sets `subjects` on one kind (the in-process PyTorch reference, the device
    check); M and the MLPs stay fp32 whatever `precision` says (precision.ALWAYS_FP32)."""
    models = spec.subject_models(subjects)
    return plan_of({m: RuntimePlanEntry.of(m, kind, device, precision) for m in models}, models)


def parse_runtime_overrides(items: list[str]) -> dict[str, str | RuntimePlanEntry]:
    """['MODEL=KIND', 'MODEL=KIND/PRECISION', ...] (the `export --runtime` option) -> {model: kind or entry}."""
    out = {}
    for item in items:
        model, sep, value = item.partition("=")
        kind, slash, precision = value.partition("/")
        if not sep or model not in spec.ALL_SUBMODELS or kind not in KINDS or (slash and precision not in PRECISIONS):
            raise RuntimeLoadError(f"--runtime {item!r}: expected MODEL=KIND or MODEL=KIND/PRECISION with MODEL "
                                   f"one of {list(spec.ALL_SUBMODELS)}, KIND one of {list(KINDS)} and PRECISION "
                                   f"one of {list(PRECISIONS)}")
        out[model] = RuntimePlanEntry.of(model, kind, precision=precision) if slash else kind
    return out


# ---------------------------------------------------------------------------------------------------------------
# Runners.

class SubnetworkRunner:
    """One sub-network on one runtime plan entry, tensors bound by spec name."""

    def __init__(self, entry: RuntimePlanEntry, model_spec: spec.ModelSpec, threads: int,
                 forward: Callable[[list], list], session=None):
        self.entry = entry
        self.model_spec = model_spec
        self.threads = threads
        self.session = session     # the runtime's own object (ONNX Runtime session, compiled model, engine)
        self._forward = forward

    @property
    def model(self) -> str:
        return self.model_spec.name

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def device(self) -> str:
        return self.entry.device

    def run(self, inputs: dict) -> dict:
        """Outputs by name. The torch kinds take torch tensors as they are (and answer with torch tensors on their
        device); every other value becomes a C-contiguous array of the spec's dtype."""
        missing = [n for n in self.model_spec.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.model}: missing input(s) {missing}; it takes {self.model_spec.input_names}")
        keep_torch = self.kind in TORCH_KINDS
        arrays = [inputs[t.name] if keep_torch and is_torch(inputs[t.name])
                  else np.ascontiguousarray(inputs[t.name], dtype=t.numpy_dtype) for t in self.model_spec.inputs]
        if len({a.shape[0] for a in arrays}) != 1:
            raise ValueError(f"{self.model}: inputs disagree on the batch size: "
                             f"{ {t.name: tuple(a.shape) for t, a in zip(self.model_spec.inputs, arrays)} }")
        for t, a in zip(self.model_spec.inputs, arrays):
            if tuple(a.shape[1:]) != t.shape:
                raise ValueError(f"{self.model}: input {t.name!r} has shape {list(a.shape)}, "
                                 f"expected [batch, {', '.join(map(str, t.shape))}]")
        return dict(zip(self.model_spec.output_names, self._forward(arrays)))


def create_subnetwork(entry: RuntimePlanEntry, model_spec: spec.ModelSpec, *,
                      artefact: str | os.PathLike | bytes | None = None, networks=None,
                      threads: int | None = None) -> SubnetworkRunner:
    """The runner of `model_spec` that plan entry `entry` describes: the ONNX kinds need `artefact` (the file's
    path), `tensorrt` the engine (path or bytes), the torch kinds the loaded `networks` (weights.Networks) or
    their network file (model.pt). RuntimeLoadError otherwise, and for a precision the entry's device does not
    compute natively (emulated bf16 is slower than fp32). The one constructor of sub-network runners."""
    if model_spec.name != entry.model:
        raise RuntimeLoadError(f"plan entry of {entry.model!r} given the spec of {model_spec.name!r}")
    if entry.precision not in precisions.native_precisions(entry.device):
        raise RuntimeLoadError(f"{entry.describe()}: this CPU (machine class {precisions.machine_class()}) has no "
                               f"native {entry.precision} and emulating it is slower than fp32; load "
                               "runtimes.native_entry(entry) instead")
    threads = threads or default_threads()
    kind = entry.kind
    if kind in TORCH_KINDS:
        if networks is None:
            networks = _network_file(model_spec, artefact, kind)
        forward, session = _torch_forward(networks, model_spec, entry, threads)
    elif kind == "tensorrt":
        forward, session = _tensorrt_forward(model_spec, artefact)
    else:
        if artefact is None or not Path(artefact).is_file():
            raise RuntimeLoadError(f"runtime {kind!r} needs the exported ONNX file ({entry.artefact}) of "
                                   f"{model_spec.name!r}, got {str(artefact)!r}: run `liveportrait-triton export` "
                                   "first")
        if kind == "onnxruntime":
            forward, session = _onnxruntime_forward(model_spec, Path(artefact), threads)
        else:
            forward, session = _openvino_forward(model_spec, Path(artefact), threads, entry.precision)
    return SubnetworkRunner(entry, model_spec, threads, forward, session)


class PlanRunner:
    """pipeline.Runner over a runtime plan: one SubnetworkRunner per sub-network."""

    def __init__(self, runners: dict[str, SubnetworkRunner]):
        self.runners = runners

    @property
    def plan(self) -> RuntimePlan:
        return {m: r.entry for m, r in self.runners.items()}

    def run(self, model: str, inputs: dict) -> dict:
        runner = self.runners.get(model)
        if runner is None:
            raise KeyError(f"no runner for model {model!r}; this one has {sorted(self.runners)}")
        return runner.run(inputs)


def create_runner(plan: RuntimePlan, config: str | dict, *, networks=None,
                  repository: str | os.PathLike | None = None, threads: int | None = None,
                  subjects=(spec.HUMAN,)) -> PlanRunner:
    """A PlanRunner for every served sub-network of the model sets `subjects` of network `config` on `plan`
    (runtime_plan, uniform_plan): the torch kinds run `networks` when given (a dict {subject: networks} for
    several sets), every other artefact comes from `repository`."""
    plan = plan_of(plan, spec.subject_models(subjects))
    specs = spec.submodel_specs(config, subjects)
    return PlanRunner({m: create_subnetwork(entry, specs[m], networks=_networks_of(networks, m), threads=threads,
                                             artefact=None if repository is None
                                             or (entry.kind in TORCH_KINDS and networks is not None)
                                             else entry.path(repository))
                        for m, entry in plan.items()})


def _networks_of(networks, model: str):
    """The loaded networks that hold `model`'s network: `networks`, or its set's of {subject: networks} (the
    shared MLPs from the human set's, else from the animal set's, which carry the humans' MLPs)."""
    if not isinstance(networks, Mapping):
        return networks
    order = (spec.ANIMAL,) if model in spec.ANIMAL_SUBMODELS else (spec.HUMAN, spec.ANIMAL)
    for subject in order:
        if subject in networks:
            return networks[subject]
    raise RuntimeLoadError(f"{model}: no {order[0]} networks given (got {sorted(networks)})")


# ---------------------------------------------------------------------------------------------------------------
def _check_names(model_spec: spec.ModelSpec, inputs, outputs, what: str) -> None:
    if sorted(inputs) != sorted(model_spec.input_names) or sorted(outputs) != sorted(model_spec.output_names):
        raise RuntimeLoadError(f"model {model_spec.name!r}: {what} has inputs {list(inputs)} and outputs "
                               f"{list(outputs)}, the spec says {model_spec.input_names} and "
                               f"{model_spec.output_names}")


def _network_file(model_spec: spec.ModelSpec, artefact, kind: str):
    """The networks of a torch kind's model.pt (weights.load_network_file), checked to hold `model_spec`'s."""
    from .networks.served import NETWORK_FIELD
    from .weights import WeightsError, load_network_file
    if artefact is None or not Path(artefact).is_file():
        raise RuntimeLoadError(f"runtime {kind!r} runs our PyTorch modules: pass networks=load_networks(...) or "
                               f"the network file ({TORCH_FILENAME}) of {model_spec.name!r}, got {str(artefact)!r}: "
                               f"run `liveportrait-triton export` with {model_spec.name} on {kind}")
    try:
        networks = load_network_file(artefact)
    except WeightsError as exc:
        raise RuntimeLoadError(str(exc)) from exc
    if getattr(networks, NETWORK_FIELD[spec.role_of(model_spec.name)]) is None:
        raise RuntimeLoadError(f"{artefact} does not hold the network of {model_spec.name!r}")
    return networks


def _torch_forward(networks, model_spec: spec.ModelSpec, entry: RuntimePlanEntry, threads: int):
    """The torch kinds: the served module on the entry's device (moved there in place) and precision, with its
    heavy convolutions rewritten (a converted copy) for torch_fastconv (torch_engine.TorchEngine)."""
    import torch

    from .networks.served import ServedModel
    from .torch_engine import TorchEngine
    if entry.device == "cpu":
        torch.set_num_threads(threads)
    served = ServedModel(networks, model_spec)
    if entry.kind == "torch_fastconv":
        from .networks.fast_convolution import fast_convolutions
        served = fast_convolutions(served.eval())
    engine = TorchEngine(served, entry.device, entry.precision)
    names, output_names = model_spec.input_names, model_spec.output_names

    def forward(values: list) -> list:
        outputs = engine.run(dict(zip(names, values)))
        return [outputs[name] for name in output_names]
    return forward, engine


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


OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def _openvino_forward(model_spec: spec.ModelSpec, path: Path, threads: int, precision: str = "fp32"):
    """OpenVINO compiles the graph once at batch 1 (static shapes) and runs a batch item by item into the
    batch's output arrays: on the CPU a batch is no cheaper per item, while every further compiled batch size
    costs memory and compilation time, and a dynamic-batch graph recompiles at each new size (measurements:
    benchmarks/results/, runtime_choice.md). `precision` is OpenVINO's inference precision hint: bf16 lets the
    CPU plugin run the graph's convolutions and matrix products in bf16."""
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
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


def _tensorrt_forward(model_spec: spec.ModelSpec, artefact):
    from .tensorrt_engine import TensorRTEngine, TensorRTError, import_tensorrt
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
        engine = TensorRTEngine(plan, model_spec)
    except TensorRTError as exc:
        raise RuntimeLoadError(str(exc)) from exc
    names = model_spec.input_names

    def forward(arrays: list[np.ndarray]) -> list[np.ndarray]:
        outputs = engine.run(dict(zip(names, arrays)))
        return [outputs[n] for n in model_spec.output_names]
    return forward, engine
