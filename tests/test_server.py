"""The streaming pipeline on a real Triton server (bundled in nvidia-pytriton), tiny networks, loopback, free ports.

Served frames are compared with the same pipeline run in-process on PyTorch (Animator(TorchRunner)) from the same
synthetic weights: per pixel within IMAGE_MAX_DIFF uint8 levels, IMAGE_MEAN_DIFF on average (conftest).
"""
from __future__ import annotations

import queue
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ASSETS, assert_images_close, server_metric
from liveportrait_triton import spec
from liveportrait_triton.client.templates import load_template
from liveportrait_triton.pipeline import Animator, TorchRunner
from liveportrait_triton.wire import DrivingFrame, MotionFrame
from liveportrait_triton.serve import ADMIN_HEADER

pytestmark = pytest.mark.server
MODEL = spec.PIPELINE
TEMPLATE = ASSETS / "templates" / "talking.pkl"
RETARGETING = {"eye_retargeting": True, "lip_retargeting": True, "driving_multiplier": 0.8}
EYE_RATIO, LIP_RATIO = np.float32([[0.3, 0.32]]), np.float32([[0.05]])


# -- helpers ---------------------------------------------------------------------------------------------------

def tensors(module, **arrays) -> list:
    """InferInputs named by the spec, each array given its leading batch dimension of 1."""
    out = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(np.asarray(array)[None])
        tensor = module.InferInput(name, list(array.shape), spec.PIPELINE_SPEC.input(name).dtype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def stream(url: str, requests: list[dict]) -> list:
    """Send requests (keyword arguments of async_stream_infer, plus `arrays`) on one gRPC stream, in order;
    returns each request's InferResult (or InferenceServerException) in the same order."""
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i, request in enumerate(requests):
            request = dict(request)
            client.async_stream_infer(MODEL, tensors(grpcclient, **request.pop("arrays")), request_id=str(i),
                                      **request)
        received = [results.get(timeout=300) for _ in requests]
        client.stop_stream()
    by_id = {}
    errors = []
    for result, error in received:
        if error is not None:
            errors.append(error)
        else:
            by_id[int(result.get_response().id)] = result
    assert not errors, f"stream errors: {errors}"
    return [by_id[i] for i in range(len(requests))]


def frame_of(result) -> tuple[int, np.ndarray | None]:
    return int(result.as_numpy("frame_index")[0, 0]), (None if result.as_numpy("image") is None
                                                       else result.as_numpy("image")[0])


def template_arrays(frame: MotionFrame) -> dict[str, np.ndarray]:
    return {"motion_R": frame.R.astype(np.float32), "motion_exp": frame.exp.astype(np.float32),
            "motion_t": frame.t.astype(np.float32), "motion_scale": frame.scale.astype(np.float32)}


class InProcess:
    """In-process reference frames (PyTorch runner, same weights as the served ONNX), cached."""

    def __init__(self, networks, sources, driving):
        self.runner = TorchRunner(networks)
        self.sources, self.driving = sources, driving
        template = load_template(TEMPLATE)
        self.template = [template.frame(i) for i in range(3)]
        self._cache = {}

    def frames(self, source: str, count: int, options: dict | None = None, kind: str = "crop") -> list[np.ndarray]:
        key = (source, count, tuple(sorted((options or {}).items())), kind)
        if key not in self._cache:
            self._cache[key] = self._animate(source, count, spec.parse_options(options or {}), kind)
        return self._cache[key]

    def _animate(self, source, count, options, kind):
        animator = Animator(self.runner)
        retarget = options["eye_retargeting"]
        eye, lip = (EYE_RATIO[0], LIP_RATIO[0]) if retarget else (None, None)
        [state] = animator.register_sources([self.sources[source]], [options], [eye], [lip])
        out = []
        for i in range(count):
            if kind == "crop":
                driving = DrivingFrame(crop=self.driving[i], eye_ratio=0.35 if retarget else None,
                                       lip_ratio=0.1 if retarget else None)
            else:
                driving = DrivingFrame(motion=self.template[i])
            out.append(animator.animate([state], [driving])[0])
        return out


@pytest.fixture(scope="module")
def in_process(tiny_networks, source_crops, driving_crops):
    return InProcess(tiny_networks, source_crops, driving_crops)


# -- tests -----------------------------------------------------------------------------------------------------

def test_health_and_metadata_equal_the_spec(tiny_server):
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    expected = {**spec.submodel_specs("tiny"), MODEL: spec.PIPELINE_SPEC}
    for name, model in expected.items():
        assert client.is_model_ready(name), name
        meta = client.get_model_metadata(name, as_json=True)
        for kind, tensors_ in (("inputs", model.inputs), ("outputs", model.outputs)):
            got = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]]
            assert got == [(t.name, t.dtype, [-1, *t.shape]) for t in tensors_], f"{name} {kind}"
    http = httpclient.InferenceServerClient(tiny_server.http_url)
    assert http.is_server_ready() and http.get_model_metadata(MODEL)["name"] == MODEL


def test_streamed_sequence_matches_in_process(tiny_server, in_process, driving_crops, source_crops):
    frames = driving_crops
    requests = [{"arrays": {"source": source_crops["s0"]}, "sequence_id": 101, "sequence_start": True}]
    requests += [{"arrays": {"driving": f}, "sequence_id": 101, "sequence_end": i == len(frames) - 1}
                 for i, f in enumerate(frames)]
    results = stream(tiny_server.grpc_url, requests)
    index, image = frame_of(results[0])
    assert index == -1 and image is None, "a START with only the source answers frame_index -1 and no image"
    want = in_process.frames("s0", len(frames))
    for i, result in enumerate(results[1:]):
        index, image = frame_of(result)
        assert index == i
        assert_images_close(image, want[i], f"frame {i}")


def test_template_motion_frames_match_in_process(tiny_server, in_process, source_crops):
    """START carries the source and the first template frame; later frames go as unary gRPC requests."""
    template = in_process.template
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    results = [client.infer(MODEL, tensors(grpcclient, source=source_crops["s1"], **template_arrays(template[0])),
                            sequence_id=102, sequence_start=True)]
    for i, frame in enumerate(template[1:], start=1):
        results.append(client.infer(MODEL, tensors(grpcclient, **template_arrays(frame)), sequence_id=102,
                                    sequence_end=i == len(template) - 1))
    want = in_process.frames("s1", len(template), kind="template")
    for i, result in enumerate(results):
        index, image = frame_of(result)
        assert index == i
        assert_images_close(image, want[i], f"template frame {i}")


def test_interleaved_sequences_do_not_mix(tiny_server, in_process, driving_crops, source_crops):
    """Two sequences, different sources and options (one with eye/lip retargeting), frame by frame on one stream."""
    count = 3
    requests = [
        {"arrays": {"source": source_crops["s0"]}, "sequence_id": 201, "sequence_start": True},
        {"arrays": {"source": source_crops["s1"], "source_eye_ratio": EYE_RATIO[0], "source_lip_ratio": LIP_RATIO[0]},
         "sequence_id": 202, "sequence_start": True, "parameters": RETARGETING},
    ]
    for i in range(count):
        end = i == count - 1
        requests.append({"arrays": {"driving": driving_crops[i]}, "sequence_id": 201, "sequence_end": end})
        requests.append({"arrays": {"driving": driving_crops[i], "driving_eye_ratio": np.float32([0.35]),
                                    "driving_lip_ratio": np.float32([0.1])}, "sequence_id": 202, "sequence_end": end})
    results = stream(tiny_server.grpc_url, requests)[2:]
    want_a = in_process.frames("s0", count)
    want_b = in_process.frames("s1", count, RETARGETING)
    for i in range(count):
        (index_a, image_a), (index_b, image_b) = frame_of(results[2 * i]), frame_of(results[2 * i + 1])
        assert index_a == index_b == i
        assert_images_close(image_a, want_a[i], f"sequence 201 frame {i}")
        assert_images_close(image_b, want_b[i], f"sequence 202 frame {i}")
        assert np.abs(image_a.astype(int) - image_b).mean() > 1, "the sequences' frames differ"


def statistics(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_concurrent_streams_share_executions(batching_server, driving_crops, source_crops):
    """Four streams sent together: every frame comes back to its own stream, and the pipeline and the
    sub-networks ran batches (fewer executions than requests) under a window no loaded machine misses."""
    tiny_server = batching_server
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    models = [MODEL, spec.WARPING, spec.GENERATOR, spec.MOTION]
    before = {m: statistics(client, m) for m in models}
    streams = [[{"arrays": {"source": source_crops["s0" if k % 2 else "s1"], "driving": driving_crops[0]},
                 "sequence_id": 300 + k, "sequence_start": True},
                {"arrays": {"driving": driving_crops[1]}, "sequence_id": 300 + k, "sequence_end": True}]
               for k in range(4)]
    outcomes: dict[int, list] = {}
    barrier = threading.Barrier(len(streams))

    def run(k):
        barrier.wait()
        outcomes[k] = stream(tiny_server.grpc_url, streams[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(outcomes) == list(range(len(streams)))
    assert all([frame_of(r)[0] for r in outcomes[k]] == [0, 1] for k in outcomes)
    for model in models:
        # Triton records a request's statistics after its response went out: wait until all 8 are counted
        deadline = time.monotonic() + 30
        while True:
            inferences, executions = (a - b for a, b in zip(statistics(client, model), before[model]))
            if inferences >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert inferences >= 8 and executions < inferences, f"{model}: {executions} executions for {inferences}"


def test_end_frees_the_sequence_state(tiny_server, source_crops):
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    live = server_metric(tiny_server, "liveportrait_live_sequences")
    ended = server_metric(tiny_server, "liveportrait_sequences_freed_total", reason="end")
    client.infer(MODEL, tensors(grpcclient, source=source_crops["s0"]), sequence_id=401, sequence_start=True)
    assert server_metric(tiny_server, "liveportrait_live_sequences") == live + 1
    assert server_metric(tiny_server, "liveportrait_sequence_state_bytes") > 0
    # an END without a frame, over HTTP: the response carries frame_index -1 and no image (both clients accept it)
    result = httpclient.InferenceServerClient(tiny_server.http_url).infer(MODEL, [], sequence_id=401,
                                                                          sequence_end=True)
    assert frame_of(result) == (-1, None)
    assert server_metric(tiny_server, "liveportrait_live_sequences") == live
    assert server_metric(tiny_server, "liveportrait_sequences_freed_total", reason="end") == ended + 1


def test_http_unary_request_serves_a_whole_sequence(tiny_server, in_process, driving_crops, source_crops):
    client = httpclient.InferenceServerClient(tiny_server.http_url)
    result = client.infer(MODEL, tensors(httpclient, source=source_crops["s0"], driving=driving_crops[0]),
                          sequence_id=501, sequence_start=True, sequence_end=True)
    index, image = frame_of(result)
    assert index == 0
    assert_images_close(image, in_process.frames("s0", 1)[0], "HTTP frame")


def expect_invalid(call, *fragments):
    with pytest.raises(InferenceServerException) as caught:
        call()
    error = caught.value
    assert "INVALID_ARG" in str(error.status()) or error.status() == "400", error
    for fragment in fragments:
        assert fragment in error.message(), f"{fragment!r} not in {error.message()!r}"


def test_bad_requests_are_refused_and_the_server_keeps_serving(tiny_server, in_process, driving_crops,
                                                              source_crops):
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    crop, source = driving_crops[0], source_crops["s0"]

    def infer(sequence_id, **kwargs):
        arrays = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.PIPELINE_SPEC.input_names}
        return lambda: client.infer(MODEL, tensors(grpcclient, **arrays), sequence_id=sequence_id, **kwargs)

    expect_invalid(infer(601, driving=crop), "sequence 601", "START")                  # a frame before any source
    expect_invalid(infer(602, driving=crop, sequence_start=True, sequence_end=True), "must carry `source`")
    expect_invalid(lambda: client.infer(MODEL, [as_declared("driving", crop[None, :128], "UINT8")], sequence_id=603,
                                        sequence_start=True), "driving", "[-1,256,256,3]")
    expect_invalid(lambda: client.infer(MODEL, [as_declared("source", source[None].astype(np.float32), "FP32")],
                                        sequence_id=604, sequence_start=True), "source", "expects 'UINT8'")
    expect_invalid(infer(605, source=source, sequence_start=True, sequence_end=True,
                         parameters={"warp_speed": 9}), "unknown option(s) ['warp_speed']")
    expect_invalid(infer(606, source=source, sequence_start=True, sequence_end=True,
                         parameters={"driving_multiplier": 11.0}), "driving_multiplier", "outside [0.0, 10.0]")
    client.infer(MODEL, tensors(grpcclient, source=source), sequence_id=607, sequence_start=True)
    expect_invalid(infer(607, source=source_crops["s1"], sequence_start=True), "607 is already live")
    expect_invalid(infer(607, motion_R=np.eye(3, dtype=np.float32)), "missing ['motion_exp'")
    # the live sequence is intact and the server still serves it
    index, image = frame_of(client.infer(MODEL, tensors(grpcclient, driving=crop), sequence_id=607, sequence_end=True))
    assert index == 0
    assert_images_close(image, in_process.frames("s0", 1)[0], "frame after refused requests")


def as_declared(name: str, array: np.ndarray, datatype: str):
    """An input sent with whatever shape and data type the array has (for requests the server must refuse)."""
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor


def test_admin_apis_need_the_key_and_ports_are_loopback(tiny_server):
    request = urllib.request.Request(f"http://{tiny_server.http_url}/v2/repository/index", data=b"{}",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert "restricted" in refused.value.read().decode()
    request.add_header(ADMIN_HEADER, tiny_server.admin_key)
    with urllib.request.urlopen(request, timeout=10) as allowed:
        assert spec.PIPELINE in allowed.read().decode()
    log = tiny_server.log_text()
    for service in ("GRPCInferenceService", "HTTPService", "Metrics Service"):
        assert f"Started {service} at 127.0.0.1:" in log, service
