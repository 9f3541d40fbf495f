"""Per-stage timers for `animate --profile`, and the server's own per-model time from Triton's statistics.

Stages run in different threads and overlap (decoding and cropping run ahead of the network), so their sums may
exceed the wall time; the report shows each stage's total, its time per frame and the wall-clock frame rate.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time

from tritonclient.utils import InferenceServerException


class StageTimer:
    """Thread-safe accumulation of seconds and counts per named stage."""

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)
        self.order: list[str] = []

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            if stage not in self.seconds:
                self.order.append(stage)
            self.seconds[stage] += seconds
            self.counts[stage] += count

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def report(self, frames: int, wall_s: float, extra: list[tuple[str, float, int]] = ()) -> str:
        """A table: stage, total seconds, ms per frame (per call where the stage counts calls)."""
        lines = [f"{'stage':<40}{'total s':>10}{'ms/frame':>11}{'calls':>8}"]
        rows = [(s, self.seconds[s], self.counts[s]) for s in self.order] + list(extra)
        for stage, seconds, count in rows:
            per = seconds / max(frames, 1) * 1e3
            lines.append(f"{stage:<40}{seconds:>10.3f}{per:>11.1f}{count:>8}")
        rate = frames / wall_s if wall_s > 0 else float("nan")
        lines.append(f"{'wall clock':<40}{wall_s:>10.3f}{wall_s / max(frames, 1) * 1e3:>11.1f}"
                     f"{frames:>8}   -> {rate:.3f} frames/s")
        lines.append("(stages overlap: decoding and cropping run ahead in a thread and several frames are in flight, "
                     "so request latencies include waiting behind earlier frames; 'server' rows are Triton's own "
                     "statistics over this run)")
        return "\n".join(lines)


def server_statistics(client, models: list[str]) -> dict[str, dict[str, float]]:
    """{model: {'count', 'queue', 'compute'}} (seconds) from Triton's cumulative inference statistics."""
    out = {}
    for model in models:
        try:
            stats = client.get_inference_statistics(model_name=model, as_json=True)
        except InferenceServerException:       # statistics are optional: a missing model simply does not show
            continue
        for entry in stats.get("model_stats", []):
            inf = entry.get("inference_stats", {})
            ns = lambda key: float(inf.get(key, {}).get("ns", 0))  # noqa: E731
            out[model] = {"count": float(inf.get("success", {}).get("count", 0)),
                          "executions": float(entry.get("execution_count", 0)),
                          "queue": ns("queue") / 1e9,
                          "compute": (ns("compute_input") + ns("compute_infer") + ns("compute_output")) / 1e9}
    return out


def statistics_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    return {m: {k: after[m][k] - before.get(m, {}).get(k, 0.0) for k in after[m]} for m in after}
