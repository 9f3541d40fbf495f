"""A server that goes away mid-stream: without --retry the command fails cleanly, with it nothing is lost."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from conftest import ASSETS
from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client import DrivingFrame, LivePortraitClient, SourceInput
from liveportrait_triton.serve import TritonServer, free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]

FRAMES = 10


@pytest.fixture
def ports():
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


def driving_inputs() -> list[DrivingFrame]:
    reader = media.VideoReader(ASSETS / "driving" / "d0.mp4")
    out = [DrivingFrame(crop=cv2.resize(f, (256, 256))) for f, _ in zip(reader, range(FRAMES))]
    reader.close()
    return out


def test_stream_survives_a_server_restart(tiny_repository, ports):
    source = SourceInput(cv2.resize(cv2.imread(str(ASSETS / "source" / "s0.jpg"))[:, :, ::-1], (256, 256)))
    drivings = driving_inputs()
    servers = [TritonServer(tiny_repository, **ports).start()]
    try:
        client = LivePortraitClient(servers[0].grpc_url)
        with client.stream(source, max_in_flight=2) as reference_stream:
            for d in drivings:
                reference_stream.send(d)
            reference = reference_stream.finish()

        def restart():
            servers[0].stop()
            servers.append(TritonServer(tiny_repository, **ports).start())

        stream = client.stream(source, max_in_flight=2, retry_s=300)
        results, restarter = [], None
        for i, d in enumerate(drivings):
            stream.send(d, last=i == FRAMES - 1)
            results += stream.ready()
            if restarter is None and len(results) >= 3:
                restarter = threading.Thread(target=restart)
                restarter.start()
        results += stream.finish()
        restarter.join()
        client.close()
    finally:
        for server in servers:
            server.stop()
    assert stream.reconnects >= 1
    assert [r.number for r in results] == list(range(FRAMES))          # none lost, none twice
    # the relative-motion anchor was rebuilt on the new server: the frames equal an uninterrupted run
    for got, want in zip(results, reference):
        assert np.array_equal(got.image, want.image), f"frame {got.number} differs after the restart"


def wait_for_answered_frames(server, count: int, timeout_s: float = 300) -> None:
    """Block until the pipeline model has answered `count` requests (Triton's statistics), not a guessed sleep."""
    import tritonclient.grpc as grpcclient
    deadline = time.monotonic() + timeout_s
    with grpcclient.InferenceServerClient(server.grpc_url) as probe:
        while time.monotonic() < deadline:
            stats = probe.get_inference_statistics("liveportrait", as_json=True)["model_stats"][0]
            if int(stats.get("inference_stats", {}).get("success", {}).get("count", 0)) >= count:
                return
            time.sleep(0.05)
    raise AssertionError(f"the pipeline did not answer {count} requests within {timeout_s:g} s")


def test_command_fails_cleanly_when_the_server_goes_away(tiny_repository, ports, tmp_path, capsys):
    server = TritonServer(tiny_repository, **ports).start()
    out = tmp_path / "r.mp4"
    codes = []
    try:
        worker = threading.Thread(target=lambda: codes.append(main([
            "animate", "--source", str(ASSETS / "source" / "s0.jpg"), "--driving", str(ASSETS / "driving" / "d0.mp4"),
            "--output", str(out), "--server", server.grpc_url, "--quiet"])))
        worker.start()
        wait_for_answered_frames(server, 3)     # the stream is under way: frames answered, more in flight
        server.stop()
        worker.join(timeout=300)
    finally:
        server.stop()
    assert codes == [1]
    err = capsys.readouterr().err
    assert "error:" in err and "--retry" in err
    assert list(tmp_path.iterdir()) == []   # no partial video left behind
