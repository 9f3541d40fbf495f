"""Sustained load on the real server (tiny networks, loopback): LP_SOAK_STREAMS concurrent streams through the client
library for LP_SOAK_SECONDS (CI default 45 s; the long run: LP_SOAK_SECONDS=300), each stream a series of sequences.

Checked: zero errors; every response accounted for (each sequence gets frames 0..n-1 exactly once, in order; the
client library also checks each answer's frame_index against the frames it sent); the server's failure counters do
not move; no sequence state left behind; memory flat. Memory (test_reliability_faults.server_memory) is measured
at rest after a warm-up, after the first half of the run and after the second; memory may grow in the first half
and must not grow by more than a margin in the second, where a leak would keep growing: the pipeline stub and the
tritonserver process by OWN_MARGIN each, in every run; the whole server's footprint by FOOTPRINT_MARGIN in runs of
at least LONG_SOAK_SECONDS. ONNX Runtime's CPU arenas in the sub-network stubs grow in steps whenever a batch
composition does not fit their free chunks and take minutes to settle (measured in a 300 s run at concurrency 8:
warping_module +152 MiB and appearance_feature_extractor +62 MiB in the first half, +4 and +0 in the second; in 45 s
runs such a step can fall in the second half). The RSS sum and the maxima under load are reported.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import server_metric
from liveportrait_triton import spec
from liveportrait_triton.client import DrivingFrame, LivePortraitClient, SourceInput
from test_reliability_faults import MiB, grown, server_memory

pytestmark = [pytest.mark.server, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("LP_SOAK_SECONDS", "45"))
STREAMS = int(os.environ.get("LP_SOAK_STREAMS", "8"))
FRAMES_PER_SEQUENCE = 8
WARMUP_SECONDS = 10
SETTLE_SECONDS = 11            # the pipeline checks every 5 s and hands freed memory back after a quiet check
OWN_MARGIN = 16 * MiB          # the pipeline stub and the tritonserver process
FOOTPRINT_MARGIN = 128 * MiB   # the whole server, ONNX Runtime's arenas included (5% of its tiny footprint) ...
LONG_SOAK_SECONDS = 240        # ... checked in runs this long: the arenas take minutes to reach their size


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
                            stream.send(DrivingFrame(crop=self.drivings[(sent + k) % len(self.drivings)]), last=last)
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
    load.run(WARMUP_SECONDS)
    assert not load.errors, load.errors
    warm_sequences = len(load.sequences)
    failed_before = failures(tiny_server)
    at_rest = [settled(tiny_server)]
    samples = list(at_rest)
    began = time.monotonic()
    for _ in range(2):          # two halves, each followed by a measurement at rest
        load.run(SOAK_SECONDS / 2, on_tick=lambda: samples.append(server_memory(tiny_server)))
        at_rest.append(settled(tiny_server))
        if load.errors:
            break
    elapsed = time.monotonic() - began - 2 * SETTLE_SECONDS
    sequences = load.sequences[warm_sequences:]
    frames = sum(sent for sent, _ in sequences)

    def figures(key: str) -> str:
        rest = ", ".join(f"{m[key] / MiB:.1f}" for m in at_rest)
        return f"at rest {rest}; max under load {max(s[key] for s in samples) / MiB:.1f}"

    print(f"\nsoak: {STREAMS} streams, {elapsed:.0f} s under load, {len(sequences)} sequences, {frames} frames "
          f"({frames / elapsed:.1f} frames/s), errors {len(load.errors)}; MiB: RSS (server + stubs) {figures('rss')}; "
          f"footprint {figures('footprint')}; pipeline stub {figures('pipeline')}; grown in the first half: "
          f"{grown(at_rest[0], at_rest[1]) or 'nothing'}; in the second: {grown(at_rest[1], at_rest[2]) or 'nothing'}")
    assert not load.errors, load.errors
    assert len(sequences) >= STREAMS, "every stream finished at least one sequence"
    for sent, got in load.sequences:
        assert got == list(range(sent)), f"a sequence of {sent} frames got {got}"
    assert failures(tiny_server) == failed_before, "the server counted failed requests"
    assert server_metric(tiny_server, "liveportrait_live_sequences") == 0, "every sequence ended and was freed"
    second_half = {key: at_rest[2][key] - at_rest[1][key] for key in at_rest[2]}
    for own in (f"anon {spec.PIPELINE}_0_0", "anon tritonserver"):
        assert second_half[own] <= OWN_MARGIN, f"{own} grew by {second_half[own] / MiB:.1f} MiB in the second half"
    if SOAK_SECONDS >= LONG_SOAK_SECONDS:
        assert second_half["footprint"] <= FOOTPRINT_MARGIN, grown(at_rest[1], at_rest[2])


def settled(server) -> dict[str, int]:
    """server_memory once the load has stopped and the pipeline has handed freed memory back."""
    time.sleep(SETTLE_SECONDS)
    return server_memory(server)
