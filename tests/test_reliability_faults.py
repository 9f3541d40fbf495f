"""Faults on the real server (tiny networks, loopback): clients that vanish, abandoned sequences, a killed stub.

A server restarted mid-stream is covered by tests/test_client_retry.py (`test_stream_survives_a_server_restart`:
with retry_s the stream re-registers the source and continues with no frame lost or duplicated, images equal to an
uninterrupted run; `test_command_fails_cleanly_when_the_server_goes_away`: without --retry the command says so).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import REPO, rendered_copy, serve_command, server_metric
from liveportrait_triton import spec
from liveportrait_triton.client import DrivingFrame, LivePortraitClient, RequestFailed, SourceInput
from liveportrait_triton.serve import TritonServer

pytestmark = pytest.mark.server

MODEL = spec.PIPELINE
IDLE_TIMEOUT_S = 10         # long enough for all ABANDONED starts to be live at once on a loaded 2-core machine
SETTLE_SECONDS = 6          # two of the pipeline's eviction checks (every IDLE_TIMEOUT_S / 4 s)
ABANDONED = 200
MiB = 2 ** 20
TOTAL_MARGIN = 48 * MiB     # see test_abandoned_sequences_are_evicted_and_their_memory_returned
PIPELINE_MARGIN = 8 * MiB


# -- helpers ---------------------------------------------------------------------------------------------------

def server_memory(server: TritonServer) -> dict[str, int]:
    """Memory of the tritonserver process plus all its Python-backend stubs, in bytes, from /proc and /dev/shm:

    - `rss`: the sum of their resident set sizes (VmRSS; pages of the shared-memory pool mapped by both the server
      and a stub count twice, library code counts in every process);
    - `footprint`: what the server group really holds, private anonymous memory (RssAnon) plus the pages of its
      Python-backend shared-memory pool (/dev/shm files with the server's prefix), each counted once;
    - `pipeline`: the anonymous resident memory of the pipeline model's stub, where sequence state lives."""
    memory = {"rss": 0, "footprint": 0, "pipeline": 0}
    for name, pid in {"tritonserver": server.process.pid, **server.stub_processes()}.items():
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        memory["rss"] += int(fields["VmRSS"].split()[0]) * 1024
        memory["footprint"] += int(fields["RssAnon"].split()[0]) * 1024
        memory[f"anon {name}"] = int(fields["RssAnon"].split()[0]) * 1024
        if name == f"{MODEL}_0_0":
            memory["pipeline"] = int(fields["RssAnon"].split()[0]) * 1024
    for region in Path("/dev/shm").glob(f"{server.shm_prefix}*"):
        memory["footprint"] += region.stat().st_blocks * 512
    return memory


def wait_for_metric(server, name: str, value: float, timeout_s: float, **labels) -> float:
    deadline = time.monotonic() + timeout_s
    while (current := server_metric(server, name, **labels)) != value and time.monotonic() < deadline:
        time.sleep(0.25)
    return current


def start_sequences(url: str, ids: list[int], source: np.ndarray, end: bool = False) -> None:
    """A START with the source for each sequence id, sent together on one gRPC stream; every answer must be OK."""
    answers: queue.Queue = queue.Queue()
    tensor = grpcclient.InferInput("source", [1, 256, 256, 3], "UINT8")
    tensor.set_data_from_numpy(source[None])
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: answers.put(error))
        for corrid in ids:
            client.async_stream_infer(MODEL, [tensor], sequence_id=corrid, sequence_start=True, sequence_end=end)
        errors = [answers.get(timeout=300) for _ in ids]
        client.stop_stream()
    assert not any(errors), [e for e in errors if e][:3]


@pytest.fixture(scope="module")
def short_idle_server(tiny_repository, tmp_path_factory):
    """A server whose sequences are freed after IDLE_TIMEOUT_S idle seconds, with room for 256 live sequences."""
    root = tmp_path_factory.mktemp("short_idle")
    repository = rendered_copy(tiny_repository, root / "repository", sequence_idle_timeout_s=IDLE_TIMEOUT_S,
                               max_candidate_sequences=512, max_live_sequences=256)
    with TritonServer(repository, log_file=root / "tritonserver.log") as server:
        yield server


# -- clients that go away --------------------------------------------------------------------------------------

def test_client_that_disconnects_mid_stream_is_freed_on_idle(short_idle_server, source_crops, driving_crops):
    server = short_idle_server
    idle_before = server_metric(server, "liveportrait_sequences_freed_total", reason="idle")
    client = LivePortraitClient(server.grpc_url)
    stream = client.stream(SourceInput(source_crops["s0"]), max_in_flight=1)
    for crop in driving_crops[:2]:
        stream.send(DrivingFrame(crop=crop))
    got = []
    while len(got) < 2:
        got += stream.ready()
        time.sleep(0.05)
    assert server_metric(server, "liveportrait_live_sequences") == 1
    stream.close()          # the stream is cancelled: no END reaches the server
    assert wait_for_metric(server, "liveportrait_live_sequences", 0, IDLE_TIMEOUT_S + 15) == 0
    assert server_metric(server, "liveportrait_sequence_state_bytes") == 0
    assert server_metric(server, "liveportrait_sequences_freed_total", reason="idle") == idle_before + 1
    with client.stream(SourceInput(source_crops["s1"])) as again:      # the server keeps serving
        for crop in driving_crops[:2]:
            again.send(DrivingFrame(crop=crop))
        assert [r.number for r in again.finish()] == [0, 1]
    client.close()


def test_abandoned_sequences_are_evicted_and_their_memory_returned(short_idle_server, source_crops):
    """ABANDONED sequences start (source registered, state held) and never END: idle eviction frees every one, the
    live-sequence metric returns to 0 and the server's memory returns to its baseline.

    The baseline is taken after a first identical round (abandoned, evicted), which brings ONNX Runtime's arenas
    and the server's buffers towards their high-water marks. The measured round must return to that baseline: the
    pipeline stub, which holds the per-sequence state, within PIPELINE_MARGIN; the whole server's footprint
    (tritonserver + stubs, see server_memory; the RSS sum is reported, not asserted, as it counts the pages of the
    shared-memory pools once per process that touched them) within TOTAL_MARGIN, which leaves room for the
    tritonserver process keeping the buffers of a burst of ABANDONED requests for reuse (measured over four rounds
    on one server, its anonymous memory: 9 MiB fresh, 13 after the first round, 50 after the second, 50 and 49
    after the next two)."""
    server = short_idle_server
    idle_before = server_metric(server, "liveportrait_sequences_freed_total", reason="idle")
    fresh = server_memory(server)
    start_sequences(server.grpc_url, list(range(1, ABANDONED + 1)), source_crops["s0"])
    assert wait_for_metric(server, "liveportrait_live_sequences", 0, IDLE_TIMEOUT_S + 30) == 0
    time.sleep(SETTLE_SECONDS)      # the pipeline hands freed memory back after a quiet check
    baseline = server_memory(server)
    start_sequences(server.grpc_url, list(range(10_000, 10_000 + ABANDONED)), source_crops["s1"])
    live = server_metric(server, "liveportrait_live_sequences")
    state_bytes = server_metric(server, "liveportrait_sequence_state_bytes")
    peak = server_memory(server)
    assert wait_for_metric(server, "liveportrait_live_sequences", 0, IDLE_TIMEOUT_S + 30) == 0
    time.sleep(SETTLE_SECONDS)
    end = server_memory(server)
    print(f"\n{ABANDONED} abandoned sequences: live {live:g}, state {state_bytes / MiB:.1f} MiB; footprint of a "
          f"fresh server {fresh['footprint'] / MiB:.1f} MiB; after a first round (baseline) / peak / after eviction, "
          f"MiB: RSS (server + stubs) {describe(baseline, peak, end, 'rss')}; footprint "
          f"{describe(baseline, peak, end, 'footprint')}; pipeline stub {describe(baseline, peak, end, 'pipeline')}")
    assert live == ABANDONED and state_bytes >= ABANDONED * 100_000
    assert server_metric(server, "liveportrait_sequence_state_bytes") == 0
    assert server_metric(server, "liveportrait_sequences_freed_total", reason="idle") == idle_before + 2 * ABANDONED
    assert peak["pipeline"] - baseline["pipeline"] >= 0.5 * state_bytes, "the held state shows in the measurement"
    assert end["pipeline"] - baseline["pipeline"] <= PIPELINE_MARGIN
    assert end["footprint"] - baseline["footprint"] <= TOTAL_MARGIN, grown(baseline, end)


def grown(before: dict, after: dict) -> str:
    """The memory figures that grew, in MiB (for failure messages)."""
    return ", ".join(f"{key} +{(after[key] - before[key]) / MiB:.1f}" for key in after
                     if key in before and after[key] > before[key])


def describe(baseline: dict, peak: dict, end: dict, key: str) -> str:
    return " / ".join(f"{m[key] / MiB:.1f}" for m in (baseline, peak, end))


# -- a killed Python-backend stub ------------------------------------------------------------------------------

def test_killed_stub_fails_loudly_and_the_health_check_says_so(tiny_repository, tmp_path, source_crops,
                                                              driving_crops):
    """A server started without `serve`'s watcher, as in the image (its entrypoint execs tritonserver). Triton 2.51
    does not restart a Python-backend stub killed with SIGKILL: every later request to that model fails at once
    with INTERNAL "Stub process '<instance>' is not healthy." (the pipeline passes it on as "animation failed:
    warping_module: ..."), and Triton's own health endpoints keep answering 200. The client gets that error within
    seconds, not a hang; other models keep serving; and docker/healthcheck.py (ready and live), the check of the
    image and the Kubernetes probes, turns unhealthy within a few seconds, naming the dead instance."""
    # the request that was in the killed stub never completes: shutdown waits only 2 s for it, not the default 20
    with TritonServer(tiny_repository, log_file=tmp_path / "tritonserver.log",
                      extra_args=("--exit-timeout-secs=2",)) as server:
        port = str(server.ports["http"])
        for probe in ("ready", "live"):
            assert healthcheck(probe, port).returncode == 0
        client = LivePortraitClient(server.grpc_url)
        stream = client.stream(SourceInput(source_crops["s0"]), max_in_flight=2, retry_s=30)
        stream.send(DrivingFrame(crop=driving_crops[0]))
        os.kill(server.stub_processes()[f"{spec.WARPING}_0_0"], signal.SIGKILL)
        killed = time.monotonic()
        checks = {probe: healthcheck(probe, port) for probe in ("ready", "live")}
        noticed = time.monotonic() - killed
        for probe, check in checks.items():
            assert check.returncode == 1 and f"{spec.WARPING}_0_0 died" in check.stderr, (probe, check.stderr)
        assert noticed < 10, f"the health check took {noticed:.1f} s"
        began = time.monotonic()
        with pytest.raises(RequestFailed) as failed:
            for i in range(20):
                stream.send(DrivingFrame(crop=driving_crops[i % len(driving_crops)]))
            stream.finish()
        waited = time.monotonic() - began
        message = str(failed.value)
        assert f"Stub process '{spec.WARPING}_0_0' is not healthy" in message and "Traceback" not in message
        assert waited < 60, f"the client waited {waited:.0f} s for the error"
        with grpcclient.InferenceServerClient(server.grpc_url) as probe:
            time.sleep(3)       # no restart comes: the model still fails while Triton's readiness says 200
            with pytest.raises(RequestFailed, match="is not healthy"):
                client.animate_image(SourceInput(source_crops["s1"]), DrivingFrame(crop=driving_crops[1]))
            assert probe.is_server_ready() and probe.is_model_ready(spec.WARPING)
            motion = client.extract_motion(np.stack(driving_crops[:1]))        # other models serve
            assert motion.exp.shape == (1, 21, 3)
        assert server.dead_stubs() == [f"{spec.WARPING}_0_0"]
        assert healthcheck("ready", port).returncode == 1
        client.close()


def healthcheck(probe: str, port: str) -> subprocess.CompletedProcess:
    """docker/healthcheck.py as the image runs it."""
    return subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py"), probe, "--port", port],
                          capture_output=True, text=True, timeout=60)


def test_serve_command_stops_when_a_stub_dies(tiny_repository):
    command, _ = serve_command(tiny_repository)
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in cli.stdout:
            if line.startswith("Ctrl-C"):
                break
        assert cli.poll() is None, cli.stderr.read()
        server_pid = next(pid for pid in children(cli.pid) if "tritonserver" in cmdline(pid)[0])
        stub = next(pid for pid in children(server_pid) if f"{MODEL}_0_0" in cmdline(pid))
        os.kill(stub, signal.SIGKILL)
        assert cli.wait(timeout=60) == 1
        assert f"the Python-backend process of {MODEL}_0_0 died" in cli.stderr.read()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")


def test_image_entrypoint_watcher_stops_a_server_whose_stub_died(tiny_repository, tmp_path):
    """The GPU image's entrypoint runs tritonserver under `health.supervise`: a killed stub stops the server and
    the entrypoint exits 1 (the container's restart policy then starts a healthy one)."""
    from liveportrait_triton.serve import find_triton, prepare_backend_dir
    server = TritonServer(tiny_repository, log_file=tmp_path / "unused.log")
    install = find_triton()
    argv = server.command(install, prepare_backend_dir(install))
    program = "import json, sys; from liveportrait_triton.health import supervise; sys.exit(supervise(json.loads(sys.argv[1])))"
    with open(tmp_path / "entrypoint.log", "wb") as log:
        watcher = subprocess.Popen([sys.executable, "-c", program, json.dumps(argv)], stdout=log,
                                   stderr=subprocess.STDOUT, env=server.environment(install), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while healthcheck("ready", str(server.ports["http"])).returncode != 0:
            assert watcher.poll() is None and time.monotonic() < deadline, (tmp_path / "entrypoint.log").read_text()
            time.sleep(0.5)
        triton = next(pid for pid in children(watcher.pid) if "tritonserver" in cmdline(pid)[0])
        stub = next(pid for pid in children(triton) if f"{MODEL}_0_0" in cmdline(pid))
        os.kill(stub, signal.SIGKILL)
        assert watcher.wait(timeout=90) == 1
        assert f"the Python-backend process of {MODEL}_0_0 died" in (tmp_path / "entrypoint.log").read_text()
        assert not children(watcher.pid) and not port_taken(server.ports["http"])
    finally:
        if watcher.poll() is None:
            os.killpg(watcher.pid, signal.SIGKILL)
            watcher.wait()
        for leftover in Path("/dev/shm").glob(f"{server.shm_prefix}*"):
            leftover.unlink(missing_ok=True)


def port_taken(port: int) -> bool:
    from liveportrait_triton.serve import port_is_free
    return not port_is_free("127.0.0.1", port)
