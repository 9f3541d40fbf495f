"""Live streams on an overloaded server: frame latency and frames delivered, blocking send vs the live rule.

    python -m liveportrait_triton.benchmarks.overload --server HOST:PORT [--source IMAGE] [--driving VIDEO] \\
        [--kept-up 2] [--seconds 60] [--in-flight 4] [--out DIR]

First the server's throughput is measured (PROBE_STREAMS streams sending as fast as their window allows); each
live stream's camera rate is then set so that the server keeps up with exactly `--kept-up` (S) streams:
fps = throughput / S. Then 2 x S streams run at that rate for `--seconds`, each frame stamped with its capture time
(a camera's schedule), twice:

- `send` (before): every frame is sent with the blocking `AnimationStream.send`, as a camera's buffer would hand
  them over; a frame waits in the client while the window is full, so its age grows while the server is behind.
  The camera stops at the end of the run: frames not sent by then are not delivered.
- `offer` (after, the live rule): `AnimationStream.offer` drops the frame when the window is full, so the newest
  frame goes out as soon as an answer frees a slot; run with the same window and with a window of 1 (what the web
  page's Live tab keeps in flight), since the rule bounds a frame's age by the frames in flight.

Latency is a frame's answer time minus its capture time, over every answered frame of every stream. "Offered" counts
the frames handed to `send` / `offer` before the camera stopped: a blocking send hands over fewer (the later
frames never leave the camera's buffer). Results go to
`overload.csv` and `overload.md` in `--out`, with the machine and its load.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from ..client import DrivingFrame, LivePortraitClient, SourceInput
from .inputs import DEFAULT_DRIVING, DEFAULT_SOURCE, read_driving, read_source
from .report import machine_info, write_dict_rows

PROBE_STREAMS = 4
PROBE_SECONDS = 15.0


def probe_throughput(url: str, source: SourceInput, drivings: list[DrivingFrame], in_flight: int) -> float:
    """Frames per second the server answers with PROBE_STREAMS streams sending as fast as their window allows."""
    counts = [0] * PROBE_STREAMS
    began = time.perf_counter()
    deadline = began + PROBE_SECONDS

    def run(k: int) -> None:
        with LivePortraitClient(url) as client, client.stream(source, max_in_flight=in_flight) as stream:
            i = 0
            while time.perf_counter() < deadline:
                stream.send(drivings[i % len(drivings)])
                counts[k] += len(stream.ready())
                i += 1
            counts[k] += len(stream.finish())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(PROBE_STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def live_stream(url: str, source: SourceInput, drivings: list[DrivingFrame], mode: str, fps: float, seconds: float,
                in_flight: int, start: float, out: dict) -> None:
    """One camera at `fps` for `seconds` from `start`; records latencies (s), frames offered/delivered/dropped."""
    captured: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    offered = 0

    def collect(results) -> None:
        for r in results:
            latencies.append(sent_at[r.number] + r.latency_s - captured[r.number])

    with LivePortraitClient(url) as client, client.stream(source, max_in_flight=in_flight) as stream:
        i = 0
        while True:
            capture = start + i / fps
            now = time.perf_counter()
            if capture >= start + seconds or now >= start + seconds:
                break
            if capture > now:
                time.sleep(capture - now)
            offered += 1
            driving = drivings[i % len(drivings)]
            number = stream.send(driving) if mode == "send" else stream.offer(driving)
            if number is not None:
                captured[number] = capture
                sent_at[number] = time.perf_counter()
            collect(stream.ready())
            i += 1
        collect(stream.finish())
        out.update(latencies=latencies, offered=offered, delivered=len(latencies), dropped=stream.dropped)


def run_mode(url, source, drivings, mode: str, streams: int, fps: float, seconds: float, in_flight: int) -> dict:
    results = [{} for _ in range(streams)]
    start = time.perf_counter() + 1.0
    threads = [threading.Thread(target=live_stream, args=(url, source, drivings, mode, fps, seconds, in_flight,
                                                          start, results[k])) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = np.array([x for r in results for x in r["latencies"]]) * 1000
    delivered = [r["delivered"] for r in results]
    return {"mode": mode, "streams": streams, "fps_per_stream": fps, "seconds": seconds, "in_flight": in_flight,
            "frames_offered_per_stream": round(float(np.mean([r["offered"] for r in results])), 1),
            "frames_delivered_min": min(delivered), "frames_delivered_mean": round(float(np.mean(delivered)), 1),
            "frames_delivered_max": max(delivered),
            "frames_dropped_mean": round(float(np.mean([r["dropped"] for r in results])), 1),
            "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "latency_max_ms": round(float(latencies.max()), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="gRPC address of a running server")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--driving", default=str(DEFAULT_DRIVING))
    parser.add_argument("--kept-up", type=int, default=2, help="streams the server keeps up with (sets the fps)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--out", default=".", help="folder for overload.csv and overload.md")
    args = parser.parse_args(argv)
    source = SourceInput(read_source(args.source))
    drivings = [DrivingFrame(crop=c) for c in read_driving(args.driving, 30)]
    throughput = probe_throughput(args.server, source, drivings, args.in_flight)
    kept_up, fps = args.kept_up, throughput / args.kept_up
    print(f"throughput {throughput:.2f} frames/s: keeps up with {kept_up} streams at {fps:.2f} fps; "
          f"running {2 * kept_up}", flush=True)
    rows = [run_mode(args.server, source, drivings, mode, 2 * kept_up, fps, args.seconds, window)
            for mode, window in (("send", args.in_flight), ("offer", args.in_flight), ("offer", 1))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_dict_rows(out / "overload.csv", rows)
    info = machine_info()
    lines = [f"# Live streams at 2x what the server keeps up with (`benchmarks/overload.py`)", "",
             f"Server throughput ({PROBE_STREAMS} streams, flat out): {throughput:.2f} frames/s, so it keeps up with "
             f"{kept_up} streams at {fps:.2f} fps; {2 * kept_up} streams ran for {args.seconds:g} s. Latency: "
             "answer time minus the frame's capture time.", "",
             "| rule | window | streams | offered / stream | delivered / stream (min / mean / max) | dropped / stream | "
             "p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "blocking send (before)" if r["mode"] == "send" else "live rule: offer, newest wins (after)"
        lines.append(f"| {name} | {r['in_flight']} | {r['streams']} | {r['frames_offered_per_stream']} | "
                     f"{r['frames_delivered_min']} / "
                     f"{r['frames_delivered_mean']} / {r['frames_delivered_max']} | {r['frames_dropped_mean']} | "
                     f"{r['latency_p50_ms']} | {r['latency_p99_ms']} | {r['latency_max_ms']} |")
    lines += ["", "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), ""]
    (out / "overload.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
