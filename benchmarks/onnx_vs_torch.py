"""ONNX Runtime (CPU) vs PyTorch (CPU) latency of every served sub-network, at batch 1 and 4, in one run.

    python -m liveportrait_triton.benchmarks.onnx_vs_torch [--weights DIR | --synthetic SEED] \
        --out results/onnx_vs_torch_cpu.md

The models are exported afresh from the given weights (the same exporter as `liveportrait-triton export`) into a
temporary directory. All PyTorch timings are taken before the first ONNX Runtime session exists, because live
sessions' spinning worker threads slow PyTorch down (../shared/reference/cpu_baseline.md). Both runtimes use
--threads threads. The max abs difference of the outputs is reported as a sanity check (export validation holds
them to tight bounds). Writes OUT.md and OUT.csv.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import numpy as np

from .modules import add_weights_arguments, format_ms, machine_note, median_ms, write_outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveportrait_triton.benchmarks.onnx_vs_torch",
                                     description=__doc__.splitlines()[0])
    add_weights_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output file; writes OUT.md and OUT.csv")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model and batch (median; default 3)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--grid-sample", choices=("decomposed", "native"), default="decomposed",
                        help="grid sample of the exported W (PyTorch always runs the native F.grid_sample)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    from .. import spec
    from ..export.cli import load
    from ..export.onnx_export import OPSET, export_model, grid_sample_mode, model_path
    from ..export.sample_inputs import sample_inputs
    from ..export.served import served_models
    from ..export.validate import ort_session
    from ..pipeline import TorchRunner

    torch.set_num_threads(args.threads)
    networks = load(argparse.Namespace(weights=args.weights, synthetic=args.synthetic, config=args.config))
    runner = TorchRunner(networks)
    with grid_sample_mode(networks, "native"):
        inputs = sample_inputs(runner, max(batches))
    before = machine_note(args.threads)
    results = {}      # (model, batch) -> {"pytorch_ms", "onnxruntime_ms", "max_abs_diff"}
    reference = {}
    with grid_sample_mode(networks, "native"):
        for model in spec.SUBMODELS:
            for batch in batches:
                feeds = {k: v[:batch] for k, v in inputs[model].items()}
                calls = 100 if model in (spec.STITCHING, spec.RETARGET_EYE, spec.RETARGET_LIP) else 1
                ms = median_ms(lambda: runner.run(model, feeds), args.repeats, warmup=calls, calls=calls)
                reference[(model, batch)] = runner.run(model, feeds)
                results[(model, batch)] = {"pytorch_ms": ms}
                print(f"PyTorch      {model:30s} batch {batch:2d}: {ms:10.3f} ms", flush=True)
    # Exported files are read back into memory at once, so later sessions do not depend on a temporary directory.
    exported = {}
    served = served_models(networks)
    with tempfile.TemporaryDirectory(prefix="lp-onnx-vs-torch-") as repository, \
            grid_sample_mode(networks, args.grid_sample):
        for model in spec.SUBMODELS:
            path = export_model(served[model], inputs[model], model_path(repository, model), OPSET[args.grid_sample])
            exported[model] = path.read_bytes()
    del networks, served, runner
    gc.collect()
    for model in spec.SUBMODELS:
        session = ort_session(exported.pop(model), threads=args.threads)
        names = spec.submodel_specs(args.config)[model].output_names
        for batch in batches:
            feeds = {k: np.ascontiguousarray(v[:batch]) for k, v in inputs[model].items()}
            calls = 100 if model in (spec.STITCHING, spec.RETARGET_EYE, spec.RETARGET_LIP) else 1
            ms = median_ms(lambda: session.run(names, feeds), args.repeats, warmup=calls, calls=calls)
            got = dict(zip(names, session.run(names, feeds)))
            diff = max(float(np.abs(got[n] - reference[(model, batch)][n]).max()) for n in names)
            results[(model, batch)].update(onnxruntime_ms=ms, max_abs_diff=diff)
            print(f"ONNX Runtime {model:30s} batch {batch:2d}: {ms:10.3f} ms (max abs diff {diff:.1e})", flush=True)
        del session
    after = machine_note(args.threads)
    rows = []
    for (model, batch), r in results.items():
        rows.append({"model": model, "batch": batch, "pytorch_ms": round(r["pytorch_ms"], 4),
                     "onnxruntime_ms": round(r["onnxruntime_ms"], 4),
                     "ort_over_pytorch": round(r["onnxruntime_ms"] / r["pytorch_ms"], 3),
                     "max_abs_diff": f"{r['max_abs_diff']:.2e}"})
    source = f"--weights {args.weights}" if args.weights else f"--synthetic {args.synthetic}"
    lines = [
        "# ONNX Runtime vs PyTorch, CPU, per served sub-network", "",
        f"Command: `python -m liveportrait_triton.benchmarks.onnx_vs_torch --config {args.config} {source} "
        f"--batches {args.batches} --repeats {args.repeats} --threads {args.threads} --grid-sample {args.grid_sample} "
        f"--out {args.out}`", "",
        f"- float32, {args.config} config, generated inputs (export/sample_inputs.py); 1 warm-up then the median of "
        f"{args.repeats} calls (S MLPs: blocks of 100 calls, per call), including the runtimes' numpy in/out.",
        f"- PyTorch: the served-model mapping of `pipeline.TorchRunner`, native F.grid_sample, {args.threads} "
        "threads, all timed before any ONNX Runtime session existed.",
        f"- ONNX Runtime: CPUExecutionProvider, intra_op_num_threads={args.threads}, default graph optimisation; "
        f"W exported with the {args.grid_sample} grid sample (opset {OPSET[args.grid_sample]}).",
        f"- Machine before: {before}", f"- Machine after: {after}", "",
        "| model | batch | PyTorch (ms) | ONNX Runtime (ms) | ORT / PyTorch | max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {format_ms(r['pytorch_ms'])} | "
                     f"{format_ms(r['onnxruntime_ms'])} | "
                     f"{r['ort_over_pytorch']:.2f} | {r['max_abs_diff']} |")
    md, table = write_outputs(args.out, rows, "\n".join(lines) + "\n")
    print(f"wrote {md} and {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
