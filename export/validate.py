"""Checks of an exported ONNX file: ONNX checker, shape inference, graph I/O against the spec, and ONNX Runtime
(CPU) against PyTorch on the same inputs with per-output tolerances.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx

from .. import spec

# ONNX element types of the spec's dtype names.
ONNX_DTYPE = {"FP32": onnx.TensorProto.FLOAT, "FP16": onnx.TensorProto.FLOAT16, "UINT8": onnx.TensorProto.UINT8,
              "INT64": onnx.TensorProto.INT64, "INT32": onnx.TensorProto.INT32, "BOOL": onnx.TensorProto.BOOL}

# Largest allowed max |ONNX Runtime - PyTorch| per output, as a fraction of max(1, max |PyTorch output|) so the
# bound scales with trained weights' activations. Set about 10x above the largest difference measured on the
# generated inputs (synthetic seed 0, full and tiny, batch 1 and 3, decomposed grid sample): F 3.5e-6 (of max 4),
# M 5.4e-7, W warped_feature 5.1e-6 (of max ~2) and occlusion_map 5.4e-7, G 2.2e-6, S 9e-8.
TOLERANCES = {
    (spec.APPEARANCE, "feature_volume"): 1e-5,
    (spec.MOTION, "pitch"): 5e-6, (spec.MOTION, "yaw"): 5e-6, (spec.MOTION, "roll"): 5e-6,
    (spec.MOTION, "t"): 5e-6, (spec.MOTION, "exp"): 5e-6, (spec.MOTION, "scale"): 5e-6, (spec.MOTION, "kp"): 5e-6,
    (spec.WARPING, "warped_feature"): 3e-5, (spec.WARPING, "occlusion_map"): 5e-6,
    (spec.GENERATOR, "image"): 2e-5,
    (spec.STITCHING, "delta"): 1e-6, (spec.RETARGET_EYE, "delta"): 1e-6, (spec.RETARGET_LIP, "delta"): 1e-6,
}


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
    """Max |ONNX Runtime - PyTorch| per output at one batch size, with the bound each was held to."""
    model: str
    batch: int
    max_abs_diff: dict[str, float]
    bound: dict[str, float]

    @property
    def failures(self) -> list[str]:
        return [f"{self.model}.{name} at batch {self.batch}: max abs diff {diff:.3g} exceeds {self.bound[name]:.3g}"
                for name, diff in self.max_abs_diff.items() if not diff <= self.bound[name]]


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None):
    """A CPU ONNX Runtime session for one file (a path, or the file's bytes)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types
        where = "the given model bytes" if isinstance(model, bytes) else model
        raise ValidationError(f"ONNX Runtime cannot load {where}: {exc}") from exc


def compare(session, model_spec: spec.ModelSpec, inputs: dict[str, np.ndarray],
            reference: dict[str, np.ndarray]) -> Comparison:
    """Run `session` on `inputs` (bound by name) and compare every spec output with `reference`."""
    names = model_spec.output_names
    feeds = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in model_spec.input_names}
    batch = next(iter(feeds.values())).shape[0]
    try:
        got = dict(zip(names, session.run(names, feeds)))
    except Exception as exc:
        raise ValidationError(f"{model_spec.name}: ONNX Runtime fails at batch {batch}: {exc}") from exc
    diffs, bounds = {}, {}
    for t in model_spec.outputs:
        want = np.asarray(reference[t.name])
        if got[t.name].shape != want.shape:
            raise ValidationError(f"{model_spec.name}.{t.name} at batch {batch}: ONNX Runtime returned shape "
                                  f"{list(got[t.name].shape)}, PyTorch {list(want.shape)}")
        diffs[t.name] = float(np.max(np.abs(got[t.name].astype(np.float64) - want))) if want.size else 0.0
        bounds[t.name] = TOLERANCES[(model_spec.name, t.name)] * max(1.0, float(np.max(np.abs(want))))
    return Comparison(model_spec.name, batch, diffs, bounds)
