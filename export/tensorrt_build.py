"""Build TensorRT engines (`model.plan`) from the exported ONNX files, check them against ONNX Runtime, time them.

TensorRT (PyPI `tensorrt==10.16.1.11`) and a CUDA GPU are needed only here; `tensorrt` is imported lazily. Engine
inputs and outputs are bound by name, never by position. Device buffers are PyTorch CUDA tensors, so checking and
timing engines needs a CUDA build of PyTorch; building alone does not.

Precision: FP16 engines keep the layers where half precision is unsafe in FP32 (see FP32_LAYER_TYPES); the motion
extractor (pose-bin logits feed a softmax expectation, ConvNeXt LayerNorm/GRN statistics) and the tiny S MLPs
(keypoint deltas, nothing to gain) are always FP32. FP32 engines disable TF32 so that they compute in true FP32.
FP16 uses the builder flag of TensorRT 10 ("weakly typed" networks, deprecated since 10.12, removed in 11).

An engine runs only on the TensorRT version (and GPU architecture) that built it: build inside the serving image
or with the same TensorRT version as the server.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx

from .. import precision as precisions
from .. import runtimes, spec
from ..tensorrt_engine import TensorRTError, import_tensorrt
from .validate import TOLERANCES, UINT8_LEVELS, output_difference

PRECISIONS = runtimes.PRECISIONS_OF_KIND["tensorrt"]     # the plan's precisions of a TensorRT engine
DEFAULT_OPT_BATCH = 4
DEFAULT_WORKSPACE_GIB = 8
# In FP16 engines, layers of these types (trt.LayerType names) stay FP32: normalisation statistics everywhere, and
# in W the keypoint Gaussians, softmax mask and the grid-sample coordinate and gather arithmetic (a 64-wide grid
# index in FP16 is off by up to 0.03 voxel).
FP32_LAYER_TYPES = {
    spec.APPEARANCE: ("NORMALIZATION", "REDUCE"),
    spec.WARPING: ("NORMALIZATION", "REDUCE", "SOFTMAX", "UNARY", "GATHER", "SELECT", "ELEMENTWISE"),
    spec.GENERATOR: ("NORMALIZATION", "REDUCE"),
}
# Engine vs ONNX Runtime (CPU, FP32) bound per float output, as a multiple of max(1, max |reference|) like
# TOLERANCES. FP32 engines: GPU kernels sum in other orders, so 10x the ONNX Runtime vs PyTorch bound. FP16
# engines: the drift bounds of every reduced precision (liveportrait_triton/precision.py BOUNDS: image mean <= 1
# level, <= 2% of values off by > 4 levels, max 48; float features mean <= 2% and max <= 25% of their scale). fp16
# measured by emulation (fp16 operands, fp32 accumulation, `liveportrait-triton bench --runtime-choice`,
# benchmarks/results/amd_epyc/precision_fp16_emulation.md: full-size G image max 1 level, mean 0.075; F and W
# through fp32 downstream mean 0.11 and 0.17 levels) lies far inside them.
FP32_ENGINE_FACTOR = 10.0


def engine_precision(model: str, requested: str) -> str:
    """The precision an engine of `model` is built in when `requested` is asked for."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {PRECISIONS}")
    return "fp32" if spec.role_of(model) in precisions.ALWAYS_FP32 else requested


def profile_shapes(model_spec: spec.ModelSpec, opt_batch: int = DEFAULT_OPT_BATCH,
                   max_batch: int = spec.MAX_BATCH_SIZE, min_batch: int = 1) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input of one model for a TensorRT optimisation profile."""
    if not 1 <= min_batch <= opt_batch <= max_batch <= spec.MAX_BATCH_SIZE:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch <= {spec.MAX_BATCH_SIZE}, "
                         f"got {min_batch}, {opt_batch}, {max_batch}")
    return {t.name: ((min_batch, *t.shape), (opt_batch, *t.shape), (max_batch, *t.shape)) for t in model_spec.inputs}


def engine_bound(model: str, output: str, precision: str) -> float:
    """Allowed max |engine - ONNX Runtime| of one output: relative to max(1, max |reference|) for float outputs,
    in grey levels for the uint8 image. FP16 engines of F, W and G: the max of precision.BOUNDS (their mean and
    share figures are checked by EngineCheck too). An animal model's bounds are its role's."""
    model = spec.role_of(model)
    image = (model, output) not in TOLERANCES
    if precision == "fp16" and engine_precision(model, precision) == "fp16":
        return float(precisions.BOUNDS["levels" if image else "relative"].max)
    if image:
        return float(UINT8_LEVELS)
    return FP32_ENGINE_FACTOR * TOLERANCES[(model, output)]


def preflight(onnx_path: str | os.PathLike, model: str) -> None:
    """Problems that need no GPU to find: a missing file, or a native GridSample TensorRT 10 cannot build."""
    path = Path(onnx_path)
    if not path.is_file():
        raise TensorRTError(f"{path} not found: run `liveportrait-triton export` first")
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    if "GridSample" in ops:
        raise TensorRTError(f"{model}: {path} uses the ONNX GridSample op on 5-D inputs, which TensorRT 10 cannot "
                            "build; export with `--grid-sample decomposed` (the default)")


def _keep_fp32(trt, network, model: str) -> int:
    """Constrain the model's FP32_LAYER_TYPES layers with floating-point outputs to FP32; returns how many."""
    types = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES.get(spec.role_of(model), ())}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.type not in types or not all(o.dtype in (trt.float32, trt.float16) for o in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        count += 1
    return count


def build_engine(onnx_path: str | os.PathLike, model_spec: spec.ModelSpec, precision: str,
                 opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = spec.MAX_BATCH_SIZE,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, log=print) -> bytes:
    """Parse one ONNX file, check its I/O names against the spec, and build a serialized engine."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTError("TensorRT cannot create a builder: no usable CUDA GPU or driver")
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{model_spec.name}: TensorRT cannot parse {onnx_path}: {errors}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if sorted(inputs) != sorted(model_spec.input_names) or sorted(outputs) != sorted(model_spec.output_names):
        raise TensorRTError(f"{model_spec.name}: network I/O {inputs} -> {outputs} differs from the spec "
                            f"{model_spec.input_names} -> {model_spec.output_names}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2 ** 30))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(model_spec, opt_batch, max_batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        kept = _keep_fp32(trt, network, model_spec.name)
        log(f"{model_spec.name}: FP16 engine, {kept} of {network.num_layers} layers kept in FP32")
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
        log(f"{model_spec.name}: FP32 engine (TF32 off)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{model_spec.name}: TensorRT failed to build an engine from {onnx_path} "
                            "(see the TensorRT messages above)")
    return bytes(serialized)


@dataclasses.dataclass
class EngineCheck:
    """Max |engine - ONNX Runtime| per output at one batch, the bounds, and the engine's latency there."""
    model: str
    batch: int
    max_abs_diff: dict[str, float]
    bound: dict[str, float]
    latency_ms: float
    drift: list = dataclasses.field(default_factory=list)     # precision.Drift per output (FP16 engines)

    @property
    def failures(self) -> list[str]:
        return [f"{self.model}.{n} at batch {self.batch}: engine vs ONNX Runtime max abs diff {d:.3g} exceeds "
                f"{self.bound[n]:.3g}" for n, d in self.max_abs_diff.items() if not d <= self.bound[n]] + [
                f"{self.model} at batch {self.batch}: FP16 engine {d.describe()} ({', '.join(precisions.problems(d))})"
                for d in self.drift if precisions.problems(d)]


def check_engine(runner, precision: str, inputs: dict[str, np.ndarray],
                 reference: dict[str, np.ndarray], repeats: int) -> EngineCheck:
    """Compare an engine's outputs (runner: a runtimes.SubnetworkRunner of kind tensorrt, whose session is a TensorRTEngine) with ONNX Runtime's on
    the same inputs (the export's comparison, engine bounds), and time it."""
    from .validate import ValidationError
    got = runner.run(inputs)
    model = runner.model_spec.name
    diffs, bounds = {}, {}
    for t in runner.model_spec.outputs:
        want = np.asarray(reference[t.name])
        try:
            diffs[t.name], export_bound, _ = output_difference(model, t.name, got[t.name], want)
        except ValidationError as exc:
            raise TensorRTError(f"engine vs ONNX Runtime: {exc}") from exc
        scale = 1.0 if want.dtype == np.uint8 else export_bound / TOLERANCES[(spec.role_of(model), t.name)]
        bounds[t.name] = engine_bound(model, t.name, precision) * scale
    batch = next(iter(inputs.values())).shape[0]
    drift = ([precisions.output_drift(model, t.name, got[t.name], np.asarray(reference[t.name]))
              for t in runner.model_spec.outputs] if engine_precision(model, precision) == "fp16" else [])
    return EngineCheck(model, batch, diffs, bounds, runner.session.latency_ms(inputs, repeats), drift)
