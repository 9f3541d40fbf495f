"""The device-resident pipeline path: per-sequence state and the W -> G hand-over stay where the sub-networks run.

GPU memory does not exist here, so `SimulatedGpuBls` stands in for the Python backend's BLS API (pb_utils) ONLY to
report GPU memory for outputs asked in it; behind it the real tiny networks run (TorchRunner), and the BlsRunner,
Animator and DLPack interop under test are the real ones. The CPU paths (`numpy`, `torch-cpu`) also run on the
real bundled server (bottom), compared with the in-process pipeline.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import assert_images_close, rendered_copy
from liveportrait_triton import spec
from liveportrait_triton.backend.bls import BlsRunner
from liveportrait_triton.backend.model_config import ConfigError
from liveportrait_triton.pipeline import Animator, DrivingFrame, TorchRunner

CPU, GPU = 0, 1


@dataclasses.dataclass(frozen=True)
class PreferredMemory:
    preferred_memory_type: int
    preferred_device_id: int


class SimulatedTensor:
    """A pb_utils.Tensor in CPU or (simulated) GPU memory; its data is a CPU torch tensor either way."""

    def __init__(self, name: str, data: torch.Tensor, memory: int = CPU):
        self._name, self.data, self.memory = name, data, memory

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.utils.dlpack.from_dlpack(capsule))

    def name(self):
        return self._name

    def is_cpu(self):
        return self.memory == CPU

    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()


class SimulatedResponse:
    def __init__(self, tensors):
        self.tensors = tensors

    def has_error(self):
        return False


class SimulatedGpuBls:
    """The pb_utils names BlsRunner uses; requests run the real tiny networks and answer in the memory asked.
    `asked` records (model, memory type) per request."""
    TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_GPU = CPU, GPU
    PreferredMemory = PreferredMemory
    Tensor = SimulatedTensor

    def __init__(self, networks):
        self.networks = TorchRunner(networks)
        self.asked: list[tuple[str, int]] = []
        bls = self

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory):
                self.model, self.outputs, self.inputs = model_name, requested_output_names, inputs
                self.memory = preferred_memory.preferred_memory_type

            def exec(self):
                bls.asked.append((self.model, self.memory))
                out = bls.networks.run(self.model, {t.name(): t.data.numpy() for t in self.inputs})
                return SimulatedResponse({n: SimulatedTensor(n, torch.from_numpy(out[n]), self.memory)
                                          for n in self.outputs})

        self.InferenceRequest = InferenceRequest

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return response.tensors.get(name)


OPTIONS = [spec.parse_options({}), spec.parse_options({"stitching": False}), spec.parse_options({"anchor": "source"})]


def animate(runner, sources, driving, frames: int = 2) -> list[list[np.ndarray]]:
    """Three streams registered in one batch, then `frames` batches of one driving frame each."""
    animator = Animator(runner)
    states = animator.register_sources([sources["s0"], sources["s1"], sources["s0"]], OPTIONS)
    return [animator.animate(states, [DrivingFrame(crop=driving[(k + i) % len(driving)]) for i in range(3)])
            for k in range(frames)], states


@pytest.fixture(scope="module")
def paths(tiny_networks, source_crops, driving_crops):
    """Frames, states, runner and simulated BLS of each tensor path."""
    out = {}
    for path in ("numpy", "torch-cpu", "torch-gpu"):
        bls = SimulatedGpuBls(tiny_networks)
        runner = BlsRunner(bls, "tiny", path)
        frames, states = animate(runner, source_crops, driving_crops)
        out[path] = (frames, states, runner, bls)
    return out


def test_gpu_path_copies_only_the_final_image_to_the_host(paths):
    frames, states, runner, bls = paths["torch-gpu"]
    # two batches of three streams: one device->host copy of the uint8 image per batch, nothing else comes back
    assert runner.device_to_host == {f"{spec.GENERATOR}.image": 2}
    # into device memory go only the source crops (once) and the driving keypoints per batch: W's feature volume
    # and G's input never leave the device
    assert runner.host_to_device == {f"{spec.APPEARANCE}.image": 1, f"{spec.WARPING}.kp_source": 2,
                                     f"{spec.WARPING}.kp_driving": 2}
    memory = {}
    for model, asked in bls.asked:
        memory.setdefault(model, set()).add(asked)
    assert memory == {spec.APPEARANCE: {GPU}, spec.WARPING: {GPU}, spec.GENERATOR: {GPU}, spec.MOTION: {CPU},
                      spec.STITCHING: {CPU}}
    volume = spec.submodel_specs("tiny")[spec.WARPING].input("feature_volume")
    for state in states:
        assert isinstance(state.feature_volume, torch.Tensor) and state.feature_volume.shape == (1, *volume.shape)
        assert state.feature_volume.dtype == torch.float32 and state.nbytes == volume.nbytes
    assert all(isinstance(image, np.ndarray) and image.dtype == np.uint8 for batch in frames for image in batch)


def test_host_paths_count_no_transfers(paths):
    for path in ("numpy", "torch-cpu"):
        _, states, runner, bls = paths[path]
        assert not runner.host_to_device and not runner.device_to_host, path
        assert {memory for _, memory in bls.asked} == {CPU}, path
    assert isinstance(paths["numpy"][1][0].feature_volume, np.ndarray)
    assert isinstance(paths["torch-cpu"][1][0].feature_volume, torch.Tensor)


def test_every_tensor_path_gives_identical_frames(paths):
    reference = paths["numpy"][0]
    for path in ("torch-cpu", "torch-gpu"):
        for k, (want, got) in enumerate(zip(reference, paths[path][0])):
            for i, (a, b) in enumerate(zip(want, got)):
                assert a.shape == (512, 512, 3) and np.array_equal(a, b), f"{path}: batch {k} stream {i}"
    # and the three streams really differ (the comparison above can fail)
    assert not np.array_equal(reference[0][0], reference[0][1])


def test_unknown_tensor_path_is_refused(tiny_networks):
    with pytest.raises(ConfigError, match="bls_tensors must be one of"):
        BlsRunner(SimulatedGpuBls(tiny_networks), "tiny", "cuda")


# -- the CPU device-resident path on the real bundled server ----------------------------------------------------

@pytest.mark.server
def test_served_torch_path_matches_in_process(tiny_repository, tmp_path, tiny_networks,
                                              source_crops, driving_crops):
    """The GPU serving configuration with CPU for the GPU: torch tensors through the real stub's DLPack
    (pb_utils.Tensor.from_dlpack / torch.from_dlpack) and every sub-network on the plan entry torch/cpu/fp32 (the
    same entry as torch/cuda but its device), serving the network files model.pt. Each served model logs the plan
    entry it runs at load."""
    from test_server import frame_of, stream
    from liveportrait_triton import repository as rendering
    from liveportrait_triton import runtimes
    from liveportrait_triton.networks.served import NETWORK_FIELD
    from liveportrait_triton.serve import TritonServer
    from liveportrait_triton.weights import save_network_file
    plan = runtimes.uniform_plan("torch", "cpu")
    repository = rendered_copy(tiny_repository, tmp_path / "repository", plan=plan, bls_tensors="torch-cpu")
    for model, entry in plan.items():
        save_network_file(tiny_networks, NETWORK_FIELD[model], entry.path(repository))
    pipeline = rendering.config_parameters(rendering.read_config(repository / spec.PIPELINE / "config.pbtxt"))
    assert pipeline["bls_tensors"] == "torch-cpu"
    assert rendering.served_plan(repository) == plan
    animator = Animator(TorchRunner(tiny_networks))
    [state] = animator.register_sources([source_crops["s1"]], [spec.parse_options({})])
    want = [animator.animate([state], [DrivingFrame(crop=f)])[0] for f in driving_crops]
    requests = [{"arrays": {"source": source_crops["s1"]}, "sequence_id": 7, "sequence_start": True}]
    requests += [{"arrays": {"driving": f}, "sequence_id": 7, "sequence_end": i == len(driving_crops) - 1}
                 for i, f in enumerate(driving_crops)]
    with TritonServer(repository, log_file=tmp_path / "tritonserver.log") as server:
        results = stream(server.grpc_url, requests)
    log = (tmp_path / "tritonserver.log").read_text()
    for entry in plan.values():
        assert f"liveportrait_triton runtime plan: {entry.describe()}" in log
    for i, result in enumerate(results[1:]):
        index, image = frame_of(result)
        assert index == i
        assert_images_close(image, want[i], f"frame {i}")
