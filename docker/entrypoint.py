#!/usr/bin/env python3
"""Entrypoint of the GPU image: build the model repository and TensorRT engines once, then run tritonserver.

`serve` (the image's default command):
 1. Reads the GPU at hand (compute capability, via nvidia-smi) and the TensorRT library version.
 2. Finds the official checkpoints under $LIVEPORTRAIT_WEIGHTS_DIR (default /weights) or, only when
    $LIVEPORTRAIT_SYNTHETIC_SEED is set, uses synthetic weights and says so loudly.
 3. Looks for a repository cached under $LIVEPORTRAIT_CACHE_DIR/repositories/<key>, the key naming GPU
    architecture, TensorRT version, network configuration, precision, weights fingerprint and package version:
    an engine only runs on the TensorRT version and GPU architecture that built it. If there is none, it runs
    `liveportrait-triton export --target ngc` and `liveportrait-triton tensorrt` into a staging directory under a
    file lock and renames it into place, so replicas that share the volume build once and never see half a build.
 4. Assembles the served repository (docker/gpu_sharing.py: links to the cached artefacts, configs with the
    GPU-sharing profile's instance groups) and runs tritonserver with secure defaults: no model control, the
    model-repository / shared-memory / logging / trace APIs behind a key, SageMaker and Vertex AI off, strict
    readiness, request-size and response-pool limits where this Triton has the flags.
 5. Watches it (liveportrait_triton.health.supervise, the check `serve` and docker/healthcheck.py use): signals are
    passed on, and a Python-backend stub that died (Triton neither restarts it nor stops reporting ready) stops the
    server, so the container exits with status 1 and its restart policy starts a healthy one.

`build` stops after step 3 and prints the cached repository. `plan` prints what `serve` would do, as JSON, and
runs nothing (GPU facts may be given instead of detected). `triton-command` prints the tritonserver argv for a
repository. Settings are environment variables (docker/README.md lists them); a bad value stops with a message.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpu_sharing import PROFILES_DIR, Profile, ProfileError, assemble
from liveportrait_triton.config import CONFIGS
from liveportrait_triton.health import supervise
from liveportrait_triton.serve import ADMIN_HEADER, DEFAULT_PORTS, triton_command as build_triton_command
from liveportrait_triton.weights import BASE_FILES, STITCHING_FILE

CLI = "liveportrait-triton"
PRECISIONS = ("fp32", "fp16")
DEFAULT_PROFILE = PROFILES_DIR / "one-gpu-2-pipelines.yaml"


class SetupError(RuntimeError):
    """Something the operator must fix (the message says what); the container stops."""


def log(message: str) -> None:
    print(f"[liveportrait] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Settings (environment).

@dataclasses.dataclass(frozen=True)
class Settings:
    weights_dir: Path
    synthetic_seed: int | None
    cache_dir: Path
    runtime_dir: Path
    network_config: str
    precision: str
    profile: Path | None
    admin_key: str | None
    cuda_pool_mib: int
    extra_triton_args: tuple[str, ...]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)

        def choice(name: str, default: str, allowed) -> str:
            value = env.get(name) or default
            if value not in allowed:
                raise SetupError(f"{name}={value!r} is not one of {sorted(allowed)}")
            return value

        def integer(name: str, default: int | None, minimum: int) -> int | None:
            raw = env.get(name, "")
            if raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                raise SetupError(f"{name}={raw!r} is not an integer") from None
            if value < minimum:
                raise SetupError(f"{name}={value} must be >= {minimum}")
            return value

        profile_name = env.get("LIVEPORTRAIT_GPU_PROFILE") or str(DEFAULT_PROFILE)
        profile = None if profile_name == "none" else Path(profile_name)
        if profile is not None and not profile.is_absolute() and not profile.exists():
            profile = PROFILES_DIR / profile          # a bare name picks one of the image's profiles
        if profile is not None and not profile.is_file():
            raise SetupError(f"LIVEPORTRAIT_GPU_PROFILE={profile_name!r}: no such profile (the image has "
                             f"{sorted(p.name for p in PROFILES_DIR.glob('one-gpu-*.yaml'))}, or 'none')")
        return cls(
            weights_dir=Path(env.get("LIVEPORTRAIT_WEIGHTS_DIR") or "/weights"),
            synthetic_seed=integer("LIVEPORTRAIT_SYNTHETIC_SEED", None, 0),
            cache_dir=Path(env.get("LIVEPORTRAIT_CACHE_DIR") or "/cache"),
            runtime_dir=Path(env.get("LIVEPORTRAIT_RUNTIME_DIR")
                             or Path(tempfile.gettempdir()) / "liveportrait-repository"),
            network_config=choice("LIVEPORTRAIT_NETWORK_CONFIG", "full", CONFIGS),
            precision=choice("LIVEPORTRAIT_PRECISION", "fp32", PRECISIONS),
            profile=profile,
            admin_key=env.get("LIVEPORTRAIT_ADMIN_KEY") or None,
            cuda_pool_mib=integer("LIVEPORTRAIT_CUDA_POOL_MIB", 1024, 0),
            extra_triton_args=tuple(shlex.split(env.get("LIVEPORTRAIT_TRITON_ARGS", ""))),
        )


# ---------------------------------------------------------------------------------------------------------------
# What the machine has: GPUs, TensorRT, engine checking.

@dataclasses.dataclass(frozen=True)
class Gpus:
    arch: str           # "sm90"
    count: int
    names: tuple[str, ...]


def detect_gpus() -> Gpus:
    """Compute capability of the visible GPUs (nvidia-smi); they must share one architecture."""
    if shutil.which("nvidia-smi") is None:
        raise SetupError("no NVIDIA GPU visible (nvidia-smi not found): run the container with a GPU "
                         "(docker run --gpus ..., compose deploy.resources.reservations.devices, or a Kubernetes "
                         "nvidia.com/gpu limit)")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"nvidia-smi failed: {getattr(exc, 'stderr', '') or exc}") from None
    rows = [[part.strip() for part in line.rsplit(",", 1)] for line in out.strip().splitlines() if line.strip()]
    if not rows:
        raise SetupError("nvidia-smi lists no GPU")
    caps = sorted({cap for _, cap in rows})
    if len(caps) != 1 or not re.fullmatch(r"\d+\.\d+", caps[0]):
        raise SetupError(f"the visible GPUs have compute capabilities {caps}: engines are built per architecture, "
                         "so give the container GPUs of one kind (NVIDIA_VISIBLE_DEVICES)")
    return Gpus(arch="sm" + caps[0].replace(".", ""), count=len(rows), names=tuple(name for name, _ in rows))


def _library_version(encoded: int) -> str:
    return f"{encoded // 10000}.{encoded // 100 % 100}.{encoded % 100}"      # major * 10000 + minor * 100 + patch


def serving_tensorrt_version() -> str | None:
    """Version of the image's own libnvinfer (the one Triton's tensorrt_plan backend loads), None if absent.

    Read in a fresh process: this one may already hold the Python wheel's copy under the same soname.
    """
    probe = "import ctypes; print(ctypes.CDLL('libnvinfer.so.10').getInferLibVersion())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    return _library_version(int(result.stdout)) if result.returncode == 0 and result.stdout.strip() else None


def detect_tensorrt() -> str:
    """Version of the TensorRT library that builds the engines, checked against the one that serves them.

    `liveportrait-triton tensorrt` builds with the library of the Python wheels; Triton's tensorrt_plan backend
    runs the image's own library. An engine loads only on the TensorRT version that built it.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise SetupError(f"the TensorRT Python bindings do not import ({exc}); the image installs "
                         "tensorrt-cu12-libs/-bindings matching its TensorRT") from None
    libs_dir = Path(tensorrt.__file__).resolve().parent.parent / "tensorrt_libs"
    wheel_lib = next(iter(sorted(libs_dir.glob("libnvinfer.so.*"))), None)
    builder = _library_version(ctypes.CDLL(str(wheel_lib) if wheel_lib else "libnvinfer.so.10").getInferLibVersion())
    if not tensorrt.__version__.startswith(builder):
        raise SetupError(f"TensorRT bindings {tensorrt.__version__} do not match their library {builder}")
    serving = serving_tensorrt_version()
    if serving is None:
        log("the image has no system libnvinfer.so.10 to compare with; trusting the Python wheels' TensorRT")
    elif serving != builder:
        raise SetupError(f"TensorRT {builder} (Python wheels) would build engines that Triton's TensorRT {serving} "
                         "cannot load: rebuild the image with --build-arg TENSORRT_VERSION matching the base image")
    return builder


def torch_has_cuda() -> bool:
    """Whether this PyTorch can run CUDA kernels, which `liveportrait-triton tensorrt` needs to check engines."""
    import torch
    return torch.version.cuda is not None and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# Weights.

@dataclasses.dataclass(frozen=True)
class Weights:
    export_args: tuple[str, ...]      # --weights DIR or --synthetic SEED
    fingerprint: str                  # part of the cache key
    description: str


def checkpoint_files() -> list[str]:
    return [*BASE_FILES.values(), STITCHING_FILE]


def fingerprint_files(root: Path, files: list[str]) -> str:
    digest = hashlib.sha256()
    for rel in files:
        file_hash = hashlib.sha256()
        with open(root / rel, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_hash.update(block)
        digest.update(f"{rel}\0{file_hash.hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def resolve_weights(weights_dir: Path, synthetic_seed: int | None) -> Weights:
    """The official checkpoints under weights_dir (several mount points accepted), else synthetic if allowed."""
    candidates = [weights_dir / "liveportrait", weights_dir, weights_dir / "pretrained_weights" / "liveportrait"]
    files = checkpoint_files()
    for root in candidates:
        if not (root / "base_models").is_dir():
            continue
        missing = [rel for rel in files if not (root / rel).is_file()]
        if missing:
            raise SetupError(f"{root} looks like the official layout but lacks {', '.join(missing)}")
        return Weights(("--weights", str(root.resolve())), "w" + fingerprint_files(root, files),
                       f"official checkpoints in {root.resolve()}")
    if synthetic_seed is None:
        raise SetupError(
            f"no LivePortrait checkpoints under {weights_dir}: mount the official pretrained_weights directory "
            f"there (expected {weights_dir}/liveportrait/{files[0]} and the other files of the official layout), "
            "or set LIVEPORTRAIT_SYNTHETIC_SEED=0 to serve synthetic, untrained weights for a smoke test")
    return Weights(("--synthetic", str(synthetic_seed)), f"synthetic{synthetic_seed}",
                   f"SYNTHETIC weights (seed {synthetic_seed}): untrained networks, the output is not a portrait")


def warn_synthetic(weights: Weights) -> None:
    bar = "!" * 100
    for line in (bar, f"!!! {weights.description}", "!!! LIVEPORTRAIT_SYNTHETIC_SEED is set and no checkpoint "
                 "is mounted: this server is for smoke tests only", bar):
        log(line)


# ---------------------------------------------------------------------------------------------------------------
# The plan: cache key, build commands, served repository, tritonserver command.

def package_version() -> str:
    return importlib.metadata.version("liveportrait-triton")


def cache_key(gpus: Gpus, tensorrt_version: str, settings: Settings, weights: Weights) -> str:
    return (f"{gpus.arch}-trt{tensorrt_version}-{settings.network_config}-{settings.precision}-"
            f"{weights.fingerprint}-lp{package_version()}")


def build_commands(staging: Path, settings: Settings, weights: Weights, check_engines: bool) -> list[list[str]]:
    export = [CLI, "export", *weights.export_args, "--config", settings.network_config, "--repository", str(staging),
              "--target", "ngc", "--grid-sample", "decomposed", "--precision", settings.precision]
    engines = [CLI, "tensorrt", "--repository", str(staging), "--precision", settings.precision]
    if not check_engines:
        engines.append("--no-check")
    return [export, engines]


def supported_flags(tritonserver: str) -> set[str]:
    """The options this tritonserver lists in --help (empty if it cannot be run here)."""
    try:
        out = subprocess.run([tritonserver, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"(--[a-z0-9-]+)", out.stdout + out.stderr))


def triton_command(repository: Path, settings: Settings, gpu_count: int, tritonserver: str = "tritonserver",
                   flags: set[str] | None = None) -> list[str]:
    """tritonserver argv (the one builder, `liveportrait_triton.serve.triton_command`): secure defaults, GPU
    memory pools, request limits where this Triton supports them."""
    key = settings.admin_key or secrets.token_urlsafe(32)      # unknown to anyone: the restricted APIs are off
    return build_triton_command(
        tritonserver, repository, network_config=settings.network_config, admin_key=key, gpu_count=gpu_count,
        cuda_pool_bytes=settings.cuda_pool_mib * 2 ** 20, exit_timeout_s=30,
        supported_flags=supported_flags(tritonserver) if flags is None else flags,
        extra_args=settings.extra_triton_args)


@dataclasses.dataclass
class Plan:
    key: str
    cache_dir: Path
    build: list[list[str]]
    runtime_repository: Path
    profile: Path | None
    triton: list[str]
    weights: Weights
    gpus: Gpus
    tensorrt: str
    check_engines: bool

    @property
    def cached_repository(self) -> Path:
        return self.cache_dir / "repositories" / self.key

    @property
    def staging(self) -> Path:
        return self.cache_dir / "repositories" / f".staging-{self.key}"

    def as_json(self) -> str:
        def redact(arg: str) -> str:     # never print the admin key
            return re.sub(rf"({ADMIN_HEADER}=).*", r"\1<redacted>", arg)
        return json.dumps({
            "key": self.key, "cached_repository": str(self.cached_repository),
            "cached": self.cached_repository.is_dir(), "weights": self.weights.description,
            "gpus": dataclasses.asdict(self.gpus), "tensorrt": self.tensorrt, "check_engines": self.check_engines,
            "build": self.build, "runtime_repository": str(self.runtime_repository),
            "profile": str(self.profile) if self.profile else None, "triton": [redact(a) for a in self.triton],
            "ports": DEFAULT_PORTS,
        }, indent=2)


def make_plan(settings: Settings, gpus: Gpus, tensorrt_version: str, check_engines: bool,
              tritonserver: str = "tritonserver", flags: set[str] | None = None) -> Plan:
    weights = resolve_weights(settings.weights_dir, settings.synthetic_seed)
    key = cache_key(gpus, tensorrt_version, settings, weights)
    staging = settings.cache_dir / "repositories" / f".staging-{key}"
    return Plan(key=key, cache_dir=settings.cache_dir,
                build=build_commands(staging, settings, weights, check_engines),
                runtime_repository=settings.runtime_dir, profile=settings.profile,
                triton=triton_command(settings.runtime_dir, settings, gpus.count, tritonserver, flags),
                weights=weights, gpus=gpus, tensorrt=tensorrt_version, check_engines=check_engines)


# ---------------------------------------------------------------------------------------------------------------
# Running the plan.

@contextlib.contextmanager
def build_lock(cache_dir: Path):
    """An exclusive lock on the cache (replicas sharing the volume wait for the one that builds)."""
    try:
        (cache_dir / "repositories").mkdir(parents=True, exist_ok=True)
        handle = open(cache_dir / ".build.lock", "w")
    except PermissionError:
        raise SetupError(f"the cache {cache_dir} is not writable by uid {os.getuid()}: give the volume to that "
                         "user (Kubernetes: securityContext.fsGroup)") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(plan: Plan) -> Path:
    """The cached repository of the plan, built first if it does not exist yet."""
    if plan.cached_repository.is_dir():
        log(f"using cached repository {plan.cached_repository}")
        return plan.cached_repository
    log(f"waiting for the build lock on {plan.cache_dir} ...")
    with build_lock(plan.cache_dir):
        if plan.cached_repository.is_dir():            # another container built it meanwhile
            log(f"using repository {plan.cached_repository}, built by another container")
            return plan.cached_repository
        shutil.rmtree(plan.staging, ignore_errors=True)     # left by a build that was killed
        plan.staging.mkdir()
        log(f"first start for {plan.key}: exporting and building TensorRT engines (this takes minutes)")
        if not plan.check_engines:
            log("WARNING: this PyTorch has no CUDA, so the engines are built but NOT compared with ONNX Runtime; "
                "build the image with a CUDA PyTorch (TORCH_INDEX_URL) to check them")
        try:
            for command in plan.build:
                log("running: " + shlex.join(command))
                result = subprocess.run(command)
                if result.returncode != 0:
                    raise SetupError(f"`{' '.join(command[:2])}` failed with status {result.returncode} "
                                     "(its messages are above); nothing was cached")
            (plan.staging / "build.json").write_text(plan.as_json() + "\n")
            plan.staging.rename(plan.cached_repository)
        except BaseException:
            shutil.rmtree(plan.staging, ignore_errors=True)
            raise
    log(f"cached {plan.cached_repository}")
    return plan.cached_repository


def serve(plan: Plan) -> None:
    if plan.weights.export_args[0] == "--synthetic":
        warn_synthetic(plan.weights)
    cached = build(plan)
    profile = Profile.load(plan.profile) if plan.profile else None
    models = assemble(cached, plan.runtime_repository, profile)
    log(f"serving {', '.join(models)} from {plan.runtime_repository}"
        + (f" with GPU profile {plan.profile.name}" if plan.profile else ""))
    sys.exit(supervise(plan.triton))


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="build if needed, then run tritonserver and watch its health (default)")
    sub.add_parser("build", help="build (or find) the cached repository and print its path")
    plan_parser = sub.add_parser("plan", help="print what `serve` would do (JSON); runs nothing")
    plan_parser.add_argument("--gpu-arch", help="GPU architecture such as sm90 (default: detected)")
    plan_parser.add_argument("--gpu-count", type=int, help="GPUs visible (default: detected)")
    plan_parser.add_argument("--tensorrt-version", help="TensorRT version such as 10.7.0 (default: detected)")
    plan_parser.add_argument("--check-engines", action=argparse.BooleanOptionalAction,
                             help="whether engines would be checked (default: a CUDA PyTorch is present)")
    plan_parser.add_argument("--tritonserver", default="tritonserver", help="server binary (default: on PATH)")
    command_parser = sub.add_parser("triton-command", help="print the tritonserver argv (JSON) for a repository")
    command_parser.add_argument("--repository", required=True, type=Path)
    command_parser.add_argument("--gpu-count", type=int, required=True)
    command_parser.add_argument("--tritonserver", default="tritonserver", help="server binary (default: on PATH)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "triton-command":
            print(json.dumps(triton_command(args.repository, settings, args.gpu_count, args.tritonserver)))
            return 0
        if args.command == "plan":
            gpus = detect_gpus() if args.gpu_arch is None else Gpus(args.gpu_arch, 1 if args.gpu_count is None else args.gpu_count, ())
            tensorrt_version = args.tensorrt_version or detect_tensorrt()
            check = torch_has_cuda() if args.check_engines is None else args.check_engines
            print(make_plan(settings, gpus, tensorrt_version, check, args.tritonserver).as_json())
            return 0
        plan = make_plan(settings, detect_gpus(), detect_tensorrt(), torch_has_cuda())
        log(f"GPU {plan.gpus.arch} x{plan.gpus.count} ({', '.join(plan.gpus.names)}), TensorRT {plan.tensorrt}, "
            f"{plan.weights.description}")
        if args.command == "build":
            print(build(plan))
            return 0
        serve(plan)
        return 0          # not reached: serve() exits with tritonserver's status
    except (SetupError, ProfileError) as exc:
        log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
