"""The prepared device check: one markdown report of the GPU serving path (scripts/device_check.sh runs it).

Sections, each measured in this one run (a failing section is reported and the others still run):
1. per-module latency of F, M, W, G, S at batch 1, 8 and 16 in fp32 and fp16 (the runtime plan's `torch` kind on
   the device: torch_engine.TorchEngine, CUDA graphs), next to the paper's RTX 4090 figures (batch 1);
2. the served pipeline through the bundled Triton (every sub-network on the plan entry torch/cuda, the
   device-resident BLS path)
   at 1, 4, 8 and 16 concurrent streams: frames/s, p50/p99 frame latency, GPU memory per stream, driven by the
   project's stream client (benchmarks.server_stream), one thread per stream;
3. the same sweep with two instances of W and G;
4. fp16 vs fp32 served frames, and fp32 served vs the in-process pipeline on the same device;
5. the drift of each reduced-precision sub-network against fp32 on the device.
Drift figures and their bounds are those of liveportrait_triton/precision.py (the export, the runtime choice and the
bench use the same); M and the MLPs stay fp32 in every plan (precision.ALWAYS_FP32).
`--rehearse` runs the same steps on the CPU with the tiny networks and small sweeps (CI keeps it working).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .. import spec

PAPER_RTX4090_MS = {"F": 0.82, "M": 0.84, "W": 5.21, "G": 7.59, "S": 0.31}     # batch 1, official fp16
MODULES = {"F": spec.APPEARANCE, "M": spec.MOTION, "W": spec.WARPING, "G": spec.GENERATOR, "S": spec.STITCHING}
SHARED_INSTANCES = {spec.WARPING: 2, spec.GENERATOR: 2}


class CheckSettings:
    """What one run measures: the GPU plan, or the CPU rehearsal of the same steps."""

    def __init__(self, rehearse: bool):
        self.rehearse = rehearse
        self.config = "tiny" if rehearse else "full"
        self.device = "cpu" if rehearse else "cuda"
        self.precisions = ("fp32", "bf16") if rehearse else ("fp32", "fp16")
        self.fast = self.precisions[1]                  # the reduced precision served
        self.batches = (1, 2) if rehearse else (1, 8, 16)
        self.streams = (1, 2) if rehearse else (1, 4, 8, 16)
        self.frames = 3 if rehearse else 40             # driving frames per stream
        self.repeats = 2 if rehearse else 20
        self.warmup = 1 if rehearse else 3              # calls before timing (the first captures the graph)
        self.bls_tensors = "torch-cpu" if rehearse else "torch-gpu"


def gpu_memory_mib() -> float | None:
    """Memory used on GPU 0 by all processes (nvidia-smi), None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def environment(plan: CheckSettings) -> list[str]:
    import torch
    device = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return ["| item | value |", "| --- | --- |", f"| mode | {'CPU rehearsal (tiny networks)' if plan.rehearse else 'GPU'} |",
            f"| device | {device} |", f"| Python | {platform.python_version()} |",
            f"| PyTorch | {torch.__version__} (CUDA {torch.version.cuda}) |", f"| networks | {plan.config}, synthetic weights |"]


def module_latency(plan: CheckSettings, networks) -> list[str]:
    """Median ms per call of each module on the torch runtime, per batch and precision."""
    import torch
    from ..pipeline import TorchRunner
    specs = spec.submodel_specs(plan.config)
    rows = ["| module | batch | " + " | ".join(f"{p} ms" for p in plan.precisions) + " | paper RTX 4090 ms (batch 1) |",
            "| --- | --- | " + " | ".join("---" for _ in plan.precisions) + " | --- |"]
    runners = {p: TorchRunner(copy.deepcopy(networks), plan.device, precision=p) for p in plan.precisions}
    rng = np.random.default_rng(0)
    for short, model in MODULES.items():
        for batch in plan.batches:
            inputs = {t.name: torch.from_numpy(rng.uniform(0, 1, (batch, *t.shape)).astype(np.float32)).to(plan.device)
                      for t in specs[model].inputs}
            cells = []
            for precision in plan.precisions:
                runner = runners[precision]
                times = []
                for i in range(plan.warmup + plan.repeats):
                    if plan.device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    runner.run(model, inputs)
                    if plan.device == "cuda":
                        torch.cuda.synchronize()
                    if i >= plan.warmup:
                        times.append((time.perf_counter() - start) * 1e3)
                cells.append(f"{statistics.median(times):.2f}")
            paper = f"{PAPER_RTX4090_MS[short]:.2f}" if batch == 1 else ""
            rows.append(f"| {short} ({model}) | {batch} | " + " | ".join(cells) + f" | {paper} |")
    return rows


def render(plan: CheckSettings, repository: Path, weights: Path, precision: str, instances: dict[str, int]) -> Path:
    """A local-target repository whose runtime plan is the torch kind on the device in `precision`, serving the
    network files written here from `weights` (no ONNX files needed)."""
    from .. import runtimes
    from ..networks.served import NETWORK_FIELD
    from ..repository import ServingOptions, write_repository_configs
    from ..weights import load_networks, save_network_file
    runtime_plan = runtimes.uniform_plan("torch", plan.device, precision)
    networks = load_networks(weights, plan.config)
    for model, entry in runtime_plan.items():
        entry.path(repository).parent.mkdir(parents=True, exist_ok=True)
        save_network_file(networks, NETWORK_FIELD[model], entry.path(repository))
    options = ServingOptions(bls_tensors=plan.bls_tensors, pipeline_max_batch_size=max(plan.streams),
                             max_candidate_sequences=max(plan.streams) * 2, instances=instances)
    write_repository_configs(repository, "local", plan.config, options=options, plan=runtime_plan)
    return repository


def perf_analyzer_or_reason():
    """(PerfAnalyzer, None) where it runs here, else (None, why not)."""
    from .perf_analyzer import PerfAnalyzer, PerfAnalyzerError
    try:
        return PerfAnalyzer.locate(), None
    except (PerfAnalyzerError, OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc).splitlines()[0]


class MemoryPeak:
    """Peak GPU memory (nvidia-smi) while a block runs, polled from a thread."""

    def __enter__(self):
        self.idle = self.peak = gpu_memory_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.2):
            used = gpu_memory_mib()
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def per_stream(self, streams: int) -> str:
        return "n/a (no GPU)" if self.idle is None else f"{(self.peak - self.idle) / streams:.0f}"


def stream_client_level(url: str, count: int, first_id: int, source, driving):
    """`count` concurrent streams with the project's stream client: (frames/s, frame latencies in ms)."""
    from .server_stream import stream_frames
    results: list = [None] * count

    def one(i):
        try:
            results[i] = stream_frames(url, source, driving, sequence_id=first_id + i)[0]
        except Exception as exc:     # reported in the table
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} streams failed: {failed[0]}")
    latencies = np.array([s for seconds in results for s in seconds[1:]]) * 1e3     # frame 0 carries START
    return sum(len(seconds) for seconds in results) / wall, latencies


def sweep(plan: CheckSettings, url: str, source, driving, work: Path) -> list[str]:
    """Concurrent streams over the served pipeline: perf_analyzer in sequence mode where it runs, else the
    project's stream client (one thread per stream). Each level is warmed up first (CUDA graphs are captured
    per batch size on first use)."""
    from .perf_analyzer import run_pipeline, write_sequence_data
    pa, why_not = ((None, "not used in the CPU rehearsal, whose frames its stability windows stretch to minutes")
                   if plan.rehearse else perf_analyzer_or_reason())
    rows = [f"Driven by {'perf_analyzer (sequence mode, gRPC streaming)' if pa else 'the stream client'}"
            + ("" if pa else f" (perf_analyzer: {why_not})") + ".", "",
            "| streams | frames/s (all streams) | p50 frame ms | p99 frame ms | GPU MiB per stream |",
            "| --- | --- | --- | --- | --- |"]
    for level, count in enumerate(plan.streams):
        base = 10000 * (level + 1)
        stream_client_level(url, count, base + 5000, source, driving[:3])            # warm-up, not measured
        with MemoryPeak() as memory:
            if pa is not None:
                data = write_sequence_data(work / f"streams{count}.json", source, driving, count, len(driving))
                result = run_pipeline(pa, url, count, data, count * len(driving), (base, base + 999),
                                      work / f"pa{count}.csv", timeout_s=300)
                throughput, p50, p99 = result.throughput, result.p50_ms, result.p99_ms
            else:
                throughput, latencies = stream_client_level(url, count, base, source, driving)
                p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
        rows.append(f"| {count} | {throughput:.1f} | {p50:.1f} | {p99:.1f} | {memory.per_stream(count)} |")
    return rows


def served(plan: CheckSettings, weights: Path, work: Path, precision: str, instances: dict[str, int], source, driving,
           streams: tuple[int, ...] | None = None):
    """The sweep's rows and one stream's served frames (for the comparisons)."""
    from ..serve import TritonServer
    from .server_stream import stream_frames
    run_plan = copy.copy(plan)
    if streams is not None:
        run_plan.streams = streams
    name = f"{precision}-" + ("-".join(f"{m}{c}" for m, c in instances.items()) or "one-instance")
    repository = render(run_plan, work / name, weights, precision, instances)
    with TritonServer(repository, log_file=work / f"{name}.log", startup_timeout_s=480) as server:
        rows = sweep(run_plan, server.grpc_url, source, driving, work)
        return rows, stream_frames(server.grpc_url, source, driving, sequence_id=1)[1]


def image_difference(what: str, a: list[np.ndarray], b: list[np.ndarray]):
    """precision.Drift of two lists of frames."""
    from ..precision import image_drift
    return image_drift(what, np.stack(a), np.stack(b))


def module_drift(plan: CheckSettings, networks) -> list[str]:
    """Drift of F, W and G in the reduced precision against fp32 on the device (random inputs, batch 2; the torch
    runtime's plan entries), within precision.BOUNDS or not."""
    import torch

    from ..pipeline import TorchRunner
    from ..precision import ALWAYS_FP32, drift_markdown, output_drift
    specs = spec.submodel_specs(plan.config)
    exact = TorchRunner(copy.deepcopy(networks), plan.device, precision="fp32")
    reduced = TorchRunner(copy.deepcopy(networks), plan.device, precision=plan.fast)
    rng = np.random.default_rng(1)
    drifts = []
    for model in (m for m in MODULES.values() if m not in ALWAYS_FP32):
        inputs = {t.name: torch.from_numpy(rng.uniform(0, 1, (2, *t.shape)).astype(np.float32)).to(plan.device)
                  for t in specs[model].inputs}
        want, got = exact.run(model, inputs), reduced.run(model, inputs)
        drifts += [output_drift(model, name, _host(got[name]), _host(want[name])) for name in want]
    return drift_markdown(drifts)


def _host(value) -> np.ndarray:
    return value.cpu().numpy() if hasattr(value, "cpu") else np.asarray(value)


def inputs(seed: int, frames: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A synthetic source and a moving driving sequence (the report stays free of third-party media)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (spec.SOURCE_SIZE, spec.SOURCE_SIZE, 3), dtype=np.uint8)
    driving = [np.roll(base, shift=4 * i, axis=1) for i in range(frames)]
    return base, driving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, type=Path, help="markdown report to write")
    parser.add_argument("--rehearse", action="store_true", help="CPU, tiny networks, small sweeps")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    plan = CheckSettings(args.rehearse)
    work = args.work or Path(tempfile.mkdtemp(prefix="lp-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    from ..weights import load_networks, write_synthetic_weights
    weights = work / "weights"
    write_synthetic_weights(weights, seed=0, config=plan.config)
    networks = load_networks(weights, plan.config)
    source, driving = inputs(0, plan.frames)
    lines = [f"# Device check ({'CPU rehearsal' if plan.rehearse else 'GPU'})", "",
             "Generated by `bash scripts/device_check.sh" + (" --rehearse" if plan.rehearse else "") + "`.", ""]
    failures = []

    def section(title, build):
        lines.extend([f"## {title}", ""])
        started = time.perf_counter()
        try:
            lines.extend(build())
        except Exception:
            failures.append(title)
            lines.extend(["```", traceback.format_exc()[-3000:], "```"])
        lines.extend(["", f"({time.perf_counter() - started:.0f} s)", ""])
        args.report.write_text("\n".join(lines) + "\n")      # a partial report survives a time-out

    section("Environment", lambda: environment(plan))
    section(f"Per-module latency (torch runtime, {plan.device}, CUDA graphs where available)",
            lambda: module_latency(plan, networks))
    images = {}

    def sweep_section(precision, instances, key, streams=None):
        rows, frames = served(plan, weights, work, precision, instances, source, driving, streams)
        images[key] = frames
        return rows

    section(f"Served pipeline, {plan.fast}, one instance per sub-network",
            lambda: sweep_section(plan.fast, {}, "fast"))
    section(f"Served pipeline, {plan.fast}, two instances of W and G",
            lambda: sweep_section(plan.fast, SHARED_INSTANCES, "shared"))
    section("Served pipeline, fp32 (one stream, for the comparisons)",
            lambda: sweep_section("fp32", {}, "fp32", streams=(1,)))

    def comparisons():
        from ..pipeline import Animator, DrivingFrame, TorchRunner
        animator = Animator(TorchRunner(copy.deepcopy(networks), plan.device, precision="fp32"))
        [state] = animator.register_sources([source], [spec.parse_options({})])
        in_process = [animator.animate([state], [DrivingFrame(crop=f)])[0] for f in driving]
        from ..precision import drift_markdown
        fp32, fast = images["fp32"], images["fast"]
        return drift_markdown([image_difference(f"{plan.fast} served vs fp32 served", fast, fp32),
                               image_difference("fp32 served vs fp32 in-process", fp32, in_process)])

    section("Served frames compared (drift and bounds: liveportrait_triton/precision.py)", comparisons)
    section(f"Drift per sub-network, {plan.fast} vs fp32 on {plan.device}", lambda: module_drift(plan, networks))
    lines.append(f"Sections failed: {', '.join(failures) if failures else 'none'}")
    args.report.write_text("\n".join(lines) + "\n")
    print(f"report: {args.report}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
