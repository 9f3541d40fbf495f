"""Reduced precision: machine classes, the plan's precision per class and its fallback at load, the drift figures,
the bounds refusing a choice outside them, `export --precision exact|reduced`, and a bf16 sub-network served on
this CPU within the bounds (tiny networks)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from liveportrait_triton import precision, repository, runtimes, spec
from liveportrait_triton.cli import main as cli_main
from liveportrait_triton.export.onnx_export import export_repository, model_path
from liveportrait_triton.runtimes import RuntimePlanEntry

LSCPU_SPR = ("fpu vme avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 avx512_vnni")
LSCPU_ZEN4 = ("fpu vme avx2 avx512f avx512bw avx512_bf16 avx512_vnni")
LSCPU_OLD = ("fpu vme avx2 fma avx512f")
NATIVE_BF16 = "bf16" in precision.native_precisions("cpu")


def test_machine_class_from_flags(tmp_path):
    assert precision.machine_class(LSCPU_SPR) == "amx"
    assert precision.machine_class(LSCPU_ZEN4) == "avx512_bf16"
    assert precision.machine_class(LSCPU_OLD) == "fp32"
    assert precision.machine_class({"amx_bf16"}) == "amx"
    assert precision.machine_class("") == "fp32"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {LSCPU_ZEN4}\n\nprocessor\t: 1\n")
    assert precision.machine_class(precision.cpu_flags(cpuinfo)) == "avx512_bf16"
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()
    assert precision.native_precisions("cpu", "fp32") == ("fp32",)
    assert precision.native_precisions("cpu", "amx") == precision.native_precisions("cpu", "avx512_bf16") == \
        ("fp32", "bf16")
    assert "fp16" in precision.native_precisions("cuda")
    with pytest.raises(ValueError, match="unknown machine class 'avx9'"):
        precision.native_precisions("cpu", "avx9")


def test_drift_figures_of_known_arrays():
    want = np.zeros((10, 10), np.uint8)
    got = want.copy()
    got[0, :5] = 2          # 5 values off by 2 levels
    got[1, 0] = 10          # 1 value off by 10
    d = precision.image_drift("img", got, want)
    assert (d.max, d.mean, d.over_1, d.over_4) == (10, 0.2, 0.06, 0.01)
    assert precision.within_bounds(d)
    f = precision.float_drift("feat", np.array([1.0, 2.0, 4.5]), np.array([1.0, 2.0, 4.0]))
    assert f.max == pytest.approx(0.5 / 4.0) and f.mean == pytest.approx((0.5 / 3) / (7 / 3))
    kp = np.zeros((1, 21, 3))
    moved = kp.copy()
    moved[0, 3, :2] = [3 / 128, 4 / 128]        # 5 px in the 256 crop; z does not count
    moved[0, 4, 2] = 1.0
    k = precision.keypoint_drift("kp", moved, kp)
    assert k.max == pytest.approx(5.0) and k.mean == pytest.approx(5.0 / 21) and k.unit == "px"
    assert precision.output_drift(spec.MOTION, "kp", moved.reshape(1, -1), kp.reshape(1, -1)).unit == "px"
    with pytest.raises(ValueError, match="two uint8 arrays of one shape"):
        precision.image_drift("img", got.astype(np.float32), want)


def test_bounds_refuse_a_choice_outside_them_with_the_figures():
    rng = np.random.default_rng(0)
    want = rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)
    fine = want + (rng.random(want.shape) < 0.3).astype(np.uint8)      # a third off by one level
    assert precision.check([precision.image_drift("fine", fine, want)], "fine choice")
    bad = want + (rng.random(want.shape) < 0.05).astype(np.uint8) * 6  # 5% off by 6 levels
    with pytest.raises(precision.DriftOutOfBounds) as refused:
        precision.check([precision.image_drift("spade_generator.image", bad, want)], "spade_generator on x/bf16")
    message = str(refused.value)
    assert "spade_generator on x/bf16 refused" in message and "max 6 levels" in message
    assert "% of values off by > 4 levels > 2%" in message
    keypoints = precision.keypoint_drift("motion_extractor.kp", np.full((1, 3), 0.01), np.zeros((1, 3)))
    assert precision.problems(keypoints) and "keypoints off by" in keypoints.describe()
    assert "| image (levels) | 48 | 1 | 2% |" in "\n".join(precision.bounds_markdown())


def test_plan_precision_per_machine_class_and_policy():
    exact = runtimes.runtime_plan("local")
    assert all(e.precision == "fp32" for e in exact.values())
    assert runtimes.runtime_plan("local", policy="reduced", machine="fp32") == exact
    amx = runtimes.runtime_plan("local", policy="reduced", machine="amx")
    assert amx[spec.GENERATOR] == RuntimePlanEntry(spec.GENERATOR, "openvino", "cpu", "bf16", "model.onnx")
    assert amx[spec.WARPING] == exact[spec.WARPING], "W in bf16 drifts beyond the bounds"
    zen4 = runtimes.runtime_plan("local", policy="reduced", machine="avx512_bf16")
    assert {m: e.label() for m, e in zen4.items() if not e.exact} == {spec.GENERATOR: "openvino/bf16"}
    assert {m: amx[m] for m in precision.ALWAYS_FP32} == {m: exact[m] for m in precision.ALWAYS_FP32}
    choice = json.loads(runtimes.RUNTIME_CHOICE_FILE.read_text())["targets"]["local"]["reduced"]
    assert set(choice) == set(precision.MACHINE_CLASSES)
    assert "not re-measured by this project" in choice["amx"]["source"]
    with pytest.raises(runtimes.RuntimeLoadError, match="always fp32"):
        RuntimePlanEntry(spec.MOTION, "torch", "cpu", "bf16")
    assert RuntimePlanEntry.of(spec.MOTION, "torch", "cuda").precision == "fp32"
    with pytest.raises(runtimes.RuntimeLoadError, match=r"runs in \['fp32'\], not 'bf16'"):
        RuntimePlanEntry(spec.GENERATOR, "onnxruntime", "cpu", "bf16")
    with pytest.raises(runtimes.RuntimeLoadError, match="unknown precision policy"):
        runtimes.runtime_plan("local", policy="fast")
    assert runtimes.parse_runtime_overrides([f"{spec.GENERATOR}=openvino/bf16"]) == {
        spec.GENERATOR: RuntimePlanEntry.of(spec.GENERATOR, "openvino", precision="bf16")}


def test_fallback_at_load_where_the_cpu_has_no_native_bf16(tmp_path, tiny_networks):
    """A served bf16 entry on a CPU of class fp32 loads its exact entry (never emulated bf16) and says so; where
    export wrote no artefact of the exact entry, the same kind in fp32."""
    from liveportrait_triton.backend.subnetwork import Subnetwork
    from liveportrait_triton.weights import save_network_file
    from liveportrait_triton.networks.served import NETWORK_FIELD
    entry = RuntimePlanEntry.of(spec.WARPING, "torch", precision="bf16")
    same, note = runtimes.native_entry(entry, "avx512_bf16")
    assert same == entry and note is None
    exact, note = runtimes.native_entry(entry, "fp32")
    assert exact == runtimes.runtime_plan("local")[spec.WARPING]
    assert note == (f"{spec.WARPING}: this CPU (machine class fp32) has no native bf16: running the exact choice "
                    f"{exact.label()} instead of torch/bf16")
    version = tmp_path / spec.WARPING / "1"
    version.mkdir(parents=True)
    save_network_file(tiny_networks, NETWORK_FIELD[spec.WARPING], version / "model.pt")
    served = Subnetwork.load(spec.submodel_specs("tiny")[spec.WARPING], entry, version, threads=1, machine="fp32")
    assert served.entry == RuntimePlanEntry.of(spec.WARPING, "torch") and "no native bf16" in served.fallback
    assert "export wrote no model_fastconv.onnx" in served.fallback
    if NATIVE_BF16:
        here = Subnetwork.load(spec.submodel_specs("tiny")[spec.WARPING], entry, version, threads=1)
        assert here.entry == entry and here.fallback is None


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_sub_network_exported_and_served_within_bounds(tmp_path, tiny_networks):
    """F in bf16 (torch autocast) validated by the drift bounds on this CPU, its feature volume and the image it
    gives through fp32 W and G (mean 0.96 levels here), with its exact entry exported beside it. W in bf16 is
    refused on these synthetic tiny networks: their random G turns W's half-percent feature drift into 2 levels
    of mean image drift. (The whole frame's drift is the bench's: full size, served vs exact.)"""
    from liveportrait_triton.export.validate import ValidationError
    reduced_f = RuntimePlanEntry.of(spec.APPEARANCE, "torch", precision="bf16")
    plan = runtimes.runtime_plan("local", {spec.APPEARANCE: reduced_f})
    [exported] = export_repository(tiny_networks, tmp_path, "decomposed", (1,), models=(spec.APPEARANCE,), plan=plan,
                                   log=lambda _: None)
    exact = runtimes.runtime_plan("local")[spec.APPEARANCE]
    assert [(c.kind, c.precision) for c in exported.comparisons] == [
        ("onnxruntime", "fp32"), ("torch", "bf16"), (exact.kind, "fp32")]
    reduced = exported.comparisons[1]
    assert [d.what for d in reduced.drift] == [f"{spec.APPEARANCE}.feature_volume",
                                               f"{spec.APPEARANCE} -> {spec.GENERATOR}.image (fp32 downstream)"]
    assert not reduced.failures and all(d.mean > 0 for d in reduced.drift)
    assert (model_path(tmp_path, spec.APPEARANCE).parent / "model.pt").is_file()
    manifest_free = [c for c in exported.comparisons if c.precision == "fp32"]
    assert all(not c.drift and not c.failures for c in manifest_free)
    with pytest.raises(ValidationError, match=r"warping_module on torch/bf16 at batch 1: warping_module -> "
                                              r"spade_generator.image \(fp32 downstream\): max \d+ levels"):
        export_repository(tiny_networks, tmp_path / "w", "decomposed", (1,), models=(spec.WARPING,), log=lambda _: None,
                          plan=runtimes.runtime_plan("local", {spec.WARPING: RuntimePlanEntry.of(
                              spec.WARPING, "torch", precision="bf16")}))


def test_export_refuses_a_reduced_choice_outside_the_bounds(tmp_path, tiny_networks):
    """The Winograd graph of G in bf16 amplifies rounding beyond the bounds: export refuses it, with the figures."""
    from liveportrait_triton.export.validate import ValidationError
    if not NATIVE_BF16:
        pytest.skip("this CPU has no native bf16")
    plan = runtimes.runtime_plan("local", {spec.GENERATOR: RuntimePlanEntry.of(spec.GENERATOR, "openvino_fastconv",
                                                                               precision="bf16")})
    with pytest.raises(ValidationError) as refused:
        export_repository(tiny_networks, tmp_path, "decomposed", (1,), models=(spec.GENERATOR,), plan=plan,
                          log=lambda _: None)
    message = str(refused.value)
    assert "spade_generator on openvino_fastconv/bf16 at batch 1: spade_generator.image: max" in message
    assert "levels, mean" in message and "> 1" in message
    assert not model_path(tmp_path, spec.GENERATOR).exists()
    # the same entry as the reduced policy's choice (not asked for by name): refused, the exact entry served
    [exported] = export_repository(tiny_networks, tmp_path, "decomposed", (1,), models=(spec.GENERATOR,), plan=plan,
                                   log=lambda _: None, exact_where_refused=(spec.GENERATOR,))
    assert exported.served == runtimes.runtime_plan("local")[spec.GENERATOR]
    assert len(exported.refused) == 1 and "openvino_fastconv/bf16" in exported.refused[0]
    assert model_path(tmp_path, spec.GENERATOR).is_file()


def test_export_precision_option(tmp_path, capsys):
    """`--precision exact` renders the exact (fp32) plan, the same as fp32; reduced (the default) the choice of
    this machine's class; fp16 is refused on the local target."""
    code = cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path / "exact"),
                     "--validate-batches", "1", "--precision", "exact"])
    assert code == 0, capsys.readouterr().err
    assert repository.served_plan(tmp_path / "exact") == runtimes.runtime_plan("local")
    assert "precision policy exact:" in capsys.readouterr().out
    manifest = json.loads((model_path(tmp_path / "exact", spec.GENERATOR).parent / "export.json").read_text())
    assert (manifest["precision"], manifest["tensorrt_precision"]) == ("exact", "fp32")
    code = cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path / "half"),
                     "--precision", "fp16"])
    assert code == 2 and "--precision fp16 is a TensorRT engine precision" in capsys.readouterr().err
    from liveportrait_triton.export.cli import precision_policy
    assert precision_policy("local", None) == precision_policy("local", "reduced") == "reduced"
    assert precision_policy("local", "fp32") == "exact"
    assert precision_policy("ngc", None) == precision_policy("ngc", "reduced") == "fp16"
    assert precision_policy("ngc", "exact") == "fp32"


def test_serve_prints_the_active_precision_of_every_sub_network(tmp_path):
    from liveportrait_triton.serve import active_precisions
    plan = runtimes.runtime_plan("local", policy="reduced", machine="amx")
    repository.write_repository_configs(tmp_path, "local", "tiny", plan=plan)
    lines = active_precisions(tmp_path)
    assert lines[0] == f"precision (machine class {precision.machine_class()}):"
    assert len(lines) == 1 + len(spec.SUBMODELS)
    if NATIVE_BF16:
        assert f"  {spec.GENERATOR}: openvino/bf16" in lines and f"  {spec.MOTION}: openvino/fp32" in lines
    assert active_precisions(tmp_path / "nothing") == []
