"""Every kind of the runtime layer (runtimes.py) on every sub-network (tiny networks): outputs bound by spec name,
within the export's validation rule of PyTorch eager at batch 1 and 3, a mixed runner animating like PyTorch, FLOPs
counted from the layers, and clear errors for what cannot run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from liveportrait_triton import runtimes, spec
from liveportrait_triton.benchmarks import flops
from liveportrait_triton.benchmarks.inputs import batch_of, record_submodel_inputs
from liveportrait_triton.benchmarks.runtime_choice import parity, timed_subnetwork
from liveportrait_triton.pipeline import Animator, DrivingFrame, TorchRunner

CPU_KINDS = ("torch", "onnxruntime", "openvino", "openvino_fastconv")
TINY = spec.submodel_specs("tiny")


@pytest.fixture(scope="module")
def inputs(tiny_networks, source_crops, driving_crops):
    """Batches of 3 of what each sub-network sees while the pipeline animates real crops."""
    samples = record_submodel_inputs(TorchRunner(tiny_networks), source_crops["s0"], driving_crops[:3])
    return {model: batch_of(samples[model], 3) for model in spec.SUBMODELS}


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_runtime_matches_pytorch(kind, tiny_networks, tiny_repository, inputs):
    reference = TorchRunner(tiny_networks)
    for model in spec.SUBMODELS:
        runner = timed_subnetwork(kind, TINY[model], tiny_repository, tiny_networks, threads=2)
        assert runner.model == model and runner.kind == kind and runner.threads == 2
        assert runner.entry == runtimes.RuntimePlanEntry(model, kind, "cpu", "fp32", runtimes.ARTEFACT[kind])
        for batch in (1, 3):
            feeds = {k: v[:batch] for k, v in inputs[model].items()}
            outputs = runner.run(feeds)
            expected = reference.run(model, feeds)
            assert list(outputs) == TINY[model].output_names
            for name, (diff, bound, ok) in parity(outputs, expected, model).items():
                assert outputs[name].shape == expected[name].shape
                assert outputs[name].dtype == TINY[model].output(name).numpy_dtype
                assert ok, f"{kind} {model}.{name} batch {batch}: max abs diff {diff:.2e} > {bound:.1e}"


def test_openvino_serves_every_batch_size(tiny_networks, tiny_repository, inputs):
    """OpenVINO's graph is compiled at batch 1; batches of any size run item by item and give PyTorch's rows."""
    entry = runtimes.RuntimePlanEntry.of(spec.STITCHING, "openvino")
    runner = runtimes.create_subnetwork(entry, TINY[spec.STITCHING], threads=1, artefact=entry.path(tiny_repository))
    reference = TorchRunner(tiny_networks)
    many = {k: np.concatenate([v] * 3) for k, v in inputs[spec.STITCHING].items()}        # 9 rows
    for batch in (1, 2, 9):
        feeds = {k: v[:batch] for k, v in many.items()}
        np.testing.assert_allclose(runner.run(feeds)["delta"], reference.run(spec.STITCHING, feeds)["delta"],
                                   rtol=1e-5, atol=1e-6)


def test_runner_animates_like_pytorch(tiny_networks, tiny_repository, source_crops, driving_crops):
    """A mixed PlanRunner (the committed local choice) drives the whole Animator; frames match PyTorch within
    one level."""
    images = {}
    for name, runner in (("torch", TorchRunner(tiny_networks)),
                         ("served", runtimes.create_runner(runtimes.runtime_plan("local"), "tiny",
                                                           repository=tiny_repository))):
        animator = Animator(runner)
        [state] = animator.register_sources([source_crops["s0"]], [spec.parse_options({})])
        images[name] = [animator.animate([state], [DrivingFrame(crop=c)])[0] for c in driving_crops[:2]]
    for got, want in zip(images["served"], images["torch"]):
        assert got.dtype == np.uint8 and got.shape == (512, 512, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_layer_flops_count_convolutions_and_linears(tiny_networks, inputs):
    """Counted FLOPs equal the hand count for the stitching MLP and scale with the batch."""
    feeds = {k: v[:1] for k, v in inputs[spec.STITCHING].items()}
    linears = [m for m in tiny_networks.stitching.modules() if isinstance(m, torch.nn.Linear)]
    assert flops.layer_flops(tiny_networks, TINY[spec.STITCHING], feeds) == sum(
        2 * m.in_features * m.out_features for m in linears)
    one = flops.layer_flops(tiny_networks, TINY[spec.GENERATOR], {"warped_feature": inputs[spec.GENERATOR]["warped_feature"][:1]})
    assert one > 0 and flops.layer_flops(tiny_networks, TINY[spec.GENERATOR], inputs[spec.GENERATOR]) == 3 * one
    assert flops.gemm_rate(1, size=256, seconds=0.05) > 1e8


def test_errors_name_the_problem(tiny_networks, tmp_path):
    entry = runtimes.RuntimePlanEntry.of
    with pytest.raises(runtimes.RuntimeLoadError, match="unknown runtime 'tensorflow'"):
        entry(spec.WARPING, "tensorflow")
    with pytest.raises(runtimes.RuntimeLoadError, match="pass networks="):
        runtimes.create_subnetwork(entry(spec.WARPING, "torch"), TINY[spec.WARPING])
    with pytest.raises(runtimes.RuntimeLoadError, match="liveportrait-triton export"):
        runtimes.create_subnetwork(entry(spec.WARPING, "onnxruntime"), TINY[spec.WARPING],
                                   artefact=tmp_path / "missing.onnx")
    with pytest.raises(runtimes.RuntimeLoadError, match="plan entry of 'stitching' given the spec of 'warping_module'"):
        runtimes.create_subnetwork(entry(spec.STITCHING, "onnxruntime"), TINY[spec.WARPING])
    with pytest.raises(runtimes.RuntimeLoadError, match="'openvino' runs on the CPU, not on 'cuda'"):
        entry(spec.WARPING, "openvino", "cuda")
    with pytest.raises(runtimes.RuntimeLoadError, match="'tensorrt' runs on a CUDA device, not on 'cpu'"):
        entry(spec.WARPING, "tensorrt", "cpu")
    with pytest.raises(runtimes.RuntimeLoadError, match=r"'onnxruntime' runs in \['fp32'\], not 'fp16'"):
        entry(spec.WARPING, "onnxruntime", precision="fp16")
    with pytest.raises(runtimes.RuntimeLoadError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        entry(spec.WARPING, "torch", "gpu")
    with pytest.raises(runtimes.RuntimeLoadError, match="no kind for"):
        runtimes.create_runner({spec.WARPING: "torch"}, "tiny", networks=tiny_networks)
    runner = runtimes.create_subnetwork(entry(spec.STITCHING, "torch"), TINY[spec.STITCHING], networks=tiny_networks)
    with pytest.raises(KeyError, match="missing input"):
        runner.run({"kp_source": np.zeros((1, 21, 3), np.float32)})
    with pytest.raises(ValueError, match="expected \\[batch, 21, 3\\]"):
        runner.run({"kp_source": np.zeros((1, 21, 2), np.float32), "kp_driving": np.zeros((1, 21, 3), np.float32)})
