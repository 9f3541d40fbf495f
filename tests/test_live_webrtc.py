"""The live WebRTC stream without a browser: the newest-frame slot, and a real aiortc peer (this process) sending
camera frames to a LiveStream and getting animated frames back, then closing its connection (the stream ends)."""
from __future__ import annotations

import asyncio
import fractions
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the `ui` extra (aiortc) is not installed")

from liveportrait_triton.client.live_webrtc import LiveStats, LiveStream, NewestFrame, host_addresses  # noqa: E402

needs_address = pytest.mark.skipif(not host_addresses(), reason="WebRTC needs a network address other than loopback "
                                   "(aioice never offers loopback candidates) and this machine has none")


def test_newest_frame_wins_and_skips_are_counted():
    async def scenario():
        stats = LiveStats()
        slot = NewestFrame(stats)
        slot.put("a")
        assert await slot.take() == "a"
        slot.put("b")
        slot.put("c")                   # "b" was still waiting: superseded
        assert await slot.take() == "c"
        waiter = asyncio.ensure_future(slot.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()        # nothing waiting: take() waits for the next frame
        slot.put("d")
        assert await waiter == "d"
        slot.close()
        assert await slot.take() is None
        return stats
    stats = asyncio.run(scenario())
    assert (stats.received, stats.skipped) == (4, 1)


class Inverting:
    """A stand-in for animate.LiveAnimation (which needs a server; tests/test_ui.py runs that one): inverts each
    frame, slowly enough that the camera outruns it."""

    def __init__(self, delay_s: float, fail_after: int | None = None):
        self.delay_s, self.fail_after, self.frames, self.closed = delay_s, fail_after, 0, threading.Event()

    def animate(self, frame: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        if self.frames == self.fail_after:
            raise RuntimeError("the server went away")
        self.frames += 1
        return 255 - frame

    def close(self) -> None:
        self.closed.set()


WIDTH, HEIGHT, FPS = 160, 128, 30
CAMERA_FRAME = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
CAMERA_FRAME[:, : WIDTH // 2] = (200, 40, 40)
CAMERA_FRAME[:, WIDTH // 2:] = (30, 30, 180)


def camera_track():
    from aiortc import VideoStreamTrack
    from av import VideoFrame

    class Camera(VideoStreamTrack):
        """A 30 frames/s camera showing CAMERA_FRAME."""
        n = 0

        async def recv(self):
            self.n += 1
            await asyncio.sleep(1 / FPS)
            frame = VideoFrame.from_ndarray(CAMERA_FRAME, format="rgb24")
            frame.pts, frame.time_base = self.n, fractions.Fraction(1, FPS)
            return frame
    return Camera()


async def connect(stream: LiveStream):
    """A browser-like peer (camera track out, stats channel) connected to the stream -> (peer, track, reports)."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = browser.createDataChannel("stats")
    reports = []
    channel.on("message", reports.append)
    received = asyncio.get_running_loop().create_future()
    browser.on("track", lambda track: received.set_result(track))
    browser.addTrack(camera_track())
    await browser.setLocalDescription(await browser.createOffer())
    answer = await stream.answer(browser.localDescription.sdp, browser.localDescription.type)
    await browser.setRemoteDescription(RTCSessionDescription(**answer))
    return browser, await asyncio.wait_for(received, 30), reports


async def until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


@needs_address
def test_camera_frames_come_back_animated_and_closing_the_connection_ends_the_stream():
    session = Inverting(delay_s=0.1)        # 10 frames/s against a 30 frames/s camera

    async def scenario():
        stream = LiveStream(session)
        browser, track, reports = await connect(stream)
        frames = [(await asyncio.wait_for(track.recv(), 30)).to_ndarray(format="rgb24") for _ in range(12)]
        await asyncio.sleep(1.5)            # a stats report or two
        await browser.close()
        await until(session.closed.is_set)  # the stream notices on its side of the connection
        return stream, frames, reports

    stream, frames, reports = asyncio.run(scenario())
    expected = 255 - CAMERA_FRAME
    for frame in frames[3:]:            # the first frames may still be the encoder's ramp-up
        assert frame.shape == expected.shape
        diff = np.abs(frame.astype(np.int16) - expected).mean()
        assert diff < 12, f"an animated frame differs from the inverted camera frame by {diff:.1f} levels on average"
    assert session.closed.is_set(), "closing the connection did not end the stream's session within 30 s"
    assert stream.stats.animated >= 12 and stream.stats.skipped > 0, stream.stats
    # every camera frame was either animated or skipped, bar the ones in flight when the connection closed
    assert 0 <= stream.stats.received - stream.stats.animated - stream.stats.skipped <= 2, stream.stats
    assert reports and '"skipped"' in reports[-1]


@needs_address
def test_a_failed_frame_is_reported_to_the_page_and_ends_the_stream():
    session = Inverting(delay_s=0.05, fail_after=3)

    async def scenario():
        stream = LiveStream(session)
        browser, track, reports = await connect(stream)
        await until(lambda: any("the server went away" in r for r in reports) and session.closed.is_set())
        await browser.close()
        return reports

    reports = asyncio.run(scenario())
    assert any('"error": "the server went away"' in r for r in reports), reports
    assert session.closed.is_set(), "the failed frame did not end the stream"
