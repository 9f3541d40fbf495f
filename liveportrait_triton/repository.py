"""Render the Triton model repository (every config.pbtxt and the Python-backend adapters) from the tensor spec.

Two targets share one layout and every tensor name:

- ``local``: the Triton 2.51 bundled in the `nvidia-pytriton` wheel, which has only the Python backend. Each
  sub-network is a Python-backend model (one generic adapter, `backend/subnetwork_adapter.py`, which each
  model's generated one-line `model.py` imports) that runs the entry of the runtime plan (runtimes.runtime_plan: kind, device, precision, artefact) its
  parameters report. The plan comes from the committed per-target choice (`runtime_choice.json`, written by
  `liveportrait-triton bench --runtime-choice`, which measures every kind), unless `export --runtime MODEL=KIND`
  overrides it.
- ``ngc``: the NGC `tritonserver` image. Sub-networks use `onnxruntime_onnx` (model.onnx) or `tensorrt_plan`
  (model.plan) directly.

The `liveportrait` pipeline model is a Python-backend sequence model on both targets. Configs are data: each is
built as Triton's own `ModelConfig` protobuf message (`submodel_config`, `pipeline_config`; instance counts,
threads and the runtime plan are parameters) and written in protobuf text format; `read_config` reads one back
through the same message. The default repository (`model_repository/`, full networks, local target) is committed
fully rendered and a test re-renders it byte for byte, so the committed files can never drift from the spec.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Mapping

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from . import runtimes, spec

TARGETS = ("local", "ngc")
PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
TEMPLATES = Path(__file__).parent / "model_repository_templates"
SUBNETWORK_ADAPTER = TEMPLATES / "subnetwork" / "model.py"
PIPELINE_ADAPTER = TEMPLATES / "liveportrait" / "model.py"
ONNX_FILENAME = runtimes.ONNX_FILENAME
DEFAULT_BLS_TENSORS = {"local": "numpy", "ngc": "torch-gpu"}


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
    # instances of a sub-network ({model: count}; 1 where not named)
    instances: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # where the pipeline keeps tensors between sub-networks (spec.BLS_TENSOR_PATHS); None: by target, NumPy
    # on the host for local, device-resident torch tensors on the GPU for ngc
    bls_tensors: str | None = None

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
        if set(self.instances) - set(spec.ALL_SUBMODELS) or any(c < 1 for c in self.instances.values()):
            raise ValueError(f"instances must map served sub-networks {list(spec.ALL_SUBMODELS)} to counts >= 1, "
                             f"got {dict(self.instances)}")
        if self.bls_tensors not in (None, *spec.BLS_TENSOR_PATHS):
            raise ValueError(f"bls_tensors must be one of {list(spec.BLS_TENSOR_PATHS)}")

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


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """config.pbtxt text parsed by Triton's own ModelConfig message (unknown fields or bad syntax fail)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_config(path: str | Path) -> model_config_pb2.ModelConfig:
    """A config.pbtxt file parsed by Triton's own ModelConfig message."""
    return parse_config(Path(path).read_text())


def config_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    """A parsed config's string parameters."""
    return {key: value.string_value for key, value in config.parameters.items()}


def repository_network_config(repository_dir: str | Path) -> str:
    """The network configuration a rendered repository serves (its pipeline config's `network_config`)."""
    path = Path(repository_dir) / spec.PIPELINE / "config.pbtxt"
    return (config_parameters(read_config(path)).get("network_config") if path.is_file() else None) or "full"


def repository_subjects(repository_dir: str | Path) -> tuple[str, ...]:
    """The model sets a rendered repository serves (its pipeline config's `subjects`; human where absent)."""
    path = Path(repository_dir) / spec.PIPELINE / "config.pbtxt"
    return spec.parse_subjects(config_parameters(read_config(path)).get("subjects") if path.is_file() else None)


def served_plan(repository_dir: str | Path) -> runtimes.RuntimePlan:
    """The runtime plan a rendered local-target repository serves, as its sub-networks' configs report it."""
    plan = {}
    for model in spec.subject_models(repository_subjects(repository_dir)):
        path = Path(repository_dir) / model / "config.pbtxt"
        try:
            plan[model] = runtimes.RuntimePlanEntry.from_parameters(model, config_parameters(read_config(path)))
        except runtimes.RuntimeLoadError as exc:
            raise ValueError(f"{path}: {exc} (not a local-target repository rendered by this version)") from exc
    return plan


def _header(target: str, config: str) -> str:
    return (f"# Generated by liveportrait_triton.repository from liveportrait_triton.spec (target {target}, "
            f"networks {config}).\n# Do not edit: re-render with `liveportrait-triton export` or "
            f"repository.write_repository_configs().\n")


def config_text(config: model_config_pb2.ModelConfig, header: str = "") -> str:
    """The config.pbtxt text of a ModelConfig (protobuf text format, after an optional comment header)."""
    return header + text_format.MessageToString(config)


def _tensor(message, t: spec.TensorSpec):
    message.name = t.name
    message.data_type = model_config_pb2.DataType.Value(t.triton_type)
    message.dims.extend(t.shape)
    if t.optional:
        message.optional = True


def _io(pb: model_config_pb2.ModelConfig, model: spec.ModelSpec) -> None:
    for t in model.inputs:
        _tensor(pb.input.add(), t)
    for t in model.outputs:
        _tensor(pb.output.add(), t)


def _parameters(pb: model_config_pb2.ModelConfig, params: dict[str, str]) -> None:
    for key, value in params.items():
        pb.parameters[key].string_value = value


def _instances(pb: model_config_pb2.ModelConfig, count: int, kind: str) -> None:
    pb.instance_group.add(count=count, kind=model_config_pb2.ModelInstanceGroup.Kind.Value(kind))


def submodel_config(model: spec.ModelSpec, target: str, config: str, platform: str | None = None,
                    options: ServingOptions = ServingOptions(),
                    entry: runtimes.RuntimePlanEntry | None = None) -> model_config_pb2.ModelConfig:
    """The ModelConfig of one sub-network: Python backend on its runtime plan `entry` (local; default: the
    committed plan's) or a native platform (ngc); `options.instances` instances of it."""
    pb = model_config_pb2.ModelConfig(name=model.name, max_batch_size=options.submodel_max_batch_size)
    if target == "local":
        entry = entry or runtimes.runtime_plan(target, subjects=spec.SUBJECTS)[model.name]
        pb.backend = "python"
        params = {"network_config": config, **entry.parameters(),
                  "threads": str(options.threads), "models_at_once": str(models_at_once(options))}
        if entry.device != "cpu":      # inputs arrive in GPU memory, as BLS sends them
            params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        instance_kind = "KIND_CPU"
    elif target == "ngc":
        if platform not in PLATFORMS:
            raise ValueError(f"ngc platform must be one of {sorted(PLATFORMS)}, got {platform!r}")
        pb.platform, pb.default_model_filename = platform, PLATFORMS[platform]
        params = {"network_config": config}
        instance_kind = "KIND_GPU"
    else:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    pb.dynamic_batching.max_queue_delay_microseconds = options.submodel_queue_delay_us
    _io(pb, model)
    _instances(pb, options.instances.get(model.name, 1), instance_kind)
    _parameters(pb, params)
    return pb


def render_submodel_config(model: spec.ModelSpec, target: str, config: str, platform: str | None = None,
                           options: ServingOptions = ServingOptions(),
                           entry: runtimes.RuntimePlanEntry | None = None) -> str:
    """config.pbtxt of one sub-network (submodel_config as text)."""
    return config_text(submodel_config(model, target, config, platform, options, entry), _header(target, config))


def pipeline_config(target: str, config: str, options: ServingOptions = ServingOptions(),
                    subjects=(spec.HUMAN,)) -> model_config_pb2.ModelConfig:
    """The ModelConfig of the `liveportrait` sequence model (Python backend, BLS to the sub-networks of the model
    sets `subjects`, which its `subjects` parameter names)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    pb = model_config_pb2.ModelConfig(name=spec.PIPELINE, backend="python",
                                      max_batch_size=options.pipeline_max_batch_size)
    sequence = pb.sequence_batching
    sequence.max_sequence_idle_microseconds = options.sequence_idle_timeout_s * 1_000_000
    for name, kind in spec.SEQUENCE_CONTROLS.items():
        control = sequence.control_input.add(name=name).control.add(
            kind=model_config_pb2.ModelSequenceBatching.Control.Kind.Value(kind))
        if name == "CORRID":
            control.data_type = model_config_pb2.TYPE_UINT64
        else:
            control.int32_false_true.extend([0, 1])
    sequence.oldest.max_candidate_sequences = options.max_candidate_sequences
    sequence.oldest.preferred_batch_size.append(options.pipeline_max_batch_size)
    sequence.oldest.max_queue_delay_microseconds = options.pipeline_queue_delay_us
    _io(pb, spec.PIPELINE_SPEC)
    _instances(pb, options.pipeline_instances, "KIND_CPU")
    _parameters(pb, {"network_config": config,
                     "sequence_idle_timeout_s": str(options.sequence_idle_timeout_s),
                     "max_live_sequences": str(options.live_capacity),
                     "bls_tensors": options.bls_tensors or DEFAULT_BLS_TENSORS[target],
                     "subjects": ",".join(spec.parse_subjects(",".join(subjects)))})
    return pb


def render_pipeline_config(target: str, config: str, options: ServingOptions = ServingOptions(),
                           subjects=(spec.HUMAN,)) -> str:
    """config.pbtxt of the `liveportrait` sequence model (pipeline_config as text)."""
    return config_text(pipeline_config(target, config, options, subjects), _header(target, config))


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
                      plan: runtimes.RuntimePlan | None = None, subjects=(spec.HUMAN,)) -> dict[str, str]:
    """Every generated file of a repository of the model sets `subjects` as {relative path: text} (artefacts such
    as model.onnx excluded).

    Local sub-networks run `plan` (default: runtimes.runtime_plan(target), the committed choice)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    models = spec.subject_models(subjects)
    plan = (runtimes.plan_of(plan or runtimes.runtime_plan(target, subjects=subjects), models)
            if target == "local" else {})
    files = {}
    for name, model in spec.submodel_specs(config, subjects).items():
        chosen = ngc_platform(repository_dir, name, platform) if target == "ngc" else None
        files[f"{name}/config.pbtxt"] = render_submodel_config(model, target, config, chosen, options,
                                                               plan.get(name))
        if target == "local":
            files[f"{name}/1/model.py"] = SUBNETWORK_ADAPTER.read_text()
    files[f"{spec.PIPELINE}/config.pbtxt"] = render_pipeline_config(target, config, options, subjects)
    files[f"{spec.PIPELINE}/1/model.py"] = PIPELINE_ADAPTER.read_text()
    return files


def write_repository_configs(repository_dir: str | Path, target: str = "local", config: str = "full",
                             platform: str | None = None, options: ServingOptions = ServingOptions(),
                             plan: runtimes.RuntimePlan | None = None, subjects=(spec.HUMAN,)) -> list[Path]:
    """Write every config.pbtxt and Python-backend model.py of a repository; returns the paths written.

    The ONNX (or TensorRT) artefacts are not touched: export writes them. On the ngc target a stale local adapter
    (<model>/1/model.py of a sub-network) is removed so that the directory holds only what the platform uses.
    """
    root = Path(repository_dir)
    written = []
    for rel, text in render_repository(target, config, platform, options, root, plan, subjects).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    if target == "ngc":
        for name in spec.subject_models(subjects):
            stale = root / name / "1" / SUBNETWORK_ADAPTER.name
            if stale.is_file() and stale.read_text() == SUBNETWORK_ADAPTER.read_text():
                stale.unlink()
    return written


def copy_artefacts(source_dir: str | Path, repository_dir: str | Path) -> None:
    """Copy the exported files of every sub-network (<model>/1/model.onnx, and model.pt / model.plan where export
    or the TensorRT build wrote them) from one repository into another (e.g. a test's copy); the animal set's
    too where the source holds it."""
    for name in spec.ALL_SUBMODELS:
        if name not in spec.SUBMODELS and not (Path(source_dir) / name).is_dir():
            continue
        for filename in sorted(set(runtimes.ARTEFACT.values())):
            src = Path(source_dir) / name / "1" / filename
            if filename != ONNX_FILENAME and not src.is_file():
                continue
            dst = Path(repository_dir) / name / "1" / filename
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
