"""Live over WebRTC: the browser's camera track in, the animated portrait's track out (aiortc, on the page's server).

How a stream runs: the page's Start button calls the app through Gradio (portrait and settings checked, the server
sequence STARTed, errors shown in the page), which answers with a one-use token; the page's script (PAGE_SCRIPT)
then opens the camera, makes an RTCPeerConnection without STUN/TURN servers (host candidates only: the page serves
its own network) and POSTs its offer with the token to OFFER_PATH. The answer carries one video track back: every
camera frame animated by the stream's session (`animate(rgb) -> rgb`, `close()`: animate.LiveAnimation).

When the server is slower than the camera, the newest camera frame wins: a frame still waiting when a newer one
arrives is skipped, and counted (`LiveStats.skipped`); every other frame gets exactly one animated frame back. The
counts go to the page once a second over the peer connection's data channel and are shown under the video.
A stream ends (its sequence ENDed, its connection closed) when the page stops it, the tab closes, the connection
closes or fails, or the server fails a frame (the error is shown in the page).
"""

import asyncio
import dataclasses
import json
import secrets
import threading
import time
from typing import Callable, Protocol

import numpy as np

OFFER_PATH = "/live/offer"
STATS_EVERY_S = 1.0


def host_addresses() -> list[str]:
    """This machine's addresses the WebRTC peer offers as host candidates (aioice's rule: loopback is never one,
    so a machine with no other interface cannot stream)."""
    from aioice.ice import get_host_addresses
    return get_host_addresses(use_ipv4=True, use_ipv6=True)


class Animator(Protocol):
    def animate(self, frame: np.ndarray) -> np.ndarray: ...
    def close(self) -> None: ...


@dataclasses.dataclass
class LiveStats:
    received: int = 0           # camera frames that arrived
    animated: int = 0           # animated frames sent back
    skipped: int = 0            # camera frames superseded by a newer one before the server got to them
    last_ms: float = 0.0        # server time of the last animated frame
    error: str | None = None

    def message(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class NewestFrame:
    """A one-frame slot between the camera track and the animation: `put` replaces a waiting frame (counting
    it as skipped), `take` waits for the next frame (None once closed)."""

    def __init__(self, stats: LiveStats):
        self.stats = stats
        self._frame = None
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, frame) -> None:
        self.stats.received += 1
        if self._frame is not None:
            self.stats.skipped += 1
        self._frame = frame
        self._ready.set()

    async def take(self):
        while self._frame is None and not self._closed:
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return frame

    def close(self) -> None:
        self._closed = True
        self._ready.set()


def _animated_track(slot: NewestFrame, stream: "LiveStream"):
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError
    from av import VideoFrame

    class AnimatedTrack(MediaStreamTrack):
        """The video track sent back: one animated frame per camera frame taken from the slot."""
        kind = "video"

        async def recv(self):
            frame = await slot.take()
            if frame is None:
                self.stop()
                raise MediaStreamError
            rgb = frame.to_ndarray(format="rgb24")
            started = time.perf_counter()
            try:
                image = await asyncio.to_thread(stream.session.animate, rgb)
            except Exception as exc:        # the server failed the frame (or went away): report it, end the stream
                stream.fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.stop()
                raise MediaStreamError from exc
            stream.stats.last_ms = (time.perf_counter() - started) * 1000.0
            stream.stats.animated += 1
            out = VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            out.pts, out.time_base = frame.pts, frame.time_base
            return out

    return AnimatedTrack()


class LiveStream:
    """One browser's live stream: its session (one server sequence) and, once the page sent its offer, the peer
    connection. `close` may be called from any thread, any number of times."""

    def __init__(self, session: Animator, on_frame: Callable[[], None] = lambda: None,
                 on_end: Callable[[], None] | None = None):
        self.session, self.on_frame = session, on_frame      # on_frame: a camera frame arrived (the stream lives)
        self.on_end = on_end or self.close       # what ends the stream when its connection does (the owner's close)
        self.token = secrets.token_urlsafe(16)
        self.stats = LiveStats()
        self.pc = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._channel = None
        self._tasks: list[asyncio.Task] = []
        self._lock = threading.Lock()
        self.closed = False

    async def answer(self, sdp: str, kind: str) -> dict:
        """The page's offer -> the answer (ICE gathered); starts animating the camera track."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        with self._lock:
            if self.closed or self.pc is not None:
                raise ValueError("this live stream has ended or is already connected; press Start again")
            self.loop = asyncio.get_running_loop()
            self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))    # no STUN/TURN: host candidates
        slot = NewestFrame(self.stats)

        @pc.on("datachannel")
        def on_datachannel(channel):
            self._channel = channel

        @pc.on("track")
        def on_track(track):
            if track.kind == "video" and not self._tasks:
                self._tasks.append(asyncio.ensure_future(self._pump(track, slot)))
                self._tasks.append(asyncio.ensure_future(self._report()))

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                slot.close()
                await asyncio.to_thread(self.on_end)

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        pc.addTrack(_animated_track(slot, self))
        await pc.setLocalDescription(await pc.createAnswer())
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    async def _pump(self, track, slot: NewestFrame) -> None:
        from aiortc.mediastreams import MediaStreamError
        try:
            while True:
                slot.put(await track.recv())
                self.on_frame()
        except MediaStreamError:            # the camera track ended
            slot.close()

    async def _report(self) -> None:
        while not self.closed:
            self._send_stats()
            await asyncio.sleep(STATS_EVERY_S)

    def _send_stats(self) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(self.stats.message())

    def fail(self, error: str) -> None:
        """A frame failed: tell the page why, then end the stream (called on the connection's event loop)."""
        self.stats.error = error
        self._send_stats()
        asyncio.ensure_future(asyncio.to_thread(self.on_end))

    def close(self) -> None:
        """END the sequence and close the connection."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.session.close()
        if self.pc is not None and self.loop is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._close_connection(), self.loop)

    async def _close_connection(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


def offer_route(find: Callable[[str], "LiveStream | None"]):
    """The POST route taking a page's offer (JSON token, sdp, type) and answering it (JSON sdp, type; or error)."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from starlette.requests import Request

    async def offer(request: Request):
        try:
            body = await request.json()
            token, sdp, kind = body["token"], body["sdp"], body["type"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected JSON with token, sdp and type"}, status_code=400)
        stream = find(str(token))
        if stream is None:
            return JSONResponse({"error": "no live stream with this token (it ended): press Start again"},
                                status_code=404)
        try:
            return JSONResponse(await stream.answer(str(sdp), str(kind)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)

    return APIRoute(OFFER_PATH, offer, methods=["POST"], include_in_schema=False)


# The page's side: camera -> RTCPeerConnection -> the animated track in a <video> inside #live-output; stats and
# errors in #live-message. `start(token)` is run by the Start button after the app accepted the portrait.
PAGE_SCRIPT = """
<script>
window.liveportraitLive = (() => {
  let pc = null, camera = null;
  const box = () => document.querySelector('#live-output');
  const say = (text, isError) => {
    const el = document.querySelector('#live-message');
    if (el) { el.textContent = text; el.dataset.error = isError ? '1' : ''; }
  };
  const video = (id, muted) => {
    let el = document.getElementById(id);
    if (!el) {
      el = document.createElement('video');
      el.id = id; el.autoplay = true; el.playsInline = true; el.muted = muted;
      el.style.width = '49%';
      box().style.cssText = 'display: flex; gap: 2%; width: 100%';
      box().appendChild(el);
    }
    return el;
  };
  function stop(text) {
    if (pc) { pc.close(); pc = null; }
    if (camera) { camera.getTracks().forEach(t => t.stop()); camera = null; }
    if (text) say(text, false);
  }
  async function start(reply) {
    stop();
    const {token, fps, offer_path} = JSON.parse(reply);
    try {
      camera = await navigator.mediaDevices.getUserMedia({video: {frameRate: {max: fps}}, audio: false});
    } catch (e) { say('cannot open the camera: ' + e.message, true); return; }
    video('live-camera', true).srcObject = camera;
    pc = new RTCPeerConnection({iceServers: []});
    const channel = pc.createDataChannel('stats');
    channel.onmessage = (event) => {
      const s = JSON.parse(event.data);
      if (s.error) { say('the server failed a frame, stream ended: ' + s.error, true); stop(); return; }
      say(`camera frames ${s.received} | animated ${s.animated} | skipped ${s.skipped} (server busy: the newest ` +
          `frame wins) | ${s.last_ms.toFixed(0)} ms per frame`, false);
    };
    pc.ontrack = (event) => { video('live-video', true).srcObject = new MediaStream([event.track]); };
    pc.onconnectionstatechange = () => {
      if (pc && pc.connectionState === 'failed') { say('the connection to the page\\'s server failed', true); stop(); }
    };
    camera.getTracks().forEach(track => pc.addTrack(track, camera));
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise(resolve => {
      if (pc.iceGatheringState === 'complete') return resolve();
      pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && resolve());
    });
    let answer;
    try {
      const response = await fetch(offer_path, {method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({token, sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
      answer = await response.json();
      if (!response.ok) throw new Error(answer.error || response.statusText);
    } catch (e) { say('the page\\'s server did not accept the stream: ' + e.message, true); stop(); return; }
    await pc.setRemoteDescription(answer);
    say('connecting...', false);
  }
  return {start, stop};
})();
</script>
"""
