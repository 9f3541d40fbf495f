#!/usr/bin/env python3
"""GPU-sharing profiles: how many instances of each sub-network (and of the `liveportrait` pipeline) one GPU runs.

A profile is a small YAML file (docker/gpu-sharing/*.yaml): `pipeline_instances` (Python-backend instances of the
sequence model, each with one batch of frames in flight), `gpus` (the GPU ids that host every sub-network) and
`instances` (per served sub-network, instances per listed GPU). Profiles are rendered from the figures in
docker/gpu-sharing/sizing.yaml (`render`), committed, and re-rendered by the tests, so the committed files always
follow the figures and the rule written there.

`assemble` makes the repository Triton serves: a fresh directory whose artefacts are symbolic links into the
cached (immutable) repository and whose config.pbtxt files are copies with the profile's instance groups. The
cache stays shared between containers and profiles; only the small configs differ.

    python docker/gpu_sharing.py render --pipelines 2 > docker/gpu-sharing/one-gpu-2-pipelines.yaml
    python docker/gpu_sharing.py assemble --source CACHED_REPO --out RUNTIME_REPO [--profile FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
from pathlib import Path

import yaml
from tritonclient.grpc import model_config_pb2

from liveportrait_triton import spec
from liveportrait_triton.repository import config_text, parse_config

PROFILES_DIR = Path(__file__).resolve().parent / "gpu-sharing"
SIZING_FILE = PROFILES_DIR / "sizing.yaml"
KIND_GPU = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.Kind.KIND_CPU


class ProfileError(ValueError):
    """A profile or sizing file that does not fit the served models, or a repository it cannot apply to."""


# ---------------------------------------------------------------------------------------------------------------
# Sizing: shares of a frame's time -> instance counts.

def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level")
    return data


def per_frame_shares(sizing: dict) -> dict[str, float]:
    """Served model -> largest share of a frame's time over all sources (per-frame models only)."""
    rows = sizing["per_frame_models"]
    shares: dict[str, float] = {}
    for name, source in sizing["sources"].items():
        times = source["per_frame_ms"]
        missing = sorted(set(rows.values()) - set(times))
        if missing:
            raise ProfileError(f"sizing source {name!r} lacks per-frame figures for {missing}")
        total = sum(times.values())
        for model, row in rows.items():
            shares[model] = max(shares.get(model, 0.0), times[row] / total)
    return shares


def instance_counts(pipelines: int, sizing: dict) -> dict[str, int]:
    """Instances of every served sub-network for `pipelines` batches in flight: max(1, ceil(K * share))."""
    if pipelines < 1:
        raise ProfileError(f"pipelines must be >= 1, got {pipelines}")
    covered = set(sizing["per_frame_models"]) | set(sizing["per_source_models"])
    if covered != set(spec.SUBMODELS):
        raise ProfileError(f"sizing covers {sorted(covered)}, the served sub-networks are {sorted(spec.SUBMODELS)}")
    shares = per_frame_shares(sizing)
    # Rounded before ceil so that a float product such as 2 * 0.5 = 1.0000000002 cannot add an instance.
    counts = {m: max(1, math.ceil(round(pipelines * shares[m], 9))) for m in sizing["per_frame_models"]}
    counts.update({m: 1 for m in sizing["per_source_models"]})
    return {m: counts[m] for m in spec.SUBMODELS}


def render_profile(pipelines: int, gpus: tuple[int, ...] = (0,), sizing_file: Path = SIZING_FILE) -> str:
    """A profile's YAML text, with the shares it was sized from as comments."""
    sizing = load_yaml(sizing_file)
    counts = instance_counts(pipelines, sizing)
    shares = per_frame_shares(sizing)
    lines = [
        f"# Rendered by `python docker/gpu_sharing.py render --pipelines {pipelines}"
        + (f" --gpus {' '.join(map(str, gpus))}" if tuple(gpus) != (0,) else "") + "` from sizing.yaml.",
        "# ESTIMATES from the official RTX 4090 module timings and the CPU profile, not measured on a GPU with",
        "# this project's engines: re-size from measured figures (see sizing.yaml) before relying on them.",
        f"# Rule: instances = max(1, ceil({pipelines} x share of a frame's time)); the appearance extractor runs",
        "# once per source and keeps 1.",
        f"pipeline_instances: {pipelines}",
        f"gpus: [{', '.join(map(str, gpus))}]",
        "instances:",
    ]
    for model in spec.SUBMODELS:
        note = f"share {shares[model]:.3f}" if model in shares else "per source"
        lines.append(f"  {model}: {counts[model]}".ljust(40) + f"# {note}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Profiles.

@dataclasses.dataclass(frozen=True)
class Profile:
    pipeline_instances: int
    gpus: tuple[int, ...]
    instances: dict[str, int]
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        data = load_yaml(Path(path))
        where = str(path)
        unknown = sorted(set(data) - {"pipeline_instances", "gpus", "instances"})
        if unknown:
            raise ProfileError(f"{where}: unknown keys {unknown}; a profile has pipeline_instances, gpus, instances")
        instances = data.get("instances")
        if not isinstance(instances, dict) or set(instances) != set(spec.SUBMODELS):
            got = sorted(instances) if isinstance(instances, dict) else instances
            raise ProfileError(f"{where}: 'instances' must name exactly the served sub-networks "
                               f"{sorted(spec.SUBMODELS)}; got {got}")
        for name, value in [("pipeline_instances", data.get("pipeline_instances")), *instances.items()]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(f"{where}: {name} must be an integer >= 1, got {value!r}")
        gpus = data.get("gpus", [])
        if not isinstance(gpus, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                                 for g in gpus):
            raise ProfileError(f"{where}: 'gpus' must be a list of GPU ids (integers >= 0), got {gpus!r}")
        return cls(data["pipeline_instances"], tuple(gpus), dict(instances), source=where)

    def instance_groups(self, model: str) -> list:
        if model == spec.PIPELINE:
            return [model_config_pb2.ModelInstanceGroup(count=self.pipeline_instances, kind=KIND_CPU)]
        if model in self.instances:
            return [model_config_pb2.ModelInstanceGroup(count=self.instances[model], kind=KIND_GPU,
                                                        gpus=list(self.gpus))]
        raise ProfileError(f"profile {self.source} does not know model {model!r}")

    def apply(self, model: str, text: str) -> str:
        """A config.pbtxt with this profile's instance groups (everything else as it was)."""
        config = parse_config(text)
        if config.name != model:
            raise ProfileError(f"config of directory {model!r} names model {config.name!r}")
        if model in self.instances and any(g.kind != KIND_GPU for g in config.instance_group):
            raise ProfileError(f"{model}: the repository runs it on the CPU; GPU profiles apply to repositories "
                               "exported with --target ngc")
        del config.instance_group[:]
        config.instance_group.extend(self.instance_groups(model))
        return config_text(config, f"# Rendered for the ngc target, then instance groups set by docker/gpu_sharing.py "
                                   f"from {Path(self.source).name}.\n")


def assemble(source: str | Path, out: str | Path, profile: Profile | None = None) -> list[str]:
    """Make `out` the repository to serve: links to every file of `source`, config.pbtxt copied (and profiled).

    Returns the model names. `out` is replaced; `source` is never written.
    """
    source, out = Path(source).resolve(), Path(out)
    configs = sorted(source.glob("*/config.pbtxt"))
    if not configs:
        raise ProfileError(f"{source} holds no model (no */config.pbtxt)")
    models = [c.parent.name for c in configs]
    if profile is not None:
        missing = sorted(set(spec.SUBMODELS) - set(models))
        if missing:
            raise ProfileError(f"{source} lacks {missing}, which the profile places")
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    for config in configs:
        model = config.parent.name
        for path in sorted(config.parent.rglob("*")):
            target = out / path.relative_to(source)
            if path == config:
                continue
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
        text = config.read_text()
        if profile is not None:
            text = profile.apply(model, text)
        (out / model).mkdir(parents=True, exist_ok=True)
        (out / model / "config.pbtxt").write_text(text)
    return models


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print a profile sized from sizing.yaml")
    render.add_argument("--pipelines", type=int, required=True, help="pipeline instances (batches in flight)")
    render.add_argument("--gpus", type=int, nargs="+", default=[0], help="GPU ids hosting the sub-networks")
    render.add_argument("--sizing", type=Path, default=SIZING_FILE, help="sizing figures (default: %(default)s)")
    build = sub.add_parser("assemble", help="make the served repository from a cached one (+ a profile)")
    build.add_argument("--source", required=True, type=Path, help="cached repository (left untouched)")
    build.add_argument("--out", required=True, type=Path, help="repository to write (replaced)")
    build.add_argument("--profile", type=Path, help="GPU-sharing profile (default: keep the rendered groups)")
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            sys.stdout.write(render_profile(args.pipelines, tuple(args.gpus), args.sizing))
        else:
            profile = Profile.load(args.profile) if args.profile else None
            models = assemble(args.source, args.out, profile)
            print(f"assembled {args.out}: {', '.join(models)}")
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
