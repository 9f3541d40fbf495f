"""`liveportrait-triton bench`: time the per-frame pipeline in-process (PyTorch eager and the served kinds) and
through Triton, every sub-network against the machine's GEMM rate, run perf_analyzer on every sub-network (batch
sweep) and on the `liveportrait` sequence model (concurrency sweep), and write CSV, markdown and PNG plots with the
machine and versions, into `--out`. `--runtime-choice` instead times every runtime kind per sub-network and writes
the winners into the choice file from which `runtimes.runtime_plan` takes its defaults.

Everything runs on real inputs: a source portrait and frames of a driving video, cropped to 256x256.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import spec
from ..config import CONFIGS

DEFAULT_OUT = Path("bench_results")           # under the current working directory, never inside the package
INPROCESS_RUNNERS = ("torch", "exact", "served")     # or any runtimes kind for every sub-network


def _choice_file() -> Path:
    from ..runtimes import RUNTIME_CHOICE_FILE
    return RUNTIME_CHOICE_FILE


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .inputs import DEFAULT_DRIVING, DEFAULT_SOURCE
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="DIR", help="checkpoints in the official layout (default: synthetic)")
    weights.add_argument("--synthetic", type=int, default=0, metavar="SEED",
                         help="synthetic weights from this seed (default 0; speed does not depend on the values)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full", help="network configuration")
    parser.add_argument("--repository", metavar="DIR",
                        help="model repository written by `liveportrait-triton export` from the same weights "
                             "(default: export into a temporary directory)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE) if DEFAULT_SOURCE.is_file() else None,
                        help=f"source portrait (default {DEFAULT_SOURCE} when present)")
    parser.add_argument("--driving", default=str(DEFAULT_DRIVING) if DEFAULT_DRIVING.is_file() else None,
                        help=f"driving video or image (default {DEFAULT_DRIVING} when present)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help=f"results folder (default ./{DEFAULT_OUT}, under the current directory)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads in-process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed frames before timing each one-stream run")
    parser.add_argument("--frames", type=int, default=5, help="timed frames of each one-stream run")
    parser.add_argument("--inprocess", type=_name_list, default=list(INPROCESS_RUNNERS), metavar="R[,R...]",
                        help="in-process runners: served (each sub-network on the plan entry the server runs "
                             "it on: the repository's precision policy, reduced by default), exact (the exact "
                             "policy's fp32 plan on the same repository's files) and/or one runtime kind for every "
                             "sub-network: torch (our PyTorch modules, the eager baseline), onnxruntime, openvino. "
                             "The drift table compares the frames of served, exact and torch")
    parser.add_argument("--served-runtime", default="served", metavar="R",
                        help="the in-process runner that uses the served models' runtime (for the 10%% comparison)")
    parser.add_argument("--no-server", action="store_true", help="skip the Triton and perf_analyzer parts")
    parser.add_argument("--pipeline-instances", type=int, default=1, metavar="N",
                        help="serving layout: instances of the pipeline model (each runs its frames' sub-networks "
                             "one after another, so N sub-networks may run at once); re-renders the repository's "
                             "configs when not 1")
    parser.add_argument("--model-threads", type=int, default=0, metavar="T",
                        help="serving layout: threads of each served sub-network (0: the cores shared by the "
                             "models that may run at once); re-renders the repository's configs when not 0")
    parser.add_argument("--server-url", metavar="HOST:PORT",
                        help="gRPC address of a running server on the same repository (default: start the bundled "
                             "Triton on --repository, on loopback)")
    parser.add_argument("--perf-analyzer", metavar="PATH",
                        help="perf_analyzer install dir or binary (default: $LP_PERF_ANALYZER_DIR or the "
                             "installer's default, see scripts/install_perf_analyzer.sh)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8], metavar="B[,B...]",
                        help="perf_analyzer batch sweep of every sub-network")
    parser.add_argument("--submodels", type=_name_list, default=list(spec.SUBMODELS), metavar="M[,M...]",
                        help="sub-networks to sweep")
    parser.add_argument("--submodel-sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="perf_analyzer batch sweep of the sub-networks (default on; minutes at full size)")
    parser.add_argument("--module-repeats", type=int, default=2,
                        help="timed batch-1 calls of each sub-network on PyTorch and on its served kind, for the "
                             "FLOP-rate table (0: skip)")
    parser.add_argument("--submodel-requests", type=int, default=3, help="perf_analyzer requests per batch size")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8], metavar="C[,C...]",
                        help="perf_analyzer concurrency sweep of the pipeline (sequences in flight)")
    parser.add_argument("--pipeline-requests-per-stream", type=int, default=3,
                        help="perf_analyzer frames per sequence in flight at each concurrency level")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                        help="perf_analyzer on the pipeline over gRPC streaming (default on)")
    parser.add_argument("--sequence-length", type=int, default=16,
                        help="requests per perf_analyzer sequence (START with source + driving, then driving)")
    parser.add_argument("--sequence-id-start", type=int, default=1_000_000,
                        help="first sequence id; each run uses its own range of 10000 ids from here")
    parser.add_argument("--timeout-s", type=float, default=3600, help="limit for each perf_analyzer run")
    choice = parser.add_argument_group("runtime choice (--runtime-choice)")
    choice.add_argument("--runtime-choice", action="store_true",
                        help="instead of the pipeline benchmark: time every runtime kind per sub-network with "
                             "parity against PyTorch and the fraction of the GEMM rate, write runtime_choice.md/.csv "
                             "and the winners into --choice-file")
    choice.add_argument("--runtimes", type=_name_list, default=None, metavar="K[,K...]",
                        help="runtime kinds to compare (default: every kind that runs on this machine)")
    choice.add_argument("--choice-file", default=str(_choice_file()), metavar="PATH",
                        help="where the winners are written for `export` to render (default: the committed "
                             "liveportrait_triton/runtime_choice.json); 'none' writes no choice")
    choice.add_argument("--runtime-batches", type=_int_list, default=[1], metavar="B[,B...]",
                        help="batch sizes of the runtime comparison")
    choice.add_argument("--runtime-budget-s", type=float, default=10.0,
                        help="time spent timing each (sub-network, runtime, precision, batch); at least 3 calls")
    choice.add_argument("--precisions", type=_name_list, default=None, metavar="P[,P...]",
                        help="precisions to time (default: every one this CPU runs natively: fp32, and bf16 on "
                             "the amx and avx512_bf16 machine classes)")
    choice.add_argument("--fp16-emulation", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the drift of F, W and G in fp16 by emulation (fp16 operands, fp32 "
                             "accumulation: the numerics of a GPU's half precision; default on)")
    parser.set_defaults(command_options=[(a.option_strings[-1], a.dest, a) for a in parser._actions
                                         if a.option_strings and a.dest != "help"])


def command_line(args) -> str:
    """The command that reproduces this run (options left at their defaults are not spelt out)."""
    parts = ["liveportrait-triton", "bench"]
    for option, dest, action in args.command_options:
        value = getattr(args, dest)
        if value == action.default or dest == "command_options":
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            parts.append(action.option_strings[0 if value else 1])     # --flag / --no-flag
        elif action.nargs == 0:
            if value:
                parts.append(option)
        elif value is not None and not (dest == "synthetic" and args.weights):
            parts += [option, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(parts)


def run(args) -> int:
    from ..serve import ServerError
    from .inputs import MediaError
    from .perf_analyzer import PerfAnalyzerError
    from ..client.errors import RequestFailed, ServerUnavailable
    try:
        return _run(args)
    except (MediaError, PerfAnalyzerError, ServerError, RequestFailed, ServerUnavailable, ValueError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .inputs import read_driving, read_source
    for name in ("source", "driving"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (the default under ../shared/assets is not there)")
    unknown = [m for m in args.submodels if m not in spec.SUBMODELS]
    if unknown:
        raise ValueError(f"unknown sub-network(s) {unknown}; choose from {list(spec.SUBMODELS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pa = None
    if not args.no_server and not args.runtime_choice:
        from .perf_analyzer import PerfAnalyzer
        pa = PerfAnalyzer.locate(args.perf_analyzer)       # fail before any long work when it is missing
    source = read_source(args.source)
    driving = read_driving(args.driving, max(args.warmup + args.frames, 2))
    with tempfile.TemporaryDirectory(prefix="liveportrait-bench-") as tmp:
        weights = _weights_dir(args, Path(tmp) / "weights")
        networks = _load_networks(weights, args.config)
        repository = Path(args.repository) if args.repository else _export(args, Path(tmp) / "repository")
        if args.runtime_choice:
            return _runtime_choice(args, networks, weights, repository, source, driving, out)
        return _pipeline_benchmark(args, networks, repository, source, driving, out, pa, Path(tmp))


def _weights_dir(args, scratch: Path) -> Path:
    """--weights, or synthetic weights of --synthetic written into `scratch`."""
    from ..weights import write_synthetic_weights
    if args.weights:
        return Path(args.weights)
    write_synthetic_weights(scratch, args.synthetic, args.config)
    return scratch


def _load_networks(weights: Path, config: str):
    from ..weights import load_networks
    return load_networks(weights, config)      # WeightsError is a ValueError: reported by run()


def _export(args, repository: Path) -> Path:
    """`liveportrait-triton export` of the same weights into `repository` (ONNX files and configs)."""
    weights = ["--weights", args.weights] if args.weights else ["--synthetic", str(args.synthetic)]
    command = [sys.executable, "-m", "liveportrait_triton", "export", *weights, "--config", args.config,
               "--repository", str(repository), "--validate-batches", "1"]
    print(f"exporting: {shlex.join(command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"export failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
    return repository


def _log(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------------------
def _runtime_choice(args, networks, weights: Path, repository, source, driving, out: Path) -> int:
    from .. import runtimes
    from ..precision import ALWAYS_FP32, EXACT, REDUCED, machine_class
    from ..pipeline import TorchRunner
    from . import flops, report, runtime_choice
    from .inputs import batch_of, record_submodel_inputs
    kinds = args.runtimes or runtimes.available_kinds()
    unknown = [k for k in kinds if k not in runtimes.KINDS]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; choose from {list(runtimes.KINDS)}")
    samples = record_submodel_inputs(TorchRunner(networks), source, driving[:2])
    specs = spec.submodel_specs(networks.params)
    work = {m: flops.layer_flops(networks, specs[m], batch_of(samples[m], 1)) for m in args.submodels}
    rate = flops.gemm_rate(args.threads)
    _log(f"fp32 GEMM rate on {args.threads} thread(s): {rate / 1e9:.1f} GFLOP/s")
    results = runtime_choice.compare_runtimes(weights, args.config, repository, samples, args.submodels, kinds,
                                              args.runtime_batches, args.threads, args.runtime_budget_s, work, rate,
                                              args.precisions)
    fp16 = (runtime_choice.emulated_fp16_drift(weights, args.config, samples,
                                               [m for m in args.submodels if m not in ALWAYS_FP32], args.threads)
            if args.fp16_emulation else None)
    machine = report.machine_info()
    machine["machine class"] = f"{machine_class()} (liveportrait_triton/precision.py machine_class)"
    machine["threads"] = str(args.threads)
    machine["fp32 GEMM rate"] = f"{rate / 1e9:.1f} GFLOP/s (torch matmul 2048^2, {args.threads} thread(s))"
    machine["network config"] = args.config
    machine["weights"] = args.weights or f"synthetic seed {args.synthetic}"
    machine["onnx files"] = _repository_note(args)
    exact = runtime_choice.winners(results, policy=EXACT)
    reduced = runtime_choice.winners(results, policy=REDUCED)
    committed = runtimes.runtime_plan("local")
    reduced, frames = runtime_choice.frame_checked(
        {**committed, **exact}, reduced, results,
        lambda entries: _frame_drift(entries, {**committed, **exact}, networks, repository, source, driving[:2],
                                     args.threads))
    for labels, drift in frames:
        print(f"whole frame with {labels}: {drift.describe()}")
    (out / "runtime_choice.md").write_text(runtime_choice.markdown(results, command_line(args), machine, fp16,
                                                                   frames, reduced))
    _write_dicts(out / "runtime_choice.csv", runtime_choice.csv_rows(results))
    for line in runtime_choice.refused(results):
        print(line)
    print(f"winners (batch 1), exact: {', '.join(f'{m} {e.label()}' for m, e in exact.items())}")
    print(f"winners (batch 1), reduced on machine class {machine_class()}: "
          f"{', '.join(f'{m} {e.label()}' for m, e in reduced.items())}")
    print(f"wrote {out / 'runtime_choice.md'} and {out / 'runtime_choice.csv'}")
    if args.choice_file != "none":
        source = f"measured by `{command_line(args)}` on {machine.get('cpu', 'this machine')}"
        entry = runtime_choice.write_choice(args.choice_file, exact, reduced if args.precisions is None
                                            or len(args.precisions) > 1 else None, source=source)
        print(f"wrote the local target's choice into {args.choice_file}: {entry} (re-render with "
              "`liveportrait-triton export`)")
    return 0


def _frame_drift(entries: dict, exact: dict, networks, repository, source, driving, threads: int):
    """precision.Drift of the frames a plan of `entries` gives against those of the `exact` plan (in-process, the
    runners the runtime choice timed: runtime_choice.timed_subnetwork)."""
    import numpy as np

    from ..pipeline import Animator, DrivingFrame
    from ..precision import image_drift
    from ..runtimes import PlanRunner
    from .inputs import pipeline_options
    from .runtime_choice import timed_subnetwork
    specs = spec.submodel_specs(networks.params)
    frames = []
    for plan in (entries, exact):
        runner = PlanRunner({m: timed_subnetwork(e.kind, specs[m], repository, networks, threads, e.precision)
                             for m, e in plan.items()})
        animator = Animator(runner)
        [state] = animator.register_sources([source], [pipeline_options()])
        frames.append(np.stack([animator.animate([state], [DrivingFrame(crop=crop)])[0] for crop in driving]))
    return image_drift("whole frame: reduced plan vs exact plan", *frames)


def _repository_note(args) -> str:
    weights = f"--weights {args.weights}" if args.weights else f"--synthetic {args.synthetic}"
    how = f"`liveportrait-triton export {weights} --config {args.config} --repository DIR --validate-batches 1`"
    return f"{args.repository}, written by {how}" if args.repository else f"exported by the bench: {how}"


def _write_dicts(path: Path, rows: list[dict]) -> None:
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------------------
def _pipeline_benchmark(args, networks, repository, source, driving, out: Path, pa, tmp: Path) -> int:
    from . import report
    rows: list[report.Row] = []
    notes = [f"network config {args.config}; weights "
             + (args.weights if args.weights else f"synthetic seed {args.synthetic}")
             + f"; source {Path(args.source).name}, driving {Path(args.driving).name} (256x256 centre crops)",
             f"model repository: {_repository_note(args)}",
             f"one-stream runs: {args.warmup} warm-up frame(s), then {args.frames} timed frames; in-process "
             f"threads {args.threads}",
             "load average (1, 5, 15 min) at the start: " + " ".join(f"{v:.2f}" for v in os.getloadavg())
             + " (the machine table has it at the end; other work on the machine slows every figure)"]
    from .. import repository as rendering
    notes.append("served plan: " + ", ".join(f"{m} {e.label()}" for m, e in rendering.served_plan(repository).items()))
    _log(notes[-1])
    frames = {}
    for runner_name in args.inprocess:
        row, frames[runner_name] = _time_inprocess(runner_name, networks, repository, source, driving, args)
        rows.append(row)
        _log(_describe(rows[-1]))
        gc.collect()
    drifts = _frame_drifts(frames)
    from ..pipeline import TorchRunner
    from .inputs import record_submodel_inputs
    samples = record_submodel_inputs(TorchRunner(networks), source, driving[:2])
    if args.module_repeats:
        rows += _time_modules(args, networks, repository, samples, notes, drifts)
    for d in drifts:
        _log(d.describe())
    versions = {"triton": None, "perf_analyzer": None}
    failed = 0
    notes.append(_serving_layout(args, repository))
    _log(notes[-1])
    try:
        if not args.no_server:
            failed = _served(args, networks, repository, samples, source, driving, pa, tmp, rows, notes, versions)
    finally:     # what was measured is written even when a later step fails
        _write_results(args, rows, notes, versions, out, drifts)
    return 1 if failed else 0


def _frame_drifts(frames: dict[str, list]) -> list:
    """precision.Drift of the whole frames (every timed and warm-up frame) of each in-process runner against the
    exact ones: served vs exact, then each vs PyTorch eager fp32."""
    import numpy as np

    from ..precision import image_drift
    pairs = [(a, b) for a, b in (("served", "exact"), ("served", "torch"), ("exact", "torch")) if a in frames
             and b in frames]
    return [image_drift(f"served frame: {a} vs {b}", np.stack(frames[a]), np.stack(frames[b])) for a, b in pairs]


def _serving_layout(args, repository: Path) -> str:
    """Render the repository's configs for --pipeline-instances / --model-threads (when not the defaults; the
    plan it serves stays) and describe the layout the server runs."""
    from .. import repository as rendering
    from ..runtimes import served_threads
    options = rendering.ServingOptions(pipeline_instances=args.pipeline_instances, threads=args.model_threads)
    if (args.pipeline_instances, args.model_threads) != (1, 0):
        rendering.write_repository_configs(repository, "local", args.config, options=options,
                                           plan=rendering.served_plan(repository))
    threads = served_threads(options.threads, rendering.models_at_once(options))
    return (f"serving layout: {options.pipeline_instances} pipeline instance(s), one instance of each sub-network "
            f"with {threads} thread(s) each")


def _write_results(args, rows, notes, versions, out: Path, drifts: list) -> None:
    from ..precision import machine_class
    from . import report
    machine = report.machine_info(versions["triton"], versions["perf_analyzer"])
    machine["machine class"] = f"{machine_class()} (liveportrait_triton/precision.py)"
    plots = report.plot(rows, out, args.served_runtime)
    report.write_csv(out / "benchmark.csv", rows, machine)
    (out / "benchmark.md").write_text(report.markdown(rows, machine, command_line(args), args.served_runtime,
                                                      plots, notes, drifts))
    print("\n".join(report.targets(rows, args.served_runtime)))
    print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.csv'} and {len(plots)} plot(s) in {out}")


def _describe(row) -> str:
    return (f"{row.section:14s} {row.runner:12s} {row.model:30s} b{row.batch} c{row.concurrency}: "
            f"{row.items_per_s:8.3f}/s p50 {row.p50_ms:10.2f} ms p95 {row.p95_ms:10.2f} ms")


def _make_runner(name: str, networks, repository: Path, threads: int):
    """An in-process runner: `served` (each sub-network on the kind the repository's configs serve it on) or one
    runtime kind for every sub-network."""
    from .. import repository as rendering
    from .. import runtimes
    if name not in ("served", "exact") and name not in runtimes.KINDS:
        raise ValueError(f"unknown in-process runner {name!r}; choose served, exact or one of {list(runtimes.KINDS)}")
    plan = {"served": lambda: {m: runtimes.native_entry(e)[0] for m, e in rendering.served_plan(repository).items()},
            "exact": lambda: runtimes.runtime_plan("local")}.get(name, lambda: runtimes.uniform_plan(name))()
    return runtimes.create_runner(plan, networks.params, networks=networks, repository=repository, threads=threads)


def _time_inprocess(name: str, networks, repository: Path, source, driving, args):
    """One stream in-process: register the source, warm up, then time each frame's `Animator.animate`."""
    from ..pipeline import Animator, DrivingFrame
    from . import report
    from .inputs import pipeline_options
    from .timing import Stats
    animator = Animator(_make_runner(name, networks, repository, args.threads))
    [state] = animator.register_sources([source], [pipeline_options()])
    seconds, frames = [], []
    for i, crop in enumerate(driving[:args.warmup + args.frames]):
        start = time.perf_counter()
        [frame] = animator.animate([state], [DrivingFrame(crop=crop)])
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
        frames.append(frame)
    return _row("inprocess", name, spec.PIPELINE, Stats.of(seconds), report), frames


def _row(section: str, runner: str, model: str, stats, report):
    return report.Row(section, runner, model, count=stats.count, items_per_s=1e3 / stats.mean_ms,
                      mean_ms=stats.mean_ms, p50_ms=stats.p50_ms, p95_ms=stats.p95_ms, p99_ms=stats.p99_ms)


def _time_modules(args, networks, repository, samples, notes: list, drifts: list) -> list:
    """Every sub-network at batch 1 on PyTorch eager and on the plan entry the server runs it on, with its counted
    FLOPs and the fraction of the machine's fp32 GEMM rate (measured here, in the same run) that it reaches; a
    reduced-precision entry also on its exact entry, its drift against PyTorch fp32 appended to `drifts`."""
    from .. import runtimes
    from ..precision import output_drift
    from ..repository import served_plan
    from . import flops, report
    from .inputs import batch_of
    from .runtime_choice import timed_subnetwork
    from .timing import Stats, time_calls
    rate = flops.gemm_rate(args.threads)
    exact = runtimes.runtime_plan("local")
    served = {m: runtimes.native_entry(entry)[0] for m, entry in served_plan(repository).items()}
    specs = spec.submodel_specs(networks.params)
    notes.append(f"fp32 GEMM rate of this machine: {rate / 1e9:.1f} GFLOP/s (torch matmul 2048x2048, "
                 f"{args.threads} thread(s), best of repeated runs, measured in this run)")
    _log(notes[-1])
    rows = []
    for model in spec.SUBMODELS:
        feeds = batch_of(samples[model], 1)
        work = flops.layer_flops(networks, specs[model], feeds)
        reference = None
        entries = [runtimes.RuntimePlanEntry.of(model, "torch"), served[model]]
        if not served[model].exact:
            entries.insert(1, exact[model])
        for entry in dict.fromkeys(entries):
            runner = timed_subnetwork(entry.kind, specs[model], repository, networks, args.threads, entry.precision)
            calls = 1 if work > 1e9 else 50
            wall, _ = time_calls(lambda: [runner.run(feeds) for _ in range(calls)], 1, args.module_repeats)
            if reference is None:
                reference = runner.run(feeds)
            elif not entry.exact:
                got = runner.run(feeds)
                drifts += [output_drift(model, name, got[name], reference[name]) for name in reference]
            stats = Stats.of([w / calls for w in wall])
            kind = entry.kind if entry.exact else entry.label()
            rows.append(report.Row("module", kind, model, count=args.module_repeats * calls,
                                   items_per_s=1e3 / stats.mean_ms, mean_ms=stats.mean_ms, p50_ms=stats.p50_ms,
                                   p95_ms=stats.p95_ms, p99_ms=stats.p99_ms, flop=work,
                                   gemm_fraction=work / (stats.p50_ms / 1e3) / rate))
            _log(_describe(rows[-1]) + f", {work / 1e9:.2f} GFLOP, {rows[-1].gemm_fraction:.0%} of the GEMM rate")
    return rows


def _served(args, networks, repository, samples, source, driving, pa, tmp: Path, rows: list, notes: list,
            versions: dict) -> int:
    """Start the server on the repository; one timed stream, then the perf_analyzer sweeps. A perf_analyzer run
    that fails is noted (in the markdown) and the sweep goes on; returns how many failed."""
    from ..serve import TritonServer
    from . import perf_analyzer as P
    from . import report, server_stats
    from .server_stream import stream_frames
    from .timing import Stats
    data_dir = tmp / "perf_analyzer"
    data_dir.mkdir()
    specs = spec.submodel_specs(networks.params)
    next_ids = iter(range(args.sequence_id_start, 2 ** 62, 10_000))
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        url = args.server_url or stack.enter_context(TritonServer(repository)).grpc_url
        versions["triton"] = triton_version = _server_version(url)
        versions["perf_analyzer"] = _pa_version(pa)
        _log(f"Triton {triton_version} serving {repository} at {url}")
        seconds, _ = stream_frames(url, source, driving[:args.warmup + args.frames], next(next_ids))
        rows.append(_row("server_stream", "triton", spec.PIPELINE, Stats.of(seconds[args.warmup:]), report))
        _log(_describe(rows[-1]))

        for model in args.submodels if args.submodel_sweep else ():
            data = P.write_submodel_data(data_dir / f"{model}.json", specs[model], samples[model])
            for batch in args.batch_sizes:
                try:
                    result = P.run_submodel(pa, url, model, batch, data, args.submodel_requests,
                                            data_dir / f"{model}_b{batch}.csv", args.timeout_s)
                except P.PerfAnalyzerError as exc:
                    failures.append(f"{model} batch {batch}: {exc}")
                    _log(f"FAILED: {failures[-1]}")
                    continue
                rows.append(_pa_row("pa_submodel", result, report))
                _log(_describe(rows[-1]))

        sequences = P.write_sequence_data(data_dir / "liveportrait.json", source, driving,
                                          streams=max(args.concurrency), length=args.sequence_length)
        for concurrency in args.concurrency:
            first = next(next_ids)
            before = server_stats.snapshot(url, list(spec.SUBMODELS))
            try:
                result = P.run_pipeline(pa, url, concurrency, sequences,
                                        args.pipeline_requests_per_stream * concurrency, (first, first + 10_000),
                                        data_dir / f"liveportrait_c{concurrency}.csv", args.timeout_s,
                                        streaming=args.streaming)
            except P.PerfAnalyzerError as exc:
                failures.append(f"{spec.PIPELINE} concurrency {concurrency}: {exc}")
                _log(f"FAILED: {failures[-1]}")
                continue
            split = server_stats.split(before, server_stats.snapshot(url, list(spec.SUBMODELS)))
            rows.append(_pa_row("pa_pipeline", result, report))
            _log(_describe(rows[-1]))
            for part in split:
                rows.append(report.Row("pa_composing", "triton", part.model, concurrency=concurrency,
                                       count=part.requests, mean_ms=part.latency_ms, queue_ms=part.queue_ms,
                                       compute_ms=part.compute_ms, mean_batch=part.mean_batch))
    notes.append(f"perf_analyzer: {args.submodel_requests} request(s) per sub-network batch size; "
                 f"{args.pipeline_requests_per_stream} frame(s) per sequence in flight per concurrency level, "
                 f"sequences of {args.sequence_length} requests (START carries source + driving), "
                 + ("gRPC streaming" if args.streaming else "gRPC unary") + "; --request-count mode (one "
                 "measurement of that many requests, no stability windows). Time by sub-model: the server's "
                 "statistics before/after each pipeline run (perf_analyzer 2.51's --bls-composing-models drops the "
                 "sequence correlation IDs, see benchmarks/server_stats.py)")
    notes += [f"FAILED perf_analyzer run: {' '.join(f.split())[:600]}" for f in failures]
    return len(failures)


def _pa_row(section: str, result, report):
    return report.Row(section, "triton", result.model, batch=result.batch, concurrency=result.concurrency,
                      count=result.requests, items_per_s=result.throughput, mean_ms=result.avg_ms,
                      p50_ms=result.p50_ms, p95_ms=result.p95_ms, p99_ms=result.p99_ms,
                      queue_ms=result.server_queue_ms, compute_ms=result.server_compute_ms,
                      pa_reported_per_s=result.reported_throughput)


def _server_version(url: str) -> str:
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.get_server_metadata().version
    finally:
        client.close()


def _pa_version(pa) -> str:
    stamp = pa.binary.parent.parent / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else str(pa.binary)
