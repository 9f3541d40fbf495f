"""Render the Triton model repository (every config.pbtxt and the Python-backend adapters) from the tensor spec.

Two targets share one layout and every tensor name:

- ``local``: the Triton 2.51 bundled in the `nvidia-pytriton` wheel, which has only the Python backend. Each
  sub-network is a Python-backend model (one generic adapter, `model_repository_templates/subnetwork/model.py`)
  that runs its exported file on the runtime kind of the layer (runtimes.py) named by its `runtime` parameter.
  That kind comes from the committed per-target choice (`runtime_choice.json`, written by `liveportrait-triton
  bench --runtime-choice`, which measures every kind), unless `export --runtime MODEL=KIND` overrides it.
- ``ngc``: the NGC `tritonserver` image. Sub-networks use `onnxruntime_onnx` (model.onnx) or `tensorrt_plan`
  (model.plan) directly.

The `liveportrait` pipeline model is a Python-backend sequence model on both targets. The default repository
(`model_repository/`, full networks, local target) is committed fully rendered and a test re-renders it byte for
byte, so the committed files can never drift from the spec.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

from . import runtimes, spec

TARGETS = ("local", "ngc")
PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
TEMPLATES = Path(__file__).parent / "model_repository_templates"
SUBNETWORK_ADAPTER = TEMPLATES / "subnetwork" / "model.py"
PIPELINE_ADAPTER = TEMPLATES / "liveportrait" / "model.py"
ONNX_FILENAME = runtimes.ONNX_FILENAME
BLS_TENSOR_PATHS = ("numpy", "torch-cpu", "torch-gpu")     # read by backend.bls (which imports no server code here)
DEFAULT_BLS_TENSORS = {"local": "numpy", "ngc": "torch-gpu"}
RUNTIME_CHOICE_FILE = Path(__file__).parent / "runtime_choice.json"
# Kinds a served sub-network of a target can run: the local Python-backend models run the file export writes for
# the chosen kind (model.onnx, model.plan, or the torch kinds' network file model.pt).
SERVED_KINDS = {"local": ("onnxruntime", "openvino", "openvino_fastconv", "tensorrt", "torch", "torch_fastconv")}


def runtime_choice(target: str = "local", path: str | Path = RUNTIME_CHOICE_FILE) -> dict[str, str]:
    """{sub-network: kind} committed for `target` (measured by `liveportrait-triton bench --runtime-choice`)."""
    choices = json.loads(Path(path).read_text())["targets"]
    if target not in choices:
        raise ValueError(f"{path} has no runtime choice for target {target!r} (it has {sorted(choices)})")
    return check_runtimes(target, choices[target])


def check_runtimes(target: str, chosen: dict[str, str]) -> dict[str, str]:
    """`chosen` if it names a servable kind for every sub-network of `target`, else ValueError naming the fault."""
    missing = [m for m in spec.SUBMODELS if m not in chosen]
    unknown = sorted(set(chosen) - set(spec.SUBMODELS))
    bad = {m: k for m, k in chosen.items() if k not in SERVED_KINDS[target]}
    if missing or unknown or bad:
        raise ValueError(f"runtime choice for target {target!r}: " + "; ".join(
            part for part in (missing and f"no kind for {missing}", unknown and f"unknown sub-networks {unknown}",
                              bad and f"{bad} not servable (choose from {list(SERVED_KINDS[target])})") if part))
    return {m: chosen[m] for m in spec.SUBMODELS}


def parse_runtime_overrides(items: list[str]) -> dict[str, str]:
    """['MODEL=KIND', ...] (the `export --runtime` option) -> {model: kind}."""
    out = {}
    for item in items:
        model, sep, kind = item.partition("=")
        if not sep or model not in spec.SUBMODELS or kind not in runtimes.KINDS:
            raise ValueError(f"--runtime {item!r}: expected MODEL=KIND with MODEL one of {list(spec.SUBMODELS)} "
                             f"and KIND one of {list(runtimes.KINDS)}")
        out[model] = kind
    return out


def models_at_once(options: "ServingOptions") -> int:
    """How many sub-network executions may run at the same time (their threads share the cores): each pipeline
    instance runs its sub-networks one after another per driving frame. (F and M run together only on a stream's
    START, once per stream: sizing them for that would halve M's threads on every frame.)"""
    return options.pipeline_instances


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """Knobs of the rendered configs that are not tensor shapes (defaults suit one CPU server)."""
    submodel_max_batch_size: int = spec.MAX_BATCH_SIZE
    submodel_queue_delay_us: int = 500              # short: a BLS call waits at most this for company
    pipeline_max_batch_size: int = 8                # requests of different sequences in one execute
    pipeline_queue_delay_us: int = 5000
    max_candidate_sequences: int = 32               # sequences Triton's batcher holds per pipeline instance
    # live streams a pipeline instance admits; the next START is refused at once ("server at capacity"). Below
    # max_candidate_sequences: a refused START holds one of Triton's slots until its END (or the idle timeout), and
    # past them Triton would queue a START unanswered. 0: half of max_candidate_sequences.
    max_live_sequences: int = 0
    sequence_idle_timeout_s: int = 300              # state of a stream idle this long is freed
    pipeline_instances: int = 1
    threads: int = 0                                # per sub-network; 0: the cores / models_at_once, at load
    # where the pipeline keeps tensors between sub-networks (backend.bls.TENSOR_PATHS); None: by target, NumPy
    # on the host for local, device-resident torch tensors on the GPU for ngc
    bls_tensors: str | None = None
    # local target: the sub-networks' runtime, `onnxruntime` (model.onnx) or `torch` (our PyTorch modules from the
    # official checkpoints in weights_dir on torch_device, torch_cuda.TorchCudaRunner)
    subnetwork_runtime: str = "onnxruntime"
    weights_dir: str = ""
    torch_device: str = "cuda"
    torch_precision: str = "fp16"

    def __post_init__(self):
        if not 1 <= self.submodel_max_batch_size <= spec.MAX_BATCH_SIZE:
            raise ValueError(f"submodel_max_batch_size must lie in 1..{spec.MAX_BATCH_SIZE}")
        if self.pipeline_max_batch_size < 1 or self.max_candidate_sequences < self.pipeline_max_batch_size:
            raise ValueError("max_candidate_sequences must be >= pipeline_max_batch_size >= 1")
        if not 0 <= self.max_live_sequences < self.max_candidate_sequences or self.live_capacity < 1:
            raise ValueError("max_live_sequences must lie in 1..max_candidate_sequences - 1 (0: half of them)")
        if self.sequence_idle_timeout_s < 1:
            raise ValueError("sequence_idle_timeout_s must be >= 1")
        if self.pipeline_instances < 1 or self.threads < 0:
            raise ValueError("pipeline_instances must be >= 1 and threads >= 0")
        if self.bls_tensors not in (None, *BLS_TENSOR_PATHS):
            raise ValueError(f"bls_tensors must be one of {list(BLS_TENSOR_PATHS)}")
        if self.subnetwork_runtime not in ("onnxruntime", "torch"):
            raise ValueError("subnetwork_runtime must be onnxruntime or torch")
        if self.subnetwork_runtime == "torch" and not self.weights_dir:
            raise ValueError("the torch sub-network runtime needs weights_dir (official checkpoint layout)")

    @property
    def live_capacity(self) -> int:
        """Live streams a pipeline instance admits (max_live_sequences, or its default)."""
        return self.max_live_sequences or self.max_candidate_sequences // 2


def python_shm_bytes(config: str = "full", max_batch_size: int = spec.MAX_BATCH_SIZE) -> int:
    """Shared-memory region size of the Python backend: the largest batch of the largest tensor any served model
    passes (the full networks' feature volume: 16 x 8 MiB), so that a whole batched tensor fits without growing
    the region; also its growth step. Rounded up to whole MiB."""
    models = [*spec.submodel_specs(config).values(), spec.PIPELINE_SPEC]
    largest = max(t.nbytes for m in models for t in (*m.inputs, *m.outputs))
    mib = 2 ** 20
    return -(-largest * max_batch_size // mib) * mib


def repository_network_config(repository_dir: str | Path) -> str:
    """The network configuration a rendered repository serves (its pipeline config's `network_config`)."""
    path = Path(repository_dir) / spec.PIPELINE / "config.pbtxt"
    text = path.read_text() if path.is_file() else ""
    found = re.search(r'key: "network_config"\s*value: \{ string_value: "([^"]+)" \}', text)
    return found.group(1) if found else "full"


def _header(target: str, config: str) -> str:
    return (f"# Generated by liveportrait_triton.repository from liveportrait_triton.spec (target {target}, "
            f"networks {config}).\n# Do not edit: re-render with `liveportrait-triton export` or "
            f"repository.write_repository_configs().\n")


def _tensor(t: spec.TensorSpec, indent: str = "  ") -> str:
    lines = [f"{indent}{{", f'{indent}  name: "{t.name}"', f"{indent}  data_type: {t.triton_type}",
             f"{indent}  dims: [ {', '.join(str(d) for d in t.shape)} ]"]
    if t.optional:
        lines.append(f"{indent}  optional: true")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _tensors(kind: str, tensors) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(t) for t in tensors) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in params.items())


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


def render_submodel_config(model: spec.ModelSpec, target: str, config: str, platform: str | None = None,
                           options: ServingOptions = ServingOptions(), runtime_kind: str = "onnxruntime") -> str:
    """config.pbtxt of one sub-network: Python backend on `runtime_kind` (local) or a native platform (ngc)."""
    if target == "local":
        if runtime_kind not in SERVED_KINDS["local"] and options.subnetwork_runtime != "torch":
            raise ValueError(f"{model.name}: runtime {runtime_kind!r} is not servable on the local target "
                             f"(choose from {list(SERVED_KINDS['local'])})")
        runtime = 'backend: "python"\n'
        instances = _instances(1, "KIND_CPU")
        if options.subnetwork_runtime == "torch":
            torch_params = {"network_config": config, "runtime": "torch", "weights_dir": options.weights_dir,
                            "device": options.torch_device, "precision": options.torch_precision}
            if options.torch_device.startswith("cuda"):      # inputs arrive in GPU memory, as BLS sends them
                torch_params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
            params = _parameters(torch_params)
        else:
            params = _parameters({"network_config": config, "runtime": runtime_kind,
                                  "threads": str(options.threads), "models_at_once": str(models_at_once(options))})
    elif target == "ngc":
        if platform not in PLATFORMS:
            raise ValueError(f"ngc platform must be one of {sorted(PLATFORMS)}, got {platform!r}")
        runtime = f'platform: "{platform}"\ndefault_model_filename: "{PLATFORMS[platform]}"\n'
        instances = _instances(1, "KIND_GPU")
        params = _parameters({"network_config": config})
    else:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    return (_header(target, config) + f'name: "{model.name}"\n' + runtime
            + f"max_batch_size: {options.submodel_max_batch_size}\n"
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.submodel_queue_delay_us}\n}}\n"
            + _tensors("input", model.inputs) + _tensors("output", model.outputs) + instances + params)


def _control(name: str) -> str:
    kind = spec.SEQUENCE_CONTROLS[name]
    body = ("data_type: TYPE_UINT64" if name == "CORRID" else "int32_false_true: [ 0, 1 ]")
    return (f'    {{\n      name: "{name}"\n      control [\n        {{\n          kind: {kind}\n'
            f"          {body}\n        }}\n      ]\n    }}")


def render_pipeline_config(target: str, config: str, options: ServingOptions = ServingOptions()) -> str:
    """config.pbtxt of the `liveportrait` sequence model (Python backend, BLS to the sub-networks)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    controls = ",\n".join(_control(name) for name in spec.SEQUENCE_CONTROLS)
    sequence = (
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {options.sequence_idle_timeout_s * 1_000_000}\n"
        f"  control_input [\n{controls}\n  ]\n"
        "  oldest {\n"
        f"    max_candidate_sequences: {options.max_candidate_sequences}\n"
        f"    preferred_batch_size: [ {options.pipeline_max_batch_size} ]\n"
        f"    max_queue_delay_microseconds: {options.pipeline_queue_delay_us}\n"
        "  }\n}\n")
    return (_header(target, config) + f'name: "{spec.PIPELINE}"\nbackend: "python"\n'
            + f"max_batch_size: {options.pipeline_max_batch_size}\n" + sequence
            + _tensors("input", spec.PIPELINE_SPEC.inputs) + _tensors("output", spec.PIPELINE_SPEC.outputs)
            + _instances(options.pipeline_instances, "KIND_CPU")
            + _parameters({"network_config": config,
                           "sequence_idle_timeout_s": str(options.sequence_idle_timeout_s),
                           "max_live_sequences": str(options.live_capacity),
                           "bls_tensors": options.bls_tensors or DEFAULT_BLS_TENSORS[target]}))


def ngc_platform(repository_dir: str | Path | None, model: str, platform: str | None) -> str:
    """The ngc platform of one model: as asked, else tensorrt_plan where model.plan exists, else onnxruntime_onnx."""
    if platform is not None:
        if platform not in PLATFORMS:
            raise ValueError(f"unknown platform {platform!r}; choose one of {sorted(PLATFORMS)}")
        return platform
    if repository_dir is not None and (Path(repository_dir) / model / "1" / PLATFORMS["tensorrt_plan"]).is_file():
        return "tensorrt_plan"
    return "onnxruntime_onnx"


def render_repository(target: str = "local", config: str = "full", platform: str | None = None,
                      options: ServingOptions = ServingOptions(),
                      repository_dir: str | Path | None = None,
                      runtime_overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Every generated file of a repository as {relative path: text} (artefacts such as model.onnx excluded).

    Local sub-networks run the committed `runtime_choice(target)`, with `runtime_overrides` ({model: kind})."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    kinds = served_runtimes(target, runtime_overrides) if target == "local" else {}
    files = {}
    for name, model in spec.submodel_specs(config).items():
        chosen = ngc_platform(repository_dir, name, platform) if target == "ngc" else None
        files[f"{name}/config.pbtxt"] = render_submodel_config(model, target, config, chosen, options,
                                                               kinds.get(name, "onnxruntime"))
        if target == "local":
            files[f"{name}/1/model.py"] = SUBNETWORK_ADAPTER.read_text()
    files[f"{spec.PIPELINE}/config.pbtxt"] = render_pipeline_config(target, config, options)
    files[f"{spec.PIPELINE}/1/model.py"] = PIPELINE_ADAPTER.read_text()
    return files


def served_runtimes(target: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """{sub-network: kind} a repository of `target` serves: the committed choice, then `overrides`."""
    return check_runtimes(target, {**runtime_choice(target), **(overrides or {})})


def write_repository_configs(repository_dir: str | Path, target: str = "local", config: str = "full",
                             platform: str | None = None, options: ServingOptions = ServingOptions(),
                             runtime_overrides: dict[str, str] | None = None) -> list[Path]:
    """Write every config.pbtxt and Python-backend model.py of a repository; returns the paths written.

    The ONNX (or TensorRT) artefacts are not touched: export writes them. On the ngc target a stale local adapter
    (<model>/1/model.py of a sub-network) is removed so that the directory holds only what the platform uses.
    """
    root = Path(repository_dir)
    written = []
    for rel, text in render_repository(target, config, platform, options, root, runtime_overrides).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    if target == "ngc":
        for name in spec.SUBMODELS:
            stale = root / name / "1" / SUBNETWORK_ADAPTER.name
            if stale.is_file() and stale.read_text() == SUBNETWORK_ADAPTER.read_text():
                stale.unlink()
    return written


def copy_artefacts(source_dir: str | Path, repository_dir: str | Path) -> None:
    """Copy the exported files of every sub-network (<model>/1/model.onnx, and model.pt / model.plan where export
    or the TensorRT build wrote them) from one repository into another (e.g. a test's copy)."""
    for name in spec.SUBMODELS:
        for filename in sorted(set(runtimes.ARTEFACT.values())):
            src = Path(source_dir) / name / "1" / filename
            if filename != ONNX_FILENAME and not src.is_file():
                continue
            dst = Path(repository_dir) / name / "1" / filename
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
