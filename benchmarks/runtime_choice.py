"""Which runtime kind serves each sub-network of a target: every kind of the runtime layer (runtimes.py), timed side
by side on the same real inputs, with parity against PyTorch eager and the fraction of the machine's GEMM rate.

A servable kind wins a sub-network when it has the lowest median latency at batch 1 among the kinds whose outputs
pass the export's validation rule against PyTorch eager (export/validate.py `output_difference`); kinds within TIE
of that latency count as equally fast, and the first of them in runtimes.KINDS order wins (the plain graph before
its fast-convolution rewrite, which changes nothing where a network has no such layers). The winners are written to the choice file that `export` renders (liveportrait_triton/runtime_choice.json).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

from .. import runtimes
from .inputs import batch_of
from .timing import Stats, time_calls

TIE = 0.03     # latencies this close (relative) are run-to-run noise on the 2-core machines here


@dataclasses.dataclass
class RuntimeResult:
    model: str
    kind: str
    batch: int
    stats: Stats | None = None
    cpu_ms: float = float("nan")                           # median CPU time per call, all threads of the process
    setup_s: float = 0.0                                  # session creation: load, trace/freeze or compile
    parity: dict = dataclasses.field(default_factory=dict)   # output -> (max abs diff, bound, ok)
    error: str | None = None
    gflop: float = float("nan")                             # conv + linear work of one call
    gemm_gflops: float = float("nan")                       # the machine's fp32 GEMM rate, same run

    @property
    def fraction_of_gemm(self) -> float:
        """The rate this call reaches (counted FLOPs / p50) as a fraction of the GEMM rate."""
        if self.stats is None:
            return float("nan")
        return self.gflop / (self.stats.p50_ms / 1e3) / self.gemm_gflops

    @property
    def parity_ok(self) -> bool:
        return self.error is None and bool(self.parity) and all(ok for *_, ok in self.parity.values())

    @property
    def worst_diff(self) -> str:
        """The output closest to its bound, as 'diff / bound'."""
        if not self.parity:
            return ""
        name, (diff, bound, _) = max(self.parity.items(), key=lambda kv: kv[1][0] / kv[1][1])
        return f"{name} {diff:.1e} / {bound:.0e}"


def repeats_for(first_call_s: float, budget_s: float, minimum: int = 3, maximum: int = 50) -> int:
    """Timed calls that fit a time budget (at least `minimum`), given one call's duration."""
    return int(min(maximum, max(minimum, budget_s // max(first_call_s, 1e-6))))


def parity(outputs: dict, reference: dict, model: str) -> dict[str, tuple]:
    """{output: (max abs diff, bound, ok)} by the export's validation rule (uint8: level and share of values)."""
    from ..export.validate import UINT8_SHARE_DIFFERING, output_difference
    result = {}
    for name, want in reference.items():
        diff, bound, share = output_difference(model, name, outputs[name], want)
        result[name] = (diff, bound, diff <= bound and (share is None or share <= UINT8_SHARE_DIFFERING))
    return result


def compare_runtimes(weights_dir, config: str, repository, samples: dict[str, list[dict]], models, kinds, batches,
                     threads: int, budget_s: float = 10.0, flops: dict | None = None,
                     gemm_rate: float = float("nan")) -> list[RuntimeResult]:
    """Time every (model, kind, batch) on recorded real inputs, with parity against PyTorch eager; `flops`
    ({model: conv + linear FLOPs per item}) and `gemm_rate` (FLOP/s) give each result its share of the rate.

    Each kind runs in a fresh process (like each served sub-network in its own Python-backend stub), so no other
    runtime's thread pool (TBB, ONNX Runtime, OpenMP) is alive to compete for the cores or skew its timing.
    """
    import concurrent.futures
    import multiprocessing
    ordered = ["torch"] + [k for k in kinds if k != "torch"]     # torch eager first: the parity reference
    results, reference = [], {}
    for kind in ordered:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            measured, outputs = pool.submit(measure_kind, kind, str(weights_dir), config, str(repository), samples,
                                            list(models), list(batches), threads, budget_s).result()
        if kind == "torch":
            reference = outputs
        for r in measured:
            r.gflop = (flops or {}).get(r.model, float("nan")) * r.batch / 1e9
            r.gemm_gflops = gemm_rate / 1e9
            if (r.model, r.batch) in outputs and (r.model, r.batch) in reference:
                r.parity = parity(outputs[(r.model, r.batch)], reference[(r.model, r.batch)], r.model)
            print(format_row(r), flush=True)
        if kind in kinds:
            results += measured
    return results


def timed_subnetwork(kind: str, model_spec, repository, networks=None, threads: int | None = None):
    """The runner a benchmark times: `kind` on the CPU, built from its plan entry. The torch kinds run `networks`;
    the others the repository's files, except an openvino_fastconv file that export did not write (the kind was
    not chosen for that sub-network), which is exported from `networks` into a folder living with the runner."""
    entry = runtimes.RuntimePlanEntry.of(model_spec.name, kind)
    if kind in runtimes.TORCH_KINDS:
        return runtimes.create_subnetwork(entry, model_spec, networks=networks, threads=threads)
    artefact = entry.path(repository)
    folder = None
    if kind == "openvino_fastconv" and not artefact.is_file() and networks is not None:
        import tempfile

        from ..export.onnx_export import export_fastconv_model
        folder = tempfile.TemporaryDirectory(prefix="liveportrait-fastconv-")
        artefact = export_fastconv_model(networks, model_spec.name, Path(folder.name) / entry.artefact)
    runner = runtimes.create_subnetwork(entry, model_spec, artefact=artefact, threads=threads)
    runner.scratch = folder          # removed with the runner
    return runner


def measure_kind(kind: str, weights_dir: str, config: str, repository: str, samples: dict[str, list[dict]],
                 models: list[str], batches: list[int], threads: int, budget_s: float):
    """In this process: every model on runtime `kind`, one session at a time; (results, {(model, batch): outputs})."""
    import torch

    from .. import spec
    from ..weights import load_networks
    torch.set_num_threads(threads)
    networks = (load_networks(weights_dir, config) if kind in (*runtimes.TORCH_KINDS, "openvino_fastconv")
                else None)
    specs = spec.submodel_specs(config)
    results, outputs = [], {}
    for model in models:
        feeds = {b: batch_of(samples[model], b) for b in batches}
        start = time.perf_counter()
        try:
            session = timed_subnetwork(kind, specs[model], repository, networks, threads)
        except Exception as exc:    # a runtime that cannot load this graph is a result, not a crash
            results += [RuntimeResult(model, kind, b, error=f"{type(exc).__name__}: {exc}") for b in batches]
            continue
        setup = time.perf_counter() - start
        for b in batches:
            result = RuntimeResult(model, kind, b, setup_s=setup)
            try:
                first = time.perf_counter()
                outputs[(model, b)] = session.run(feeds[b])      # also the warm-up call
                first = time.perf_counter() - first
                wall, cpu = time_calls(lambda: session.run(feeds[b]), warmup=0, repeats=repeats_for(first, budget_s))
                result.stats = Stats.of(wall)
                result.cpu_ms = Stats.of(cpu).p50_ms
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            results.append(result)
        del session
        gc.collect()
    return results, outputs


def format_row(r: RuntimeResult) -> str:
    if r.stats is None:
        return f"{r.model:30s} {r.kind:20s} b{r.batch}: {r.error}"
    return (f"{r.model:30s} {r.kind:17s} b{r.batch}: p50 {r.stats.p50_ms:9.2f} ms, cpu {r.cpu_ms:9.2f} ms "
            f"(n={r.stats.count}, setup {r.setup_s:.1f} s), {r.gflop:.2f} GFLOP = {r.fraction_of_gemm:.0%} of GEMM, "
            f"parity {'ok' if r.parity_ok else 'FAIL'} {r.worst_diff}")


def winners(results: list[RuntimeResult], batch: int = 1, target: str = "local") -> dict[str, str]:
    """{model: fastest kind at `batch` among the kinds `target` can serve that pass the validation rule, the
    first in runtimes.KINDS order among those within TIE of the fastest}."""
    candidates: dict[str, list[RuntimeResult]] = {}
    for r in results:
        if (r.batch == batch and r.parity_ok and r.stats is not None
                and r.kind in runtimes.KINDS):
            candidates.setdefault(r.model, []).append(r)
    order = list(runtimes.KINDS)
    chosen = {}
    for model, found in candidates.items():
        fastest = min(r.stats.p50_ms for r in found)
        ties = [r for r in found if r.stats.p50_ms <= fastest * (1 + TIE)]
        chosen[model] = min(ties, key=lambda r: order.index(r.kind)).kind
    return chosen


def speedups(results: list[RuntimeResult]) -> dict[tuple[str, str, int], float]:
    """{(model, kind, batch): torch eager p50 / this p50}."""
    torch_p50 = {(r.model, r.batch): r.stats.p50_ms for r in results if r.kind == "torch" and r.stats}
    return {(r.model, r.kind, r.batch): torch_p50[(r.model, r.batch)] / r.stats.p50_ms
            for r in results if r.stats and (r.model, r.batch) in torch_p50}


def write_choice(path: str | Path, chosen: dict[str, str], target: str = "local") -> dict[str, str]:
    """Update `target`'s entry of the choice file (the committed one by default) with the measured winners;
    sub-networks not measured keep their kind. Returns the entry written."""
    path = Path(path)
    document = json.loads(path.read_text()) if path.is_file() else {"targets": {}}
    entry = {m: e.kind for m, e in runtimes.plan_of({**document["targets"].get(target, {}), **chosen}).items()}
    document["targets"][target] = entry
    path.write_text(json.dumps(document, indent=2) + "\n")
    return entry


def markdown(results: list[RuntimeResult], command: str, machine: dict) -> str:
    """runtime_choice.md: the command, machine, the full table and the winner per sub-network."""
    ratio = speedups(results)
    win = winners(results)
    lines = ["# Runtime kind per sub-network (local target)", "",
             "Every kind of `liveportrait_triton/runtimes.py` timed on the same real inputs (recorded "
             "while the pipeline animated real driving crops); each runtime in a fresh process of its own, one "
             "session at a time (as each served sub-network runs in its own Python-backend process). Parity: max abs difference "
             "from PyTorch eager against the export's per-output bound (worst output shown). "
             "Speed-up: PyTorch eager p50 / this p50. CPU ms: median CPU time of the process per call (all "
             "threads); it leaves out time spent waiting for a core, so other processes on the machine disturb it "
             "less than wall time (shared caches and memory bandwidth still do). GFLOP: convolution and linear work "
             "per call, counted from the layers; % of GEMM: GFLOP / p50 as a share of the fp32 GEMM rate measured "
             "in the same run (benchmarks/flops.py).", "",
             "Command:", "", "```", command, "```", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "Kinds (`runtimes.KINDS`):", ""]
    lines += [f"- `{k}`: {v}" for k, v in runtimes.KINDS.items() if any(r.kind == k for r in results)]
    lines += ["", "| sub-network | runtime | batch | p50 ms | p95 ms | CPU ms | calls | speed-up vs torch | GFLOP | "
              "% of GEMM | setup s | parity |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if r.stats is None:
            lines.append(f"| {r.model} | {r.kind} | {r.batch} | | | | | | | | | error: {r.error} |")
            continue
        verdict = ("ok " if r.parity_ok else "FAIL ") + r.worst_diff
        lines.append(f"| {r.model} | {r.kind} | {r.batch} | {r.stats.p50_ms:.2f} | {r.stats.p95_ms:.2f} | "
                     f"{r.cpu_ms:.2f} | {r.stats.count} | {ratio.get((r.model, r.kind, r.batch), float('nan')):.2f} | "
                     f"{r.gflop:.3g} | {r.fraction_of_gemm:.1%} | {r.setup_s:.1f} | {verdict} |")
    lines += ["", "## Winner per sub-network (batch 1, servable kinds that pass the validation rule)", "",
              "| sub-network | runtime | p50 ms | speed-up vs torch |", "| --- | --- | ---: | ---: |"]
    p50 = {(r.model, r.kind): r.stats.p50_ms for r in results if r.batch == 1 and r.stats}
    for model, kind in win.items():
        lines.append(f"| {model} | {kind} | {p50[(model, kind)]:.2f} | {ratio[(model, kind, 1)]:.2f} |")
    return "\n".join(lines) + "\n"


def csv_rows(results: list[RuntimeResult]) -> list[dict]:
    ratio = speedups(results)
    rows = []
    for r in results:
        s = r.stats
        rows.append({"model": r.model, "runtime": r.kind, "batch": r.batch,
                     "p50_ms": s and round(s.p50_ms, 3), "p95_ms": s and round(s.p95_ms, 3),
                     "mean_ms": s and round(s.mean_ms, 3), "cpu_ms": round(r.cpu_ms, 3), "calls": s and s.count,
                     "speedup_vs_torch": round(ratio[(r.model, r.kind, r.batch)], 3)
                     if (r.model, r.kind, r.batch) in ratio else None,
                     "setup_s": round(r.setup_s, 2), "flop": round(r.gflop * 1e9) if r.gflop == r.gflop else None,
                     "fraction_of_gemm": round(r.fraction_of_gemm, 4), "parity_ok": r.parity_ok,
                     "max_abs_diff": max((d for d, *_ in r.parity.values()), default=None)
                     if r.parity else None, "error": r.error})
    return rows

