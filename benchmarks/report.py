"""Benchmark results: one row type for every measurement, the machine and versions, and the CSV, markdown and PNG
files written from them."""
from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

@dataclasses.dataclass
class Row:
    """One measurement. `section`: inprocess | module | server_stream | pa_submodel | pa_pipeline | pa_composing."""
    section: str
    runner: str               # torch / served / a runtime kind / triton
    model: str
    batch: int = 1
    concurrency: int = 1
    count: int = 0            # timed frames or requests
    items_per_s: float = float("nan")
    mean_ms: float = float("nan")
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    queue_ms: float = float("nan")
    compute_ms: float = float("nan")
    mean_batch: float = float("nan")   # composing models: inferences per execution
    pa_reported_per_s: float = float("nan")   # perf_analyzer's own throughput (window rounded up; see perf_analyzer)
    flop: float = float("nan")                # module rows: conv + linear work of one call
    gemm_fraction: float = float("nan")       # module rows: flop / p50 as a share of the measured GEMM rate


def machine_info(triton_version: str | None = None, perf_analyzer_version: str | None = None) -> dict[str, str]:
    """Machine, CPU, GPU, memory, load and the versions of every runtime in the measurements."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        memory = f"{kib / 2 ** 20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    info = {"machine": f"{platform.node()} ({platform.system()} {platform.machine()})",
            "cpu": f"{cpu}, {os.cpu_count()} logical cores", "gpu": gpu_model(), "memory": memory,
            "load_average_1_5_15": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "python": platform.python_version()}
    for package in ("torch", "onnxruntime", "openvino", "numpy", "tritonclient", "nvidia-pytriton"):
        info[package] = _version(package)
    info["triton_server"] = triton_version or "not run"
    info["perf_analyzer"] = perf_analyzer_version or "not run"
    return info


def gpu_model() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) if out.returncode == 0 and names else "none"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_csv(path: Path, rows: list[Row], machine: dict[str, str]) -> Path:
    """Every row with the machine and version columns repeated, so each line stands on its own."""
    fields = [f.name for f in dataclasses.fields(Row)] + list(machine)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            values = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(row).items()}
            writer.writerow({**values, **machine})
    return path


def write_dict_rows(path: Path, rows: list[dict]) -> Path:
    """Rows of one benchmark (dicts with the same keys, in order) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: float, digits: int = 1) -> str:
    return "" if value != value else f"{value:.{digits}f}"     # NaN -> empty cell


def frame_p50(rows: list[Row], section: str, runner: str | None = None) -> float | None:
    for r in rows:
        if r.section == section and (runner is None or r.runner == runner):
            return r.p50_ms
    return None


PER_FRAME_MODULES = ("motion_extractor", "stitching", "warping_module", "spade_generator")


def targets(rows: list[Row], served_runner: str) -> list[str]:
    """The issue's CPU goals, each stated as met or not met with the numbers behind it (all from this run)."""
    lines = []
    served = frame_p50(rows, "server_stream")
    torch_ms = frame_p50(rows, "inprocess", "torch")
    same = frame_p50(rows, "inprocess", served_runner)
    if served is not None and torch_ms is not None:
        ratio = torch_ms / served
        verdict = "met" if ratio >= 2.0 else "floor met, goal not" if ratio >= 1.5 else "not met"
        lines.append(f"- Served pipeline per frame {served / 1e3:.2f} s (Triton, one stream, p50) vs PyTorch eager "
                     f"per frame {torch_ms / 1e3:.2f} s (in-process, M + stitching + W + G, same run): "
                     f"**{ratio:.2f}x faster**; goal >= 2.0x, floor 1.5x: **{verdict}**.")
    if served is not None and same is not None:
        lines.append(f"- Served vs the same runtimes ({served_runner}) called in-process, one stream: "
                     f"{served / same:.3f}x the in-process time (the cost of Triton, BLS and copies).")
    exact = frame_p50(rows, "inprocess", "exact")
    if exact is not None and same is not None and served_runner != "exact":
        lines.append(f"- In-process per frame: {served_runner} (the repository's precision policy) {same / 1e3:.2f} s vs "
                     f"exact (fp32 plan) {exact / 1e3:.2f} s: **{exact / same:.2f}x**"
                     + (f"; PyTorch eager fp32 {torch_ms / 1e3:.2f} s ({torch_ms / same:.2f}x)" if torch_ms else "")
                     + ". Goal (issue 26): a served full-size frame <= 1.0 s on a 2-core AMX Xeon.")
    modules = {r.model: r for r in rows if r.section == "module" and r.runner == "torch"}
    rate = [r.flop / (r.p50_ms / 1e3) / r.gemm_fraction for r in rows if r.section == "module" and r.gemm_fraction]
    if served is not None and rate and all(m in modules for m in PER_FRAME_MODULES):
        floor_ms = sum(modules[m].flop for m in PER_FRAME_MODULES) / rate[0] * 1e3
        lines.append(f"- fp32 floor per frame (conv + linear GFLOP of M, stitching, W, G / the GEMM rate): "
                     f"{floor_ms / 1e3:.2f} s; served frame {served / floor_ms:.2f}x the floor; goal within 1.3x: "
                     f"**{'met' if served <= 1.3 * floor_ms else 'not met'}**.")
    pipeline = {r.concurrency: r.items_per_s for r in rows if r.section == "pa_pipeline"}
    if 1 in pipeline and 4 in pipeline:
        lines.append(f"- perf_analyzer throughput at concurrency 4: {pipeline[4]:.3f} frames/s vs "
                     f"{pipeline[1]:.3f} at concurrency 1 ({pipeline[4] / pipeline[1]:.2f}x); goal not below: "
                     f"**{'met' if pipeline[4] >= pipeline[1] else 'not met'}**.")
    return lines


def markdown(rows: list[Row], machine: dict[str, str], command: str, served_runner: str,
             plots: list[Path], notes: list[str], drifts: list | None = None) -> str:
    torch_ms = frame_p50(rows, "inprocess", "torch")
    same_ms = frame_p50(rows, "inprocess", served_runner)
    out = ["# LivePortrait-Triton benchmark", "", "Command:", "", "```", command, "```", "",
           "| machine | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    out += ["", "## Targets", ""] + (targets(rows, served_runner) or ["- (no server measurements)"])

    out += ["", "## Per frame, one stream (warm)", "",
            f"Ratios: p50 / in-process torch p50, and p50 / in-process {served_runner} p50 (the runtime the "
            "server's sub-network models use).", "",
            f"| how | runner | frames | frames/s | mean ms | p50 ms | p95 ms | p99 ms | vs torch | vs {served_runner} |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.section in ("inprocess", "server_stream"):
            how = "in-process" if r.section == "inprocess" else "Triton, gRPC stream"
            vs_torch = _fmt(r.p50_ms / torch_ms, 3) if torch_ms else ""
            vs_same = _fmt(r.p50_ms / same_ms, 3) if same_ms else ""
            out.append(f"| {how} | {r.runner} | {r.count} | {_fmt(r.items_per_s, 3)} | {_fmt(r.mean_ms)} | "
                       f"{_fmt(r.p50_ms)} | {_fmt(r.p95_ms)} | {_fmt(r.p99_ms)} | {vs_torch} | {vs_same} |")

    if drifts:
        from ..precision import bounds_markdown, drift_markdown
        out += ["", "## Drift against fp32 (liveportrait_triton/precision.py)", "",
                "Whole frames of the in-process runners above (warm-up frames included), and each reduced-precision "
                "sub-network of the served plan against PyTorch eager fp32 on the recorded inputs (batch 1).", ""]
        out += drift_markdown(drifts) + ["", "Bounds:", ""] + bounds_markdown()

    modules = [r for r in rows if r.section == "module"]
    if modules:
        out += ["", "## Per sub-network, batch 1: PyTorch eager and the served kind, vs the machine's GEMM rate", "",
                "GFLOP: convolution and linear work of one call, counted from the layers (benchmarks/flops.py); "
                "% of GEMM: GFLOP / p50 as a share of the fp32 GEMM rate measured in this run (see the notes). "
                "What a module does besides convolutions (normalisation, activations, W's grid sample and "
                "keypoint Gaussians) costs time but no counted FLOPs, so memory-bound modules stay far below the "
                "rate.", "",
                "| sub-network | runtime | calls | p50 ms | GFLOP | GFLOP/s | % of GEMM | vs torch |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        torch_module = {r.model: r.p50_ms for r in modules if r.runner == "torch"}
        for r in modules:
            speed = _fmt(torch_module[r.model] / r.p50_ms, 2) if r.model in torch_module else ""
            out.append(f"| {r.model} | {r.runner} | {r.count} | {_fmt(r.p50_ms, 2)} | {r.flop / 1e9:.3g} | "
                       f"{r.flop / 1e9 / (r.p50_ms / 1e3):.3g} | {_fmt(100 * r.gemm_fraction, 1)} | {speed} |")

    pipeline = [r for r in rows if r.section == "pa_pipeline"]
    if pipeline:
        same_fps = 1e3 / same_ms if same_ms else None
        out += ["", "## perf_analyzer: `liveportrait` pipeline, gRPC streaming, sequences in flight = concurrency", "",
                f"frames/s = concurrency / mean latency (Little's law; perf_analyzer 2.51's own figure in "
                "--request-count mode uses a window rounded up to whole seconds, and is in the CSV as "
                f"pa_reported_per_s). Throughput ratio: frames/s / in-process {served_runner} frames/s (one stream).",
                "",
                "| concurrency | requests | frames/s | p50 ms | p95 ms | p99 ms | server queue ms | "
                "server compute ms | throughput vs in-process |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in pipeline:
            ratio = _fmt(r.items_per_s / same_fps, 3) if same_fps else ""
            out.append(f"| {r.concurrency} | {r.count} | {_fmt(r.items_per_s, 3)} | {_fmt(r.p50_ms)} | "
                       f"{_fmt(r.p95_ms)} | {_fmt(r.p99_ms)} | {_fmt(r.queue_ms)} | {_fmt(r.compute_ms)} | {ratio} |")
        composing = [r for r in rows if r.section == "pa_composing"]
        if composing:
            out += ["", "Time by sub-model (server statistics over the run): per request to the sub-model, and the mean "
                    "batch it ran (inferences / executions).", "",
                    "| concurrency | sub-model | requests | queue ms | compute ms | mean batch |",
                    "| ---: | --- | ---: | ---: | ---: | ---: |"]
            for r in composing:
                out.append(f"| {r.concurrency} | {r.model} | {r.count} | {_fmt(r.queue_ms)} | {_fmt(r.compute_ms)} | "
                           f"{_fmt(r.mean_batch, 2)} |")

    subs = [r for r in rows if r.section == "pa_submodel"]
    if subs:
        out += ["", "## perf_analyzer: sub-networks, batch sweep (concurrency 1)", "",
                "items/s = batch / mean latency (Little's law, as above).", "",
                "| sub-network | batch | requests | items/s | p50 ms | p95 ms | p99 ms | server compute ms |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in subs:
            out.append(f"| {r.model} | {r.batch} | {r.count} | {_fmt(r.items_per_s, 2)} | {_fmt(r.p50_ms, 2)} | "
                       f"{_fmt(r.p95_ms, 2)} | {_fmt(r.p99_ms, 2)} | {_fmt(r.compute_ms, 2)} |")
    if plots:
        out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


def plot(rows: list[Row], out_dir: Path, served_runner: str) -> list[Path]:
    """throughput_vs_concurrency.png, latency_by_submodel.png and submodel_batch_sweep.png (those with data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    pipeline = sorted((r for r in rows if r.section == "pa_pipeline"), key=lambda r: r.concurrency)
    if pipeline:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r.concurrency for r in pipeline], [r.items_per_s for r in pipeline], "o-",
                label="Triton pipeline (perf_analyzer)")
        for r in rows:
            if r.section == "inprocess":
                ax.axhline(r.items_per_s, linestyle="--", linewidth=1, color="C1" if r.runner == "torch" else "C2"
                           if r.runner == served_runner else "C3", label=f"in-process {r.runner}, one stream")
        ax.set_xlabel("concurrency (sequences in flight)")
        ax.set_ylabel("frames / s")
        ax.set_xticks([r.concurrency for r in pipeline])
        ax.set_ylim(bottom=0)
        ax.set_title("Throughput vs concurrency")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))
    composing = [r for r in rows if r.section == "pa_composing"]
    if composing:
        levels = sorted({r.concurrency for r in composing})
        models = sorted({r.model for r in composing}, key=lambda m: -max(r.compute_ms for r in composing
                                                                          if r.model == m))
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [str(level) for level in levels]
        bottom = [0.0] * len(levels)
        for i, model in enumerate(models):
            for part in ("compute", "queue"):
                heights = []
                for level in levels:
                    match = [r for r in composing if r.model == model and r.concurrency == level]
                    value = (match[0].compute_ms if part == "compute" else match[0].queue_ms) if match else 0.0
                    heights.append(0.0 if value != value else value)
                ax.bar(labels, heights, bottom=bottom, color=f"C{i}", hatch="//" if part == "queue" else None,
                       edgecolor="white" if part == "queue" else None, label=model if part == "compute" else None)
                bottom = [b + h for b, h in zip(bottom, heights)]
        pipe = {r.concurrency: r.mean_ms for r in pipeline}
        ax.scatter(labels, [pipe.get(level, float("nan")) for level in levels], marker="_", s=2000, color="k",
                   label="pipeline request (mean, client)")
        ax.set_xlabel("concurrency (sequences in flight)")
        ax.set_ylabel("ms per request")
        ax.set_title("Pipeline latency by sub-model (server statistics; hatched: queue)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=0.2)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "latency_by_submodel.png"))
    subs = [r for r in rows if r.section == "pa_submodel"]
    if subs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in dict.fromkeys(r.model for r in subs):
            points = sorted((r.batch, r.items_per_s) for r in subs if r.model == model)
            ax.plot(*zip(*points), "o-", label=model)
        ax.set_xlabel("batch size")
        ax.set_ylabel("items / s")
        ax.set_yscale("log")
        ax.set_title("Sub-networks: throughput vs batch (perf_analyzer)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "submodel_batch_sweep.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
