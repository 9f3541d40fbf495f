"""Every CPU runtime of `local_runtimes` on every sub-network (tiny networks): outputs bound by spec name, within the
export's tolerances of PyTorch eager at batch 1 and 3, and clear errors for what cannot run."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from liveportrait_triton import local_runtimes as LR
from liveportrait_triton import spec
from liveportrait_triton.benchmarks.inputs import batch_of, record_submodel_inputs
from liveportrait_triton.pipeline import Animator, DrivingFrame, TorchRunner

KINDS = [pytest.param(k, marks=pytest.mark.skipif(k == "openvino" and importlib.util.find_spec("openvino") is None,
                                                   reason="OpenVINO is not installed (optional runtime)"))
         for k in LR.KINDS]


@pytest.fixture(scope="module")
def inputs(tiny_networks, source_crops, driving_crops):
    """Batches of 3 of what each sub-network sees while the pipeline animates real crops."""
    samples = record_submodel_inputs(TorchRunner(tiny_networks), source_crops["s0"], driving_crops[:3])
    return {model: batch_of(samples[model], 3) for model in spec.SUBMODELS}


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_matches_pytorch(kind, tiny_networks, tiny_repository, inputs):
    reference = TorchRunner(tiny_networks)
    for model in spec.SUBMODELS:
        session = LR.create_session(kind, model, networks=tiny_networks, threads=2,
                                    onnx_path=LR.onnx_file(tiny_repository, model))
        assert session.model == model and session.kind == kind
        for batch in (1, 3):
            feeds = {k: v[:batch] for k, v in inputs[model].items()}
            outputs = session.run(feeds)
            expected = reference.run(model, feeds)
            assert list(outputs) == spec.submodel_specs("tiny")[model].output_names
            for name, (diff, bound, ok) in LR.parity(outputs, expected, model).items():
                assert outputs[name].shape == expected[name].shape
                assert ok, f"{kind} {model}.{name} batch {batch}: max abs diff {diff:.2e} > {bound:.1e}"


def test_runner_animates_like_pytorch(tiny_networks, tiny_repository, source_crops, driving_crops):
    """A mixed RuntimeRunner drives the whole Animator; frames match the PyTorch pipeline within one level."""
    choice = {m: "onnxruntime" for m in spec.SUBMODELS} | {spec.WARPING: "torchscript"}
    images = {}
    for name, runner in (("torch", TorchRunner(tiny_networks)),
                         ("mixed", LR.create_runner(choice, networks=tiny_networks, repository=tiny_repository))):
        animator = Animator(runner)
        [state] = animator.register_sources([source_crops["s0"]], [spec.parse_options({})])
        images[name] = [animator.animate([state], [DrivingFrame(crop=c)])[0] for c in driving_crops[:2]]
    for got, want in zip(images["mixed"], images["torch"]):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_errors_name_the_problem(tiny_networks, tmp_path):
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        LR.create_session("tensorflow", spec.WARPING, networks=tiny_networks)
    with pytest.raises(ValueError, match="pass networks="):
        LR.create_session("torchscript", spec.WARPING)
    with pytest.raises(FileNotFoundError, match="liveportrait-triton export"):
        LR.create_session("onnxruntime", spec.WARPING, onnx_path=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="no runtime chosen"):
        LR.create_runner({spec.WARPING: "torch"}, networks=tiny_networks)
    session = LR.create_session("torch", spec.STITCHING, networks=tiny_networks)
    with pytest.raises(KeyError, match="missing input"):
        session.run({"kp_source": np.zeros((1, 21, 3), np.float32)})
    with pytest.raises(ValueError, match="expected \\[batch, 21, 3\\]"):
        session.run({"kp_source": np.zeros((1, 21, 2), np.float32), "kp_driving": np.zeros((1, 21, 3), np.float32)})
