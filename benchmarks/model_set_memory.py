"""Memory each model set takes in the server: RSS and PSS of the Triton process and of every Python-backend stub
(one per model instance), after loading and after animating a few frames of each set the repository serves.

    .venv/bin/python -m liveportrait_triton.benchmarks.model_set_memory [--repository DIR ...] [--frames 2]
        [--activations 1,4 --config full] [--out results.json]

Each repository is served in turn on free loopback ports by the bundled Triton server. Per stub the model is read
from its instance name; the human and animal sets' totals are the sums over their models (the shared stitching
MLP and the pipeline counted apart). `--activations` measures, per sub-network of a set (F, M, W, G; the same for
either set), its weights' bytes and the peak memory one PyTorch forward (fp32, CPU) adds at each batch size, each in
a fresh process (peak RSS before and after the forward): the numbers a second set's cost is calculated from.
Linux only (reads /proc).
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


def _forward_peak(role: str, config: str, batch: int, queue) -> None:
    """In a fresh process: (weights bytes, peak-RSS growth of one forward at `batch`) of sub-network `role`."""
    import resource

    import torch

    from ..config import model_params
    from ..weights import build_network
    torch.set_num_threads(1)
    params = model_params(config)
    network = build_network(params, {spec.APPEARANCE: "appearance_feature_extractor", spec.MOTION: "motion_extractor",
                                     spec.WARPING: "warping_module", spec.GENERATOR: "spade_generator"}[role]).eval()
    if role == spec.GENERATOR:
        network.fold_spectral_norm()        # as loading does
    weights = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    model_spec = spec.submodel_specs(config)[role]
    inputs = [torch.rand(batch, *t.shape) * (0.5 if t.name.startswith("kp") else 1.0) for t in model_spec.inputs]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if role == spec.WARPING:
            network(*inputs)
        else:
            network(inputs[0])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((weights, (after - before) * KIB))


def activations(config: str, batches: list[int]) -> dict:
    """{sub-network: {"weights_mib", "forward_peak_mib": {batch: MiB}}} for F, M, W and G."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    out = {}
    for role in spec.ANIMAL_ROLES:
        entry = {"forward_peak_mib": {}}
        for batch in batches:
            queue = context.Queue()
            process = context.Process(target=_forward_peak, args=(role, config, batch, queue))
            process.start()
            weights, peak = queue.get(timeout=1800)
            process.join()
            entry["weights_mib"] = weights / KIB ** 2
            entry["forward_peak_mib"][batch] = peak / KIB ** 2
        out[role] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", action="append", default=[], type=Path, help="repository to serve")
    parser.add_argument("--frames", type=int, default=2, help="frames animated per served set")
    parser.add_argument("--activations", type=lambda text: [int(b) for b in text.split(",")], default=[],
                        metavar="B[,B...]", help="measure weights and forward peaks at these batch sizes")
    parser.add_argument("--config", default="full", help="network configuration of --activations")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = [measure(path, args.frames) for path in args.repository]
    if args.activations:
        results.append({"config": args.config, "activations": activations(args.config, args.activations)})
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
