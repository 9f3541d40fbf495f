"""ONNX export: graphs match the spec, ONNX Runtime and OpenVINO (CPU) match PyTorch, the grid-sample variants
agree, the generator's uint8 image is the official parse_output, and the export command fails clearly on bad input.

Tolerances: export/validate.py `output_difference` (float outputs: TOLERANCES, max abs diff relative to
max(1, max |reference|); the uint8 image: one level, in at most UINT8_SHARE_DIFFERING of the values).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from liveportrait_triton import spec
from liveportrait_triton.cli import main as cli_main
from liveportrait_triton.export.onnx_export import OPSET, export_repository, grid_sample_mode, model_path
from liveportrait_triton.export.sample_inputs import fraction_inside_grid, sample_inputs
from liveportrait_triton.export.validate import (UINT8_SHARE_DIFFERING, ValidationError, check_graph, compare,
                                                 io_problems, output_difference)
from liveportrait_triton.networks.grid_sample import grid_sample_3d
from liveportrait_triton.pipeline import OnnxRunner, TorchRunner
from liveportrait_triton.repository import served_plan
from liveportrait_triton.runtimes import RuntimePlanEntry, create_subnetwork, runtime_plan

BATCHES = (1, 3)


@pytest.fixture(scope="module")
def tiny_repository(tiny_networks, tmp_path_factory):
    """Every tiny model exported with the default (decomposed) grid sample, validated at batch 1 and 3."""
    out = tmp_path_factory.mktemp("repository_tiny")
    exported = export_repository(tiny_networks, out, "decomposed", BATCHES, log=lambda _: None)
    assert [e.model for e in exported] == list(spec.SUBMODELS)
    return out


@pytest.fixture(scope="module")
def tiny_inputs(tiny_networks):
    with grid_sample_mode(tiny_networks, "native"):
        return sample_inputs(TorchRunner(tiny_networks), max(BATCHES))


def test_every_model_exported_with_spec_io(tiny_repository):
    specs = spec.submodel_specs("tiny")
    for model in spec.SUBMODELS:
        path = model_path(tiny_repository, model)
        check_graph(path, specs[model])
        graph = onnx.load(str(path)).graph
        assert io_problems(graph, specs[model]) == []
        assert [i.name for i in graph.input] == specs[model].input_names
        assert [o.name for o in graph.output] == specs[model].output_names


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_kinds_match_pytorch(tiny_repository, tiny_networks, tiny_inputs, batch, kind):
    """Independent of the exporter's own check: the pipeline's OnnxRunner on each kind against its TorchRunner."""
    onnx_runner = OnnxRunner(tiny_repository, "tiny", kind)
    with grid_sample_mode(tiny_networks, "native"):
        torch_runner = TorchRunner(tiny_networks)
        for model in spec.SUBMODELS:
            feeds = {k: v[:batch] for k, v in tiny_inputs[model].items()}
            want = torch_runner.run(model, feeds)
            got = onnx_runner.run(model, feeds)
            assert sorted(got) == sorted(want)
            for name, value in want.items():
                model_output = spec.submodel_specs("tiny")[model].output(name)
                assert got[name].shape == value.shape == (batch, *model_output.shape)
                assert got[name].dtype == value.dtype == model_output.numpy_dtype
                diff, bound, share = output_difference(model, name, got[name], value)
                assert diff <= bound, f"{kind} {model}.{name} batch {batch}: {diff:.3g} > {bound:.3g}"
                assert share is None or share <= UINT8_SHARE_DIFFERING, f"{kind} {model}.{name}: {share:.2%}"


def test_generator_image_is_the_official_parse_output(tiny_networks, tiny_inputs):
    """The served G (PyTorch, and its ONNX graph) returns exactly the official rule applied to the float image:
    HWC, clip to [0, 1], x255, truncated (not rounded) to uint8."""
    feeds = tiny_inputs[spec.GENERATOR]
    with torch.no_grad():
        image = tiny_networks.spade_generator(torch.from_numpy(feeds["warped_feature"])).numpy()
    official = np.clip(np.clip(np.transpose(image, (0, 2, 3, 1)), 0, 1) * 255, 0, 255).astype(np.uint8)
    served = TorchRunner(tiny_networks).run(spec.GENERATOR, feeds)["image"]
    np.testing.assert_array_equal(served, official)
    assert not np.array_equal(official, np.round(np.clip(np.transpose(image, (0, 2, 3, 1)), 0, 1) * 255))


def test_uint8_rule_catches_rounding(tiny_repository, tiny_networks, tiny_inputs):
    """An image rounded instead of truncated is within one level everywhere, yet fails the share rule."""
    feeds = tiny_inputs[spec.GENERATOR]
    runner = create_subnetwork(RuntimePlanEntry.of(spec.GENERATOR, "onnxruntime"),
                               spec.submodel_specs("tiny")[spec.GENERATOR], artefact=model_path(tiny_repository, spec.GENERATOR))
    with torch.no_grad():
        image = tiny_networks.spade_generator(torch.from_numpy(feeds["warped_feature"])).numpy()
    rounded = np.round(np.clip(np.transpose(image, (0, 2, 3, 1)), 0, 1) * 255).astype(np.uint8)
    comparison = compare(runner, feeds, {"image": rounded})
    assert comparison.max_abs_diff["image"] <= 1 and comparison.share_differing["image"] > 0.3
    assert any("differ, more than" in f for f in comparison.failures)
    assert not compare(runner, feeds, TorchRunner(tiny_networks).run(spec.GENERATOR, feeds)).failures


def test_validation_inputs_are_realistic(tiny_inputs):
    kp = tiny_inputs[spec.WARPING]
    assert fraction_inside_grid(kp["kp_source"]) > 0.9
    assert fraction_inside_grid(kp["kp_driving"]) > 0.9
    assert not np.allclose(kp["kp_source"], kp["kp_driving"])
    image = tiny_inputs[spec.APPEARANCE]["image"]
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.05
    # smooth: neighbouring pixels differ far less than the image varies
    assert np.abs(np.diff(image, axis=-1)).mean() < 0.1 * image.std()


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for output in model.graph.output:
        if output.name == old:
            output.name = new


def test_renamed_output_fails_validation(tiny_repository, tmp_path):
    model = onnx.load(str(model_path(tiny_repository, spec.STITCHING)))
    _rename_output(model, "delta", "stitching_delta")
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)   # a valid graph, only the name differs from the spec
    with pytest.raises(ValidationError, match=r"outputs are \['stitching_delta'\], the spec says \['delta'\]"):
        check_graph(path, spec.submodel_specs("tiny")[spec.STITCHING])


def test_fixed_batch_fails_validation(tiny_repository, tmp_path):
    model = onnx.load(str(model_path(tiny_repository, spec.RETARGET_LIP)))
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed_batch.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValidationError, match=r"input 'lip_ratio' has batch dim 1, the spec says dynamic"):
        check_graph(path, spec.submodel_specs("tiny")[spec.RETARGET_LIP])


def test_wrong_per_item_shape_fails_validation(tiny_repository):
    """The tiny W graph checked against the full spec: per-item dims differ."""
    with pytest.raises(ValidationError, match=r"input 'feature_volume' has shape \[batch, 4, 4, 64, 64\], "
                                              r"the spec says \[batch, 32, 16, 64, 64\]"):
        check_graph(model_path(tiny_repository, spec.WARPING), spec.submodel_specs("full")[spec.WARPING])


def test_grid_sample_variants_agree_including_out_of_range():
    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(2, 3, 5, 6, 7, generator=gen)
    grid = torch.rand(2, 4, 5, 6, 3, generator=gen) * 2.6 - 1.3      # about a fifth of the points outside [-1, 1]
    grid[0, 0, 0, :, :] = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [-1.2, 0.0, 0.0], [0.0, 1.1, 0.5],
                                        [3.0, -3.0, 0.0], [1.0 + 1e-3, -1.0 - 1e-3, 0.2]])
    assert ((grid.abs() > 1).any(-1)).float().mean() > 0.1
    native = grid_sample_3d(volume, grid, "native")
    decomposed = grid_sample_3d(volume, grid, "decomposed")
    assert float((native - decomposed).abs().max()) <= 1e-5
    assert float(native[0, :, 0, 0, 4].abs().max()) == 0.0               # far outside: zeros padding


def test_warping_module_grid_sample_variants_agree(tiny_networks, tiny_inputs):
    feeds = tiny_inputs[spec.WARPING]
    runner = TorchRunner(tiny_networks)
    with grid_sample_mode(tiny_networks, "native"):
        native = runner.run(spec.WARPING, feeds)
    with grid_sample_mode(tiny_networks, "decomposed"):
        decomposed = runner.run(spec.WARPING, feeds)
    for name in native:
        assert float(np.abs(native[name] - decomposed[name]).max()) <= 1e-5, name


def test_native_grid_sample_export(tiny_networks, tiny_repository, tmp_path):
    """--grid-sample native: opset 20 GridSample nodes, validated against PyTorch like the decomposed export."""
    export_repository(tiny_networks, tmp_path, "native", BATCHES, models=(spec.WARPING,), log=lambda _: None)
    native = onnx.load(str(model_path(tmp_path, spec.WARPING)))
    decomposed = onnx.load(str(model_path(tiny_repository, spec.WARPING)))
    opset = {o.domain: o.version for o in native.opset_import}[""]
    assert opset == OPSET["native"] == 20
    assert [n.op_type for n in native.graph.node].count("GridSample") == 2
    assert "GridSample" not in {n.op_type for n in decomposed.graph.node}
    assert {o.domain: o.version for o in decomposed.opset_import}[""] == OPSET["decomposed"] == 17


def test_cli_missing_weights_directory(tmp_path, capsys):
    missing = tmp_path / "no_such_weights"
    code = cli_main(["export", "--weights", str(missing), "--config", "tiny", "--repository", str(tmp_path / "repo")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"weights directory {str(missing)!r} does not exist" in err
    assert not (tmp_path / "repo").exists()


def test_cli_rejects_bad_batches(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path),
                  "--validate-batches", "0,3"])
    assert "batch sizes must lie in 1..16" in capsys.readouterr().err


def test_cli_export_tiny(tmp_path, capsys):
    """The whole command: ONNX files, export.json manifests, the Triton configs for the local target, and an
    engine built from an earlier export removed (the ngc configs would serve it)."""
    stale = model_path(tmp_path, spec.GENERATOR).with_name("model.plan")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"engine of an earlier export")
    code = cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path),
                     "--validate-batches", "1,2", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "exported and validated 7 models" in out
    assert not stale.exists() and f"removed {stale}" in out
    for model in spec.SUBMODELS:
        assert model_path(tmp_path, model).is_file()
        manifest = json.loads((model_path(tmp_path, model).parent / "export.json").read_text())
        assert manifest["grid_sample"] == "decomposed" and manifest["tensorrt_precision"] == "fp32"
        chosen = runtime_plan("local")[model].kind
        assert manifest["runtime"] == chosen and manifest["runtime_plan"] == runtime_plan("local")[model].parameters()
        assert [(v["runtime"], v["batch"]) for v in manifest["validation"]] == [
            (kind, batch) for kind in dict.fromkeys(("onnxruntime", chosen)) for batch in (1, 2)]
        assert (tmp_path / model / "config.pbtxt").is_file()


def test_cli_runtime_override(tmp_path, capsys):
    """`--runtime MODEL=KIND` renders that kind into the model's config and validates the file on it."""
    code = cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path),
                     "--validate-batches", "1", "--runtime", f"{spec.GENERATOR}=openvino"])
    assert code == 0, capsys.readouterr().err
    assert served_plan(tmp_path)[spec.GENERATOR] == RuntimePlanEntry.of(spec.GENERATOR, "openvino")
    manifest = json.loads((model_path(tmp_path, spec.GENERATOR).parent / "export.json").read_text())
    assert [v["runtime"] for v in manifest["validation"]] == ["onnxruntime", "openvino"]
    code = cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path / "torch"),
                     "--validate-batches", "1", "--runtime", f"{spec.WARPING}=torch_fastconv",
                     "--runtime", f"{spec.GENERATOR}=openvino_fastconv"])
    assert code == 0, capsys.readouterr().err
    version = model_path(tmp_path / "torch", spec.WARPING).parent
    assert (version / "model.pt").is_file()          # the network file the torch kinds serve
    manifest = json.loads((version / "export.json").read_text())
    assert [v["runtime"] for v in manifest["validation"]] == ["onnxruntime", "torch_fastconv"]
    version = model_path(tmp_path / "torch", spec.GENERATOR).parent
    assert (version / "model_fastconv.onnx").is_file() and not (version / "model.pt").exists()
    manifest = json.loads((version / "export.json").read_text())
    assert [v["runtime"] for v in manifest["validation"]] == ["onnxruntime", "openvino_fastconv"]
    code = cli_main(["export", "--synthetic", "0", "--config", "tiny", "--repository", str(tmp_path / "bad"),
                     "--runtime", f"{spec.GENERATOR}=tensorflow"])
    assert code == 2 and "expected MODEL=KIND" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_export(full_repository):
    """Every full-size model exported and validated at batch 1 (batch 3 would add about 40 s of W and G on 2
    cores for no extra coverage: the tiny tests check batch 3 and the batch axis is the same graph)."""
    plan = runtime_plan("local")
    chosen = {m: entry.kind for m, entry in plan.items()}
    path, exported = full_repository
    assert [e.model for e in exported] == list(spec.SUBMODELS)
    assert model_path(path, spec.GENERATOR).stat().st_size > 100 * 2 ** 20
    for e in exported:
        assert [c.kind for c in e.comparisons] == list(dict.fromkeys(("onnxruntime", chosen[e.model])))
        assert not [f for c in e.comparisons for f in c.failures]
