"""GPU-sharing profiles (docker/gpu-sharing/) and the served-repository assembly of docker/gpu_sharing.py.

The committed profiles must equal what `render` makes from sizing.yaml (so the figures and the rule written there
are the ones in force), and applying a profile to an ngc repository rendered by the package must change the
instance groups and nothing else.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from liveportrait_triton import repository, spec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "gpu_sharing.py"
PROFILES = REPO / "docker" / "gpu-sharing"
KIND_GPU = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.Kind.KIND_CPU


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def committed_profiles() -> list[Path]:
    profiles = sorted(PROFILES.glob("one-gpu-*.yaml"))
    assert profiles, f"no profiles in {PROFILES}"
    return profiles


@pytest.mark.parametrize("profile", committed_profiles(), ids=lambda p: p.name)
def test_committed_profile_is_rendered_from_the_sizing_figures(profile):
    pipelines = yaml.safe_load(profile.read_text())["pipeline_instances"]
    result = run("render", "--pipelines", str(pipelines))
    assert result.returncode == 0, result.stderr
    assert result.stdout == profile.read_text(), (f"{profile.name} differs from what sizing.yaml gives; re-render: "
                                                  f"python docker/gpu_sharing.py render --pipelines {pipelines}")


def test_sizing_gives_warping_and_generator_the_most_instances():
    sizing = yaml.safe_load((PROFILES / "sizing.yaml").read_text())
    shares = {}
    for source in sizing["sources"].values():
        frame = source["per_frame_ms"]
        assert (frame["warping_module"] + frame["spade_generator"]) / sum(frame.values()) > 0.9
        for model in (spec.WARPING, spec.GENERATOR):
            shares[model] = max(shares.get(model, 0.0), frame[model] / sum(frame.values()))
    for profile in committed_profiles():
        data = yaml.safe_load(profile.read_text())
        counts, k = data["instances"], data["pipeline_instances"]
        assert set(counts) == set(spec.SUBMODELS)
        assert counts[spec.GENERATOR] >= counts[spec.WARPING] >= counts[spec.MOTION] >= 1
        for model in (spec.WARPING, spec.GENERATOR):       # the rule of sizing.yaml, computed independently
            assert counts[model] == max(1, math.ceil(k * shares[model] - 1e-9)), (profile.name, model)
        assert counts[spec.APPEARANCE] == 1


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture()
def ngc_repository(tmp_path):
    root = tmp_path / "ngc"
    repository.write_repository_configs(root, target="ngc", config="tiny")
    return root


@pytest.mark.parametrize("profile", committed_profiles(), ids=lambda p: p.name)
def test_profile_changes_only_the_instance_groups(ngc_repository, tmp_path, profile):
    out = tmp_path / "served"
    result = run("assemble", "--source", str(ngc_repository), "--out", str(out), "--profile", str(profile))
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(profile.read_text())
    for model in (*spec.SUBMODELS, spec.PIPELINE):
        before, after = parse_config(ngc_repository / model / "config.pbtxt"), parse_config(out / model / "config.pbtxt")
        (group,) = after.instance_group
        if model == spec.PIPELINE:
            assert (group.kind, group.count) == (KIND_CPU, data["pipeline_instances"])
        else:
            assert (group.kind, group.count, list(group.gpus)) == (KIND_GPU, data["instances"][model], data["gpus"])
            wanted = spec.submodel_specs("tiny")[model]
            assert [t.name for t in after.input] == wanted.input_names
            assert [t.name for t in after.output] == wanted.output_names
        del before.instance_group[:]
        del after.instance_group[:]
        assert before == after, f"{model}: the profile changed more than the instance groups"
    adapter = out / spec.PIPELINE / "1" / "model.py"
    assert adapter.is_symlink() and adapter.resolve() == (ngc_repository / spec.PIPELINE / "1" / "model.py").resolve()
    assert not any(p.is_symlink() for p in ngc_repository.rglob("*")), "the cached repository must stay untouched"


def test_assembling_again_replaces_the_served_repository(ngc_repository, tmp_path):
    out = tmp_path / "served"
    (out / "stale_model").mkdir(parents=True)
    assert run("assemble", "--source", str(ngc_repository), "--out", str(out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*spec.SUBMODELS, spec.PIPELINE])
    for model in (*spec.SUBMODELS, spec.PIPELINE):        # without a profile the configs are copied as rendered
        assert (out / model / "config.pbtxt").read_text() == (ngc_repository / model / "config.pbtxt").read_text()


def test_gpu_profile_refuses_a_cpu_repository(tmp_path):
    local = tmp_path / "local"
    repository.write_repository_configs(local, target="local", config="tiny")
    result = run("assemble", "--source", str(local), "--out", str(tmp_path / "served"),
                 "--profile", str(PROFILES / "one-gpu-2-pipelines.yaml"))
    assert result.returncode == 2 and "exported with --target ngc" in result.stderr, result.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["instances"].pop(spec.WARPING), "must name exactly the served sub-networks"),
    (lambda d: d["instances"].update({spec.GENERATOR: 0}), "must be an integer >= 1"),
    (lambda d: d.update(pipeline_instances="2"), "must be an integer >= 1"),
    (lambda d: d.update(gpus=[-1]), "GPU ids"),
    (lambda d: d.update(replicas=2), "unknown keys"),
])
def test_invalid_profiles_are_refused_with_the_reason(ngc_repository, tmp_path, edit, message):
    data = yaml.safe_load((PROFILES / "one-gpu-2-pipelines.yaml").read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = run("assemble", "--source", str(ngc_repository), "--out", str(tmp_path / "served"), "--profile", str(bad))
    assert result.returncode == 2 and message in result.stderr, result.stderr
