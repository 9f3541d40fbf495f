"""The client library: one class that talks to the served `liveportrait` pipeline (and its sub-networks).

    client = LivePortraitClient("127.0.0.1:8001")             # checks the server and the model's tensors
    image = client.animate_image(source_crop, driving_crop)     # sync: one unary request (START + frame + END)
    with client.stream(source_crop, options) as stream:       # gRPC stream, several frames in flight
        for crop in crops:
            stream.send(DrivingInput(crop=crop))
            for result in stream.ready():                      # results so far, in frame order
                ...
    async with AsyncLivePortraitClient(url) as c: ...          # asyncio: the same over grpc.aio

Every tensor name and shape comes from `spec`; before sending anything the client compares the server's model
metadata with `spec.PIPELINE_SPEC` and refuses a mismatch with a message naming the difference.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import queue
import secrets
import time
from typing import AsyncIterable, AsyncIterator, Iterable

import numpy as np
from tritonclient.utils import InferenceServerException

from .. import spec
from ..keypoints import MotionInfo
from ..pipeline import MotionFrame

DEFAULT_URL = "127.0.0.1:8001"
START_HINT = "start one with `liveportrait-triton serve --repository DIR` (or pass --server HOST:PORT)"


class ServerUnavailable(ConnectionError):
    """No server answered, or the model is not loaded."""


class ServerMismatch(RuntimeError):
    """The served model's tensors differ from the spec this client was built with."""


class RequestFailed(RuntimeError):
    """The server refused or failed a request (its message is kept)."""


class ServerAtCapacity(RequestFailed):
    """The server refused a new sequence: it holds as many live streams as it admits (try later or elsewhere)."""


def _refused_at_capacity(exc: BaseException) -> bool:
    return spec.CAPACITY_REFUSAL in str(exc)


def _failure(what: str, exc: BaseException) -> RequestFailed:
    """`what: <the server's first line>`, as ServerAtCapacity when the server was full, else RequestFailed."""
    kind = ServerAtCapacity if _refused_at_capacity(exc) else RequestFailed
    return kind(f"{what}: {_first_line(exc)}")


@dataclasses.dataclass
class DrivingInput:
    """One driving frame for the pipeline: a 256x256 RGB crop or template motion, plus optional ratios."""
    crop: np.ndarray | None = None
    motion: MotionFrame | None = None
    eye_ratio: float | None = None
    lip_ratio: float | None = None
    # a source-video frame's own source crop and ratios (sequences with the option source_video)
    source_crop: np.ndarray | None = None
    source_eye_ratio: np.ndarray | None = None
    source_lip_ratio: np.ndarray | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        if (self.crop is None) == (self.motion is None):
            raise ValueError("a driving input is either a crop or template motion")
        out = {}
        if self.crop is not None:
            out["driving"] = self.crop
        else:
            out.update(motion_R=self.motion.R, motion_exp=self.motion.exp, motion_t=self.motion.t,
                       motion_scale=self.motion.scale)
        if self.eye_ratio is not None:
            out["driving_eye_ratio"] = np.float32([self.eye_ratio])
        if self.lip_ratio is not None:
            out["driving_lip_ratio"] = np.float32([self.lip_ratio])
        for name in ("source_crop", "source_eye_ratio", "source_lip_ratio"):
            if getattr(self, name) is not None:
                out["source" if name == "source_crop" else name] = getattr(self, name)
        return out


@dataclasses.dataclass
class SourceInput:
    """What a sequence starts with: the 256x256 RGB source crop, its ratios and the sequence's options."""
    crop: np.ndarray
    options: dict = dataclasses.field(default_factory=dict)
    eye_ratio: np.ndarray | None = None     # (2,)
    lip_ratio: np.ndarray | None = None     # (1,)

    def __post_init__(self):
        spec.parse_options(self.options)        # fail here, before anything is sent

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"source": self.crop}
        if self.eye_ratio is not None:
            out["source_eye_ratio"] = self.eye_ratio
        if self.lip_ratio is not None:
            out["source_lip_ratio"] = self.lip_ratio
        return out


@dataclasses.dataclass
class FrameResult:
    number: int                 # 0-based position of the driving frame in what the caller sent
    image: np.ndarray           # (512, 512, 3) uint8 RGB
    latency_s: float            # send -> response


def new_sequence_id() -> int:
    """A random correlation id (fits the INT64 request parameter; the model's CORRID is UINT64)."""
    return secrets.randbits(62) + 1


TRANSPORT_ERRORS = (InferenceServerException, OSError)
"""What tritonclient raises when the server refuses a request or cannot be reached (gRPC wraps everything in
InferenceServerException; HTTP lets the socket's OSError through). Anything else is a bug here and propagates."""


def _batch_of(name: str, value, model_spec: spec.ModelSpec, batched: bool) -> np.ndarray:
    """A request's value of an input as the spec's dtype, with a batch dimension (of 1 unless `batched`)."""
    t = model_spec.input(name)
    array = np.ascontiguousarray(value, dtype=t.numpy_dtype)
    if batched:
        if tuple(array.shape[1:]) != tuple(t.shape):
            raise ValueError(f"input {name!r}: expected shape [B, {', '.join(map(str, t.shape))}], "
                             f"got {list(array.shape)}")
        return array
    if array.size != int(np.prod(t.shape)):
        raise ValueError(f"input {name!r}: expected shape {list(t.shape)}, got {list(array.shape)}")
    return array.reshape((1,) + t.shape)


def session_headers(sequence_id: int) -> dict[str, str]:
    """The header naming a sequence's session (`spec.SESSION_HEADER`): a proxy in front of several replicas
    hashes it to send every request of the sequence to the replica holding its state (liveportrait_triton.cluster).
    gRPC sends it as metadata: per request for unary calls, once per stream for a stream."""
    return {spec.SESSION_HEADER: str(sequence_id)}


def build_request(module, model: str, tensors: dict[str, np.ndarray], *, model_spec: spec.ModelSpec = spec.PIPELINE_SPEC,
                  batched: bool = False, request_id: str = "", sequence_id: int = 0, start: bool = False,
                  end: bool = False, options: dict | None = None, streamed: bool = False) -> dict:
    """The keyword arguments of one inference request, the same for every call this client makes.

    `module` is tritonclient.grpc, tritonclient.http or tritonclient.grpc.aio (each has its own InferInput);
    the result is passed as `**request` to `infer`, `async_stream_infer` or yielded to aio `stream_infer`.
    Pipeline tensors are one item each (a batch dimension of 1 is added); `batched` sub-model tensors already
    carry theirs. Shapes and dtypes come from `model_spec`; a wrong shape raises ValueError before anything is sent.
    A request of a sequence carries the session header (`session_headers`), unless it is `streamed`: a stream's
    requests share the metadata the stream was opened with (`start_stream` / `stream_infer(headers=...)`).
    """
    inputs = []
    for name, value in tensors.items():
        array = _batch_of(name, value, model_spec, batched)
        item = module.InferInput(name, list(array.shape), model_spec.input(name).dtype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    request = {"model_name": model, "inputs": inputs,
               "outputs": [module.InferRequestedOutput(n) for n in model_spec.output_names]}
    if request_id:
        request["request_id"] = request_id
    if sequence_id:
        request.update(sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        if not streamed:
            request["headers"] = session_headers(sequence_id)
    if options:
        request["parameters"] = options
    return request


def _compare(kind: str, served: list[dict], wanted: tuple[spec.TensorSpec, ...], batched: bool, model: str) -> None:
    got = {t["name"]: t for t in served}
    want = {t.name: t for t in wanted}
    if set(got) != set(want):
        raise ServerMismatch(f"served model {model!r} has {kind}s {sorted(got)}, this client expects "
                             f"{sorted(want)} (client and server versions differ?)")
    for name, t in want.items():
        shape = [int(d) for d in got[name].get("shape", [])]
        expected = ([-1] if batched else []) + list(t.shape)
        if got[name].get("datatype") != t.dtype or shape != expected:
            raise ServerMismatch(f"served model {model!r} {kind} {name!r} is {got[name].get('datatype')} {shape}, "
                                 f"this client expects {t.dtype} {expected}")


class LivePortraitClient:
    """Synchronous client (gRPC or HTTP) of the `liveportrait` model; `stream()` needs gRPC."""

    def __init__(self, url: str = DEFAULT_URL, protocol: str = "grpc", model: str = spec.PIPELINE,
                 timeout_s: float = 30.0, check: bool = True):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, timeout_s
        self._client = self._connect()
        if check:
            self.check_server()

    def _connect(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        if self.protocol == "http":
            return module.InferenceServerClient(self.url, network_timeout=self.timeout_s)
        return module.InferenceServerClient(self.url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- checks ---------------------------------------------------------------------------------------------
    def where(self) -> str:
        return f"{self.protocol}://{self.url}"

    def check_server(self, models: Iterable[str] | None = None) -> None:
        """The server is live, the models are ready and their tensors match the spec (else a clear error)."""
        try:
            live = self._client.is_server_live(client_timeout=self.timeout_s) if self.protocol == "grpc" \
                else self._client.is_server_live()
        except TRANSPORT_ERRORS as exc:        # grpc/http raise different types for a refused connection
            raise ServerUnavailable(f"no Triton server answered at {self.where()} ({_first_line(exc)}); "
                                    f"{START_HINT}") from exc
        if not live:
            raise ServerUnavailable(f"the Triton server at {self.where()} is not live yet; {START_HINT}")
        for model in (self.model, *(models or ())):
            self.check_model(model)

    def model_ready(self, model: str) -> bool:
        return bool(self._client.is_model_ready(model))

    def check_model(self, model: str) -> None:
        if not self.model_ready(model):
            raise ServerUnavailable(f"the server at {self.where()} has no ready model {model!r} (is the repository "
                                    f"complete? see the server log)")
        wanted = spec.PIPELINE_SPEC if model == self.model else spec.submodel_specs()[model]
        metadata = self._json(self._client.get_model_metadata(model, **self._as_json()))
        config = self._json(self._client.get_model_config(model, **self._as_json()))
        config = config.get("config", config)
        batched = int(config.get("max_batch_size", 0)) > 0
        _compare("input", metadata.get("inputs", []), wanted.inputs, batched, model)
        _compare("output", metadata.get("outputs", []), wanted.outputs, batched, model)

    def _as_json(self) -> dict:
        return {"as_json": True} if self.protocol == "grpc" else {}

    @staticmethod
    def _json(value) -> dict:
        return value if isinstance(value, dict) else {}

    # -- unary requests -------------------------------------------------------------------------------------
    def request(self, tensors: dict[str, np.ndarray], **kwargs) -> dict:
        """`build_request` for this client's protocol and pipeline model (see there for the keywords)."""
        return build_request(self._module, self.model, tensors, **kwargs)

    def infer(self, tensors: dict[str, np.ndarray], sequence_id: int, start: bool = False, end: bool = False,
              options: dict | None = None) -> tuple[np.ndarray | None, int]:
        """One request of a sequence -> (image or None, frame_index); an edit's image comes with index -1."""
        request = self.request(tensors, sequence_id=sequence_id, start=start, end=end, options=options)
        try:
            result = self._client.infer(**request)
        except TRANSPORT_ERRORS as exc:
            raise _failure(f"{self.model} request failed", exc) from exc
        index = int(result.as_numpy("frame_index").reshape(-1)[0])
        image = result.as_numpy("image")
        return (None if image is None else image.reshape(image.shape[-3:])), index

    def animate_image(self, source: SourceInput, driving: DrivingInput) -> np.ndarray:
        """A whole sequence in one request (START + one frame + END): image-driven animation."""
        image, _ = self.infer({**source.tensors(), **driving.tensors()}, new_sequence_id(), start=True, end=True,
                              options=source.options)
        if image is None:
            raise RequestFailed("the server answered without an image")
        return image

    def extract_motion(self, crops: np.ndarray) -> MotionInfo:
        """Run the served motion extractor on (B, 256, 256, 3) uint8 RGB crops."""
        from ..pipeline import crop_to_input
        model_spec = spec.submodel_specs()[spec.MOTION]
        request = build_request(self._module, spec.MOTION, {"image": crop_to_input(crops)}, model_spec=model_spec,
                                batched=True)
        try:
            result = self._client.infer(**request)
        except TRANSPORT_ERRORS as exc:
            raise RequestFailed(f"{spec.MOTION} request failed: {_first_line(exc)}") from exc
        return MotionInfo.from_raw({n: result.as_numpy(n) for n in model_spec.output_names})

    def editor(self, image: np.ndarray, **settings):
        """A `client.editing.PortraitEditor` on a full RGB portrait (settings: source_scale, vx, vy, stitching,
        paste_back, face_models); its `edit(**controls)` returns the edited portrait."""
        from .editing import PortraitEditor
        return PortraitEditor(self, image, **settings)

    # -- streaming ------------------------------------------------------------------------------------------
    def stream(self, source: SourceInput, max_in_flight: int = 4, retry_s: float = 0.0,
               sequence_id: int | None = None) -> "AnimationStream":
        """A streamed sequence (see AnimationStream); `sequence_id` defaults to a random one."""
        if self.protocol != "grpc":
            raise ValueError("streaming needs the gRPC protocol")
        return AnimationStream(self, source, max_in_flight=max_in_flight, retry_s=retry_s, sequence_id=sequence_id)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _is_connection_error(exc) -> bool:
    status = getattr(exc, "status", lambda: None)()
    return str(status) in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED") \
        or "Socket closed" in str(exc) or "failed to connect" in str(exc).lower()


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

    def __init__(self, client: LivePortraitClient, source: SourceInput, max_in_flight: int = 4,
                 retry_s: float = 0.0, sequence_id: int | None = None):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.client, self.source, self.max_in_flight, self.retry_s = client, source, max_in_flight, retry_s
        self._answers: queue.Queue = queue.Queue()
        self._pending: dict[int, tuple[DrivingInput, float]] = {}      # frame number -> (input, send time)
        self._done: dict[int, FrameResult] = {}
        self._first: DrivingInput | None = None
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
            raise RequestFailed(f"lost the connection to {self.client.where()} mid-stream ({_first_line(cause)}); "
                                f"use --retry SECONDS to reconnect automatically") from cause
        self._reconnect(cause)

    RETRY_PAUSE_S = 0.5

    def _wait_for_server(self, deadline: float, cause: BaseException) -> None:
        """Block until the server is live with the model ready and matching, or raise ServerUnavailable."""
        while True:
            try:
                LivePortraitClient(self.client.url, model=self.client.model, check=True).close()
                return
            except (ServerUnavailable, *TRANSPORT_ERRORS):      # down, or up with the models still loading
                if time.monotonic() > deadline:
                    self._abort()
                    raise ServerUnavailable(f"the stream to {self.client.where()} broke ({_first_line(cause)}) "
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
            raise RequestFailed(f"the stream to {self.client.where()} keeps breaking ({_first_line(cause)})") \
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
                                            f"({_first_line(exc)})") from exc
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
            raise ServerAtCapacity(f"{self.client.where()} refused the stream: {_first_line(cause)} ({hint})") \
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
            if _refused_at_capacity(error):
                self._refused(error)
                return True
            if _is_connection_error(error) or not self._server_healthy():
                self._connection_lost(error)        # e.g. in-flight frames fail while the server shuts down
                return True
            self._abort()
            raise RequestFailed(f"the server failed a frame of sequence {self._sequence_id}: "
                                f"{_first_line(error)}") from error
        tag = result.get_response().id.split(":", 1)[1]
        index = int(result.as_numpy("frame_index").reshape(-1)[0])
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

    def send(self, driving: DrivingInput, last: bool = False) -> int:
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

    def has_room(self) -> bool:
        """Whether a frame can be sent without waiting (answers that arrived are taken in first)."""
        while self._handle(block=False):
            pass
        return len(self._pending) < self.max_in_flight

    def offer(self, driving: DrivingInput, last: bool = False) -> int | None:
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


class AsyncLivePortraitClient:
    """asyncio client over tritonclient.grpc.aio: checks, single requests and streamed animation."""

    def __init__(self, url: str = DEFAULT_URL, model: str = spec.PIPELINE):
        import tritonclient.grpc.aio as aio
        self._aio = aio
        self.url, self.model = url, model
        self._client = aio.InferenceServerClient(url)

    async def __aenter__(self):
        await self.check_server()
        return self

    async def __aexit__(self, *exc):
        await self.close()
        return False

    async def close(self) -> None:
        await self._client.close()

    async def check_server(self) -> None:
        try:
            live = await self._client.is_server_live()
        except TRANSPORT_ERRORS as exc:
            raise ServerUnavailable(f"no Triton server answered at grpc://{self.url} ({_first_line(exc)}); "
                                    f"{START_HINT}") from exc
        if not live or not await self._client.is_model_ready(self.model):
            raise ServerUnavailable(f"model {self.model!r} is not ready at grpc://{self.url}")
        metadata = await self._client.get_model_metadata(self.model, as_json=True)
        config = (await self._client.get_model_config(self.model, as_json=True)).get("config", {})
        batched = int(config.get("max_batch_size", 0)) > 0
        _compare("input", metadata.get("inputs", []), spec.PIPELINE_SPEC.inputs, batched, self.model)
        _compare("output", metadata.get("outputs", []), spec.PIPELINE_SPEC.outputs, batched, self.model)

    def _request(self, tensors: dict, sequence_id: int, request_id: str, start=False, end=False,
                 options: dict | None = None, streamed: bool = False) -> dict:
        return build_request(self._aio, self.model, tensors, request_id=request_id, sequence_id=sequence_id,
                             start=start, end=end, options=options, streamed=streamed)

    async def animate_image(self, source: SourceInput, driving: DrivingInput) -> np.ndarray:
        request = self._request({**source.tensors(), **driving.tensors()}, new_sequence_id(), "image", True, True,
                                source.options)
        try:
            result = await self._client.infer(**request)
        except TRANSPORT_ERRORS as exc:
            raise _failure(f"{self.model} request failed", exc) from exc
        image = result.as_numpy("image")
        return image.reshape(image.shape[-3:])

    async def animate(self, source: SourceInput, drivings: AsyncIterable[DrivingInput] | Iterable[DrivingInput],
                      sequence_id: int | None = None) -> AsyncIterator[FrameResult]:
        """Stream a whole sequence (`sequence_id`, else a random one) on one gRPC stream carrying its session
        header; yields results in frame order as they arrive."""
        sequence_id = sequence_id or new_sequence_id()
        sent: dict[int, float] = {}

        async def requests():
            yield self._request(source.tensors(), sequence_id, "start", start=True, options=source.options,
                                streamed=True)
            number = 0
            if hasattr(drivings, "__aiter__"):
                async for driving in drivings:
                    sent[number] = time.perf_counter()
                    yield self._request(driving.tensors(), sequence_id, str(number), streamed=True)
                    number += 1
            else:
                for driving in drivings:
                    sent[number] = time.perf_counter()
                    yield self._request(driving.tensors(), sequence_id, str(number), streamed=True)
                    number += 1
                    await asyncio.sleep(0)
            yield self._request({}, sequence_id, "end", end=True, streamed=True)

        done: dict[int, FrameResult] = {}
        next_out = 0
        async for result, error in self._client.stream_infer(requests(), headers=session_headers(sequence_id)):
            if error is not None:
                raise _failure(f"the server failed a frame of sequence {sequence_id}", error) from error
            tag = result.get_response().id
            if tag == "end":
                break
            if tag == "start":
                continue
            number = int(tag)
            image = result.as_numpy("image")
            done[number] = FrameResult(number, image.reshape(image.shape[-3:]), time.perf_counter() - sent[number])
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
