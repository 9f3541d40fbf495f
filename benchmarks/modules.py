"""PyTorch CPU time of each sub-network at batch 1, beside the official implementation's published CPU times.

    python -m liveportrait_triton.benchmarks.modules [--weights DIR | --synthetic SEED] --out results/modules_cpu.md

Each module runs on the generated validation inputs (export/sample_inputs.py): warm-up, then the median of
--repeats timed calls, with --threads torch threads (2, as the official baseline). Writes a markdown table and a
CSV beside it. Timings do not depend on the weights' values, so synthetic weights measure the same thing.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

# Official LivePortrait modules on this kind of machine (2 vCPU, torch 2.13 CPU, 2 threads, batch 1, median of 3
# after 1 warm-up), from ../shared/reference/cpu_baseline.md, table "Module forward times (ms)": the lowest and
# highest of its runs A, B and all-in-one-process.
OFFICIAL_CPU_MS = {
    "F": (372, 393),
    "M": (94, 115),
    "W": (2582, 2684),
    "G": (3847, 4015),
    "S stitching": (0.043, 0.045),
    "S eye": (0.065, 0.074),
    "S lip": (0.039, 0.044),
}
OFFICIAL_PER_FRAME_MS = (6593, 6793)    # M + S(stitching) + W + G, same table
OFFICIAL_SOURCE = ("../shared/reference/cpu_baseline.md (official LivePortrait modules, synthetic seed-0 weights, "
                   "full config, on a 2 vCPU Intel Xeon with AVX-512)")
PER_FRAME = ("M", "S stitching", "W", "G")
MLP_CALLS = 200   # an S MLP call takes tens of microseconds: time blocks of calls


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="DIR", help="checkpoint directory in the official layout")
    source.add_argument("--synthetic", type=int, metavar="SEED", default=0,
                        help="synthetic weights from this seed (default 0; timings do not depend on the values)")
    parser.add_argument("--config", choices=("full", "tiny"), default="full", help="network configuration")


def median_ms(fn, repeats: int, warmup: int = 1, calls: int = 1) -> float:
    """Median over `repeats` of the wall time of `calls` calls of fn, per call, in ms, after `warmup` calls."""
    return timed(fn, repeats, warmup, calls)[0]


def timed(fn, repeats: int, warmup: int = 1, calls: int = 1) -> tuple[float, float]:
    """(median wall ms, median process CPU ms) per call, as median_ms. On a busy shared machine the CPU time,
    summed over this process's threads, moves much less than the wall time."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall.append((time.perf_counter() - start) / calls * 1e3)
        cpu.append((time.process_time() - start_cpu) / calls * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def machine_note(threads: int) -> str:
    """CPU, thread count and load average: the machine is shared, so say how busy it was."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {threads} threads; "
            f"load average (1, 5, 15 min) {load}")


def module_calls(networks, batch: int):
    """name -> (description, zero-argument callable) for F, M, W, G and the three S MLPs at this batch size."""
    import torch

    from .. import spec
    from ..export.onnx_export import grid_sample_mode
    from ..export.sample_inputs import sample_inputs
    from ..pipeline import TorchRunner
    with grid_sample_mode(networks, "native"):
        inputs = sample_inputs(TorchRunner(networks), batch)
    t = {m: {k: torch.from_numpy(v) for k, v in feeds.items()} for m, feeds in inputs.items()}
    n = networks

    def flat(x):
        return x.reshape(x.shape[0], -1)
    stitch_in = torch.cat([flat(t[spec.STITCHING]["kp_source"]), flat(t[spec.STITCHING]["kp_driving"])], 1)
    eye_in = torch.cat([flat(t[spec.RETARGET_EYE]["kp_source"]), t[spec.RETARGET_EYE]["eye_ratio"]], 1)
    lip_in = torch.cat([flat(t[spec.RETARGET_LIP]["kp_source"]), t[spec.RETARGET_LIP]["lip_ratio"]], 1)
    w = t[spec.WARPING]
    return {
        "F": ("appearance_feature_extractor", lambda: n.appearance_feature_extractor(t[spec.APPEARANCE]["image"])),
        "M": ("motion_extractor", lambda: n.motion_extractor(t[spec.MOTION]["image"])),
        "W": ("warping_module (native grid_sample)",
              lambda: n.warping_module(w["feature_volume"], w["kp_source"], w["kp_driving"])),
        "G": ("spade_generator", lambda: n.spade_generator(t[spec.GENERATOR]["warped_feature"])),
        "S stitching": (f"stitching MLP {tuple(stitch_in.shape)}", lambda: n.stitching(stitch_in)),
        "S eye": (f"eye retargeting MLP {tuple(eye_in.shape)}", lambda: n.eye(eye_in)),
        "S lip": (f"lip retargeting MLP {tuple(lip_in.shape)}", lambda: n.lip(lip_in)),
    }


def format_ms(ms: float) -> str:
    """Three decimals below 1 ms, whole milliseconds above."""
    return f"{ms:.3f}" if ms < 1 else f"{ms:.0f}"


def _official(name: str) -> str:
    lo, hi = OFFICIAL_CPU_MS[name]
    return f"{format_ms(lo)}–{format_ms(hi)}"


def write_outputs(out: Path, rows: list[dict], markdown: str) -> tuple[Path, Path]:
    """OUT.md and OUT.csv (whatever suffix --out has)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    md, table = out.with_suffix(".md"), out.with_suffix(".csv")
    md.write_text(markdown)
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return md, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveportrait_triton.benchmarks.modules",
                                     description=__doc__.splitlines()[0])
    add_weights_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output file; writes OUT.md and OUT.csv")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per module (median; default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the official baseline)")
    args = parser.parse_args(argv)

    import torch

    from ..export.cli import load
    torch.set_num_threads(args.threads)
    networks = load(argparse.Namespace(weights=args.weights, synthetic=args.synthetic, config=args.config))
    before = machine_note(args.threads)
    rows = []
    with torch.no_grad():
        for name, (what, fn) in module_calls(networks, 1).items():
            calls = MLP_CALLS if name.startswith("S") else 1
            ms, cpu_ms = timed(fn, args.repeats, warmup=max(1, calls), calls=calls)
            lo, hi = OFFICIAL_CPU_MS[name]
            rows.append({"module": name, "forward": what, "this_project_ms": round(ms, 4),
                         "process_cpu_ms": round(cpu_ms, 4), "official_min_ms": lo, "official_max_ms": hi,
                         "ratio_to_official_mid": round(ms / ((lo + hi) / 2), 3)})
            print(f"{name:12s} {ms:10.3f} ms   (official {_official(name)} ms)", flush=True)
    after = machine_note(args.threads)
    ours = {r["module"]: r["this_project_ms"] for r in rows}
    frame = sum(ours[m] for m in PER_FRAME)
    rows.append({"module": "per frame", "forward": " + ".join(PER_FRAME), "this_project_ms": round(frame, 1),
                 "process_cpu_ms": round(sum(r["process_cpu_ms"] for r in rows if r["module"] in PER_FRAME), 1),
                 "official_min_ms": OFFICIAL_PER_FRAME_MS[0], "official_max_ms": OFFICIAL_PER_FRAME_MS[1],
                 "ratio_to_official_mid": round(frame / (sum(OFFICIAL_PER_FRAME_MS) / 2), 3)})
    lines = [
        "# PyTorch CPU time per sub-network: this project vs the official implementation", "",
        f"Command: `python -m liveportrait_triton.benchmarks.modules --config {args.config} "
        f"{'--weights ' + args.weights if args.weights else '--synthetic ' + str(args.synthetic)} "
        f"--repeats {args.repeats} --threads {args.threads} --out {args.out}`", "",
        f"- Batch 1, float32, eval, `torch.no_grad()`, {args.config} config; 1 warm-up then the median of "
        f"{args.repeats} calls (S MLPs: blocks of {MLP_CALLS} calls, per call).",
        "- Inputs: generated images and the keypoints M finds on them (export/sample_inputs.py).",
        f"- Official column: {OFFICIAL_SOURCE}, lowest–highest of its three runs."
        + ("" if args.config == "full" else f" It is for the full config, not {args.config}: compare with care."),
        f"- Machine before: {before}", f"- Machine after: {after}", "",
        f"- Process CPU time: summed over the process's threads (up to {args.threads}x the wall time on an idle "
        "machine); it moves far less with the load of other processes than the wall time does.", "",
        "| module | forward | this project, wall (ms) | process CPU (ms) | official, wall (ms) | "
        "ratio to official mid |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        official = f"{format_ms(r['official_min_ms'])}–{format_ms(r['official_max_ms'])}"
        b = "**" if r["module"] == "per frame" else ""
        lines.append(f"| {b}{r['module']}{b} | {r['forward']} | {b}{format_ms(r['this_project_ms'])}{b} | "
                     f"{format_ms(r['process_cpu_ms'])} | {official} | {r['ratio_to_official_mid']:.2f} |")
    md, table = write_outputs(args.out, rows, "\n".join(lines) + "\n")
    lo, hi = OFFICIAL_PER_FRAME_MS
    print(f"per frame (M + S + W + G): {frame:.0f} ms (official {lo}–{hi})")
    print(f"wrote {md} and {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
