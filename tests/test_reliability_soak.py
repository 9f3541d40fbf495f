"""Sustained load on the real server (tiny networks, loopback): LP_SOAK_STREAMS concurrent streams through the client
library for LP_SOAK_SECONDS (CI default 45 s; the long run: LP_SOAK_SECONDS=300), each stream a series of sequences.

Checked: zero errors; every response accounted for (each sequence gets frames 0..n-1 exactly once, in order; the
client library also checks each answer's frame_index against the frames it sent); the server's failure counters do
not move; no sequence state left behind; memory flat: measured with test_reliability_faults.server_memory at rest
after a warm-up and again at rest after the run, the pipeline stub (per-sequence state, per-frame arrays) within
PIPELINE_MARGIN and the whole server's footprint (tritonserver + stubs) within FOOTPRINT_MARGIN, which leaves room
for ONNX Runtime's arenas meeting a batch composition they had not seen yet (they are bounded by the maximum batch
sizes, not by time). The RSS sum and its maximum during the run are reported too.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import server_metric
from liveportrait_triton import spec
from liveportrait_triton.client.client import DrivingInput, LivePortraitClient, SourceInput
from test_reliability_faults import MiB, server_memory

pytestmark = [pytest.mark.server, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("LP_SOAK_SECONDS", "45"))
STREAMS = int(os.environ.get("LP_SOAK_STREAMS", "8"))
FRAMES_PER_SEQUENCE = 8
WARMUP_SECONDS = 10
SETTLE_SECONDS = 6          # > the pipeline's eviction interval, after which it hands freed memory back
PIPELINE_MARGIN = 8 * MiB
FOOTPRINT_MARGIN = 64 * MiB


class Load:
    """STREAMS threads, each running sequences back to back until `stop`; results and errors per thread."""

    def __init__(self, url: str, sources: list, drivings: list):
        self.url, self.sources, self.drivings = url, sources, drivings
        self.stop = threading.Event()
        self.sequences: list[tuple[int, list[int]]] = []    # (frames sent, frame numbers got in arrival order)
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def worker(self, k: int) -> None:
        """Sequences of up to FRAMES_PER_SEQUENCE frames; once `stop` is set the next frame is the sequence's last."""
        try:
            with LivePortraitClient(self.url) as client:
                while not self.stop.is_set():
                    source = SourceInput(self.sources[k % len(self.sources)])
                    got, sent = [], 0
                    with client.stream(source, max_in_flight=2) as stream:
                        while sent < FRAMES_PER_SEQUENCE:
                            last = sent == FRAMES_PER_SEQUENCE - 1 or self.stop.is_set()
                            stream.send(DrivingInput(crop=self.drivings[(sent + k) % len(self.drivings)]), last=last)
                            sent += 1
                            got += [r.number for r in stream.ready()]
                            if last:
                                break
                        got += [r.number for r in stream.finish()]
                    with self._lock:
                        self.sequences.append((sent, got))
        except Exception as exc:        # anything at all is a failure of the soak
            with self._lock:
                self.errors.append(f"stream {k}: {type(exc).__name__}: {exc}")

    def run(self, seconds: float, on_tick=None) -> None:
        self.stop.clear()
        threads = [threading.Thread(target=self.worker, args=(k,), daemon=True) for k in range(STREAMS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.errors:
            if on_tick:
                on_tick()
            time.sleep(1.0)
        self.stop.set()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a stream did not finish"


def failures(server) -> float:
    return server_metric(server, "nv_inference_request_failure", model=spec.PIPELINE)


def test_soak_at_concurrency(tiny_server, source_crops, driving_crops):
    load = Load(tiny_server.grpc_url, list(source_crops.values()), driving_crops)
    load.run(WARMUP_SECONDS)        # ONNX Runtime arenas and Triton's buffers reach their working size
    assert not load.errors, load.errors
    warm_sequences = len(load.sequences)
    failed_before = failures(tiny_server)
    time.sleep(SETTLE_SECONDS)
    start = server_memory(tiny_server)
    samples = [start]
    began = time.monotonic()
    load.run(SOAK_SECONDS, on_tick=lambda: samples.append(server_memory(tiny_server)))
    elapsed = time.monotonic() - began
    time.sleep(SETTLE_SECONDS)
    end = server_memory(tiny_server)
    sequences = load.sequences[warm_sequences:]
    frames = sum(sent for sent, _ in sequences)

    def figures(key: str) -> str:
        return (f"start {start[key] / MiB:.1f}, max {max(s[key] for s in samples) / MiB:.1f}, "
                f"end {end[key] / MiB:.1f}")

    print(f"\nsoak: {STREAMS} streams, {elapsed:.0f} s, {len(sequences)} sequences, {frames} frames "
          f"({frames / elapsed:.1f} frames/s), errors {len(load.errors)}; MiB: RSS (server + stubs) {figures('rss')}; "
          f"footprint {figures('footprint')}; pipeline stub {figures('pipeline')}")
    assert not load.errors, load.errors
    assert len(sequences) >= STREAMS, "every stream finished at least one sequence"
    for sent, got in load.sequences:
        assert got == list(range(sent)), f"a sequence of {sent} frames got {got}"
    assert failures(tiny_server) == failed_before, "the server counted failed requests"
    assert server_metric(tiny_server, "liveportrait_live_sequences") == 0, "every sequence ended and was freed"
    assert end["pipeline"] - start["pipeline"] <= PIPELINE_MARGIN, "the pipeline stub's memory grew"
    assert end["footprint"] - start["footprint"] <= FOOTPRINT_MARGIN, "the server's memory grew"
