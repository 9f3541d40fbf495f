"""Logic of the Python-backend models without a server: ONNX batching, request checks, rounds, state, eviction."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import assert_images_close
from liveportrait_triton import spec
from liveportrait_triton.runtimes import RuntimePlanEntry
from liveportrait_triton.pipeline import Animator, DrivingFrame, InputError, TorchRunner
from liveportrait_triton.backend.model_config import ConfigError
from liveportrait_triton.backend.outcomes import Failure, ServedFrame
from liveportrait_triton.backend.pipeline_model import PipelineBackend, PipelineCore
from liveportrait_triton.backend.requests import RawRequest, parse_parameters, parse_request, plan_rounds
from liveportrait_triton.backend.sequences import FREED_END, FREED_IDLE, SequenceStore
from liveportrait_triton.backend.subnetwork import Subnetwork, thread_count

RNG = np.random.default_rng(0)


# -- sub-networks on ONNX Runtime ----------------------------------------------------------------------------

def stitching_like_onnx(path, weights: np.ndarray, output_name: str = "delta") -> None:
    """A real ONNX graph with the stitching model's tensor names: delta = [kp_source, kp_driving] @ weights."""
    flat = helper.make_tensor("flat", TensorProto.INT64, [2], [-1, 63])
    w = helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.ravel().tolist())
    nodes = [helper.make_node("Reshape", ["kp_source", "flat"], ["s"]),
             helper.make_node("Reshape", ["kp_driving", "flat"], ["d"]),
             helper.make_node("Concat", ["s", "d"], ["x"], axis=1),
             helper.make_node("MatMul", ["x", "w"], [output_name])]
    graph = helper.make_graph(
        nodes, "stitching_like",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 21, 3]) for n in ("kp_source", "kp_driving")],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 65])], [flat, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_subnetwork_batches_requests_and_splits_back(tmp_path):
    weights = RNG.standard_normal((126, 65)).astype(np.float32)
    stitching_like_onnx(tmp_path / "model.onnx", weights)
    net = Subnetwork.load(spec.submodel_specs("tiny")[spec.STITCHING], RuntimePlanEntry.of(spec.STITCHING, "onnxruntime"), tmp_path)
    requests = [{"kp_source": RNG.standard_normal((b, 21, 3)).astype(np.float32),
                 "kp_driving": RNG.standard_normal((b, 21, 3)).astype(np.float32)} for b in (1, 3, 2)]
    outputs = net.run_requests(requests)
    assert len(outputs) == 3
    for request, out in zip(requests, outputs):
        expected = np.concatenate([request["kp_source"].reshape(-1, 63), request["kp_driving"].reshape(-1, 63)],
                                  axis=1) @ weights
        assert list(out) == ["delta"] and out["delta"].shape == expected.shape
        np.testing.assert_allclose(out["delta"], expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(out["delta"], net.run_requests([request])[0]["delta"])


def test_subnetwork_refuses_a_graph_that_is_not_the_spec(tmp_path):
    stitching_like_onnx(tmp_path / "model.onnx", np.zeros((126, 65), np.float32), output_name="stitching_delta")
    for kind in ("onnxruntime", "openvino"):
        with pytest.raises(ConfigError, match=r"outputs \['stitching_delta'\].*\['delta'\]"):
            Subnetwork.load(spec.submodel_specs("tiny")[spec.STITCHING], RuntimePlanEntry.of(spec.STITCHING, kind), tmp_path)
    with pytest.raises(ConfigError, match=r"model.plan not found \(runtime 'tensorrt'"):
        Subnetwork.load(spec.submodel_specs("tiny")[spec.STITCHING], RuntimePlanEntry.of(spec.STITCHING, "tensorrt"), tmp_path)
    with pytest.raises(ConfigError, match="model.onnx not found"):
        Subnetwork.load(spec.submodel_specs("tiny")[spec.STITCHING], RuntimePlanEntry.of(spec.STITCHING, "onnxruntime"), tmp_path / "missing")


def test_subnetwork_config_names_a_servable_runtime(tmp_path):
    """initialize refuses a runtime plan entry that is missing, unknown or inconsistent, naming the choices."""
    from liveportrait_triton import repository
    from test_repository import as_triton_json, parse
    stitching_like_onnx(tmp_path / "model.onnx", RNG.standard_normal((126, 65)).astype(np.float32))
    model = spec.submodel_specs("tiny")[spec.STITCHING]
    config = as_triton_json(parse(repository.render_submodel_config(model, "local", "tiny")))
    assert Subnetwork.from_config(config, tmp_path).runner.kind == "onnxruntime"
    config["parameters"]["runtime"]["string_value"] = "tensorflow"
    with pytest.raises(ConfigError, match=r"unknown runtime 'tensorflow'; choose one of "
                                          r"\['onnxruntime', 'openvino', 'openvino_fastconv', 'torch', 'torch_fastconv', 'tensorrt'\]"):
        Subnetwork.from_config(config, tmp_path)
    config["parameters"]["runtime"]["string_value"] = "torch_fastconv"
    with pytest.raises(ConfigError, match=r"runtime 'torch_fastconv' loads model.pt, not 'model.onnx'"):
        Subnetwork.from_config(config, tmp_path)
    config["parameters"]["artefact"]["string_value"] = "model.pt"
    with pytest.raises(ConfigError, match=r"model.pt not found \(runtime 'torch_fastconv'"):
        Subnetwork.from_config(config, tmp_path)
    config["parameters"]["device"]["string_value"] = "cuda"
    with pytest.raises(ConfigError, match=r"runtime 'torch_fastconv' runs on the CPU, not on 'cuda'"):
        Subnetwork.from_config(config, tmp_path)
    del config["parameters"]["runtime"]
    with pytest.raises(ConfigError, match=r"lacks the runtime plan parameter\(s\) \['runtime'\]"):
        Subnetwork.from_config(config, tmp_path)


@pytest.mark.parametrize("kind", ["torch", "torch_fastconv"])
def test_torch_kinds_serve_the_exported_network_file(tmp_path, tiny_networks, kind):
    """The torch kinds load W from the network file export writes (model.pt) and compute what PyTorch does; a file
    that is not one is refused with its name."""
    from liveportrait_triton import repository
    from liveportrait_triton.export.sample_inputs import sample_inputs
    from liveportrait_triton.weights import save_network_file
    from test_repository import as_triton_json, parse
    save_network_file(tiny_networks, "warping_module", tmp_path / "model.pt")
    model = spec.submodel_specs("tiny")[spec.WARPING]
    config = as_triton_json(parse(repository.render_submodel_config(model, "local", "tiny",
                                                                    entry=RuntimePlanEntry.of(spec.WARPING, kind))))
    served = Subnetwork.from_config(config, tmp_path)
    assert served.runner.kind == kind
    feeds = sample_inputs(TorchRunner(tiny_networks), 2)[spec.WARPING]
    want = TorchRunner(tiny_networks).run(spec.WARPING, feeds)
    got = served.run_requests([feeds])[0]
    for name in model.output_names:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * float(np.abs(want[name]).max()))
    (tmp_path / "model.pt").write_bytes(b"not a network")
    with pytest.raises(ConfigError, match="model.pt: cannot be read as a PyTorch checkpoint"):
        Subnetwork.from_config(config, tmp_path)


def test_thread_count_shares_the_cores():
    from liveportrait_triton.runtimes import default_threads

    def config(**parameters):
        return {"name": spec.WARPING, "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    assert thread_count(config(threads="3", models_at_once="2")) == 3
    assert thread_count(config(threads="0", models_at_once="1")) == default_threads()
    assert thread_count(config(threads="0", models_at_once=str(4 * default_threads()))) == 1
    assert thread_count(config(threads="0", models_at_once="2")) == max(1, default_threads() // 2)
    with pytest.raises(ConfigError, match="threads must be a non-negative integer, got 'many'"):
        thread_count(config(threads="many"))


# -- request checks ------------------------------------------------------------------------------------------

def crop(value: int = 0) -> np.ndarray:
    return np.full((1, 256, 256, 3), value, np.uint8)


def motion() -> dict[str, np.ndarray]:
    return {"motion_R": np.eye(3, dtype=np.float32)[None], "motion_exp": np.zeros((1, 21, 3), np.float32),
            "motion_t": np.zeros((1, 3), np.float32), "motion_scale": np.ones((1, 1), np.float32)}


def raw(corrid=1, start=False, end=False, parameters=None, **tensors) -> RawRequest:
    return RawRequest(corrid=corrid, start=start, end=end, tensors=tensors, parameters=parameters or {})


def test_parse_start_with_source_options_and_a_first_frame():
    request = parse_request(raw(start=True, source=crop(1), driving=crop(2),
                                parameters={"driving_multiplier": 1.5, "relative_motion": "false"}))
    assert request.source.shape == (256, 256, 3) and request.frame.crop[0, 0, 0] == 2
    assert request.options["driving_multiplier"] == 1.5 and request.options["relative_motion"] is False
    assert parse_request(raw(start=True, source=crop())).frame is None


def test_parse_template_motion_frame():
    request = parse_request(raw(**motion(), driving_eye_ratio=np.float32([[0.3]])))
    assert request.frame.crop is None and request.frame.motion.exp.shape == (21, 3)
    assert request.frame.eye_ratio == pytest.approx(0.3)


@pytest.mark.parametrize("request_, message", [
    (raw(start=True, driving=crop()), "START request must carry `source`"),
    (raw(driving=crop(), parameters={"stitching": False}), r"options \['stitching'\] may only be sent with the START"),
    (raw(start=True, source=crop(), parameters={"colour": "red"}), r"unknown option\(s\) \['colour'\]"),
    (raw(start=True, source=crop(), parameters={"driving_multiplier": 50}), r"'driving_multiplier'=50.0 is outside"),
    (raw(start=True, source=crop(), parameters={"animation_region": "ears"}), "is not one of"),
    (raw(start=True, source=crop(), parameters={"eye_retargeting": True}), "has no source_eye_ratio"),
    (raw(driving=crop(), **motion()), "either `driving` or the motion_\\* inputs"),
    (raw(motion_R=np.eye(3, dtype=np.float32)[None]), r"missing \['motion_exp', 'motion_t', 'motion_scale'\]"),
    (raw(**{**motion(), "motion_t": np.float32([[0, np.nan, 0]])}), "motion_t: contains NaN"),
    (raw(driving=np.zeros((2, 256, 256, 3), np.uint8)), "batch dimension 1"),
    (raw(driving=np.zeros((1, 256, 256, 3), np.float32)), "driving: expected UINT8"),
    (raw(driving_lip_ratio=np.float32([[0.1]])), r"\['driving_lip_ratio'\] need a driving input"),
    (raw(), "carries no driving input"),
    (raw(flow=crop()), r"unknown input\(s\) \['flow'\]"),
])
def test_bad_requests_are_refused_with_the_reason(request_, message):
    with pytest.raises((InputError, spec.OptionError), match=message):
        parse_request(request_)


def test_end_without_a_frame_is_valid():
    assert parse_request(raw(end=True)).frame is None


def test_parameters_must_be_a_json_object():
    assert parse_parameters("") == {} and parse_parameters('{"stitching": false}') == {"stitching": False}
    with pytest.raises(InputError, match="JSON object"):
        parse_parameters("[1, 2]")


def test_rounds_hold_one_request_per_sequence_in_order():
    assert plan_rounds([1, 2, 1, 1, 3, 2]) == [[0, 1, 4], [2, 5], [3]]
    assert plan_rounds([]) == []


# -- state store ---------------------------------------------------------------------------------------------

class Recorder:
    """A SequenceListener that keeps what it was told."""

    def __init__(self):
        self.changes, self.freed = [], []

    def sequences_changed(self, live, state_bytes):
        self.changes.append((live, state_bytes))

    def sequence_freed(self, reason):
        self.freed.append(reason)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class State:
    nbytes = 1000


def test_store_ends_evicts_and_reports():
    clock, recorder = Clock(), Recorder()
    store = SequenceStore(10, recorder, clock=clock)
    store.add(1, State())
    store.add(2, State())
    with pytest.raises(KeyError, match="already live"):
        store.add(1, State())
    assert len(store) == 2 and store.state_bytes == 2000 and recorder.changes[-1] == (2, 2000)
    assert store.end(1) and not store.end(1)
    clock.now += 9
    assert store.get(2) is not None            # used: its idle time restarts
    store.add(3, State())
    clock.now += 10
    assert store.evict_idle(keep={3}) == [2]
    assert store.was_evicted(2) and not store.was_evicted(1)
    assert store.evict_idle() == [3]
    assert recorder.freed == [FREED_END, FREED_IDLE, FREED_IDLE] and recorder.changes[-1] == (0, 0)
    store.add(2, State())                       # an evicted id may start again
    assert not store.was_evicted(2)


# -- the pipeline on real networks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_runner(tiny_networks):
    return TorchRunner(tiny_networks)


def reference(runner, source, frames, options=None) -> list[np.ndarray]:
    animator = Animator(runner)
    [state] = animator.register_sources([source], [spec.parse_options(options or {})])
    return [animator.animate([state], [DrivingFrame(crop=f)])[0] for f in frames]


def test_core_batches_sequences_and_matches_the_animator(torch_runner, source_crops, driving_crops):
    s0, s1 = source_crops["s0"], source_crops["s1"]
    f0, f1 = driving_crops[:2]
    core = PipelineCore(torch_runner, SequenceStore(60))
    outcomes = core.process([
        raw(1, start=True, source=s0[None], driving=f0[None]),
        raw(2, start=True, source=s1[None], parameters={"driving_multiplier": 0.5}),
        raw(2, driving=f0[None]),
        raw(1, driving=f1[None], end=True),
    ])
    assert [type(o) for o in outcomes] == [ServedFrame] * 4
    assert [o.frame_index for o in outcomes] == [0, -1, 0, 1] and outcomes[1].image is None
    want_1 = reference(torch_runner, s0, [f0, f1])
    want_2 = reference(torch_runner, s1, [f0], {"driving_multiplier": 0.5})
    assert_images_close(outcomes[0].image, want_1[0], "sequence 1 frame 0")
    assert_images_close(outcomes[3].image, want_1[1], "sequence 1 frame 1")
    assert_images_close(outcomes[2].image, want_2[0], "sequence 2 frame 0")
    assert np.abs(outcomes[2].image.astype(int) - want_1[0]).mean() > 1, "the two sequences' frames differ"
    assert 1 not in core.store and 2 in core.store


def test_core_isolates_bad_requests(torch_runner, source_crops, driving_crops):
    store = SequenceStore(60)
    core = PipelineCore(torch_runner, store)
    core.process([raw(5, start=True, source=source_crops["s0"][None], parameters={"lip_retargeting": True},
                      source_lip_ratio=np.float32([[0.2]]))])
    frame = driving_crops[0][None]
    outcomes = core.process([
        raw(5, start=True, source=source_crops["s1"][None]),          # second START on a live sequence
        raw(6, driving=frame),                                        # no source registered
        raw(7, start=True, driving=frame),                            # START without source
        raw(8, start=True, source=source_crops["s0"][None], driving=frame),
    ])
    assert isinstance(outcomes[0], Failure) and "already live" in outcomes[0].message
    assert isinstance(outcomes[1], Failure) and "has no source" in outcomes[1].message
    assert isinstance(outcomes[2], Failure) and "must carry `source`" in outcomes[2].message
    assert all(o.caller_fault for o in outcomes[:3])
    assert isinstance(outcomes[3], ServedFrame) and outcomes[3].frame_index == 0
    # sequence 5 kept its options: a frame without the lip ratio its option needs is refused, alone
    [missing_ratio] = core.process([raw(5, driving=frame)])
    assert isinstance(missing_ratio, Failure) and "driving_lip_ratio" in missing_ratio.message
    [ok] = core.process([raw(5, driving=frame, driving_lip_ratio=np.float32([[0.4]]))])
    assert isinstance(ok, ServedFrame) and ok.frame_index == 0


class FailingGenerator:
    """A runner whose generator fails, as a broken sub-network would."""

    def __init__(self, runner):
        self.runner = runner

    def run(self, model, inputs):
        if model == spec.GENERATOR:
            raise RuntimeError("spade_generator: out of memory")
        return self.runner.run(model, inputs)


def test_core_reports_server_faults_as_internal(torch_runner, source_crops, driving_crops):
    core = PipelineCore(FailingGenerator(torch_runner), SequenceStore(60))
    [outcome] = core.process([raw(1, start=True, source=source_crops["s0"][None], driving=driving_crops[0][None])])
    assert isinstance(outcome, Failure) and not outcome.caller_fault
    assert "spade_generator: out of memory" in outcome.message and "Traceback" not in outcome.message
    assert outcome.detail.startswith("Traceback"), "the traceback is kept for the server log"


def test_backend_evicts_idle_sequences_on_its_own(torch_runner, source_crops):
    recorder = Recorder()
    backend = PipelineBackend(torch_runner, idle_timeout_s=0.5, listener=recorder, eviction_interval_s=0.1)
    try:
        [started] = asyncio.run(backend.execute([raw(3, start=True, source=source_crops["s0"][None])]))
        assert started.frame_index == -1 and len(backend.store) == 1
        deadline = time.monotonic() + 10
        while len(backend.store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(backend.store) == 0 and recorder.freed == [FREED_IDLE]
        [late] = asyncio.run(backend.execute([raw(3, driving=source_crops["s1"][None])]))
        assert isinstance(late, Failure) and "was freed after 0.5 s without requests" in late.message
    finally:
        backend.close()


def test_a_refused_start_with_end_leaves_the_live_sequence(torch_runner, source_crops):
    store = SequenceStore(60)
    core = PipelineCore(torch_runner, store)
    core.process([raw(4, start=True, source=source_crops["s0"][None])])
    [refused] = core.process([raw(4, start=True, end=True, source=source_crops["s1"][None])])
    [unparsable] = core.process([raw(4, start=True, end=True, parameters={"speed": 2})])
    assert isinstance(refused, Failure) and isinstance(unparsable, Failure)
    assert 4 in store
    [ended] = core.process([raw(4, end=True)])
    assert ended.frame_index == -1 and 4 not in store
