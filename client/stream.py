"""The reconnecting stream: one sequence over a gRPC bi-directional stream (`LivePortraitClient.stream()`)."""
from __future__ import annotations

import functools
import queue
import time
from typing import TYPE_CHECKING

from ..wire import DrivingFrame, SourceInput
from .errors import (TRANSPORT_ERRORS, RequestFailed, ServerAtCapacity, ServerUnavailable, first_line,
                     is_connection_error, refused_at_capacity)
from .requests import FrameResult, new_sequence_id, session_headers

if TYPE_CHECKING:
    from .client import LivePortraitClient


class AnimationStream:
    """One sequence over a gRPC bi-directional stream, with up to `max_in_flight` frames awaiting answers.

    `send()` blocks while the window is full; `ready()` yields the results that have arrived, in frame order;
    `finish()` ends the sequence and yields the rest. With `retry_s` > 0 a dropped connection (server restart) is
    survived: the stream reconnects for up to retry_s seconds, registers the source again, replays the first
    driving frame to rebuild the relative-motion anchor (its answer is discarded), then resends every frame not
    yet answered, so no frame is lost or duplicated. Frames are matched to answers by request id and checked
    against the server's frame_index.

    Live sources use `offer()` instead of `send()`: when `max_in_flight` frames already await answers (the server
    is behind), the offered frame is dropped and counted in `dropped` rather than queued, so the newest frame goes
    out as soon as an answer frees a slot and a frame's latency stays bounded by the window (a blocking send
    would let a camera's frames age without bound). File-based animation uses `send()`: every frame.

    A START refused by a full server ("server at capacity") is ENDed at once, which frees the slot Triton gave
    it; with `retry_s` > 0 a new sequence is started every RETRY_PAUSE_S for up to retry_s seconds (a proxy may
    place it on another replica), else ServerAtCapacity is raised.
    """

    MAX_RECONNECTS_WITHOUT_PROGRESS = 5
    ANSWER_TIMEOUT_S = 600.0        # a full-size frame takes seconds on a CPU; a queue of streams takes longer

    def __init__(self, client: "LivePortraitClient", source: SourceInput, max_in_flight: int = 4,
                 retry_s: float = 0.0, sequence_id: int | None = None):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.client, self.source, self.max_in_flight, self.retry_s = client, source, max_in_flight, retry_s
        self._answers: queue.Queue = queue.Queue()
        self._pending: dict[int, tuple[DrivingFrame, float]] = {}      # frame number -> (input, send time)
        self._done: dict[int, FrameResult] = {}
        self._first: DrivingFrame | None = None
        self._next_number = 0           # next frame number to send
        self._next_out = 0              # next frame number to yield
        self._ended = False
        self._end_number: int | None = None
        self.reconnects = 0
        self.dropped = 0                # frames `offer` dropped because the window was full
        self._failed_reconnects = 0
        self._refused_until: float | None = None     # while starts are refused: when to stop trying
        self._open(sequence_id)

    # -- connection -----------------------------------------------------------------------------------------
    def _open(self, sequence_id: int | None = None) -> None:
        """A new gRPC stream and sequence (`sequence_id`, else a random one), its START sent (raises
        TRANSPORT_ERRORS when the stream cannot open). The stream carries the sequence's session header, so a
        proxy sends it to one replica; a reopened stream is a new sequence and goes where the proxy now hashes it."""
        import tritonclient.grpc as grpcclient
        self._grpc = grpcclient.InferenceServerClient(self.client.url)
        self._attempt = getattr(self, "_attempt", -1) + 1
        self._sequence_id = sequence_id or new_sequence_id()
        self._expected_index = 0        # the server's frame_index of the next animated frame
        self._closed = False
        self._start_answered = False
        self._grpc.start_stream(callback=functools.partial(self._on_answer, self._attempt),
                                headers=session_headers(self._sequence_id))
        self._grpc.async_stream_infer(**self._request(self.source.tensors(), "start", start=True,
                                                      options=self.source.options))

    def _on_answer(self, attempt: int, result, error) -> None:
        """Runs on the gRPC thread; `attempt` tells answers of a broken connection from current ones."""
        self._answers.put((attempt, result, error, time.perf_counter()))

    def _request(self, tensors: dict, tag: str, start: bool = False, end: bool = False,
                 options: dict | None = None) -> dict:
        """A request of the current sequence; its id `attempt:tag` matches the answer to the frame."""
        return self.client.request(tensors, request_id=f"{self._attempt}:{tag}", sequence_id=self._sequence_id,
                                   start=start, end=end, options=options, streamed=True)

    def _server_healthy(self) -> bool:
        """Whether the server is up with the model ready (a failed frame then is a real failure, not a restart)."""
        try:
            probe = self.client._module.InferenceServerClient(self.client.url)
            try:
                return bool(probe.is_server_ready(client_timeout=5) and probe.is_model_ready(self.client.model,
                                                                                             client_timeout=5))
            finally:
                probe.close()
        except TRANSPORT_ERRORS:        # unreachable
            return False

    def _connection_lost(self, cause: BaseException) -> None:
        """Reconnect and resend (retry on), or fail with a clear message."""
        if self.retry_s <= 0:
            self._abort()
            raise RequestFailed(f"lost the connection to {self.client.where()} mid-stream ({first_line(cause)}); "
                                f"use --retry SECONDS to reconnect automatically") from cause
        self._reconnect(cause)

    RETRY_PAUSE_S = 0.5

    def _wait_for_server(self, deadline: float, cause: BaseException) -> None:
        """Block until the server is live with the model ready and matching, or raise ServerUnavailable."""
        while True:
            try:
                type(self.client)(self.client.url, model=self.client.model, check=True).close()
                return
            except (ServerUnavailable, *TRANSPORT_ERRORS):      # down, or up with the models still loading
                if time.monotonic() > deadline:
                    self._abort()
                    raise ServerUnavailable(f"the stream to {self.client.where()} broke ({first_line(cause)}) "
                                            f"and the server did not come back within {self.retry_s:g} s") from cause
            time.sleep(self.RETRY_PAUSE_S)

    def _reconnect(self, cause: BaseException) -> None:
        """New connection and sequence: START, replay the anchor frame if it was answered, resend the rest.

        Bounded twice: each reconnection gives up at `retry_s` (also when the server answers health checks but
        the stream cannot be opened), and more than MAX_RECONNECTS_WITHOUT_PROGRESS reconnections without an
        answered frame in between fail the stream.
        """
        self._failed_reconnects += 1
        if self._failed_reconnects > self.MAX_RECONNECTS_WITHOUT_PROGRESS:
            self._abort()
            raise RequestFailed(f"the stream to {self.client.where()} keeps breaking ({first_line(cause)})") \
                from cause
        deadline = time.monotonic() + self.retry_s
        while True:
            self._close_grpc(cancel=True)
            self._wait_for_server(deadline, cause)
            try:
                self._open()
                if self._first is not None and 0 not in self._pending:
                    self._grpc.async_stream_infer(**self._request(self._first.tensors(), "anchor"))
                for number in sorted(self._pending):
                    driving, _ = self._pending[number]
                    self._pending[number] = (driving, time.perf_counter())
                    self._grpc.async_stream_infer(**self._request(driving.tensors(), str(number),
                                                                  end=number == self._end_number))
            except TRANSPORT_ERRORS as exc:     # healthy, yet the stream does not open: again, until the deadline
                cause = exc
                if time.monotonic() > deadline:
                    self._abort()
                    raise ServerUnavailable(f"the server at {self.client.where()} answers health checks but the "
                                            f"stream could not be reopened within {self.retry_s:g} s "
                                            f"({first_line(exc)})") from exc
                time.sleep(self.RETRY_PAUSE_S)
                continue
            self.reconnects += 1
            return

    def _refused(self, cause: BaseException) -> None:
        """The server refused this sequence's START: END it (Triton frees its slot), then start a new sequence
        (retry on, within retry_s of the first refusal) or raise ServerAtCapacity."""
        try:
            self._grpc.async_stream_infer(**self._request({}, "end", end=True))
        except TRANSPORT_ERRORS:        # the stream is gone: Triton frees the slot at its idle timeout
            pass
        self._close_grpc()
        now = time.monotonic()
        if self._refused_until is None:
            self._refused_until = now + self.retry_s
        if now >= self._refused_until:
            self._abort()
            hint = f"still full after {self.retry_s:g} s" if self.retry_s > 0 else \
                "use --retry SECONDS to keep trying"
            raise ServerAtCapacity(f"{self.client.where()} refused the stream: {first_line(cause)} ({hint})") \
                from cause
        time.sleep(self.RETRY_PAUSE_S)
        self._failed_reconnects -= 1    # a refusal is not a broken connection: retry_s alone bounds the tries
        self._reconnect(cause)

    def _close_grpc(self, cancel: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._grpc.stop_stream(cancel_requests=cancel)
        except TRANSPORT_ERRORS:        # the connection is gone already
            pass
        self._grpc.close()

    # -- answers --------------------------------------------------------------------------------------------
    def _handle(self, block: bool, timeout_s: float | None = None) -> bool:
        """Process one answer; False if none came (non-blocking / timeout)."""
        try:
            attempt, result, error, when = self._answers.get(block=block, timeout=timeout_s)
        except queue.Empty:
            return False
        if attempt != self._attempt:
            return True                 # an answer of a broken connection: its frames are resent
        if error is not None:
            if refused_at_capacity(error):
                self._refused(error)
                return True
            if is_connection_error(error) or not self._server_healthy():
                self._connection_lost(error)        # e.g. in-flight frames fail while the server shuts down
                return True
            self._abort()
            raise RequestFailed(f"the server failed a frame of sequence {self._sequence_id}: "
                                f"{first_line(error)}") from error
        tag = result.get_response().id.split(":", 1)[1]
        index = int(result.as_numpy("frame_index").reshape(-1)[0])
        if tag == "start":
            self._start_answered = True
        if tag in ("start", "end"):
            return True
        if index != self._expected_index:
            self._abort()
            raise RequestFailed(f"answers out of step: frame_index {index}, expected {self._expected_index}")
        self._expected_index += 1
        if tag == "anchor":
            return True
        number = int(tag)
        driving, sent = self._pending.pop(number)
        self._failed_reconnects = 0
        self._refused_until = None
        image = result.as_numpy("image")
        self._done[number] = FrameResult(number, image.reshape(image.shape[-3:]), when - sent)
        return True

    def _drain(self) -> list[FrameResult]:
        out = []
        while self._next_out in self._done:
            out.append(self._done.pop(self._next_out))
            self._next_out += 1
        return out

    # -- public ---------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send(self, driving: DrivingFrame, last: bool = False) -> int:
        """Send the next driving frame (blocks while max_in_flight frames await answers); returns its number."""
        if self._ended:
            raise RuntimeError("the sequence has ended")
        tensors = driving.tensors()     # a bad input raises here, before anything is sent
        while len(self._pending) >= self.max_in_flight:
            if not self._handle(block=True, timeout_s=self.ANSWER_TIMEOUT_S):
                self._abort()
                raise RequestFailed(f"no answer from {self.client.where()} within {self.ANSWER_TIMEOUT_S:g} s")
        number = self._next_number
        if number == 0:
            self._first = driving
        self._pending[number] = (driving, time.perf_counter())
        self._next_number += 1
        if last:
            self._end_number = number
        request = self._request(tensors, str(number), end=last)
        try:
            self._grpc.async_stream_infer(**request)
        except TRANSPORT_ERRORS as exc:     # the stream is gone: the frame is pending and is resent on reconnection
            self._connection_lost(exc)
        self._ended = last
        return number

    def wait_started(self) -> None:
        """Block until the server has answered the START (the source is registered), e.g. so that a timed part
        that follows excludes the source's registration."""
        while not self._start_answered:
            if not self._handle(block=True, timeout_s=self.ANSWER_TIMEOUT_S):
                self._abort()
                raise RequestFailed(f"no answer to the START from {self.client.where()} within "
                                    f"{self.ANSWER_TIMEOUT_S:g} s")

    def has_room(self) -> bool:
        """Whether a frame can be sent without waiting (answers that arrived are taken in first)."""
        while self._handle(block=False):
            pass
        return len(self._pending) < self.max_in_flight

    def offer(self, driving: DrivingFrame, last: bool = False) -> int | None:
        """Send a live frame if the window has room, else drop it (counted in `dropped`): its number, or None."""
        if not self.has_room() and not last:
            self.dropped += 1
            return None
        return self.send(driving, last=last)

    def ready(self) -> list[FrameResult]:
        """The results that have arrived and are next in order (does not block)."""
        while self._handle(block=False):
            pass
        return self._drain()

    def finish(self) -> list[FrameResult]:
        """End the sequence (if the last send did not), wait for every answer, close; the remaining results."""
        out = []
        while self._pending:
            if not self._handle(block=True, timeout_s=self.ANSWER_TIMEOUT_S):
                self._abort()
                raise RequestFailed(f"{len(self._pending)} frames got no answer from {self.client.where()} "
                                    f"within {self.ANSWER_TIMEOUT_S:g} s")
            out.extend(self._drain())
        if not self._ended:
            request = self._request({}, "end", end=True)
            try:
                self._grpc.async_stream_infer(**request)
            except TRANSPORT_ERRORS:        # the sequence is freed by the server's idle timeout instead
                pass
            self._ended = True
        self._close_grpc()
        return out + self._drain()

    def _abort(self) -> None:
        self._ended = True
        self._close_grpc(cancel=True)

    def close(self) -> None:
        """Close the connection; a sequence that was not finished is cancelled (the server frees it when idle)."""
        self._close_grpc(cancel=not self._ended or bool(self._pending))
        self._ended = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

