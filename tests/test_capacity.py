"""Admission control on the real server (tiny networks, loopback): a full server refuses a START at once.

A pipeline instance admits `max_live_sequences` live streams; the next START is answered at once with "server at
capacity" (never left in Triton's sequence backlog), an END or an idle eviction frees a slot, and the admitted
streams lose no frame. Through `liveportrait-triton cluster` a refused stream retried with retry_s (`--retry`)
starts new sequences until one is admitted, and completes every frame.
"""
from __future__ import annotations

import threading
import time

import pytest

from conftest import rendered_copy, server_metric
from liveportrait_triton import spec
from liveportrait_triton.cli import main
from liveportrait_triton.client import DrivingFrame, LivePortraitClient, ServerAtCapacity, SourceInput
from liveportrait_triton.serve import TritonServer

pytestmark = pytest.mark.server

CAPACITY = 3
IDLE_TIMEOUT_S = 6
REFUSAL_S = 1.0             # a refused START is answered within this
FRAMES = 4


@pytest.fixture(scope="module")
def small_server(tiny_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("capacity")
    repository = rendered_copy(tiny_repository, root / "repository", max_candidate_sequences=8,
                               max_live_sequences=CAPACITY, sequence_idle_timeout_s=IDLE_TIMEOUT_S)
    with TritonServer(repository, log_file=root / "tritonserver.log") as server:
        yield server


def send_frames(stream, drivings, count: int) -> list:
    got = []
    for i in range(count):
        stream.send(drivings[i % len(drivings)])
        got += stream.ready()
    return got


def refused_within(client: LivePortraitClient, source: SourceInput, driving: DrivingFrame) -> float:
    """Seconds until a new stream's START is refused with the capacity message (fails if it is admitted)."""
    began = time.monotonic()
    with pytest.raises(ServerAtCapacity, match=f"{spec.CAPACITY_REFUSAL}: {CAPACITY} live streams") as refused:
        stream = client.stream(source, max_in_flight=1)
        stream.send(driving)
        stream.finish()
    assert "--retry" in str(refused.value)
    return time.monotonic() - began


def test_full_server_refuses_at_once_and_a_freed_slot_admits(small_server, source_crops, driving_crops):
    server = small_server
    source = SourceInput(source_crops["s0"])
    drivings = [DrivingFrame(crop=c) for c in driving_crops]
    client = LivePortraitClient(server.grpc_url)
    admitted = [client.stream(source, max_in_flight=2) for _ in range(CAPACITY)]
    got = {i: send_frames(stream, drivings, 2) for i, stream in enumerate(admitted)}
    for i, stream in enumerate(admitted):       # answered: nothing in flight (a refusal waits for a running batch)
        while len(got[i]) < 2:
            got[i] += stream.ready()
            time.sleep(0.02)
    assert server_metric(server, "liveportrait_live_sequences") == CAPACITY

    waits = [refused_within(client, source, drivings[0]) for _ in range(3)]
    assert max(waits) < REFUSAL_S, f"refusals took {waits} s"
    assert server_metric(server, "liveportrait_live_sequences") == CAPACITY

    # the admitted streams go on, then one ENDs: the next START is admitted
    for i, stream in enumerate(admitted):
        got[i] += send_frames(stream, drivings, FRAMES - 2)
    got[0] += admitted[0].finish()
    with client.stream(source, max_in_flight=2) as newcomer:
        send_frames(newcomer, drivings, FRAMES)
        assert [r.number for r in newcomer.finish()][-1] == FRAMES - 1
    for i, stream in enumerate(admitted[1:], 1):
        got[i] += stream.finish()
    for i in range(CAPACITY):
        assert [r.number for r in got[i]] == list(range(FRAMES)), f"admitted stream {i} lost a frame"
    client.close()


def test_an_idle_evicted_stream_frees_its_slot(small_server, source_crops, driving_crops):
    server = small_server
    source = SourceInput(source_crops["s1"])
    driving = DrivingFrame(crop=driving_crops[0])
    client = LivePortraitClient(server.grpc_url)
    abandoned = [client.stream(source, max_in_flight=1) for _ in range(CAPACITY)]
    for stream in abandoned:
        stream.send(driving)
        while not stream.ready():
            time.sleep(0.02)
        stream.close()
    refused_within(client, source, driving)       # the abandoned streams hold every slot: no END came
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 15
    while server_metric(server, "liveportrait_live_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    with client.stream(source, max_in_flight=1) as admitted:
        admitted.send(driving)
        assert [r.number for r in admitted.finish()] == [0]
    client.close()


def test_retry_waits_for_a_free_slot_and_loses_no_frame(small_server, source_crops, driving_crops):
    """While the server is full, a stream with retry_s keeps starting new sequences; once a slot frees it is
    admitted and every frame comes back once."""
    source = SourceInput(source_crops["s0"])
    drivings = [DrivingFrame(crop=c) for c in driving_crops]
    client = LivePortraitClient(small_server.grpc_url)
    full = [client.stream(source, max_in_flight=1) for _ in range(CAPACITY)]
    for stream in full:
        stream.send(drivings[0])
        while not stream.ready():
            time.sleep(0.02)
    outcome: list = []

    def retried():
        try:
            with LivePortraitClient(small_server.grpc_url) as own:
                stream = own.stream(source, max_in_flight=2, retry_s=60)
                got = send_frames(stream, drivings, FRAMES)
                outcome.append(got + stream.finish())
        except BaseException as exc:        # reported below
            outcome.append(exc)

    worker = threading.Thread(target=retried)
    worker.start()
    time.sleep(3)                           # refused a few times meanwhile
    assert worker.is_alive() and not outcome
    full[0].finish()
    worker.join(timeout=120)
    for stream in full[1:]:
        stream.finish()
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert [r.number for r in outcome[0]] == list(range(FRAMES))
    client.close()


def test_animate_command_says_the_server_is_full(small_server, source_crops, driving_crops, tmp_path, capsys):
    from conftest import ASSETS
    source = SourceInput(source_crops["s0"])
    client = LivePortraitClient(small_server.grpc_url)
    full = [client.stream(source, max_in_flight=1) for _ in range(CAPACITY)]
    for stream in full:
        stream.send(DrivingFrame(crop=driving_crops[0]))
    out = tmp_path / "r.mp4"
    try:
        code = main(["animate", "--source", str(ASSETS / "source" / "s0.jpg"),
                     "--driving", str(ASSETS / "driving" / "d0.mp4"), "--max-frames", "3", "--output", str(out),
                     "--server", small_server.grpc_url, "--quiet"])
    finally:
        for stream in full:
            stream.finish()
        client.close()
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and spec.CAPACITY_REFUSAL in err, err


@pytest.mark.slow
def test_a_stream_refused_by_a_full_cluster_retries_until_admitted(tiny_repository, tmp_path, source_crops,
                                                                     driving_crops):
    """`liveportrait-triton cluster` with 2 replicas of capacity 1: once both hold a stream, a new stream is
    refused; with retry_s (`--retry`) it starts new sequences, which the proxy hashes anew, until a replica frees
    its slot, and then completes every frame."""
    import shutil
    from liveportrait_triton.cluster import LocalCluster
    if shutil.which("haproxy") is None:
        pytest.skip("HAProxy is not installed (scripts/install.sh installs the Debian package haproxy)")
    repository = rendered_copy(tiny_repository, tmp_path / "repository", max_candidate_sequences=8,
                               max_live_sequences=1, threads=1)
    source = SourceInput(source_crops["s0"])
    drivings = [DrivingFrame(crop=c) for c in driving_crops]
    with LocalCluster(repository, 2, log_dir=tmp_path / "cluster") as cluster:
        client = LivePortraitClient(cluster.grpc_url)
        held, refusals = [], 0
        while len(held) < 2:                # new sequences hash onto either replica: fill both
            stream = client.stream(source, max_in_flight=1)
            stream.send(drivings[0])
            try:
                while not stream.ready():
                    time.sleep(0.02)
                held.append(stream)
            except ServerAtCapacity:
                refusals += 1
            assert refusals < 50, "the proxy never placed a stream on the second replica"
        outcome: list = []

        def retried():
            try:
                with LivePortraitClient(cluster.grpc_url) as own:
                    stream = own.stream(source, max_in_flight=2, retry_s=120)
                    got = send_frames(stream, drivings, FRAMES)
                    outcome.append((got + stream.finish(), stream.reconnects))
            except BaseException as exc:    # reported below
                outcome.append(exc)

        worker = threading.Thread(target=retried)
        worker.start()
        time.sleep(3)
        assert worker.is_alive() and not outcome, outcome
        held[0].finish()
        worker.join(timeout=180)
        held[1].finish()
        client.close()
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    got, reconnects = outcome[0]
    assert reconnects >= 1 and [r.number for r in got] == list(range(FRAMES))


def test_a_live_stream_drops_frames_while_the_server_is_behind(small_server, source_crops, driving_crops):
    """`offer` sends a frame only when the window has room (the newest frame wins): offered faster than the server
    answers, frames are dropped and counted rather than queued, what is sent all comes back, and the last frame
    (the END) is always sent."""
    drivings = [DrivingFrame(crop=c) for c in driving_crops]
    with LivePortraitClient(small_server.grpc_url) as client, \
            client.stream(SourceInput(source_crops["s0"]), max_in_flight=1) as stream:
        numbers = [stream.offer(drivings[i % len(drivings)], last=i == 19) for i in range(20)]
        got = stream.ready() + stream.finish()
    sent = [n for n in numbers if n is not None]
    assert stream.dropped == numbers.count(None) > 0 and numbers[-1] is not None
    assert sent == list(range(len(sent))) and [r.number for r in got] == sent
