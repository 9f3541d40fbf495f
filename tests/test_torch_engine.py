"""The runtime layer's torch kind (torch_engine.TorchEngine, built from plan entries) as far as a CPU runs it: fp32
index maths of the grid sample under autocast, precision handling, graph bookkeeping; the CUDA-graph replay itself
needs a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from liveportrait_triton import runtimes, spec
from liveportrait_triton.networks.grid_sample import grid_sample_3d
from liveportrait_triton.networks.served import ServedModel
from liveportrait_triton.pipeline import TorchRunner
from liveportrait_triton.torch_engine import TorchEngine

CUDA = torch.cuda.is_available()


def volume_and_grid(seed: int = 0):
    """A LivePortrait-like sample: volume (2, 4, 16, 64, 64), grid of (x, y, z) in [-1.05, 1.05] (some outside)."""
    g = torch.Generator().manual_seed(seed)
    volume = torch.randn(2, 4, 16, 64, 64, generator=g)
    grid = torch.rand(2, 16, 64, 64, 3, generator=g) * 2.1 - 1.05
    return volume, grid


@pytest.mark.parametrize("mode", ["decomposed", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grid_sample_keeps_fp32_under_autocast(mode, dtype):
    volume, grid = volume_and_grid()
    want = grid_sample_3d(volume, grid, mode)
    with torch.autocast("cpu", dtype=dtype):
        got = grid_sample_3d(volume, grid, mode)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reduced_precision_index_maths_would_sample_elsewhere():
    """Why the guard exists: the same gather with its grid in bf16 lands on other voxels (so the test above can
    fail)."""
    volume, grid = volume_and_grid()
    want = grid_sample_3d(volume, grid, "decomposed")
    coarse = grid_sample_3d(volume, grid.to(torch.bfloat16).float(), "decomposed")
    assert (coarse - want).abs().max() > 0.1


def test_fp32_runner_on_cpu_equals_the_in_process_reference(tiny_networks):
    import copy
    networks = copy.deepcopy(tiny_networks)
    reference = TorchRunner(tiny_networks)
    rng = np.random.default_rng(0)
    for model, model_spec in spec.submodel_specs("tiny").items():
        entry = runtimes.RuntimePlanEntry.of(model, "torch")
        assert (entry.device, entry.precision) == ("cpu", "fp32")
        runner = runtimes.create_subnetwork(entry, model_spec, networks=networks)
        engine = runner.session
        assert isinstance(engine, TorchEngine) and engine.graph_batch_sizes == frozenset()
        assert "CUDA device" in engine.graphs_unavailable
        inputs = {t.name: rng.uniform(0, 1, (2, *t.shape)).astype(np.float32) for t in model_spec.inputs}
        got, want = runner.run(inputs), reference.run(model, inputs)
        assert sorted(got) == sorted(model_spec.output_names), model
        for name in model_spec.output_names:
            assert isinstance(got[name], np.ndarray) and got[name].dtype == model_spec.output(name).numpy_dtype
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{model}.{name}")
        # torch tensors in: torch tensors out, on the runner's device
        torch_out = runner.run({k: torch.from_numpy(v) for k, v in inputs.items()})
        assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in torch_out.values())
        assert engine.calls["eager"] == 2 and not engine.calls["replay"]


def test_reduced_precision_runner_stays_close_and_returns_spec_dtypes(tiny_networks):
    import copy
    model_spec = spec.submodel_specs("tiny")[spec.WARPING]
    runner = runtimes.create_subnetwork(runtimes.RuntimePlanEntry.of(spec.WARPING, "torch", precision="bf16"),
                                        model_spec, networks=copy.deepcopy(tiny_networks))
    reference = TorchRunner(tiny_networks)
    rng = np.random.default_rng(1)
    inputs = {"feature_volume": rng.standard_normal((1, *model_spec.input("feature_volume").shape)).astype(np.float32),
              "kp_source": rng.uniform(-0.5, 0.5, (1, 21, 3)).astype(np.float32),
              "kp_driving": rng.uniform(-0.5, 0.5, (1, 21, 3)).astype(np.float32)}
    got, want = runner.run(inputs), reference.run(spec.WARPING, inputs)
    for name in model_spec.output_names:
        assert got[name].dtype == np.float32
        scale = max(1.0, float(np.abs(want[name]).max()))
        assert float(np.abs(got[name] - want[name]).max()) <= 0.1 * scale, name   # bf16: 8 mantissa bits


def test_unknown_precision_is_refused(tiny_networks):
    with pytest.raises(runtimes.RuntimeLoadError, match=r"runtime 'torch' runs in \['fp32', 'fp16', 'bf16'\], not 'int8'"):
        runtimes.RuntimePlanEntry.of(spec.WARPING, "torch", precision="int8")
    model_spec = spec.submodel_specs("tiny")[spec.WARPING]
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchEngine(ServedModel(tiny_networks, model_spec), device="cpu", precision="int8")


@pytest.mark.skipif(not CUDA, reason="CUDA graph capture and replay need a CUDA GPU (none here); the device "
                                     "check (scripts/device_check.sh) runs this on one")
def test_cuda_graph_replay_equals_eager(tiny_networks):
    import copy
    model_spec = spec.submodel_specs("tiny")[spec.GENERATOR]
    graphs = TorchEngine(ServedModel(copy.deepcopy(tiny_networks), model_spec), "cuda", "fp16", graph_batch_sizes=(2,))
    eager = TorchEngine(ServedModel(copy.deepcopy(tiny_networks), model_spec), "cuda", "fp16", graph_batch_sizes=())
    x = torch.rand(2, *model_spec.input("warped_feature").shape, device="cuda")
    for _ in range(3):
        a, b = graphs.run({"warped_feature": x}), eager.run({"warped_feature": x})
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-3)
    assert graphs.calls["capture"] == 1 and graphs.calls["replay"] == 3
