"""Scale-out: replicas behind HAProxy, every sequence pinned to one replica by its session header.

Units: the rendered proxy configuration (both renderings are accepted by the real HAProxy when it is installed),
the proxy-log parser, and the session header on every request the client builds. Real processes (3 tiny replicas
and HAProxy on loopback, one cluster for the module): 12 concurrent sequences (sync and asyncio gRPC streams,
unary gRPC and HTTP requests) each answered by one replica, every replica used, per-replica statistics that add up; a frame
whose header hashes elsewhere than its START's is refused; perf_analyzer through the proxy counts the frames it counts directly; then one
replica is killed mid-run: only its streams reconnect (`retry_s`), with every frame once, equal to the others.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from conftest import assert_images_close, rendered_copy
from liveportrait_triton import spec
from liveportrait_triton.cluster import (STREAM_IDLE_TIMEOUT_S, ClusterError, DnsReplicas, LocalCluster,
                                         LoopbackReplicas, find_proxy, parse_proxy_log, render_proxy_config)


def _installed_proxy() -> str | None:
    try:
        return str(find_proxy())
    except ClusterError:
        return None


HAPROXY = _installed_proxy()
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed (scripts/install.sh "
                                                           "installs the Debian package haproxy)")
INFERENCE_PATHS = ("/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelStreamInfer",
                   f"/v2/models/{spec.PIPELINE}/infer")
LOOPBACK = LoopbackReplicas({f"replica{i}": ("127.0.0.1", 9001 + 10 * i, 9000 + 10 * i) for i in range(3)})
DNS = DnsReplicas("liveportrait-triton.${POD_NAMESPACE}.svc.cluster.local", slots=8)


# ---------------------------------------------------------------------------------------------------------------
# Units

def sections(config: str) -> dict[str, list[str]]:
    """'frontend grpc' / 'backend grpc_replicas' / ... -> the section's lines (comments dropped)."""
    out, current = {}, None
    for line in config.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if line and not line.startswith(" "):
            current = out.setdefault(line, [])
        elif line and current is not None:
            current.append(line.strip())
    return out


def test_both_front_ends_hash_the_session_header_over_health_checked_replicas():
    config = sections(render_proxy_config(LOOPBACK, bind_host="127.0.0.1", grpc_port=8001, http_port=8000))
    assert "bind 127.0.0.1:8001 proto h2" in config["frontend grpc"]        # gRPC = HTTP/2 cleartext
    assert "bind 127.0.0.1:8000" in config["frontend http"]
    for kind in ("grpc", "http"):
        backend = config[f"backend {kind}_replicas"]
        assert f"balance hdr({spec.SESSION_HEADER})" in backend and "hash-type consistent" in backend
        assert "http-check send meth GET uri /v2/health/ready" in backend
        servers = [line for line in backend if line.startswith("server ")]
        assert len(servers) == 3
        for line, (name, (host, grpc, http)) in zip(servers, LOOPBACK.addresses.items()):
            port = grpc if kind == "grpc" else http
            assert line.startswith(f"server {name} {host}:{port}") and line.endswith(f"check port {http}")
            assert ("proto h2 check-proto h1" in line) == (kind == "grpc")
        assert any(line.startswith(f"default_backend {kind}_replicas") for line in config[f"frontend {kind}"])
        statistics = config[f"backend {kind}_statistics"]
        assert "balance first" in statistics and servers == [s for s in statistics if s.startswith("server ")]
    defaults = config["defaults"]
    assert f"timeout client {STREAM_IDLE_TIMEOUT_S}s" in defaults and f"timeout server {STREAM_IDLE_TIMEOUT_S}s" \
        in defaults
    assert "option redispatch 1" in defaults and "default-server inter 1000ms fall 2 rise 1" in defaults


def test_the_dns_rendering_tracks_the_headless_service():
    config = sections(render_proxy_config(DNS, bind_host="0.0.0.0", grpc_port=8001, http_port=8000))
    assert "parse-resolv-conf" in config["resolvers cluster"]
    for kind, port in (("grpc", 8001), ("http", 8000)):
        (server,) = [line for line in config[f"backend {kind}_replicas"] if line.startswith("server")]
        assert server.startswith(f'server-template replica 8 "{DNS.hostname}:{port}"')
        assert "check port 8000 resolvers cluster" in server and "init-addr none" in server


@needs_haproxy
@pytest.mark.parametrize("replicas", [LOOPBACK, DNS], ids=["loopback", "dns"])
def test_haproxy_accepts_the_rendering(replicas, tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(render_proxy_config(replicas, bind_host="127.0.0.1", grpc_port=8001, http_port=8000,
                                        stats_socket=tmp_path / "s.sock"))
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True,
                           env={**os.environ, "POD_NAMESPACE": "default"})
    assert check.returncode == 0, check.stdout + check.stderr
    assert "[WARNING]" not in check.stdout + check.stderr, check.stdout + check.stderr


def test_proxy_log_lines_are_parsed_and_others_skipped():
    text = ("grpc replica1 200 /inference.GRPCInferenceService/ModelStreamInfer 42\n"
            "[WARNING]  (1) : Server grpc_replicas/replica0 is DOWN, reason: Layer4 connection problem\n"
            "http replica2 400 /v2/models/liveportrait/infer -\n")
    assert parse_proxy_log(text) == [
        {"frontend": "grpc", "server": "replica1", "status": "200",
         "path": "/inference.GRPCInferenceService/ModelStreamInfer", "session": "42"},
        {"frontend": "http", "server": "replica2", "status": "400", "path": "/v2/models/liveportrait/infer",
         "session": "-"}]


def test_every_request_of_a_sequence_names_its_session():
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    import tritonclient.http as httpclient
    from liveportrait_triton.client import build_request, session_headers
    assert session_headers(42) == {spec.SESSION_HEADER: "42"}
    for module in (grpcclient, httpclient, aioclient):
        request = build_request(module, spec.PIPELINE, {}, sequence_id=42, end=True)
        assert request["headers"] == {spec.SESSION_HEADER: "42"}
        # streamed requests share the stream's metadata: async_stream_infer accepts no headers
        assert "headers" not in build_request(module, spec.PIPELINE, {}, sequence_id=42, streamed=True)
    motion = spec.submodel_specs()[spec.MOTION]
    assert "headers" not in build_request(grpcclient, spec.MOTION, {"image": np.zeros((1, 3, 256, 256), np.float32)},
                                          model_spec=motion, batched=True)


# ---------------------------------------------------------------------------------------------------------------
# Real processes: 3 tiny replicas behind HAProxy

REPLICAS = 3
STREAMS = 12
FRAMES = 4                  # per sequence in the routing test
KILL_FRAMES = 6             # per stream in the failover test
# Fixed ids make the hashing, and so the test, deterministic; these spread over all three replicas.
SEQUENCE_IDS = [1000 + k for k in range(STREAMS)]


def running_cluster(tiny_repository, tmp_path_factory):
    if HAPROXY is None:
        pytest.skip("HAProxy is not installed (scripts/install.sh installs the Debian package haproxy)")
    # one thread per sub-network: three replicas share two cores
    repository = rendered_copy(tiny_repository, tmp_path_factory.mktemp("repository_cluster"),
                               threads=1)
    with LocalCluster(repository, REPLICAS, log_dir=tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def cluster(tiny_repository, tmp_path_factory):
    """The cluster the tests share; none of them harms it."""
    yield from running_cluster(tiny_repository, tmp_path_factory)


@pytest.fixture
def cluster_to_break(tiny_repository, tmp_path_factory):
    """A cluster of its own for the test that kills a replica (so no test depends on running before it)."""
    yield from running_cluster(tiny_repository, tmp_path_factory)


def inference_servers(cluster, since: int = 0) -> dict[str, set[str]]:
    """Session -> the replicas that answered its inference requests (the proxy's log after line `since`)."""
    out = defaultdict(set)
    for entry in parse_proxy_log(cluster.proxy_log())[since:]:
        if entry["path"] in INFERENCE_PATHS and entry["session"] != "-":
            out[entry["session"]].add(entry["server"])
    return dict(out)


def pipeline_requests(cluster) -> dict[str, int]:
    """Replica -> successful `liveportrait` requests so far (each replica's own statistics)."""
    from liveportrait_triton.benchmarks import server_stats
    return {name: server_stats.snapshot(server.grpc_url, [spec.PIPELINE])[spec.PIPELINE].requests
            for name, server in cluster.replicas.items()}


def wait_for_log(cluster, count: int, timeout_s: float = 10.0) -> None:
    """HAProxy logs a stream when it closes: wait until `count` entries are there."""
    deadline = time.monotonic() + timeout_s
    while len(parse_proxy_log(cluster.proxy_log())) < count and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.server
@pytest.mark.slow
def test_every_sequence_stays_on_one_replica_and_all_replicas_serve(cluster, source_crops, driving_crops):
    from liveportrait_triton.client import (AsyncLivePortraitClient, DrivingFrame, LivePortraitClient,
                                                   SourceInput)
    source = SourceInput(source_crops["s0"])
    drivings = [DrivingFrame(crop=c) for c in driving_crops[:FRAMES]]
    kinds = ["stream"] * 6 + ["unary"] * 2 + ["http"] + ["async"] * 3     # 12 sequences, all at once
    # requests the server counts per sequence: a stream sends START, the frames and an empty END; a unary
    # sequence sends START with the first frame, then the others, the last one ending it
    requests_per_sequence = {"stream": FRAMES + 2, "async": FRAMES + 2, "unary": FRAMES, "http": FRAMES}
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    before, log_start = pipeline_requests(cluster), len(parse_proxy_log(cluster.proxy_log()))

    def run(kind: str, sequence_id: int) -> None:
        try:
            if kind == "async":
                async def animate():
                    async with AsyncLivePortraitClient(cluster.grpc_url) as client:
                        return [r.image async for r in client.animate(source, drivings, sequence_id=sequence_id)]
                results[sequence_id] = asyncio.run(animate())
                return
            url, protocol = (cluster.http_url, "http") if kind == "http" else (cluster.grpc_url, "grpc")
            with LivePortraitClient(url, protocol=protocol) as client:
                if kind == "stream":
                    with client.stream(source, max_in_flight=2, sequence_id=sequence_id) as stream:
                        for driving in drivings:
                            stream.send(driving)
                        results[sequence_id] = [r.image for r in stream.finish()]
                else:
                    images = [client.infer({**source.tensors(), **drivings[0].tensors()}, sequence_id, start=True,
                                           options=source.options)[0]]
                    images += [client.infer(d.tensors(), sequence_id, end=i == FRAMES - 1)[0]
                               for i, d in enumerate(drivings[1:], start=1)]
                    results[sequence_id] = images
        except BaseException as exc:            # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(kind, sid)) for kind, sid in zip(kinds, SEQUENCE_IDS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=900)
    assert not errors, errors
    assert sorted(results) == SEQUENCE_IDS and all(len(images) == FRAMES for images in results.values())

    wait_for_log(cluster, log_start + 9)
    servers = inference_servers(cluster, log_start)
    assert set(servers) == {str(s) for s in SEQUENCE_IDS}, "every sequence sent its session header"
    assert all(len(replicas) == 1 for replicas in servers.values()), f"a sequence moved between replicas: {servers}"
    placed = {int(session): replicas.pop() for session, replicas in servers.items()}
    assert set(placed.values()) == set(cluster.replicas), f"not every replica served: {placed}"
    # each replica's own statistics count exactly the requests of the sequences the proxy placed on it
    after = pipeline_requests(cluster)
    expected = defaultdict(int)
    for kind, sid in zip(kinds, SEQUENCE_IDS):
        expected[placed[sid]] += requests_per_sequence[kind]
    assert {name: after[name] - before[name] for name in after} == {name: expected[name] for name in after}
    # the same source and frames give the same animation whichever replica and protocol served them
    reference = results[SEQUENCE_IDS[0]]
    for sid, images in results.items():
        for number, (got, want) in enumerate(zip(images, reference)):
            assert_images_close(got, want, f"sequence {sid} frame {number}")


def placements(cluster, sessions: list[int]) -> dict[int, str]:
    """Where each session hashes now: any request carrying the header goes where the session's frames would."""
    from liveportrait_triton.client import LivePortraitClient, session_headers
    log_start = len(parse_proxy_log(cluster.proxy_log()))
    with LivePortraitClient(cluster.grpc_url, check=False) as probe:
        for sid in sessions:
            probe._client.is_model_ready(spec.PIPELINE, headers=session_headers(sid))
    wait_for_log(cluster, log_start + len(sessions))
    return {int(e["session"]): e["server"] for e in parse_proxy_log(cluster.proxy_log())[log_start:]
            if e["path"].endswith("/ModelReady") and e["session"] != "-"}


@pytest.mark.server
@pytest.mark.slow
def test_the_header_not_the_connection_chooses_the_replica(cluster, source_crops, driving_crops):
    """Control: on one client connection, a frame whose header hashes to another replica than its START's is
    refused there (that replica never saw the sequence), so the header is what keeps a sequence together."""
    from tritonclient.utils import InferenceServerException
    from liveportrait_triton.client import DrivingFrame, LivePortraitClient, SourceInput, session_headers
    placed = placements(cluster, SEQUENCE_IDS)
    first = SEQUENCE_IDS[0]
    elsewhere = next(sid for sid in SEQUENCE_IDS if placed[sid] != placed[first])
    source, driving = SourceInput(source_crops["s0"]), DrivingFrame(crop=driving_crops[0])
    with LivePortraitClient(cluster.grpc_url) as client:
        start = client.request(source.tensors(), sequence_id=77, start=True)
        frame = client.request(driving.tensors(), sequence_id=77, end=True)
        start["headers"], frame["headers"] = session_headers(first), session_headers(elsewhere)
        client._client.infer(**start)
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            client._client.infer(**frame)
        frame["headers"] = session_headers(first)       # where the START went: accepted
        assert client._client.infer(**frame).as_numpy("image").shape == (1, spec.OUTPUT_SIZE, spec.OUTPUT_SIZE, 3)


@pytest.mark.server
@pytest.mark.slow
def test_perf_analyzer_through_the_proxy_counts_the_frames_it_counts_directly(cluster, source_crops, driving_crops,
                                                                              tmp_path):
    """perf_analyzer's sequence mode over gRPC streams (one replica per stream; perf_analyzer 2.51 sends no
    gRPC headers), direct to one replica and through the proxy: the same frames sent, answered and counted."""
    from liveportrait_triton.benchmarks import perf_analyzer as P
    try:
        pa = P.PerfAnalyzer.locate()
    except P.PerfAnalyzerError as exc:
        pytest.skip(str(exc))
    data = P.write_sequence_data(tmp_path / "sequences.json", source_crops["s0"], driving_crops, streams=3, length=4)
    counted = {}
    for label, url, first in (("direct", cluster.replicas["replica0"].grpc_url, 5000),
                              ("proxy", cluster.grpc_url, 6000)):
        before = pipeline_requests(cluster)
        out = pa.run(["-m", spec.PIPELINE, "--streaming", "--input-data", str(data), "--concurrency-range", "3",
                      "--sequence-id-range", f"{first}:{first + 1000}", "-u", url, "-i", "grpc",
                      "--request-count", "12"], timeout_s=600)
        after = pipeline_requests(cluster)
        sent = int(re.search(r"^\s*Request count: (\d+)", out, re.MULTILINE).group(1))
        counted[label] = (sent, sum(after.values()) - sum(before.values()))
    assert counted["direct"] == counted["proxy"] == (12, 12), counted


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_replica_moves_only_its_streams(cluster_to_break, source_crops, driving_crops):
    """A replica killed (on a cluster of its own): its streams reconnect through the proxy (START with the source
    again, anchor replayed) on a live replica and finish with every frame once; the others never notice."""
    cluster = cluster_to_break
    from liveportrait_triton.client import DrivingFrame, LivePortraitClient, SourceInput
    source = SourceInput(source_crops["s0"])
    drivings = [DrivingFrame(crop=driving_crops[i % len(driving_crops)]) for i in range(KILL_FRAMES)]
    placed = placements(cluster, SEQUENCE_IDS)
    victim = placed[SEQUENCE_IDS[0]]
    doomed = {sid for sid, replica in placed.items() if replica == victim}
    assert 0 < len(doomed) < STREAMS

    progress: dict[int, int] = defaultdict(int)
    outcome: dict[int, tuple[list, int]] = {}
    errors: list[BaseException] = []

    def run(sequence_id: int) -> None:
        try:
            with LivePortraitClient(cluster.grpc_url) as client:
                stream = client.stream(source, max_in_flight=2, retry_s=120, sequence_id=sequence_id)
                got = []
                for i, driving in enumerate(drivings):
                    stream.send(driving, last=i == KILL_FRAMES - 1)
                    got += stream.ready()
                    progress[sequence_id] = len(got)
                got += stream.finish()
                outcome[sequence_id] = (got, stream.reconnects)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(sid,)) for sid in SEQUENCE_IDS]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 600
    while not all(progress[sid] >= 1 for sid in doomed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(progress[sid] >= 1 for sid in doomed), "the victim's streams never got going"
    os.killpg(cluster.replicas[victim].process.pid, signal.SIGKILL)      # the server and its stubs, at once
    for worker in workers:
        worker.join(timeout=900)
    assert not errors, errors
    assert sorted(outcome) == SEQUENCE_IDS
    for sid, (got, reconnects) in outcome.items():
        assert [r.number for r in got] == list(range(KILL_FRAMES)), f"stream {sid}: a frame lost or repeated"
        if sid in doomed:
            assert reconnects >= 1, f"stream {sid} on the killed {victim} did not reconnect"
        else:
            assert reconnects == 0, f"stream {sid} on a live replica reconnected"
    assert cluster.replica_states()[victim] != "UP"
    # a resumed stream continues exactly: the same frames as a stream that was never interrupted
    calm = next(sid for sid in SEQUENCE_IDS if sid not in doomed)
    for sid in doomed:
        for got, want in zip(outcome[sid][0], outcome[calm][0]):
            assert_images_close(got.image, want.image, f"stream {sid} frame {got.number} after the failover")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    return [argv for _, argv in pids_mentioning(text)]


def pids_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of running processes whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if text in argv and entry.isdigit() and int(entry) != os.getpid():
            found.append((int(entry), argv))
    return found


@pytest.mark.server
@needs_haproxy
def test_cluster_command_serves_one_address_and_sigterm_leaves_nothing(tiny_repository, tmp_path):
    import sys
    from liveportrait_triton.client import LivePortraitClient
    from liveportrait_triton.serve import free_port
    repository = rendered_copy(tiny_repository, tmp_path / "repository", threads=1)
    grpc_port, http_port = free_port(), free_port()
    command = subprocess.Popen([sys.executable, "-m", "liveportrait_triton", "cluster", "--repository", str(repository),
                                "--replicas", "2", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                                "--log-dir", str(tmp_path / "logs")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in command.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        printed = "".join(lines)
        assert f"GRPC    127.0.0.1:{grpc_port}" in printed, printed
        assert len(processes_mentioning(str(repository))) >= 2 * (len(spec.SUBMODELS) + 2)   # servers and stubs
        with LivePortraitClient(f"127.0.0.1:{grpc_port}") as client:
            client.check_model(spec.PIPELINE)       # raises unless the proxy reaches a replica with the model
        # a replica whose pipeline stub dies (Triton still says ready) is stopped; the other one serves on
        left = len(processes_mentioning(str(repository))) - (len(spec.SUBMODELS) + 2)    # one replica fewer
        stub = next(pid for pid, line in pids_mentioning(str(repository)) if f"{spec.PIPELINE}_0_0" in line)
        os.kill(stub, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(processes_mentioning(str(repository))) > left and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(processes_mentioning(str(repository))) == left, "the broken replica was not stopped"
        with LivePortraitClient(f"127.0.0.1:{grpc_port}") as client:
            client.check_model(spec.PIPELINE)
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=120) == 0
        assert f"the Python-backend process of {spec.PIPELINE}_0_0 on replica" in command.stderr.read()
    finally:
        if command.poll() is None:
            command.kill()
    assert processes_mentioning(str(repository)) == [] and processes_mentioning(str(tmp_path / "logs")) == []
