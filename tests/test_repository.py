"""Rendering of the Triton model repository: committed files, protobuf validity, both targets, config checks."""
from __future__ import annotations

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from conftest import REPO
from liveportrait_triton import repository, runtimes, spec
from liveportrait_triton.backend.model_config import ConfigError, check_model_config
from liveportrait_triton.backend.pipeline_model import PipelineBackend

COMMITTED = REPO / "model_repository"


def parse(text: str) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text with Triton's own ModelConfig message (unknown fields or bad syntax fail)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def as_triton_json(config: model_config_pb2.ModelConfig) -> dict:
    """The JSON form Triton hands to a Python-backend model's initialize (args['model_config'])."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def test_committed_repository_is_rendered_byte_for_byte():
    rendered = repository.render_repository("local", "full")
    for rel, text in rendered.items():
        path = COMMITTED / rel
        assert path.is_file(), f"{path} is missing: re-render with repository.write_repository_configs"
        assert path.read_text() == text, f"{path} differs from its rendering: re-render, don't edit"
    committed = {p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*")
                 if p.is_file() and p.suffix != ".onnx" and "__pycache__" not in p.parts}
    assert committed == set(rendered), f"unexpected files: {sorted(committed - set(rendered))}"


def test_committed_configs_are_data_equal_to_a_fresh_render():
    """Every committed config.pbtxt parses with protobuf's text format into Triton's ModelConfig, and equals (as a
    message) the renderer's ModelConfig of today's spec and plan."""
    committed = sorted(COMMITTED.glob("*/config.pbtxt"))
    assert [p.parent.name for p in committed] == sorted([*spec.SUBMODELS, spec.PIPELINE])
    specs = spec.submodel_specs("full")
    for path in committed:
        pb = parse(path.read_text())
        name = path.parent.name
        fresh = (repository.pipeline_config("local", "full") if name == spec.PIPELINE
                 else repository.submodel_config(specs[name], "local", "full"))
        assert pb == fresh, f"{path} differs from a fresh render: re-render, don't edit"
        assert repository.read_config(path) == pb


def test_instances_and_threads_are_renderer_parameters():
    options = repository.ServingOptions(instances={spec.WARPING: 2, spec.GENERATOR: 3}, threads=2,
                                        pipeline_instances=2)
    rendered = repository.render_repository("local", "tiny", options=options)
    counts = {name: parse(rendered[f"{name}/config.pbtxt"]).instance_group[0].count
              for name in (*spec.SUBMODELS, spec.PIPELINE)}
    assert counts == {**{m: 1 for m in spec.SUBMODELS}, spec.WARPING: 2, spec.GENERATOR: 3, spec.PIPELINE: 2}
    assert parse(rendered[f"{spec.WARPING}/config.pbtxt"]).parameters["threads"].string_value == "2"
    with pytest.raises(ValueError, match="instances must map served sub-networks"):
        repository.ServingOptions(instances={"gen": 2})
    with pytest.raises(ValueError, match="instances must map served sub-networks"):
        repository.ServingOptions(instances={spec.WARPING: 0})


def test_served_models_report_the_runtime_plan():
    """Every committed sub-network config reports its entry of THE runtime plan (runtimes.runtime_plan: the
    committed choice of runtime_choice.json) in its parameters, and the served model reads that same entry back;
    a config whose runtime, device, precision or artefact disagrees with the plan fails here."""
    plan = runtimes.runtime_plan("local")
    assert list(plan) == list(spec.SUBMODELS)
    assert plan == runtimes.runtime_choice("local") == runtimes.runtime_choice("local", policy="exact")
    for name, entry in plan.items():
        config = parse((COMMITTED / name / "config.pbtxt").read_text())
        reported = runtimes.RuntimePlanEntry.from_parameters(name, repository.config_parameters(config))
        assert reported == entry == runtimes.RuntimePlanEntry(name, entry.kind, "cpu", "fp32",
                                                             runtimes.ARTEFACT[entry.kind]), name
    assert repository.served_plan(COMMITTED) == plan


def test_a_cuda_plan_renders_device_inputs():
    """torch on CUDA is the plan entry torch/cuda/fp16 (fp32 for M and the MLPs: precision.ALWAYS_FP32), rendered
    like any other entry; its inputs stay in GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS no)."""
    from liveportrait_triton.precision import ALWAYS_FP32
    plan = runtimes.uniform_plan("torch", "cuda")
    rendered = repository.render_repository("local", "tiny", plan=plan)
    for name in spec.SUBMODELS:
        parameters = repository.config_parameters(parse(rendered[f"{name}/config.pbtxt"]))
        assert runtimes.RuntimePlanEntry.from_parameters(name, parameters) == plan[name]
        precision = "fp32" if name in ALWAYS_FP32 else "fp16"
        assert (parameters["device"], parameters["precision"], parameters["artefact"]) == ("cuda", precision, "model.pt")
        assert parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    cpu = repository.config_parameters(parse(repository.render_repository("local", "tiny")[f"{spec.WARPING}/config.pbtxt"]))
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu


def test_runtime_overrides_and_their_errors():
    plan = runtimes.runtime_plan("local", {spec.WARPING: "onnxruntime"})
    rendered = repository.render_repository("local", "tiny", plan=plan)
    assert parse(rendered[f"{spec.WARPING}/config.pbtxt"]).parameters["runtime"].string_value == "onnxruntime"
    assert runtimes.parse_runtime_overrides([f"{spec.GENERATOR}=openvino"]) == {spec.GENERATOR: "openvino"}
    for bad in ("spade_generator", "spade_generator=tensorflow", "gen=openvino"):
        with pytest.raises(ValueError, match="expected MODEL=KIND"):
            runtimes.parse_runtime_overrides([bad])
    with pytest.raises(ValueError, match="spade_generator: unknown runtime 'tensorflow'"):
        runtimes.runtime_plan("local", {spec.GENERATOR: "tensorflow"})
    with pytest.raises(ValueError, match=r"unknown sub-networks \['gen'\]"):
        runtimes.runtime_plan("local", {"gen": "torch"})
    plan = runtimes.runtime_plan("local", {spec.GENERATOR: "torch_fastconv"})
    rendered = repository.render_repository("local", "tiny", plan=plan)
    assert parse(rendered[f"{spec.GENERATOR}/config.pbtxt"]).parameters["runtime"].string_value == "torch_fastconv"
    assert parse(rendered[f"{spec.GENERATOR}/config.pbtxt"]).parameters["artefact"].string_value == "model.pt"


def test_threads_are_shared_by_the_models_that_run_at_once():
    """A pipeline instance runs its sub-networks one at a time per frame; more pipeline instances, more models at
    once. An explicit thread count is rendered as given."""
    def parameters(name, **serving):
        rendered = repository.render_repository("local", "tiny", options=repository.ServingOptions(**serving))
        pb = parse(rendered[f"{name}/config.pbtxt"])
        return pb.parameters["threads"].string_value, pb.parameters["models_at_once"].string_value
    assert parameters(spec.MOTION) == ("0", "1") and parameters(spec.WARPING) == ("0", "1")
    assert parameters(spec.WARPING, pipeline_instances=2) == ("0", "2")
    assert parameters(spec.GENERATOR, threads=3) == ("3", "1")


@pytest.mark.parametrize("config", ["full", "tiny"])
def test_local_configs_match_the_spec(config):
    rendered = repository.render_repository("local", config)
    for name, model in spec.submodel_specs(config).items():
        pb = parse(rendered[f"{name}/config.pbtxt"])
        assert pb.backend == "python" and not pb.platform
        assert pb.max_batch_size >= 8 and pb.dynamic_batching.max_queue_delay_microseconds <= 1000
        assert [i.name for i in pb.input] == model.input_names
        assert [o.name for o in pb.output] == model.output_names
        for t, entry in zip(model.inputs + model.outputs, list(pb.input) + list(pb.output)):
            assert tuple(entry.dims) == t.shape
            assert model_config_pb2.DataType.Name(entry.data_type) == t.triton_type
        check_model_config(as_triton_json(pb), model)
        assert rendered[f"{name}/1/model.py"] == repository.SUBNETWORK_ADAPTER.read_text()


def test_pipeline_config_is_a_batched_sequence_model():
    pb = parse(repository.render_pipeline_config("local", "full"))
    check_model_config(as_triton_json(pb), spec.PIPELINE_SPEC)
    assert pb.max_batch_size == 8
    seq = pb.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_candidate_sequences >= 16
    controls = {c.name: model_config_pb2.ModelSequenceBatching.Control.Kind.Name(c.control[0].kind)
                for c in seq.control_input}
    assert controls == spec.SEQUENCE_CONTROLS
    assert all(i.optional for i in pb.input)
    timeout = float(pb.parameters["sequence_idle_timeout_s"].string_value)
    assert seq.max_sequence_idle_microseconds == timeout * 1_000_000


@pytest.mark.parametrize("platform,artefact", [("onnxruntime_onnx", "model.onnx"), ("tensorrt_plan", "model.plan")])
def test_ngc_configs_use_native_platforms(platform, artefact):
    rendered = repository.render_repository("ngc", "full", platform=platform)
    for name, model in spec.submodel_specs("full").items():
        pb = parse(rendered[f"{name}/config.pbtxt"])
        assert pb.platform == platform and not pb.backend
        assert pb.default_model_filename == artefact
        assert pb.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
        assert pb.max_batch_size == spec.MAX_BATCH_SIZE and pb.HasField("dynamic_batching")
        check_model_config(as_triton_json(pb), model)
        assert f"{name}/1/model.py" not in rendered
    # the pipeline is the same Python-backend sequence model as locally
    assert rendered["liveportrait/1/model.py"] == repository.PIPELINE_ADAPTER.read_text()
    assert parse(rendered["liveportrait/config.pbtxt"]).backend == "python"


def test_ngc_platform_follows_the_artefacts(tmp_path):
    (tmp_path / spec.WARPING / "1").mkdir(parents=True)
    (tmp_path / spec.WARPING / "1" / "model.plan").write_bytes(b"engine")
    (tmp_path / spec.APPEARANCE / "1").mkdir(parents=True)
    stale = tmp_path / spec.APPEARANCE / "1" / "model.py"
    stale.write_text(repository.SUBNETWORK_ADAPTER.read_text())
    repository.write_repository_configs(tmp_path, "ngc", "tiny")
    assert parse((tmp_path / spec.WARPING / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert parse((tmp_path / spec.GENERATOR / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    assert not stale.exists(), "the local adapter is removed from an ngc repository"


def test_unknown_target_or_platform_is_refused():
    with pytest.raises(ValueError, match="unknown target 'cloud'"):
        repository.render_repository("cloud", "full")
    with pytest.raises(ValueError, match="unknown platform 'tensorflow'"):
        repository.render_repository("ngc", "full", platform="tensorflow")


def test_config_checks_name_the_mismatch():
    model = spec.submodel_specs("tiny")[spec.WARPING]
    config = as_triton_json(parse(repository.render_submodel_config(model, "local", "tiny")))
    config["input"][0]["dims"] = ["8", "4", "64", "64"]
    with pytest.raises(ConfigError, match=r"input 'feature_volume'.*\[8, 4, 64, 64\].*\[4, 4, 64, 64\]"):
        check_model_config(config, model)
    config = as_triton_json(parse(repository.render_submodel_config(model, "local", "tiny")))
    config["output"].pop()
    with pytest.raises(ConfigError, match="outputs"):
        check_model_config(config, model)


def test_pipeline_refuses_misaligned_idle_timeouts():
    pb = parse(repository.render_pipeline_config("local", "tiny", repository.ServingOptions(sequence_idle_timeout_s=9)))
    pb.sequence_batching.max_sequence_idle_microseconds = 1_000_000
    with pytest.raises(ConfigError, match="max_sequence_idle_microseconds"):
        PipelineBackend.from_config(as_triton_json(pb), runner=None)


def test_live_stream_capacity_is_rendered_below_tritons_candidate_sequences():
    """The pipeline admits max_live_sequences streams (default: half of Triton's candidate sequences, the other
    half holding refused STARTs until their END); a capacity Triton could not hold is refused at render and load."""
    def capacity(**serving):
        pb = parse(repository.render_pipeline_config("local", "tiny", repository.ServingOptions(**serving)))
        return int(pb.parameters["max_live_sequences"].string_value), pb.sequence_batching.oldest.max_candidate_sequences
    assert capacity() == (16, 32)
    assert capacity(max_candidate_sequences=8, max_live_sequences=3) == (3, 8)
    for bad in ({"max_live_sequences": 32}, {"max_live_sequences": -1}):
        with pytest.raises(ValueError, match="max_live_sequences"):
            repository.ServingOptions(**bad)
    pb = parse(repository.render_pipeline_config("local", "tiny"))
    pb.parameters["max_live_sequences"].string_value = "32"
    with pytest.raises(ConfigError, match=r"max_live_sequences \(32\).*max_candidate_sequences \(32\)"):
        PipelineBackend.from_config(as_triton_json(pb), runner=None)
