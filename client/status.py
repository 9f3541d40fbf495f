"""What a server is doing, for a status line: ready models, live sequences, recent queue time, the Animals set.

Readiness comes over gRPC (`is_model_ready` per model of the spec); live sequences and queue times come from
Triton's Prometheus metrics endpoint (`liveportrait_live_sequences`, the pipeline's custom gauge, and Triton's
cumulative `nv_inference_queue_duration_us` / `nv_inference_request_success`). The queue time shown is the
average over the requests since the previous poll, so it tracks the present load rather than the server's life.
"""
from __future__ import annotations

import dataclasses
import re
import urllib.request

from .. import spec
from .client import LivePortraitClient

LIVE_SEQUENCES = "liveportrait_live_sequences"
QUEUE_US = "nv_inference_queue_duration_us"
SUCCESSES = "nv_inference_request_success"
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def default_metrics_url(grpc_url: str, metrics_port: int = 8002) -> str:
    """Triton's metrics endpoint on the same host as the gRPC address (its default port 8002)."""
    host = grpc_url.rsplit(":", 1)[0]
    return f"http://{host}:{metrics_port}/metrics"


def metrics_candidates(grpc_url: str) -> list[str]:
    """Where Triton's metrics may be, seen from a gRPC address alone (Triton does not say over gRPC): its default
    port 8002, and the gRPC port + 1 (`serve --http-port P-1 --grpc-port P --metrics-port P+1`, the default layout
    moved). `serve` prints the exact `ui --metrics-url` to use."""
    host, port = grpc_url.rsplit(":", 1)
    urls = [default_metrics_url(grpc_url)]
    if port.isdigit():
        urls.append(f"http://{host}:{int(port) + 1}/metrics")
    return list(dict.fromkeys(urls))


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) samples; comments and malformed lines are skipped."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        samples.append((match["name"], dict(_LABEL.findall(match["labels"] or "")), value))
    return samples


def metric_sum(samples, name: str, **labels) -> float | None:
    """Sum of a metric over the samples whose labels include `labels`; None if there is none."""
    values = [v for n, got, v in samples if n == name and all(got.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None


@dataclasses.dataclass
class ServerStatus:
    ready: list[str]                    # models of the spec that are ready
    missing: list[str]                  # models of the spec that are not
    live_sequences: int | None          # None: the metrics endpoint did not answer
    queue_ms: float | None              # mean pipeline queue time of the requests since the last poll
    error: str | None = None
    metrics_tried: tuple[str, ...] = ()     # when no metrics endpoint answered: where they were looked for
    animals: bool | None = None         # every model of the Animals set is ready (subject=animal can be served)

    def line(self) -> str:
        if self.error:
            return f"server: {self.error}"
        parts = [f"ready models {len(self.ready)}/{len(self.ready) + len(self.missing)}"
                 + (f" (not ready: {', '.join(self.missing)})" if self.missing else "")]
        if self.live_sequences is not None:
            parts.append(f"live sequences {self.live_sequences}")
        else:
            parts.append(f"live sequences ? (no metrics at {', '.join(self.metrics_tried) or 'the metrics URL'}: "
                         "start the page with --metrics-url, which `serve` prints)")
        parts.append("queue " + (f"{self.queue_ms:.1f} ms" if self.queue_ms is not None else "- (no requests)"))
        if self.animals is not None:
            parts.append("animal set " + ("served" if self.animals else "not served"))
        return "server: " + " | ".join(parts)


class StatusMonitor:
    """Polls one server; remembers the previous metrics sample to report recent queue times."""

    def __init__(self, client: LivePortraitClient, metrics_url: str | list[str], timeout_s: float = 5.0):
        self.client, self.timeout_s = client, timeout_s
        self.candidates = [metrics_url] if isinstance(metrics_url, str) else list(metrics_url)
        self.metrics_url: str | None = self.candidates[0] if len(self.candidates) == 1 else None
        self._previous: tuple[float, float] | None = None      # (queue us, successes) of the pipeline

    def samples(self):
        """The metrics of the first candidate URL that answers with the pipeline's metrics (then kept)."""
        for url in [self.metrics_url] if self.metrics_url else self.candidates:
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                    samples = parse_metrics(response.read().decode("utf-8", "replace"))
            except OSError:
                continue
            if self.metrics_url or metric_sum(samples, LIVE_SEQUENCES) is not None:
                self.metrics_url = url
                return samples
        raise OSError(f"no metrics at {', '.join(self.candidates)}")

    def poll(self) -> ServerStatus:
        models = [spec.PIPELINE, *spec.SUBMODELS]
        try:
            ready = [m for m in models if self.client.model_ready(m)]
            animals = all([self.client.model_ready(m) for m in spec.ANIMAL_SUBMODELS])
        except Exception as exc:        # grpc raises its own types for a refused connection
            return ServerStatus([], models, None, None, error=f"unreachable ({str(exc).splitlines()[0][:120]})")
        try:
            samples = self.samples()
        except OSError:
            return ServerStatus(ready, [m for m in models if m not in ready], None, None,
                                metrics_tried=tuple([self.metrics_url] if self.metrics_url else self.candidates),
                                animals=animals)
        live = metric_sum(samples, LIVE_SEQUENCES, model=spec.PIPELINE)
        queue_us = metric_sum(samples, QUEUE_US, model=spec.PIPELINE) or 0.0
        done = metric_sum(samples, SUCCESSES, model=spec.PIPELINE) or 0.0
        queue_ms = None
        if self._previous is not None and done > self._previous[1]:
            queue_ms = (queue_us - self._previous[0]) / (done - self._previous[1]) / 1000.0
        self._previous = (queue_us, done)
        return ServerStatus(ready, [m for m in models if m not in ready],
                            int(live) if live is not None else None, queue_ms, animals=animals)
