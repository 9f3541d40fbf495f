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

from liveportrait_triton.client.live_webrtc import LiveStats, LiveStream, NewestFrame  # noqa: E402


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
    """A stand-in for the page's LiveSession (which needs a server; tests/test_ui.py runs that one): inverts each
    frame, slowly enough that the camera outruns it."""

    def __init__(self, delay_s: float):
        self.delay_s, self.frames, self.closed = delay_s, 0, threading.Event()

    def animate(self, frame: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        self.frames += 1
        return 255 - frame

    def close(self) -> None:
        self.closed.set()


def test_camera_frames_come_back_animated_and_closing_the_connection_ends_the_stream():
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
    from av import VideoFrame

    width, height, fps = 160, 128, 30
    camera_frame = np.zeros((height, width, 3), np.uint8)
    camera_frame[:, : width // 2] = (200, 40, 40)
    camera_frame[:, width // 2:] = (30, 30, 180)

    class Camera(VideoStreamTrack):
        async def recv(self):
            pts = getattr(self, "n", 0)
            self.n = pts + 1
            await asyncio.sleep(1 / fps)
            frame = VideoFrame.from_ndarray(camera_frame, format="rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, fps)
            return frame

    session = Inverting(delay_s=0.1)        # 10 frames/s against a 30 frames/s camera

    async def scenario():
        stream = LiveStream(session)
        browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = browser.createDataChannel("stats")
        reports = []
        channel.on("message", reports.append)
        received = asyncio.get_running_loop().create_future()
        browser.on("track", lambda track: received.set_result(track))
        browser.addTrack(Camera())
        await browser.setLocalDescription(await browser.createOffer())
        answer = await stream.answer(browser.localDescription.sdp, browser.localDescription.type)
        await browser.setRemoteDescription(RTCSessionDescription(**answer))
        track = await asyncio.wait_for(received, 30)
        frames = [(await asyncio.wait_for(track.recv(), 30)).to_ndarray(format="rgb24") for _ in range(12)]
        await asyncio.sleep(1.5)            # a stats report or two
        await browser.close()
        closed_after = time.monotonic()
        while not session.closed.is_set() and time.monotonic() - closed_after < 30:
            await asyncio.sleep(0.1)            # the stream notices on its side of the connection
        return stream, frames, reports

    stream, frames, reports = asyncio.run(scenario())
    expected = 255 - camera_frame
    for frame in frames[3:]:            # the first frames may still be the encoder's ramp-up
        assert frame.shape == expected.shape
        diff = np.abs(frame.astype(np.int16) - expected).mean()
        assert diff < 12, f"an animated frame differs from the inverted camera frame by {diff:.1f} levels on average"
    assert session.closed.is_set(), "closing the connection did not end the stream's session within 30 s"
    assert stream.stats.animated >= 12 and stream.stats.skipped > 0, stream.stats
    # every camera frame was either animated or skipped, bar the ones in flight when the connection closed
    assert 0 <= stream.stats.received - stream.stats.animated - stream.stats.skipped <= 2, stream.stats
    assert reports and '"skipped"' in reports[-1]
