"""Export served sub-networks to ONNX with the spec's names, dtypes and a dynamic batch axis.

Uses the TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and exports every network here.
The 5-D grid sample is exported either `decomposed` (gather-based, opset 17, builds in TensorRT 10) or `native`
(ONNX GridSample, opset 20; ONNX Runtime runs it, TensorRT 10 does not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import precision, runtimes, spec
from ..networks.fast_convolution import fast_convolutions
from ..networks.grid_sample import MODES as GRID_SAMPLE_MODES
from ..pipeline import TorchRunner
from ..weights import Networks, save_network_file
from .sample_inputs import fraction_inside_grid, sample_inputs
from ..networks.served import NETWORK_FIELD, ServedModel, served_models
from .validate import Comparison, ValidationError, check_graph, compare

OPSET = {"decomposed": 17, "native": 20}
BATCH_AXIS = "batch"
MODEL_FILENAME = runtimes.ONNX_FILENAME
REJECTED_FILENAME = "model.rejected.onnx"   # a file that failed validation, kept for inspection
PLAN_FILENAME = runtimes.PLAN_FILENAME       # TensorRT engine built from model.onnx by `liveportrait-triton tensorrt`
ENGINE_MANIFEST_FILENAME = "tensorrt.json"  # how that engine was built and checked


def model_path(repository: str | os.PathLike, model: str) -> Path:
    """`<repository>/<model>/1/model.onnx`, where Triton looks for version 1 of a model."""
    return Path(repository) / model / "1" / MODEL_FILENAME


@contextlib.contextmanager
def grid_sample_mode(networks: Networks, mode: str):
    """Temporarily set the warping module's grid-sample implementation."""
    if mode not in GRID_SAMPLE_MODES:
        raise ValueError(f"unknown grid-sample mode {mode!r}; choose one of {GRID_SAMPLE_MODES}")
    previous = networks.warping_module.grid_sample_mode
    networks.set_grid_sample_mode(mode)
    try:
        yield
    finally:
        networks.set_grid_sample_mode(previous)


def export_model(module: ServedModel, example: dict[str, np.ndarray], path: str | os.PathLike,
                 opset: int) -> Path:
    """Trace `module` on `example` (inputs by spec name) and write an ONNX file with spec names, batch axis dynamic.

    Trace with a batch of 2 or more: a batch of 1 lets the tracer treat the batch size as a constant in places.
    """
    model_spec = module.model_spec
    missing = [n for n in model_spec.input_names if n not in example]
    if missing:
        raise KeyError(f"example inputs for {model_spec.name} lack {missing}")
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n], dtype=np.float32)) for n in model_spec.input_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = model_spec.input_names + model_spec.output_names
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice and the tracer's notes on static shape checks are expected.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # InstanceNorm without running stats always normalises with the input's statistics, as exported.
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True")
        # The fast convolutions' strided slices (Winograd tiles) are computed at run time, not folded.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        with torch.no_grad():
            torch.onnx.export(module.eval(), args, str(path), input_names=model_spec.input_names,
                              output_names=model_spec.output_names, dynamic_axes={n: {0: BATCH_AXIS} for n in names},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    declare_inferred_output_shapes(path)
    return path


def export_fastconv_model(networks: Networks, model: str, path: str | os.PathLike,
                          example: dict[str, np.ndarray] | None = None, grid_sample: str = "decomposed") -> Path:
    """The openvino_fastconv kind's file: `model`'s served module with its convolutions in their fast forms by
    OpenVINO's rules (networks/fast_convolution.py RULES: the FFT as DFT matrix products, Winograd up to 128x128),
    exported as `export_model` does. `example` defaults to zeros at batch 2 (tracing reads only shapes)."""
    model_spec = spec.submodel_specs(networks.params)[model]
    if example is None:
        example = {t.name: np.zeros((2, *t.shape), np.float32) for t in model_spec.inputs}
    with grid_sample_mode(networks, grid_sample):
        module = fast_convolutions(ServedModel(networks, model_spec), runtime="openvino")
    return export_model(module, example, path, OPSET[grid_sample])


def declare_inferred_output_shapes(path: str | os.PathLike) -> None:
    """Replace the exporter's declared output shapes by ONNX shape inference's, with the batch dim named.

    The TorchScript exporter declares some fixed output dims as symbolic (W's 64x64 as Mul..._dim_2, G's image
    height even as 'batch'); ONNX's own inference with data propagation resolves them from the graph.
    External-data references (files over 2 GB) are kept as they are.
    """
    model = onnx.load(str(path), load_external_data=False)
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    for output, found in zip(model.graph.output, inferred.graph.output):
        output.type.tensor_type.shape.CopyFrom(found.type.tensor_type.shape)
        dims = output.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_AXIS
    onnx.save(model, str(path))


@dataclasses.dataclass
class ExportedModel:
    """One exported and validated file, with the measured runtime vs PyTorch differences."""
    model: str
    path: Path
    opset: int
    comparisons: list[Comparison]
    served: runtimes.RuntimePlanEntry | None = None    # the plan entry it is served on (None: no plan given)
    refused: list[str] = dataclasses.field(default_factory=list)   # a reduced entry's drift beyond the bounds

    def summary(self) -> str:
        size = self.path.stat().st_size / 2 ** 20
        parts = [f"{self.model}: {self.path} ({size:.1f} MiB, opset {self.opset}): checker, shape inference and "
                 "I/O vs spec ok"]
        for c in self.comparisons:
            if c.precision != "fp32":
                parts.append(f"  {c.kind}/{c.precision}, batch {c.batch}: drift vs PyTorch fp32: "
                             + "; ".join(d.describe() for d in c.drift))
                continue
            diffs = ", ".join(f"{name} {diff:.2e} (bound {c.bound[name]:.0e})" for name, diff in c.max_abs_diff.items())
            shares = "".join(f", {name} differs in {share:.3%} of values" for name, share in c.share_differing.items())
            parts.append(f"  {c.kind}, batch {c.batch}: max abs diff vs PyTorch: {diffs}{shares}")
        return "\n".join(parts)


def validation_entries(model: str, served: runtimes.RuntimePlanEntry | None) -> list[runtimes.RuntimePlanEntry]:
    """The runners an export is checked on, as plan entries on the CPU: ONNX Runtime in fp32 always (the ONNX
    file), and the plan's `served` entry when its kind runs a file export writes (OpenVINO: the ONNX file;
    openvino_fastconv: its own model_fastconv.onnx; the torch kinds: the network file model.pt), in its
    precision; a reduced-precision entry also brings its exact entry (what a CPU without native bf16 loads
    instead, runtimes.native_entry). TensorRT engines are checked by `liveportrait-triton tensorrt`."""
    entries = [runtimes.RuntimePlanEntry.of(model, "onnxruntime")]
    servable = (*runtimes.ONNX_KINDS, *runtimes.TORCH_KINDS)
    candidates = [served] if served is not None else []
    if served is not None and not served.exact:
        candidates.append(runtimes.runtime_plan("local", subjects=spec.SUBJECTS)[model])
    for entry in candidates:
        entry = runtimes.RuntimePlanEntry.of(model, entry.kind, precision=entry.precision)
        if entry.kind in servable and entry not in entries:
            entries.append(entry)
    return entries


def _remove_served_files(final: Path) -> None:
    """The files besides model.onnx that export writes for the chosen kind (model.pt, model_fastconv.onnx)."""
    for filename in (runtimes.TORCH_FILENAME, runtimes.FASTCONV_ONNX_FILENAME):
        final.with_name(filename).unlink(missing_ok=True)


def export_repository(networks: Networks, repository: str | os.PathLike, grid_sample: str = "decomposed",
                      validate_batches: tuple[int, ...] = (1, 3), models: tuple[str, ...] = spec.SUBMODELS,
                      plan: runtimes.RuntimePlan | None = None, log=print,
                      exact_where_refused: tuple[str, ...] = ()) -> list[ExportedModel]:
    """Export, check and compare every served model into `<repository>/<model>/1/model.onnx`, on ONNX Runtime
    and on the kind the runtime `plan` serves it on (`validation_entries`). `models` are served names of one
    model set, whose networks `networks` holds: the human set's (default), or the animal set's
    (spec.ANIMAL_SUBMODELS, with networks loaded by `load_networks(human_dir, config, animal_dir)`).

    PyTorch references use the native F.grid_sample whatever `grid_sample` says, so the comparison also checks
    the decomposed grid sample. A file is moved into place only after it passed (and a model.plan built from an
    earlier export is removed); a failing one is left as `model.rejected.onnx` for inspection. Raises
    ValidationError listing every failure after trying all models, except that a reduced-precision entry of a
    model in `exact_where_refused` (the choice of the reduced policy, not one asked for by name) whose drift lies
    beyond the bounds is refused with its figures and the model served on its exact entry (`ExportedModel.served`).
    """
    if not validate_batches or min(validate_batches) < 1:
        raise ValueError(f"validate_batches must be positive batch sizes, got {validate_batches}")
    specs = spec.submodel_specs(networks.params, spec.SUBJECTS)
    unknown = [m for m in models if m not in specs]
    if unknown:
        raise ValueError(f"unknown models {unknown}; served models: {list(spec.ALL_SUBMODELS)}")
    opset = OPSET[grid_sample]
    trace_batch = max(2, *validate_batches)
    reference_runner = TorchRunner(networks)
    with grid_sample_mode(networks, "native"):
        inputs = sample_inputs(reference_runner, trace_batch)
    kp = inputs[spec.WARPING]
    log(f"validation inputs: generated images; {fraction_inside_grid(kp['kp_source']):.0%} of source and "
        f"{fraction_inside_grid(kp['kp_driving']):.0%} of driving keypoints inside W's [-1, 1]^3 grid")
    served = served_models(networks)
    done, failures = [], []
    for model in models:
        role = spec.role_of(model)      # the sub-network it runs: its inputs, reference and network
        final = model_path(repository, model)
        partial = final.with_name("model.partial.onnx")
        rejected = final.with_name(REJECTED_FILENAME)
        with grid_sample_mode(networks, grid_sample):
            export_model(served[role], inputs[role], partial, opset)
        comparisons = []
        try:
            check_graph(partial, specs[model])
            references = []
            for batch in validate_batches:
                feeds = {k: v[:batch] for k, v in inputs[role].items()}
                with grid_sample_mode(networks, "native"):
                    references.append((feeds, reference_runner.run(role, feeds)))
            for entry in validation_entries(model, (plan or {}).get(model)):
                kind = entry.kind
                artefact = partial
                if kind in runtimes.TORCH_KINDS:     # the network file the torch kinds serve, checked as served
                    artefact = final.with_name(runtimes.TORCH_FILENAME)
                    save_network_file(networks, NETWORK_FIELD[role], artefact)
                elif kind == "openvino_fastconv":    # its own ONNX file, checked as served
                    artefact = export_fastconv_model(networks, role, final.with_name(runtimes.FASTCONV_ONNX_FILENAME),
                                                     inputs[role], grid_sample)
                runner = runtimes.create_subnetwork(entry, specs[model], artefact=artefact)
                for feeds, reference in references:
                    comparisons.append(compare(runner, feeds, reference))
                    if not entry.exact:      # F and W: the image they give through fp32 W and G decides too
                        got = runner.run(feeds)
                        kp = {k: v[:len(got[next(iter(got))])] for k, v in inputs[spec.WARPING].items()
                              if k != "feature_volume"}
                        with grid_sample_mode(networks, "native"):
                            comparisons[-1].drift += precision.downstream_drift(reference_runner, role, got,
                                                                                reference, kp)
                del runner
            problems = [f for c in comparisons for f in c.failures]
        except (ValidationError, runtimes.RuntimeLoadError) as exc:
            problems = [str(exc)]
        entry = (plan or {}).get(model)
        refused = []
        if entry is not None and not entry.exact and model in exact_where_refused:
            refused = [f for c in comparisons if c.precision != "fp32" for f in c.failures]
            if refused:
                problems = [p for p in problems if p not in refused]
                entry = runtimes.runtime_plan("local", subjects=spec.SUBJECTS)[model]
                log(f"{model}: reduced precision refused, serving the exact entry {entry.label()}: "
                    + "; ".join(refused))
        os.replace(partial, rejected if problems else final)
        result = ExportedModel(model, rejected if problems else final, opset, comparisons, entry, refused)
        if comparisons:
            log(result.summary())
        if problems:
            failures += problems
            _remove_served_files(final)
            log(f"{model}: FAILED: " + "; ".join(problems))
            continue
        rejected.unlink(missing_ok=True)
        stale = final.with_name(PLAN_FILENAME)
        if stale.exists():   # an engine built from an earlier export, which the ngc configs would serve
            stale.unlink()
            final.with_name(ENGINE_MANIFEST_FILENAME).unlink(missing_ok=True)
            log(f"{model}: removed {stale}, built from an earlier export (rebuild with `liveportrait-triton tensorrt`)")
        done.append(result)
    if failures:
        raise ValidationError(f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures))
    return done
