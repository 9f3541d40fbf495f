"""TensorRT engine building, up to where a GPU is needed: profiles from the spec, precision policy, tolerances,
pre-flight checks and clear errors. (Building and checking engines runs on a GPU machine: see export/tensorrt_cli.py.)
"""
from __future__ import annotations

import importlib.util

import pytest

from liveportrait_triton import spec
from liveportrait_triton.cli import main as cli_main
from liveportrait_triton.export.onnx_export import export_model, grid_sample_mode, model_path
from liveportrait_triton.export.sample_inputs import sample_inputs
from liveportrait_triton.networks.served import served_models
from liveportrait_triton.export.tensorrt_build import (engine_bound,
                                                       engine_precision, preflight, profile_shapes)
from liveportrait_triton.tensorrt_engine import TensorRTError, require_cuda_torch
from liveportrait_triton.pipeline import TorchRunner
from liveportrait_triton.runtimes import RuntimeLoadError, RuntimePlanEntry, create_subnetwork

TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes_follow_the_spec():
    w = spec.submodel_specs("full")[spec.WARPING]
    shapes = profile_shapes(w, opt_batch=8)
    assert list(shapes) == ["feature_volume", "kp_source", "kp_driving"]
    assert shapes["feature_volume"] == ((1, 32, 16, 64, 64), (8, 32, 16, 64, 64), (16, 32, 16, 64, 64))
    assert shapes["kp_driving"] == ((1, 21, 3), (8, 21, 3), (16, 21, 3))
    eye = profile_shapes(spec.submodel_specs("tiny")[spec.RETARGET_EYE])
    assert eye["eye_ratio"] == ((1, 3), (4, 3), (16, 3))
    for bad in ({"opt_batch": 0}, {"opt_batch": 17, "max_batch": 17}, {"opt_batch": 8, "max_batch": 4}):
        with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch <= 16"):
            profile_shapes(w, **bad)


def test_precision_policy():
    assert engine_precision(spec.MOTION, "fp16") == "fp32"
    for model in (spec.STITCHING, spec.RETARGET_EYE, spec.RETARGET_LIP):
        assert engine_precision(model, "fp16") == "fp32"
    for model in (spec.APPEARANCE, spec.WARPING, spec.GENERATOR):
        assert engine_precision(model, "fp16") == "fp16"
        assert engine_precision(model, "fp32") == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        engine_precision(spec.GENERATOR, "int8")


def test_every_output_has_engine_bounds():
    """Float outputs: relative bounds; the generator's uint8 image: grey levels (1 in FP32). FP16 engines are held
    to the one table of drift bounds (precision.BOUNDS), the same as every reduced precision."""
    from liveportrait_triton.precision import BOUNDS
    for model, model_spec in spec.submodel_specs("full").items():
        for t in model_spec.outputs:
            precision = engine_precision(model, "fp16")
            ceiling = BOUNDS["levels" if t.dtype == "UINT8" else "relative"].max
            assert 0 < engine_bound(model, t.name, "fp32") <= engine_bound(model, t.name, precision) <= ceiling
    assert engine_bound(spec.GENERATOR, "image", "fp32") == 1
    assert engine_bound(spec.GENERATOR, "image", "fp16") == BOUNDS["levels"].max
    assert engine_bound(spec.MOTION, "kp", "fp16") == engine_bound(spec.MOTION, "kp", "fp32")     # M stays fp32


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="tensorrt is installed here")
def test_tensorrt_kind_says_what_is_missing(tmp_path):
    """The runtime layer's tensorrt kind, where TensorRT is absent: a clear load error, not an ImportError."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(RuntimeLoadError, match="tensorrt is not installed"):
        create_subnetwork(RuntimePlanEntry.of(spec.GENERATOR, "tensorrt"), spec.submodel_specs("tiny")[spec.GENERATOR],
                          artefact=plan)
    with pytest.raises(RuntimeLoadError, match="run `liveportrait-triton tensorrt`"):
        create_subnetwork(RuntimePlanEntry.of(spec.GENERATOR, "tensorrt"), spec.submodel_specs("tiny")[spec.GENERATOR],
                          artefact=tmp_path / "none.plan")


@pytest.fixture(scope="module")
def tiny_warping_exports(tiny_networks, tmp_path_factory):
    """The tiny W exported with each grid-sample implementation: {mode: repository}."""
    served = served_models(tiny_networks)
    runner = TorchRunner(tiny_networks)
    with grid_sample_mode(tiny_networks, "native"):
        example = sample_inputs(runner, 2)[spec.WARPING]
    out = {}
    for mode, opset in (("decomposed", 17), ("native", 20)):
        out[mode] = tmp_path_factory.mktemp(f"trt_{mode}")
        with grid_sample_mode(tiny_networks, mode):
            export_model(served[spec.WARPING], example, model_path(out[mode], spec.WARPING), opset)
    return out


def test_preflight_rejects_native_grid_sample(tiny_warping_exports):
    preflight(model_path(tiny_warping_exports["decomposed"], spec.WARPING), spec.WARPING)
    with pytest.raises(TensorRTError, match="GridSample op on 5-D inputs, which TensorRT 10 cannot build; "
                                            "export with `--grid-sample decomposed`"):
        preflight(model_path(tiny_warping_exports["native"], spec.WARPING), spec.WARPING)


def test_cli_missing_onnx(tmp_path, capsys):
    code = cli_main(["tensorrt", "--repository", str(tmp_path), "--config", "tiny", "--models", spec.GENERATOR])
    assert code == 2
    assert f"{model_path(tmp_path, spec.GENERATOR)} not found: run `liveportrait-triton export` first" in \
        capsys.readouterr().err


def test_cli_needs_config_without_manifest(tiny_warping_exports, capsys):
    code = cli_main(["tensorrt", "--repository", str(tiny_warping_exports["decomposed"]), "--models", spec.WARPING])
    assert code == 2
    assert "pass --config full|tiny" in capsys.readouterr().err


def test_cli_rejects_check_batch_beyond_profile(tiny_warping_exports, capsys):
    code = cli_main(["tensorrt", "--repository", str(tiny_warping_exports["decomposed"]), "--models", spec.WARPING,
                     "--config", "tiny", "--max-batch", "8", "--check-batches", "1,12"])
    assert code == 2
    assert "check batches <= --max-batch" in capsys.readouterr().err


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="tensorrt is installed here")
def test_cli_without_tensorrt(tiny_warping_exports, capsys):
    code = cli_main(["tensorrt", "--repository", str(tiny_warping_exports["decomposed"]), "--models", spec.WARPING,
                     "--config", "tiny"])
    assert code == 2
    assert "tensorrt is not installed" in capsys.readouterr().err


def test_engine_checks_need_cuda_pytorch():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible to PyTorch here")
    with pytest.raises(TensorRTError, match=r"needs a CUDA build of PyTorch and a GPU .*pass --no-check"):
        require_cuda_torch()


def gpu_with_tensorrt() -> str | None:
    """None where engines can be built and checked here, else why not."""
    import torch
    if not TENSORRT_INSTALLED:
        return "tensorrt is not installed (pip extra `tensorrt`)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    return None


@pytest.mark.slow
@pytest.mark.skipif(gpu_with_tensorrt() is not None, reason=f"needs a GPU and TensorRT: {gpu_with_tensorrt()}")
def test_builds_and_checks_an_engine_on_the_gpu(tiny_warping_exports, capsys):
    """Where a GPU and TensorRT are present this runs: W (decomposed grid sample) built and checked against ONNX
    Runtime at batch 1 and 2 within its engine bounds; the plan is written beside the ONNX file."""
    repository = tiny_warping_exports["decomposed"]
    code = cli_main(["tensorrt", "--repository", str(repository), "--models", spec.WARPING, "--config", "tiny",
                     "--max-batch", "4", "--opt-batch", "2", "--check-batches", "1,2", "--repeats", "2"])
    assert code == 0, capsys.readouterr().err
    plan = model_path(repository, spec.WARPING).with_name("model.plan")
    assert plan.is_file() and plan.stat().st_size > 0
