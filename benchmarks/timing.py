"""Wall-clock timing with warm-up, and the summary statistics every benchmark table reports."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds over `count` timed calls."""
    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Stats":
        if not seconds:
            raise ValueError("no timed calls")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(len(ms), float(ms.mean()), float(p50), float(p95), float(p99), float(ms.min()))


def time_calls(call: Callable[[], object], warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds of this process, all threads) of each of `repeats` calls, after `warmup`
    untimed calls. CPU time is far less sensitive than wall time to other processes competing for the cores."""
    for _ in range(warmup):
        call()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu
