"""`liveportrait-triton tensorrt`: build `<model>/1/model.plan` TensorRT engines from an exported repository.

Needs an NVIDIA GPU and `tensorrt==10.16.1.11`; checking and timing engines also needs a CUDA build of PyTorch.
Each engine gets one optimisation profile for batch 1..max (opt at --opt-batch), is compared with ONNX Runtime
(CPU) on the same generated inputs, and is timed. Afterwards the repository's configs are re-rendered for the
`ngc` target, which serves a model from model.plan wherever one exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .. import spec
from ..tensorrt_engine import TensorRTError, import_tensorrt, require_cuda_torch
from .cli import MANIFEST_FILENAME, batch_sizes
from .onnx_export import ENGINE_MANIFEST_FILENAME, PLAN_FILENAME, model_path
from .tensorrt_build import (DEFAULT_OPT_BATCH, DEFAULT_WORKSPACE_GIB, PRECISIONS, build_engine, check_engine,
                             engine_precision, preflight)

REJECTED_PLAN_FILENAME = "model.rejected.plan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, metavar="DIR",
                        help="model repository written by `liveportrait-triton export` (<model>/1/model.onnx)")
    parser.add_argument("--models", nargs="+", choices=spec.ALL_SUBMODELS, default=None, metavar="MODEL",
                        help=f"models to build (default: those of the model sets the repository holds: "
                             f"{', '.join(spec.SUBMODELS)}, and the animal set's {', '.join(spec.ANIMAL_SUBMODELS)})")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="engine precision (default: the export's --precision from export.json, else fp16); "
                             "motion_extractor and the S MLPs are always fp32")
    parser.add_argument("--opt-batch", type=int, default=DEFAULT_OPT_BATCH,
                        help=f"batch size the profile is tuned for (default {DEFAULT_OPT_BATCH})")
    parser.add_argument("--max-batch", type=int, default=spec.MAX_BATCH_SIZE,
                        help=f"largest batch of the profile (default {spec.MAX_BATCH_SIZE}, the configs' max)")
    parser.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB,
                        help=f"builder workspace limit in GiB (default {DEFAULT_WORKSPACE_GIB})")
    parser.add_argument("--check-batches", type=batch_sizes, default=None, metavar="B[,B...]",
                        help="batch sizes at which engines are compared with ONNX Runtime and timed "
                             "(default 1 and --opt-batch)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per engine and batch (median)")
    parser.add_argument("--no-check", action="store_true",
                        help="only build engines (no comparison with ONNX Runtime, no timing)")
    parser.add_argument("--config", choices=("full", "tiny"), default=None,
                        help="network configuration (default: from export.json)")


def _export_manifest(repository: Path, model: str) -> dict:
    path = repository / model / "1" / MANIFEST_FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}


def run(args) -> int:
    try:
        return _run(args)
    except TensorRTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    repository = Path(args.repository)
    if not repository.is_dir():
        raise TensorRTError(f"repository {str(repository)!r} does not exist: run `liveportrait-triton export` first")
    from ..repository import repository_subjects
    subjects = repository_subjects(repository)
    models = args.models or list(spec.subject_models(subjects))
    manifests = {m: _export_manifest(repository, m) for m in models}
    config = args.config or next((m["config"] for m in manifests.values() if "config" in m), None)
    if config is None:
        raise TensorRTError("no export.json in the repository says which network configuration it holds; "
                            "pass --config full|tiny")
    requested = args.precision or next((m["tensorrt_precision"] for m in manifests.values()
                                        if "tensorrt_precision" in m), "fp16")
    check_batches = args.check_batches or tuple(sorted({1, args.opt_batch}))
    if max(check_batches) > args.max_batch or not 1 <= args.opt_batch <= args.max_batch <= spec.MAX_BATCH_SIZE:
        raise TensorRTError(f"need 1 <= --opt-batch <= --max-batch <= {spec.MAX_BATCH_SIZE} and check batches "
                            f"<= --max-batch; got opt {args.opt_batch}, max {args.max_batch}, check {check_batches}")
    for model in models:
        preflight(model_path(repository, model), model)
    trt = import_tensorrt()
    print(f"TensorRT {trt.__version__}; engines for {', '.join(models)} ({config} config, {requested} "
          f"requested), profile batch 1..{args.max_batch} opt {args.opt_batch}")
    specs = spec.submodel_specs(config, spec.SUBJECTS)
    checker = None if args.no_check else _Checker(repository, config, max(check_batches), subjects)
    failures = []
    for model in models:
        precision = engine_precision(model, requested)
        started = time.perf_counter()
        plan = build_engine(model_path(repository, model), specs[model], precision, args.opt_batch, args.max_batch,
                            args.workspace_gib)
        seconds = time.perf_counter() - started
        plan_path = model_path(repository, model).with_name(PLAN_FILENAME)
        manifest = {"model": model, "config": config, "precision": precision, "tensorrt": trt.__version__,
                    "profile": {"min": 1, "opt": args.opt_batch, "max": args.max_batch},
                    "build_seconds": round(seconds, 1), "checks": []}
        problems = []
        if checker is not None:
            for result in checker.check(plan, specs[model], precision, check_batches, args.repeats):
                diffs = ", ".join(f"{n} {d:.2e} (bound {result.bound[n]:.0e})" for n, d in result.max_abs_diff.items())
                print(f"  batch {result.batch}: {result.latency_ms:.3f} ms; max abs diff vs ONNX Runtime: {diffs}")
                manifest["checks"].append(dataclasses.asdict(result))
                problems += result.failures
        # A failing engine is kept for inspection under another name, so the ngc configs serve the ONNX file.
        written = plan_path.with_name(REJECTED_PLAN_FILENAME) if problems else plan_path
        written.write_bytes(plan)
        if problems:
            plan_path.unlink(missing_ok=True)
        failures += problems
        (plan_path.parent / ENGINE_MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{model}: wrote {written} ({len(plan) / 2 ** 20:.1f} MiB, {precision}, built in {seconds:.0f} s)")
    from .. import repository as repository_configs
    repository_configs.write_repository_configs(repository, target="ngc", config=config)
    print(f"wrote Triton configs for target 'ngc' into {repository} (tensorrt_plan where model.plan exists)")
    if failures:
        print("error: engine checks failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


class _Checker:
    """Generated inputs and ONNX Runtime (CPU) references from the repository's own ONNX files."""

    def __init__(self, repository: Path, config: str, batch: int, subjects=(spec.HUMAN,)):
        from ..pipeline import OnnxRunner
        from ..runtimes import RuntimeLoadError
        from .sample_inputs import sample_inputs
        require_cuda_torch()
        try:
            self.onnx = OnnxRunner(repository, config, subjects=subjects)
        except RuntimeLoadError as exc:
            raise TensorRTError(f"{exc}; checking engines needs every model's ONNX file (or pass --no-check)") from exc
        self.inputs = sample_inputs(self.onnx, batch)     # by role: made with the human set's networks

    def check(self, plan: bytes, model_spec: spec.ModelSpec, precision: str, batches, repeats: int):
        from ..runtimes import RuntimeLoadError, RuntimePlanEntry, create_subnetwork
        try:
            entry = RuntimePlanEntry.of(model_spec.name, "tensorrt", precision=precision)
            runner = create_subnetwork(entry, model_spec, artefact=plan)
        except RuntimeLoadError as exc:
            raise TensorRTError(str(exc)) from exc
        for batch in batches:
            feeds = {k: v[:batch] for k, v in self.inputs[spec.role_of(model_spec.name)].items()}
            yield check_engine(runner, precision, feeds, self.onnx.run(model_spec.name, feeds), repeats)
