"""Frames per second of the streaming pipeline: one stream and N concurrent streams, through the Triton server
and in-process (PyTorch, and the served runtime kinds), in one run on the same inputs.

    python -m liveportrait_triton.benchmarks.stream_fps --repository DIR (--weights DIR | --synthetic 0) \\
        --config full --frames N [--streams 4] [--source IMAGE] [--driving VIDEO] [--csv PATH]

Each stream is one sequence: the source is registered first (not timed), then `--frames` driving frames are timed.
Streams run closed-loop, one frame in flight per stream: in-process, the N streams advance together through one
batched `Animator.animate` call per frame; through the server, N client threads each drive their own gRPC stream
and the server batches across sequences. frames/s = all driving frames / wall time of the timed part. One warm-up
frame per mode runs first. The repository must have been exported from the same weights.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib.metadata
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .. import spec
from ..config import CONFIGS
from ..pipeline import Animator, DrivingFrame, OnnxRunner, TorchRunner
from ..repository import served_plan
from .inputs import DEFAULT_DRIVING, DEFAULT_SOURCE, read_driving, read_source
from .server_stream import drive, open_stream


@dataclasses.dataclass
class Measurement:
    mode: str
    streams: int
    frames: int            # driving frames over all streams
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


def in_process(runner, source: np.ndarray, warm: list[np.ndarray], timed: list[np.ndarray], streams: int) -> float:
    """Seconds for `streams` sequences to animate the timed frames, batched across sequences (after a warm-up)."""
    animator = Animator(runner)
    options = spec.parse_options({})
    if warm:
        [state] = animator.register_sources([source], [options])
        for frame in warm:
            animator.animate([state], [DrivingFrame(crop=frame)])
    states = animator.register_sources([source] * streams, [options] * streams)
    start = time.perf_counter()
    for frame in timed:
        animator.animate(states, [DrivingFrame(crop=frame)] * streams)
    return time.perf_counter() - start


def through_server(url: str, source: np.ndarray, warm: list[np.ndarray], timed: list[np.ndarray], streams: int,
                   first_id: int) -> tuple[float, dict[str, float]]:
    """Seconds for `streams` concurrent gRPC streams to get every driving frame back, and the compute seconds each
    served model spent on those frames (sources registered and warm-up done before)."""
    import tritonclient.grpc as grpcclient
    statistics = grpcclient.InferenceServerClient(url)
    if warm:
        client, warming = open_stream(url, source, first_id + streams)
        drive(warming, warm)
        client.close()
    opened = [open_stream(url, source, first_id + k) for k in range(streams)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams + 1)

    def drive_timed(sequence) -> None:
        barrier.wait()
        try:
            drive(sequence, timed)
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=drive_timed, args=(stream,)) for _, stream in opened]
    for thread in threads:
        thread.start()
    before = compute_seconds(statistics)
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    after = compute_seconds(statistics)
    for client, stream in opened:
        stream.close()
        client.close()
    statistics.close()
    if errors:
        raise errors[0]
    return seconds, {name: after[name] - before.get(name, 0.0) for name in after}


def environment() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnxruntime", "openvino", "nvidia-pytriton", "tritonclient", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "-"
    return {"machine": f"{platform.machine()} {platform.processor() or platform.node()}",
            "cpus": str(os.cpu_count()), "python": platform.python_version(),
            **{f"version_{k}": v for k, v in versions.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", metavar="DIR", help="checkpoints in the official layout")
    weights.add_argument("--synthetic", type=int, metavar="SEED", help="synthetic weights from this seed")
    parser.add_argument("--repository", required=True, metavar="DIR",
                        help="model repository exported (liveportrait-triton export) from the same weights")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full", help="network configuration")
    parser.add_argument("--frames", type=int, default=4, help="timed driving frames per stream")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams of the multi-stream runs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed frames per mode")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="source portrait image")
    parser.add_argument("--driving", default=str(DEFAULT_DRIVING), help="driving video (or image)")
    parser.add_argument("--server-url", metavar="HOST:PORT",
                        help="gRPC address of a running server on this repository (default: start one)")
    parser.add_argument("--csv", metavar="PATH", help="also write the measurements as CSV (with the environment)")


def compute_seconds(client, settle_s: float = 5.0) -> dict[str, float]:
    """Cumulative compute time of every served model's executions (batch statistics: a batch counts once).

    A backend reports an execution's statistics just after sending its responses, so this reads until two reads
    agree (at most settle_s)."""
    def read():
        stats = client.get_inference_statistics(as_json=True)["model_stats"]
        return {m["name"]: sum(int(b["compute_infer"].get("ns", 0)) for b in m.get("batch_stats", [])) / 1e9
                for m in stats}

    previous, deadline = read(), time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        current = read()
        if current == previous:
            break
        previous = current
    return previous


def report_breakdown(spent: dict[str, float], frames: int) -> str:
    """Server time per driving frame: the pipeline model, its sub-networks (called one after another for a driving
    frame), and what is left: the orchestration."""
    networks = sum(spent[m] for m in spec.SUBMODELS if m in spent)
    parts = ", ".join(f"{m} {spent[m] / frames:.2f}" for m in spec.SUBMODELS if spent.get(m, 0) > 0.0005 * frames)
    return (f"  per frame: pipeline {spent[spec.PIPELINE] / frames:.2f} s = sub-networks {networks / frames:.2f} s "
            f"({parts}) + orchestration (BLS, keypoint maths, copies) "
            f"{(spent[spec.PIPELINE] - networks) / frames * 1000:.0f} ms")


def run(args) -> int:
    from ..serve import TritonServer
    from ..weights import load_networks, write_synthetic_weights
    if args.frames < 1 or args.streams < 1 or args.warmup < 0:
        print("error: --frames and --streams must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    source = read_source(args.source)
    driving = read_driving(args.driving, args.frames + args.warmup)
    warm, timed = driving[:args.warmup], driving[args.warmup:]
    load = os.getloadavg()
    results: list[Measurement] = []

    def record(mode: str, streams: int, seconds: float) -> None:
        results.append(Measurement(mode, streams, streams * len(timed), seconds))
        print(f"{mode:24s} streams {streams}: {results[-1].fps:8.3f} frames/s ({seconds:.1f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="liveportrait-stream-fps-") as tmp:
        weights_dir = args.weights
        if weights_dir is None:
            weights_dir = Path(tmp) / "weights"
            write_synthetic_weights(weights_dir, args.synthetic, args.config)
        # one runner in memory at a time, and none while the server runs: at full size, batches of 4 take GBs
        runners = {"in-process PyTorch": lambda: TorchRunner(load_networks(weights_dir, args.config)),
                   "in-process served runtimes": lambda: OnnxRunner(args.repository, args.config,
                                                                     served_plan(args.repository))}
        for mode, make in runners.items():
            runner = make()
            for streams in sorted({1, args.streams}):
                record(mode, streams, in_process(runner, source, warm, timed, streams))
            del runner
            gc.collect()
        server = None if args.server_url else TritonServer(args.repository, startup_timeout_s=1200).start()
        try:
            url = args.server_url or server.grpc_url
            for number, streams in enumerate(sorted({1, args.streams})):
                seconds, spent = through_server(url, source, warm, timed, streams, first_id=1_000_000 + 100 * number)
                record("Triton gRPC streams", streams, seconds)
                print(report_breakdown(spent, streams * len(timed)), flush=True)
        finally:
            if server is not None:
                server.stop()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.csv:
        env = environment()
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["mode", "streams", "frames", "seconds", "frames_per_s", "config", *env])
            for m in results:
                writer.writerow([m.mode, m.streams, m.frames, f"{m.seconds:.6f}", f"{m.fps:.4f}", args.config,
                                 *env.values()])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveportrait_triton.benchmarks.stream_fps",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
