"""Checks of an exported ONNX file: ONNX checker, shape inference, graph I/O against the spec, and every runtime
kind that runs it (runtimes.py) against PyTorch on the same inputs, with the one per-output comparison rule.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx

from .. import precision, spec

# ONNX element types of the spec's dtype names.
ONNX_DTYPE = {"FP32": onnx.TensorProto.FLOAT, "FP16": onnx.TensorProto.FLOAT16, "UINT8": onnx.TensorProto.UINT8,
              "INT64": onnx.TensorProto.INT64, "INT32": onnx.TensorProto.INT32, "BOOL": onnx.TensorProto.BOOL}

# Largest allowed max |runtime - PyTorch| per output, as a fraction of max(1, max |PyTorch output|) so the
# bound scales with trained weights' activations. Set about 10x above the largest difference measured on the
# generated inputs (synthetic seed 0, full and tiny, batch 1 and 3, decomposed grid sample) on a 2-core AMD EPYC:
# F 3.5e-6 (of max 4), M 5.4e-7, W warped_feature 5.1e-6 (of max ~2) and occlusion_map 5.4e-7, S 9e-8. M's
# bound is wider: on a 2-core Intel Xeon (Sapphire Rapids) ONNX Runtime and OpenVINO differed from PyTorch by up
# to 7.5e-6 and PyTorch's own fast-convolution copy by 1.1e-5 (other summation orders of the same ConvNeXt).
# The generator's image is uint8 (the official parse_output is part of the graph); see output_difference.
TOLERANCES = {
    (spec.APPEARANCE, "feature_volume"): 1e-5,
    (spec.MOTION, "pitch"): 1e-4, (spec.MOTION, "yaw"): 1e-4, (spec.MOTION, "roll"): 1e-4,
    (spec.MOTION, "t"): 1e-4, (spec.MOTION, "exp"): 1e-4, (spec.MOTION, "scale"): 1e-4, (spec.MOTION, "kp"): 1e-4,
    (spec.WARPING, "warped_feature"): 3e-5, (spec.WARPING, "occlusion_map"): 5e-6,
    (spec.STITCHING, "delta"): 1e-6, (spec.RETARGET_EYE, "delta"): 1e-6, (spec.RETARGET_LIP, "delta"): 1e-6,
}

# uint8 outputs: the float image before the truncation differs by ~2e-6 (ONNX Runtime) to ~1e-5 (OpenVINO) between
# runtimes, so a value that lies that close to an integer level truncates to the neighbouring level: one level at
# most, and rarely (full size, synthetic seed 0, batch 1: ONNX Runtime 0.005%, OpenVINO 0.038% of the values); a
# runtime that rounded instead of truncating would differ in about half of them.
UINT8_LEVELS = 1
UINT8_SHARE_DIFFERING = 0.01


class ValidationError(RuntimeError):
    """An exported graph that does not match the spec or does not compute what PyTorch computes."""


def _dims(value_info: onnx.ValueInfoProto) -> list:
    """Dims of a graph value: int for a fixed dim, str for a symbolic one, None for an unknown one."""
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None))
    return out


def _describe(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def io_problems(graph: onnx.GraphProto, model_spec: spec.ModelSpec, kinds=("input", "output"),
                require_symbolic_batch: bool = True) -> list[str]:
    """Differences between a graph's inputs/outputs and the spec: names and order, dtypes, ranks, per-item dims,
    a dynamic batch dim (symbolic when `require_symbolic_batch`, else at least not fixed)."""
    problems = []
    initializers = {t.name for t in graph.initializer}
    graph_values = {"input": [v for v in graph.input if v.name not in initializers], "output": list(graph.output)}
    spec_values = {"input": model_spec.inputs, "output": model_spec.outputs}
    for kind in kinds:
        actual, expected = graph_values[kind], spec_values[kind]
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            problems.append(f"{kind}s are {names}, the spec says {[t.name for t in expected]}")
        by_name = {v.name: v for v in actual}
        for t in expected:
            v = by_name.get(t.name)
            if v is None:
                continue
            elem = v.type.tensor_type.elem_type
            if elem != ONNX_DTYPE[t.dtype]:
                problems.append(f"{kind} {t.name!r} has type {onnx.TensorProto.DataType.Name(elem)}, "
                                f"the spec says {t.dtype}")
            dims = _dims(v)
            want = f"[batch, {', '.join(map(str, t.shape))}]"
            if len(dims) != len(t.shape) + 1:
                problems.append(f"{kind} {t.name!r} has shape {_describe(dims)}, the spec says {want}")
                continue
            if isinstance(dims[0], int) or (require_symbolic_batch and not dims[0]):
                problems.append(f"{kind} {t.name!r} has batch dim {dims[0] if dims[0] is not None else '?'}, "
                                "the spec says dynamic (a symbolic dim)")
            if tuple(dims[1:]) != t.shape:
                problems.append(f"{kind} {t.name!r} has shape {_describe(dims)}, the spec says {want}")
    return problems


def check_graph(path: str | os.PathLike, model_spec: spec.ModelSpec) -> None:
    """onnx.checker (full check, path form so files over 2 GB work), strict shape inference of the outputs, and
    graph I/O equal to the spec; raises ValidationError naming every problem."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # checker errors come in several types
        raise ValidationError(f"{model_spec.name}: {path} fails onnx.checker: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    problems = io_problems(model.graph, model_spec)
    # Infer the outputs from the graph alone: drop the declared shapes, infer, compare with the spec.
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ValidationError(f"{model_spec.name}: shape inference fails on {path}: {exc}") from exc
    problems += [f"shape inference: {p}"
                 for p in io_problems(inferred.graph, model_spec, ("output",), require_symbolic_batch=False)]
    if problems:
        raise ValidationError(f"{model_spec.name}: {path} does not match the spec: " + "; ".join(problems))


@dataclasses.dataclass
class Comparison:
    """Max |runtime - PyTorch| per output at one batch size, with the bound each was held to; for uint8 outputs
    also the share of elements that differ at all."""
    model: str
    batch: int
    max_abs_diff: dict[str, float]
    bound: dict[str, float]
    kind: str = "onnxruntime"
    share_differing: dict[str, float] = dataclasses.field(default_factory=dict)
    precision: str = "fp32"
    drift: list = dataclasses.field(default_factory=list)    # precision.Drift per output (reduced precision)

    @property
    def failures(self) -> list[str]:
        if self.precision != "fp32":      # reduced precision: held to the drift bounds, not to fp32 rounding
            return [f"{self.model} on {self.kind}/{self.precision} at batch {self.batch}: {d.describe()} "
                    f"({', '.join(precision.problems(d))})" for d in self.drift if precision.problems(d)]
        problems = [f"{self.model}.{name} on {self.kind} at batch {self.batch}: max abs diff {diff:.3g} exceeds "
                    f"{self.bound[name]:.3g}" for name, diff in self.max_abs_diff.items()
                    if not diff <= self.bound[name]]
        problems += [f"{self.model}.{name} on {self.kind} at batch {self.batch}: {share:.2%} of the uint8 values "
                     f"differ, more than {UINT8_SHARE_DIFFERING:.0%} (a rounding instead of the official "
                     "truncation?)" for name, share in self.share_differing.items() if share > UINT8_SHARE_DIFFERING]
        return problems


def output_difference(model: str, output: str, got: np.ndarray, want: np.ndarray) -> tuple[float, float, float | None]:
    """(max abs diff, its bound, share of differing elements or None) of one output against the reference.

    The one comparison rule: float outputs within TOLERANCES x max(1, max |reference|); uint8 outputs (the
    generator's image) within UINT8_LEVELS level, at most UINT8_SHARE_DIFFERING of them different at all.
    """
    if got.shape != want.shape:
        raise ValidationError(f"{model}.{output}: shape {list(got.shape)}, the reference has {list(want.shape)}")
    if want.dtype == np.uint8:
        if got.dtype != np.uint8:
            raise ValidationError(f"{model}.{output}: dtype {got.dtype}, the reference is uint8")
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        return (float(diff.max()) if diff.size else 0.0, float(UINT8_LEVELS),
                float(np.count_nonzero(diff)) / max(1, diff.size))
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    return diff, TOLERANCES[(spec.role_of(model), output)] * max(1.0, float(np.max(np.abs(want)))), None


def compare(runner, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> Comparison:
    """Run `runner` (a runtimes.SubnetworkRunner) on `inputs` and compare every spec output with `reference`: an
    fp32 runner by the fp32 rule (output_difference), a reduced-precision one by its drift against the fp32
    reference within precision.BOUNDS."""
    model_spec = runner.model_spec
    batch = next(iter(inputs.values())).shape[0]
    try:
        got = runner.run(inputs)
    except Exception as exc:    # every runtime raises its own exception types
        raise ValidationError(f"{model_spec.name}: {runner.kind} fails at batch {batch}: {exc}") from exc
    diffs, bounds, shares = {}, {}, {}
    for t in model_spec.outputs:
        diffs[t.name], bounds[t.name], share = output_difference(model_spec.name, t.name, got[t.name],
                                                                 np.asarray(reference[t.name]))
        if share is not None:
            shares[t.name] = share
    reduced = runner.entry.precision
    drift = ([precision.output_drift(model_spec.name, t.name, got[t.name], np.asarray(reference[t.name]))
              for t in model_spec.outputs] if reduced != "fp32" else [])
    return Comparison(model_spec.name, batch, diffs, bounds, runner.kind, shares, reduced, drift)
