"""`liveportrait-triton export`: export every served sub-network to ONNX, validate it, render the Triton configs.

Writes `<repository>/<model>/1/model.onnx` (+ `export.json`, what was exported and how it validated) for every
model in spec.SUBMODELS, then the repository's config.pbtxt files for the chosen target.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .. import spec
from ..config import CONFIGS
from ..networks.grid_sample import MODES as GRID_SAMPLE_MODES
from ..precision import EXACT, REDUCED
from ..runtimes import KINDS, PRECISIONS_OF_KIND

TARGETS = ("local", "ngc")
PRECISION_CHOICES = (EXACT, REDUCED, *PRECISIONS_OF_KIND["tensorrt"])


def precision_policy(target: str, requested: str | None) -> str:
    """The --precision of `target`: local runs a policy (exact | reduced; fp32 is exact), ngc a TensorRT engine
    precision (fp32 | fp16; exact is fp32, reduced fp16)."""
    if target == "local":
        if requested == "fp16":
            raise ValueError("--precision fp16 is a TensorRT engine precision (--target ngc); the local target's "
                             "CPUs run exact (fp32) or reduced (bf16 where the machine has it)")
        return EXACT if requested in (EXACT, "fp32") else REDUCED
    return {None: "fp16", EXACT: "fp32", REDUCED: "fp16"}.get(requested, requested)
MANIFEST_FILENAME = "export.json"


def batch_sizes(text: str) -> tuple[int, ...]:
    """argparse type: '1,3' -> (1, 3), each in 1..spec.MAX_BATCH_SIZE."""
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,3, got {text!r}") from None
    if not batches or min(batches) < 1 or max(batches) > spec.MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"batch sizes must lie in 1..{spec.MAX_BATCH_SIZE}, got {text!r}")
    return batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="DIR",
                        help="checkpoint directory in the official layout (base_models/, retargeting_models/)")
    source.add_argument("--synthetic", type=int, metavar="SEED",
                        help="use deterministic synthetic weights from this seed (not a trained model)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full", help="network configuration")
    parser.add_argument("--repository", required=True, metavar="DIR", help="Triton model repository to write")
    parser.add_argument("--target", choices=TARGETS, default="local",
                        help="local: bundled CPU Triton, Python-backend models running ONNX Runtime; "
                             "ngc: NGC tritonserver image, onnxruntime/tensorrt backends")
    parser.add_argument("--grid-sample", choices=GRID_SAMPLE_MODES, default="decomposed",
                        help="5-D grid sample in the warping module: decomposed (gathers, opset 17, builds in "
                             "TensorRT 10) or native (ONNX GridSample, opset 20, ONNX Runtime only)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="local target: exact (fp32 everywhere, today's numerics, within one uint8 level of "
                             "the official code; fp32 says the same) or reduced (default: the choice measured for "
                             "this machine's class, liveportrait_triton/precision.py: bf16 where it was faster "
                             "within the drift bounds; M and the MLPs stay fp32). ngc target: the precision of the "
                             "TensorRT engines that `liveportrait-triton tensorrt` later builds from this export "
                             "(recorded in export.json; default fp16, where motion_extractor and the S MLPs stay "
                             "fp32; exact means fp32). The ONNX files always stay FP32: inputs, outputs and weights")
    parser.add_argument("--validate-batches", type=batch_sizes, default=(1, 3), metavar="B[,B...]",
                        help="batch sizes at which the runtimes are compared with PyTorch (default 1,3)")
    parser.add_argument("--runtime", action="append", default=[], metavar="MODEL=KIND",
                        help=f"serve MODEL on runtime KIND ({', '.join(KINDS)}) instead of the "
                             "committed choice for the target (liveportrait_triton/runtime_choice.json); "
                             "repeatable. Each file is validated on ONNX Runtime and on the kind serving it")


def load(args):
    """The networks the arguments name (synthetic ones are written to a temporary directory and loaded)."""
    from ..weights import load_networks, write_synthetic_weights
    if args.weights is not None:
        return load_networks(args.weights, args.config)
    with tempfile.TemporaryDirectory(prefix="liveportrait-synthetic-") as tmp:
        write_synthetic_weights(tmp, args.synthetic, args.config)
        return load_networks(tmp, args.config)


def run(args) -> int:
    from .. import repository, runtimes   # rendered and run by the server side of the package
    from ..weights import WeightsError
    from .onnx_export import OPSET, export_repository
    from .validate import ValidationError
    try:
        precision = precision_policy(args.target, args.precision)
        plan = (runtimes.runtime_plan(args.target, runtimes.parse_runtime_overrides(args.runtime), policy=precision)
                if args.target == "local" else {})
        networks = load(args)
    except (WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    overridden = set(runtimes.parse_runtime_overrides(args.runtime)) if plan else set()
    try:
        exported = export_repository(networks, args.repository, args.grid_sample, args.validate_batches,
                                     plan=plan, exact_where_refused=tuple(m for m in plan if m not in overridden))
    except ValidationError as exc:
        print(f"error: export failed validation: {exc}", file=sys.stderr)
        return 1
    plan = {**plan, **{item.model: item.served for item in exported if item.served is not None}}
    for item in exported:
        manifest = {
            "model": item.model, "config": args.config, "grid_sample": args.grid_sample,
            "opset": OPSET[args.grid_sample],
            "weights": str(Path(args.weights).resolve()) if args.weights else f"synthetic seed {args.synthetic}",
            "precision": precision,
            "tensorrt_precision": "fp32" if precision in (EXACT, "fp32") else "fp16",   # engines built later
            "runtime": plan[item.model].kind if item.model in plan else None,
            "runtime_plan": plan[item.model].parameters() if item.model in plan else None,
            "refused": item.refused,
            "validation": [{"runtime": c.kind, "precision": c.precision, "batch": c.batch,
                            "max_abs_diff": c.max_abs_diff, "bound": c.bound, "share_differing": c.share_differing,
                            "drift": [d.row() for d in c.drift]} for c in item.comparisons],
        }
        (item.path.parent / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"exported and validated {len(exported)} models in {time.perf_counter() - started:.0f} s")
    if plan:
        print(f"precision policy {precision}: " + ", ".join(f"{m} {e.label()}" for m, e in plan.items()))
    repository.write_repository_configs(args.repository, target=args.target, config=args.config,
                                        plan=plan or None)
    print(f"wrote Triton configs for target {args.target!r} into {args.repository}")
    return 0
