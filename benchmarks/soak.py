"""Soak a running server: streams start and end continuously, some abandoned without END, for a bounded time,
while every process's resident memory and open file descriptors are sampled (a benchmark, not a test).

    python -m liveportrait_triton.benchmarks.soak --server HOST:GRPC_PORT --http-port PORT --minutes 10 \\
        [--workers 3] [--frames 4] [--abandon-every 4] [--out DIR]

Each worker loops: a new stream (a new sequence), `--frames` driving frames, then END; every `--abandon-every`-th
stream is closed without END instead (the server frees it at its idle timeout: give the server a short one so
that several eviction cycles fall inside the run). A START refused at capacity is counted and retried later.
Sampled every `--interval` seconds: tritonserver, each of its Python-backend stubs (liveportrait_triton.health)
and this client process: RSS (VmRSS) and the number of open descriptors (/proc/PID/fd). The slope of each is
fitted (least squares) over the run after its first quarter (warm-up: arenas and caches reaching their size).
Writes soak.csv (every sample) and soak.md (counts and slopes, with the machine and its load) into `--out`.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from .. import health
from ..client import DrivingFrame, LivePortraitClient, ServerAtCapacity, SourceInput
from .inputs import DEFAULT_DRIVING, DEFAULT_SOURCE, read_driving, read_source
from .report import machine_info, write_dict_rows


def sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open descriptors) of a process, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = int(status.split("VmRSS:", 1)[1].split()[0])
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError, ValueError):
        return None


def processes(http_port: int) -> dict[str, int]:
    server = health.server_process(http_port)
    if server is None:
        raise SystemExit(f"no tritonserver with --http-port={http_port} is visible here")
    return {"tritonserver": server, **health.stub_processes(server), "client (this process)": os.getpid()}


def slope_per_minute(times: list[float], values: list[float]) -> float:
    t = np.asarray(times) / 60
    return float(np.polyfit(t, np.asarray(values), 1)[0]) if len(t) >= 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="gRPC address")
    parser.add_argument("--http-port", type=int, required=True, help="the server's HTTP port (finds its processes)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--abandon-every", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--driving", default=str(DEFAULT_DRIVING))
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    source = SourceInput(read_source(args.source))
    drivings = [DrivingFrame(crop=c) for c in read_driving(args.driving, 16)]
    watched = processes(args.http_port)
    counts = {"ended": 0, "abandoned": 0, "refused": 0, "failed": 0, "frames": 0}
    lock = threading.Lock()
    began = time.monotonic()
    deadline = began + args.minutes * 60

    def worker() -> None:
        with LivePortraitClient(args.server) as client:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                abandon = n % args.abandon_every == 0
                try:
                    stream = client.stream(source, max_in_flight=2)
                    got = []
                    for i in range(args.frames):
                        stream.send(drivings[i % len(drivings)])
                        got += stream.ready()
                    if abandon:
                        stream.close()
                        outcome = "abandoned"
                    else:
                        got += stream.finish()
                        outcome = "ended"
                except ServerAtCapacity:
                    outcome, got = "refused", []
                    time.sleep(1)
                except Exception as exc:         # counted; the soak goes on
                    print(f"stream failed: {str(exc).splitlines()[0]}", flush=True)
                    outcome, got = "failed", []
                with lock:
                    counts[outcome] += 1
                    counts["frames"] += len(got)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    rows = []
    while True:
        now = time.monotonic() - began
        for name, pid in watched.items():
            measured = sample(pid)
            if measured is not None:
                rows.append({"seconds": round(now, 1), "process": name, "pid": pid,
                             "rss_mib": round(measured[0], 1), "fds": measured[1]})
        if time.monotonic() >= deadline:
            break
        time.sleep(min(args.interval, max(deadline - time.monotonic(), 0.1)))
    for t in threads:
        t.join(timeout=600)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_dict_rows(out / "soak.csv", rows)
    warm = args.minutes * 60 / 4
    lines = ["# Soak (`benchmarks/soak.py`)", "",
             f"{args.minutes:g} min, {args.workers} workers, {args.frames} frames per stream, every "
             f"{args.abandon_every}th stream abandoned without END. Streams: {counts['ended']} ended, "
             f"{counts['abandoned']} abandoned, {counts['refused']} refused at capacity, {counts['failed']} failed; "
             f"{counts['frames']} frames answered. Slopes fitted after the first {warm / 60:g} min.", "",
             "| process | RSS first / last MiB | RSS slope MiB/min | fds first / last | fds slope /min |",
             "|---|---|---|---|---|"]
    for name in watched:
        mine = [r for r in rows if r["process"] == name]
        late = [r for r in mine if r["seconds"] >= warm]
        if not mine:
            continue
        lines.append(f"| {name} | {mine[0]['rss_mib']} / {mine[-1]['rss_mib']} | "
                     f"{slope_per_minute([r['seconds'] for r in late], [r['rss_mib'] for r in late]):+.3f} | "
                     f"{mine[0]['fds']} / {mine[-1]['fds']} | "
                     f"{slope_per_minute([r['seconds'] for r in late], [r['fds'] for r in late]):+.3f} |")
    lines += ["", "Machine: " + "; ".join(f"{k} {v}" for k, v in machine_info().items()), ""]
    (out / "soak.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
