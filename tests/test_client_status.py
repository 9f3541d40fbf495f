"""The status line's metrics parsing and queue-time arithmetic (no server: a Prometheus text sample)."""
from __future__ import annotations

from liveportrait_triton.client import status

SAMPLE = """# HELP liveportrait_live_sequences Sequences whose source state is held
# TYPE liveportrait_live_sequences gauge
liveportrait_live_sequences{model="liveportrait",version="1"} 3
nv_inference_queue_duration_us{model="liveportrait",version="1"} {queue}
nv_inference_queue_duration_us{model="warping_module",version="1"} 999999
nv_inference_request_success{model="liveportrait",version="1"} {done}
"""


def sample(queue_us: float, done: float) -> list:
    return status.parse_metrics(SAMPLE.replace("{queue}", str(queue_us)).replace("{done}", str(done)))


def test_parse_and_sum_by_label():
    samples = sample(5000, 10)
    assert status.metric_sum(samples, status.LIVE_SEQUENCES, model="liveportrait") == 3
    assert status.metric_sum(samples, status.QUEUE_US, model="liveportrait") == 5000
    assert status.metric_sum(samples, status.QUEUE_US) == 5000 + 999999
    assert status.metric_sum(samples, "absent_metric") is None


class FakeReady:
    """Stands in for the gRPC readiness call only (the metrics text is the part under test)."""
    def model_ready(self, model):
        return model != "retarget_lip"


def test_queue_time_is_per_request_since_the_last_poll():
    monitor = status.StatusMonitor(FakeReady(), "http://unused")
    polls = iter([sample(5000, 10), sample(5000 + 3 * 2500, 13), sample(12500, 13)])
    monitor.samples = lambda: next(polls)
    first, second, idle = monitor.poll(), monitor.poll(), monitor.poll()
    assert first.queue_ms is None                            # nothing to compare with yet
    assert abs(second.queue_ms - 2.5) < 1e-9                 # 7500 us over 3 requests
    assert idle.queue_ms is None                             # no requests since the last poll
    assert second.live_sequences == 3 and second.missing == ["retarget_lip"]
    assert second.line() == ("server: ready models 7/8 (not ready: retarget_lip) | live sequences 3 | "
                             "queue 2.5 ms | animal set served")

    class HumansOnly(FakeReady):
        def model_ready(self, model):
            return not model.startswith("animal_")
    humans = status.StatusMonitor(HumansOnly(), "http://unused")
    humans.samples = lambda: sample(0, 0)
    assert humans.poll().line().endswith("| animal set not served")


def test_default_metrics_url_uses_the_server_host():
    assert status.default_metrics_url("10.0.0.5:8001") == "http://10.0.0.5:8002/metrics"


def test_metrics_are_found_beside_a_moved_grpc_port_and_a_missing_endpoint_is_named():
    """`ui --server HOST:9001` without --metrics-url: 8002 does not answer, 9002 (the gRPC port + 1, where `serve`
    puts it when the ports move together) does; with neither, the line names where it looked."""
    import http.server
    import threading
    from liveportrait_triton.serve import free_port

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = SAMPLE.replace("{queue}", "0").replace("{done}", "0").encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    HOST = "127.0.0.2"      # loopback, but not where a real server with the default ports would listen
    metrics_port = free_port(HOST)
    server = http.server.ThreadingHTTPServer((HOST, metrics_port), Metrics)
    grpc_port = metrics_port - 1
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        candidates = status.metrics_candidates(f"{HOST}:{grpc_port}")
        assert candidates == [f"http://{HOST}:8002/metrics", f"http://{HOST}:{grpc_port + 1}/metrics"]
        monitor = status.StatusMonitor(FakeReady(), candidates, timeout_s=2)
        polled = monitor.poll()
        assert polled.live_sequences == 3 and monitor.metrics_url == candidates[1], polled
    finally:
        server.shutdown()
        server.server_close()
    nowhere = [f"http://127.0.0.1:{free_port()}/metrics"]
    line = status.StatusMonitor(FakeReady(), nowhere, timeout_s=2).poll().line()
    assert f"live sequences ? (no metrics at {nowhere[0]}: start the page with --metrics-url" in line, line
