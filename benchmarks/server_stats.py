"""Time spent in each served model during a measurement, from Triton's statistics API (before/after deltas).

perf_analyzer's `--bls-composing-models` reads the same counters, but in perf_analyzer 2.51 naming composing
models makes it treat the `liveportrait` sequence model as a plain model: its requests lose their correlation ID
and the server rejects them ("must specify a non-zero or non-empty correlation ID"). So the pipeline's time is split
by sub-model here, from the counters the server keeps per model.
"""
from __future__ import annotations

import dataclasses

PARTS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass(frozen=True)
class ModelCounters:
    """Cumulative counters of one model: requests (success count), items, executions, nanoseconds per part."""
    requests: int
    inferences: int
    executions: int
    ns: dict[str, int]


@dataclasses.dataclass(frozen=True)
class ModelTime:
    """One model's share of a measurement: per request, mean ms in queue and in compute, and its mean batch."""
    model: str
    requests: int
    latency_ms: float
    queue_ms: float
    compute_ms: float
    mean_batch: float


def snapshot(url: str, models: list[str]) -> dict[str, ModelCounters]:
    """Current counters of `models` (gRPC statistics API of the server at `url`)."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    out = {}
    for entry in stats.get("model_stats", []):
        if entry["name"] in models:
            parts = entry.get("inference_stats", {})
            out[entry["name"]] = ModelCounters(
                requests=int(parts.get("success", {}).get("count", 0)),
                inferences=int(entry.get("inference_count", 0)), executions=int(entry.get("execution_count", 0)),
                ns={p: int(parts.get(p, {}).get("ns", 0)) for p in PARTS})
    return out


def split(before: dict[str, ModelCounters], after: dict[str, ModelCounters]) -> list[ModelTime]:
    """Per model that served requests between the two snapshots: mean time per request by part."""
    times = []
    for model, end in after.items():
        start = before.get(model, ModelCounters(0, 0, 0, {p: 0 for p in PARTS}))
        requests = end.requests - start.requests
        if requests <= 0:
            continue
        ms = {p: (end.ns[p] - start.ns[p]) / requests / 1e6 for p in PARTS}
        executions = end.executions - start.executions
        times.append(ModelTime(model, requests, latency_ms=ms["success"], queue_ms=ms["queue"],
                               compute_ms=ms["compute_input"] + ms["compute_infer"] + ms["compute_output"],
                               mean_batch=(end.inferences - start.inferences) / executions if executions else 0.0))
    return times
