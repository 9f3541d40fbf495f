"""Bad input on the real server (tiny networks, loopback), over gRPC and HTTP, while a healthy stream runs.

Every bad request must be refused with a clear error naming the problem (INVALID_ARGUMENT / HTTP 400 where it is
the caller's fault), no Python traceback may reach the client, the server stays ready, and a gRPC stream animating
frames in a thread the whole time loses no frame: it gets every frame_index, in order.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from liveportrait_triton import spec
from liveportrait_triton.runtimes import RuntimePlanEntry
from liveportrait_triton.pipeline import InputError
from liveportrait_triton.backend.outcomes import Failure
from liveportrait_triton.backend.requests import RawRequest, parse_request
from liveportrait_triton.backend.subnetwork import Subnetwork

pytestmark = pytest.mark.server

MODEL = spec.PIPELINE
TINY = spec.submodel_specs("tiny")
STATUS = {  # what each protocol reports for an error code
    "INVALID_ARG": {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"},
    "NOT_FOUND": {"grpc": "StatusCode.NOT_FOUND", "http": "404"},
}
JSON_PARSE_ERROR_STATUS = 500      # Triton 2.51 (see test_malformed_http_bodies_are_refused)
OBSERVED: dict[str, str] = {}       # case id -> message, printed at the end (pytest -s) for the report


# -- a healthy stream running beside the bad requests ----------------------------------------------------------

class HealthyStream(threading.Thread):
    """One sequence on a gRPC stream, one frame in flight at a time, until stopped; keeps each frame_index."""

    SEQUENCE_ID = 777_000

    def __init__(self, url: str, source: np.ndarray, frames: list[np.ndarray]):
        super().__init__(daemon=True, name="healthy-stream")
        self.url, self.source, self.frames = url, source, frames
        self.indices: list[int] = []
        self.errors: list[str] = []
        self.sent = 0
        self._stopping = threading.Event()
        self._answers: queue.Queue = queue.Queue()

    def _send(self, client, arrays: dict, start=False, end=False) -> None:
        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, [1, *array.shape], spec.PIPELINE_SPEC.input(name).dtype)
            tensor.set_data_from_numpy(np.ascontiguousarray(array[None]))
            inputs.append(tensor)
        client.async_stream_infer(MODEL, inputs, sequence_id=self.SEQUENCE_ID, sequence_start=start,
                                  sequence_end=end)

    def _answer(self) -> None:
        try:
            result, error = self._answers.get(timeout=120)
        except queue.Empty:
            self.errors.append("no answer within 120 s")
            return
        if error is not None:
            self.errors.append(str(error))
        else:
            self.indices.append(int(result.as_numpy("frame_index").reshape(-1)[0]))

    def run(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            client.start_stream(callback=lambda result, error: self._answers.put((result, error)))
            self._send(client, {"source": self.source}, start=True)
            self._answer()
            while True:
                last = self._stopping.is_set()
                self._send(client, {"driving": self.frames[self.sent % len(self.frames)]}, end=last)
                self.sent += 1
                self._answer()
                if last or self.errors:
                    break
            client.stop_stream()

    def finish(self) -> None:
        self._stopping.set()
        self.join(timeout=300)
        assert not self.is_alive(), "the healthy stream did not finish"

    def assert_still_animating(self, timeout_s: float = 120.0) -> None:
        """Every answer so far is the next frame, none failed, and another frame comes back after the caller's
        bad requests (each test that sends them checks this itself: no test has to run last)."""
        seen = len(self.indices)
        deadline = time.monotonic() + timeout_s
        while len(self.indices) <= seen and not self.errors and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        indices = list(self.indices)
        assert not self.errors, self.errors
        assert len(indices) > seen, f"the healthy stream answered nothing more within {timeout_s:g} s"
        assert indices == [-1, *range(len(indices) - 1)], indices


@pytest.fixture(scope="module")
def healthy_stream(tiny_server, source_crops, driving_crops):
    stream = HealthyStream(tiny_server.grpc_url, source_crops["s0"], driving_crops)
    stream.start()
    deadline = time.monotonic() + 120
    while len(stream.indices) < 2 and not stream.errors and time.monotonic() < deadline:
        time.sleep(0.1)         # the stream is animating before the first bad request goes out
    yield stream
    stream.finish()
    if os.environ.get("LP_PRINT_OBSERVED"):
        print("\n".join(f"| {case} | {message} |" for case, message in OBSERVED.items()))
    assert not stream.errors and stream.indices == [-1, *range(stream.sent)], (stream.errors, stream.indices)


# -- the bad requests ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One bad request: inputs as {name: array} (sent with the array's own shape and dtype), sequence flags,
    parameters; `prepare` runs valid requests first (e.g. a live sequence); `expect` are fragments of the error."""
    id: str
    expect: tuple[str, ...]
    inputs: Callable[[], dict[str, np.ndarray]] = dict
    model: str = MODEL
    start: bool = False
    end: bool = False
    sequence: bool = True
    parameters: dict | None = None
    prepare: str | None = None      # "live": a START with the source first; "ended": START and END first
    code: str = "INVALID_ARG"


def crop(*shape, dtype=np.uint8) -> np.ndarray:
    return np.full(shape or (1, 256, 256, 3), 90, dtype)


def motion(**overrides) -> dict[str, np.ndarray]:
    frame = {"motion_R": np.eye(3, dtype=np.float32)[None], "motion_exp": np.zeros((1, 21, 3), np.float32),
             "motion_t": np.zeros((1, 3), np.float32), "motion_scale": np.ones((1, 1), np.float32)}
    return {**frame, **overrides}


def floats(*shape, value=0.0) -> np.ndarray:
    return np.full(shape, value, np.float32)


def kp(batch: int, value: float = 0.0) -> np.ndarray:
    return floats(batch, 21, 3, value=value)


VOLUME = TINY[spec.WARPING].input("feature_volume").shape
NAN, INF = float("nan"), float("inf")

CASES = [
    # data type, shape, rank, size
    Case("source-wrong-dtype", ("'source'", "FP32", "expects 'UINT8'"),
         lambda: {"source": crop().astype(np.float32)}, start=True, end=True),
    Case("driving-wrong-shape", ("'driving'", "Expected [-1,256,256,3]", "got [1,128,256,3]"),
         lambda: {"driving": crop(1, 128, 256, 3)}, prepare="live"),
    Case("driving-wrong-rank", ("'driving'", "Expected [-1,256,256,3]", "got [1,256,256]"),
         lambda: {"driving": crop(1, 256, 256)}, prepare="live"),
    Case("source-without-batch-dim", ("batch-size must be <= 8",),
         lambda: {"source": crop(256, 256, 3)}, start=True, end=True),
    Case("source-empty", ("input byte size mismatch", "'source'", "got 0"),
         lambda: {"source": crop(0, 256, 256, 3)}, start=True, end=True),
    Case("source-oversized-2048px", ("'source'", "Expected [-1,256,256,3]", "got [1,2048,2048,3]"),
         lambda: {"source": crop(1, 2048, 2048, 3)}, start=True, end=True),
    Case("source-batch-2", ("must specify batch-size 1", "sequence batcher"),
         lambda: {"source": crop(2, 256, 256, 3)}, start=True, end=True),
    Case("unknown-input", ("unexpected inference input 'flow'",),
         lambda: {"source": crop(), "flow": floats(1, 3)}, start=True, end=True),
    # NaN / Inf in float inputs
    Case("motion-exp-nan", ("motion_exp: contains NaN or Inf",),
         lambda: {"source": crop(), **motion(motion_exp=kp(1, NAN))}, start=True, end=True),
    Case("motion-R-inf", ("motion_R: contains NaN or Inf",),
         lambda: {"source": crop(), **motion(motion_R=floats(1, 3, 3, value=INF))}, start=True, end=True),
    Case("source-eye-ratio-nan", ("source_eye_ratio: contains NaN or Inf",),
         lambda: {"source": crop(), "source_eye_ratio": floats(1, 2, value=NAN)}, start=True, end=True,
         parameters={"eye_retargeting": True}),
    Case("driving-lip-ratio-inf", ("driving_lip_ratio: contains NaN or Inf",),
         lambda: {"driving": crop(), "driving_lip_ratio": floats(1, 1, value=-INF)}, prepare="live"),
    # parameters
    Case("option-out-of-range", ("'driving_multiplier'=11.0 is outside [0.0, 10.0]",),
         lambda: {"source": crop()}, start=True, end=True, parameters={"driving_multiplier": 11.0}),
    Case("option-not-a-choice", ("'animation_region'='hair' is not one of",),
         lambda: {"source": crop()}, start=True, end=True, parameters={"animation_region": "hair"}),
    Case("option-wrong-type", ("option 'stitching' must be a boolean, got 'maybe'",),
         lambda: {"source": crop()}, start=True, end=True, parameters={"stitching": "maybe"}),
    Case("option-unknown", ("unknown option(s) ['warp_speed']",),
         lambda: {"source": crop()}, start=True, end=True, parameters={"warp_speed": 9}),
    Case("option-after-start", ("options ['stitching'] may only be sent with the START request",),
         lambda: {"driving": crop()}, prepare="live", parameters={"stitching": False}),
    Case("retargeting-without-ratio", ("eye_retargeting is on but the START request has no source_eye_ratio",),
         lambda: {"source": crop()}, start=True, end=True, parameters={"eye_retargeting": True}),
    # sequences
    Case("frame-for-unknown-sequence", ("sequence", "must specify the START flag on the first request"),
         lambda: {"driving": crop()}),
    Case("frame-for-ended-sequence", ("sequence", "must specify the START flag on the first request"),
         lambda: {"driving": crop()}, prepare="ended"),
    Case("second-start-on-live-sequence", ("is already live: a second START on it is refused",),
         lambda: {"source": crop()}, start=True, prepare="live"),
    Case("start-without-source", ("the START request must carry `source`",),
         lambda: {"driving": crop()}, start=True, end=True),
    Case("no-correlation-id", ("must specify a non-zero or non-empty correlation ID",),
         lambda: {"source": crop()}, sequence=False),
    Case("driving-and-motion", ("either `driving` or the motion_* inputs",),
         lambda: {"driving": crop(), **motion()}, prepare="live"),
    Case("incomplete-motion", ("missing ['motion_exp', 'motion_t', 'motion_scale']",),
         lambda: {"motion_R": np.eye(3, dtype=np.float32)[None]}, prepare="live"),
    Case("frame-without-driving-input", ("carries no driving input",), lambda: {}, prepare="live"),
    # sub-networks called directly
    Case("warping-batch-mismatch", ("'kp_source' batch size does not match other inputs", "'warping_module'"),
         lambda: {"feature_volume": floats(2, *VOLUME), "kp_source": kp(2), "kp_driving": kp(1)},
         model=spec.WARPING, sequence=False),
    Case("stitching-kp-nan", ("stitching: input(s) ['kp_source'] contain NaN or Inf",),
         lambda: {"kp_source": kp(1, NAN), "kp_driving": kp(1)}, model=spec.STITCHING, sequence=False),
    Case("warping-volume-inf", ("warping_module: input(s) ['feature_volume'] contain NaN or Inf",),
         lambda: {"feature_volume": floats(1, *VOLUME, value=INF), "kp_source": kp(1), "kp_driving": kp(1)},
         model=spec.WARPING, sequence=False),
    Case("subnetwork-batch-too-large", ("batch-size must be <= 16", "'stitching'"),
         lambda: {"kp_source": kp(17), "kp_driving": kp(17)}, model=spec.STITCHING, sequence=False),
    Case("subnetwork-wrong-dtype", ("'image'", "data-type is 'UINT8'", "expects 'FP32'"),
         lambda: {"image": crop(1, 3, 256, 256)}, model=spec.MOTION, sequence=False),
    Case("unknown-model", ("unknown model", "'face_swap'"), lambda: {"source": crop()}, model="face_swap",
         sequence=False, code="NOT_FOUND"),
]


def inputs_of(module, arrays: dict[str, np.ndarray]) -> list:
    """InferInputs with each array's own shape and data type (whatever the model declares)."""
    from tritonclient.utils import np_to_triton_dtype
    out = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        out.append(tensor)
    return out


@pytest.fixture(scope="module")
def clients(tiny_server):
    made = {"grpc": grpcclient.InferenceServerClient(tiny_server.grpc_url),
            "http": httpclient.InferenceServerClient(tiny_server.http_url, network_timeout=120)}
    yield made
    for client in made.values():
        client.close()


def sequence_id(case: Case, protocol: str) -> int:
    return 900_000 + 10 * [c.id for c in CASES].index(case.id) + (1 if protocol == "http" else 0)


def assert_clean_message(message: str) -> None:
    assert "Traceback" not in message and 'File "' not in message, f"a traceback reached the client: {message}"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_with_a_clear_error(case, protocol, clients, healthy_stream):
    module = grpcclient if protocol == "grpc" else httpclient
    client = clients[protocol]
    corrid = sequence_id(case, protocol)
    if case.prepare:
        client.infer(MODEL, inputs_of(module, {"source": crop()}), sequence_id=corrid, sequence_start=True,
                     sequence_end=case.prepare == "ended")
    flags = {"sequence_id": corrid, "sequence_start": case.start, "sequence_end": case.end} if case.sequence else {}
    with pytest.raises(InferenceServerException) as refused:
        client.infer(case.model, inputs_of(module, case.inputs()), parameters=case.parameters, **flags)
    error = refused.value
    message = error.message() or ""
    OBSERVED[f"{case.id} ({protocol})"] = f"{error.status()}: {message}"
    assert str(error.status()) == STATUS[case.code][protocol], f"{error.status()}: {message}"
    for fragment in case.expect:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_clean_message(message)
    if case.prepare == "live":      # the refused request left the live sequence alone: it still animates
        result = client.infer(MODEL, inputs_of(module, {"driving": crop()}), sequence_id=corrid, sequence_end=True)
        assert int(result.as_numpy("frame_index").reshape(-1)[0]) == 0
    assert client.is_server_ready()
    healthy_stream.assert_still_animating()


def test_malformed_http_bodies_are_refused(tiny_server, healthy_stream):
    """Triton 2.51's HTTP front end answers JSON it cannot parse with 500 (it classifies the parse error as
    internal, although the caller sent it); the message names what is wrong and the server goes on."""
    base = f"http://{tiny_server.http_url}/v2/models/{MODEL}/infer"
    bodies = {
        b"{not json": "failed to parse the request JSON buffer",
        b'{"inputs": 7}': "Unable to parse 'inputs'",
        b'{"inputs": [{"name": "source", "shape": [1, 256, 256, 3], "datatype": "UINT8", "data": [1, 2]}]}':
            "Shape does not match true shape of 'data' field",
    }
    for body, fragment in bodies.items():
        request = urllib.request.Request(base, data=body, method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        text = refused.value.read().decode()
        OBSERVED[f"malformed JSON body {body[:30]!r} (http)"] = f"{refused.value.code}: {text}"
        assert refused.value.code == JSON_PARSE_ERROR_STATUS, text
        assert fragment.lower() in text.lower(), f"{fragment!r} not in {text!r}"
        assert_clean_message(text)
    healthy_stream.assert_still_animating()


def test_garbage_bytes_on_every_port_leave_the_server_up(tiny_server, healthy_stream):
    """Random bytes, a broken HTTP/2 preface, a request with a huge declared body that never comes, and a
    connection left half-open while the others fly."""
    rng = np.random.default_rng(7)
    payloads = [rng.bytes(64 * 1024), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.bytes(4096),
                b"POST /v2/models/liveportrait/infer HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n{\"in",
                b"\x00" * 100_000, b"GET /" + b"A" * 70_000 + b" HTTP/1.1\r\n\r\n"]
    lingering = []
    for port in tiny_server.ports.values():
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.sendall(b"GE")
        lingering.append(idle)
        for payload in payloads:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                try:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    sock.recv(4096)
                except OSError:         # the server may reset the connection: that is a fine answer
                    pass
    with grpcclient.InferenceServerClient(tiny_server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready(MODEL)
    with urllib.request.urlopen(f"http://{tiny_server.http_url}/v2/health/ready", timeout=10) as ready:
        assert ready.status == 200
    for sock in lingering:
        sock.close()
    assert tiny_server.alive()
    healthy_stream.assert_still_animating()


# -- the same checks without a server ----------------------------------------------------------------------

def test_non_finite_ratios_are_refused_before_any_network_runs():
    request = RawRequest(corrid=1, start=True, end=False, parameters={},
                         tensors={"source": crop(), "source_lip_ratio": floats(1, 1, value=NAN)})
    with pytest.raises(InputError, match="source_lip_ratio: contains NaN or Inf"):
        parse_request(request)


def test_subnetwork_refuses_only_the_requests_with_non_finite_inputs(tiny_repository):
    network = Subnetwork.load(TINY[spec.STITCHING], RuntimePlanEntry.of(spec.STITCHING, "onnxruntime"), tiny_repository / spec.STITCHING / "1")
    good = {"kp_source": kp(2, 0.1), "kp_driving": kp(2, 0.2)}
    bad = {"kp_source": kp(1), "kp_driving": kp(1, INF)}
    outcomes = network.serve_requests([good, bad, good])
    assert isinstance(outcomes[1], Failure) and outcomes[1].caller_fault
    assert outcomes[1].message == "stitching: input(s) ['kp_driving'] contain NaN or Inf"
    assert outcomes[0]["delta"].shape == (2, 65)
    np.testing.assert_array_equal(outcomes[0]["delta"], outcomes[2]["delta"])
    np.testing.assert_array_equal(outcomes[0]["delta"], network.run_requests([good])[0]["delta"])
