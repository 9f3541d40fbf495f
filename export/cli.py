"""`liveportrait-triton export`: export every served sub-network to ONNX, validate it, render the Triton configs.

Writes `<repository>/<model>/1/model.onnx` (+ `export.json`, what was exported and how it validated) for every
model in spec.SUBMODELS (and, with animal weights, spec.ANIMAL_SUBMODELS: the official Animals mode's F, M, W and G
as models of their own), then the repository's config.pbtxt files for the chosen target.
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
    animals = parser.add_mutually_exclusive_group()
    animals.add_argument("--animal-weights", metavar="DIR",
                         help="also export the Animals set from DIR in the official liveportrait_animals layout "
                              "(base_models_v1.1/, or base_models/ for v1.0); its stitching MLP is the humans' "
                              "(--weights or --synthetic), and it has no eye/lip retargeting")
    animals.add_argument("--animal-synthetic", type=int, metavar="SEED",
                         help="also export an Animals set of deterministic synthetic weights from this seed")
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


def subjects(args) -> tuple[str, ...]:
    """The model sets the arguments export."""
    animals = args.animal_weights is not None or args.animal_synthetic is not None
    return (spec.HUMAN, spec.ANIMAL) if animals else (spec.HUMAN,)


def load(args) -> dict:
    """{subject: networks} the arguments name (synthetic ones are written to a temporary directory and loaded);
    the animal set's networks carry the humans' stitching MLP, as the official Animals mode does."""
    from ..weights import load_networks, write_synthetic_weights
    with tempfile.TemporaryDirectory(prefix="liveportrait-synthetic-") as tmp:
        human_dir, animal_dir = args.weights, args.animal_weights
        if human_dir is None:
            human_dir = Path(tmp) / "human"
            write_synthetic_weights(human_dir, args.synthetic, args.config)
        if args.animal_synthetic is not None:
            animal_dir = Path(tmp) / "animal"
            write_synthetic_weights(animal_dir, args.animal_synthetic, args.config, spec.ANIMAL)
        networks = {spec.HUMAN: load_networks(human_dir, args.config)}
        if animal_dir is not None:
            networks[spec.ANIMAL] = load_networks(human_dir, args.config, animal_dir)
        return networks


def weights_origin(args, model: str) -> str:
    """Where an exported model's weights came from (recorded in export.json)."""
    if model in spec.ANIMAL_SUBMODELS:
        if args.animal_weights:
            return str(Path(args.animal_weights).resolve())
        return f"synthetic animal seed {args.animal_synthetic}"
    return str(Path(args.weights).resolve()) if args.weights else f"synthetic seed {args.synthetic}"


def run(args) -> int:
    from .. import repository, runtimes   # rendered and run by the server side of the package
    from ..weights import WeightsError
    from .onnx_export import OPSET, export_repository
    from .validate import ValidationError
    try:
        precision = precision_policy(args.target, args.precision)
        plan = (runtimes.runtime_plan(args.target, runtimes.parse_runtime_overrides(args.runtime), policy=precision,
                                      subjects=subjects(args)) if args.target == "local" else {})
        networks = load(args)
    except (WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    overridden = set(runtimes.parse_runtime_overrides(args.runtime)) if plan else set()
    try:
        exported = []
        for subject, subject_networks in networks.items():
            models = spec.SUBMODELS if subject == spec.HUMAN else spec.ANIMAL_SUBMODELS
            exported += export_repository(subject_networks, args.repository, args.grid_sample, args.validate_batches,
                                          models=models, plan=plan,
                                          exact_where_refused=tuple(m for m in plan if m not in overridden))
    except ValidationError as exc:
        print(f"error: export failed validation: {exc}", file=sys.stderr)
        return 1
    plan = {**plan, **{item.model: item.served for item in exported if item.served is not None}}
    for item in exported:
        manifest = {
            "model": item.model, "config": args.config, "grid_sample": args.grid_sample,
            "opset": OPSET[args.grid_sample],
            "weights": weights_origin(args, item.model),
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
                                        plan=plan or None, subjects=subjects(args))
    print(f"wrote Triton configs for target {args.target!r} into {args.repository}")
    return 0
