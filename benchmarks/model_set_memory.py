"""Memory each model set takes in the server: RSS and PSS of the Triton process and of every Python-backend stub
(one per model instance), after loading and after animating a few frames of each set the repository serves.

    .venv/bin/python -m liveportrait_triton.benchmarks.model_set_memory --repository DIR [--repository DIR ...]
        [--frames 2] [--out results.json]

Each repository is served in turn on free loopback ports by the bundled Triton server. Per stub the model is read
from its instance name; the human and animal sets' totals are the sums over their models (the shared stitching
MLP and the pipeline counted apart). Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .. import repository as repo
from .. import spec

KIB = 1024


def _kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def process_memory(pid: int) -> dict[str, float]:
    """RSS and PSS of one process in MiB (PSS shares the pages mapped by several processes among them)."""
    proc = Path("/proc") / str(pid)
    return {"rss_mib": _kib(proc / "status", "VmRSS") / KIB, "pss_mib": _kib(proc / "smaps_rollup", "Pss") / KIB}


def model_of(instance: str) -> str:
    """The model of a stub's instance name (`<model>_<group>_<index>`)."""
    return instance.rsplit("_", 2)[0]


def server_memory(server) -> dict:
    """Per model and per set: RSS/PSS in MiB of its stubs; plus the Triton process itself."""
    per_model: dict[str, dict[str, float]] = {}
    for instance, pid in server.stub_processes().items():
        memory = process_memory(pid)
        entry = per_model.setdefault(model_of(instance), {"rss_mib": 0.0, "pss_mib": 0.0})
        for key, value in memory.items():
            entry[key] += value
    sets = {subject: {key: sum(per_model.get(m, {}).get(key, 0.0) for m in models)
                      for key in ("rss_mib", "pss_mib")}
            for subject, models in (("human", [m for m in spec.SUBMODELS if m != spec.STITCHING]),
                                    ("animal", list(spec.ANIMAL_SUBMODELS)))}
    total = {key: process_memory(server.process.pid)[key] + sum(m[key] for m in per_model.values())
             for key in ("rss_mib", "pss_mib")}
    return {"triton": process_memory(server.process.pid), "models": per_model, "sets": sets, "total": total}


def animate(url: str, subjects: tuple[str, ...], frames: int) -> None:
    """A few frames of one stream per served set (the networks' working buffers get allocated)."""
    from ..client import LivePortraitClient, SourceInput
    from ..wire import DrivingFrame
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (spec.SOURCE_SIZE, spec.SOURCE_SIZE, 3), dtype=np.uint8)
    with LivePortraitClient(url) as client:
        for subject in subjects:
            with client.stream(SourceInput(crop, {"subject": subject})) as stream:
                for i in range(frames):
                    stream.send(DrivingFrame(crop=crop), last=i == frames - 1)
                stream.finish()


def measure(repository: Path, frames: int) -> dict:
    from ..serve import TritonServer
    subjects = repo.repository_subjects(repository)
    with TritonServer(repository, startup_timeout_s=1800) as server:
        loaded = server_memory(server)
        animate(server.grpc_url, subjects, frames)
        served = server_memory(server)
    return {"repository": str(repository), "subjects": list(subjects),
            "network_config": repo.repository_network_config(repository), "loaded": loaded,
            f"after_{frames}_frames_per_set": served}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", action="append", required=True, type=Path, help="repository to serve")
    parser.add_argument("--frames", type=int, default=2, help="frames animated per served set")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = [measure(path, args.frames) for path in args.repository]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
