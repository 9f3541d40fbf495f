"""The one runtime plan: every runner of a sub-network is built by runtimes.create_subnetwork from a plan entry,
and the layers below the exporter never import it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO
from liveportrait_triton import runtimes, spec

# The runtime objects only the runtime layer constructs (in create_subnetwork and its helpers).
RUNNER_CONSTRUCTORS = {"SubnetworkRunner", "TorchEngine", "TensorRTEngine", "InferenceSession", "compile_model",
                       "TorchCudaRunner", "EngineRunner"}
RUNTIME_LAYER = {REPO / "liveportrait_triton" / "runtimes.py"}
# the client's face detector and landmark models are not served sub-networks (no spec, no plan)
NOT_SUBNETWORKS = {("client/faces.py", "InferenceSession")}
PACKAGE_FOLDERS = ("liveportrait_triton", "export", "benchmarks", "client", "docker", "model_repository")
# the server side of the package, below the exporter
BELOW_EXPORT = ("liveportrait_triton/runtimes.py", "liveportrait_triton/torch_engine.py",
                "liveportrait_triton/tensorrt_engine.py", "liveportrait_triton/pipeline.py",
                "liveportrait_triton/repository.py", "liveportrait_triton/backend", "liveportrait_triton/networks")


def python_files(*folders: str) -> list[Path]:
    files = []
    for folder in folders:
        path = REPO / folder
        files += [path] if path.suffix == ".py" else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return files


def called_names(path: Path) -> list[tuple[str, int]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name:
                names.append((name, node.lineno))
    return names


def test_runners_are_built_only_by_the_runtime_layer():
    """No code outside runtimes.py constructs a sub-network runner or a runtime session: every runner comes from
    runtimes.create_subnetwork and a plan entry (server, in-process pipeline, export validation, benchmarks,
    device check)."""
    found = [f"{p.relative_to(REPO)}:{line} {name}(...)" for p in python_files(*PACKAGE_FOLDERS)
             if p not in RUNTIME_LAYER for name, line in called_names(p) if name in RUNNER_CONSTRUCTORS
             and (p.relative_to(REPO).as_posix(), name) not in NOT_SUBNETWORKS]
    assert not found, "runners built outside runtimes.create_subnetwork: " + ", ".join(found)


def test_the_check_above_can_fail(tmp_path):
    bad = tmp_path / "side_door.py"
    bad.write_text("from liveportrait_triton.torch_engine import TorchEngine\nengine = TorchEngine(served)\n")
    assert ("TorchEngine", 2) in called_names(bad)


def test_server_side_never_imports_the_exporter():
    """runtimes, the engines, the pipeline, the renderer, the backend and the networks look only down: no import of
    liveportrait_triton.export (the exporter looks down at them, never the reverse)."""
    found = []
    for path in python_files(*BELOW_EXPORT):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                       [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(m == "export" or m.startswith("export.") or ".export" in f".{m}" and "export" in m.split(".")
                   for m in modules):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"imports of export below it: {found}"


def test_served_adapter_builds_its_runner_from_the_reported_entry():
    """The sub-network adapter has one way to a runner: Subnetwork.from_config reads the plan entry from the config
    and calls runtimes.create_subnetwork; there is no other dispatch (no weights_dir, no torch side path)."""
    text = (REPO / "liveportrait_triton" / "backend" / "subnetwork.py").read_text()
    assert "runtimes.create_subnetwork(" in text and "weights_dir" not in text and "TorchSubnetwork" not in text
    for path in python_files(*PACKAGE_FOLDERS):
        assert "subnetwork_runtime" not in path.read_text(), path


def test_plan_defaults_and_round_trip():
    plan = runtimes.runtime_plan("local")
    assert list(plan) == list(spec.SUBMODELS)
    for model, entry in plan.items():
        assert runtimes.RuntimePlanEntry.from_parameters(model, entry.parameters()) == entry
    trt = runtimes.RuntimePlanEntry.of(spec.WARPING, "tensorrt")
    assert (trt.device, trt.precision, trt.artefact) == ("cuda", "fp16", "model.plan")
    cuda = runtimes.uniform_plan("torch", "cuda:1")[spec.GENERATOR]
    assert (cuda.kind, cuda.device, cuda.precision, cuda.artefact) == ("torch", "cuda:1", "fp16", "model.pt")
    assert runtimes.RuntimePlanEntry.of(spec.GENERATOR, "openvino_fastconv").artefact == "model_fastconv.onnx"
    assert cuda.describe() == "spade_generator runs torch on cuda:1 in fp16 from model.pt"
    with pytest.raises(runtimes.RuntimeLoadError, match="loads model.pt, not 'model.onnx'"):
        runtimes.RuntimePlanEntry(spec.WARPING, "torch", artefact="model.onnx")
    with pytest.raises(runtimes.RuntimeLoadError, match="no served sub-network 'liveportrait'"):
        runtimes.RuntimePlanEntry(spec.PIPELINE, "torch")
