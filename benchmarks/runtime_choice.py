"""Which runtime kind and precision serve each sub-network of a target: every (kind, precision) of the runtime
layer (runtimes.py) that this machine runs natively, timed side by side on the same real inputs, with parity
against PyTorch eager fp32 and the fraction of the machine's GEMM rate.

An fp32 runner passes when its outputs pass the export's validation rule (export/validate.py
`output_difference`); a reduced-precision one when its drift against PyTorch fp32 lies within precision.BOUNDS
(the same figures export validation reports). Among the passing runners, those within TIE of the lowest median
latency at batch 1 count as equally fast and the first of them wins: fp32 before bf16, then runtimes.KINDS order
(the plain graph before its fast-convolution rewrite). The `exact` winner is chosen among fp32 runners only, the
`reduced` one among all, for this machine's class (precision.machine_class); both are written to the choice file
that `export` renders (liveportrait_triton/runtime_choice.json). M and the MLPs are timed in fp32 only
(precision.ALWAYS_FP32). `emulated_fp16_drift` measures fp16 by emulation (fp16 operands, fp32 accumulation: a
GPU's tensor cores): numbers for the GPU bounds, never a served choice.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

from .. import precision as precisions
from .. import runtimes
from .inputs import batch_of
from .timing import Stats, time_calls

TIE = 0.03     # latencies this close (relative) are run-to-run noise on the 2-core machines here


@dataclasses.dataclass
class RuntimeResult:
    model: str
    kind: str
    batch: int
    precision: str = "fp32"
    stats: Stats | None = None
    cpu_ms: float = float("nan")                           # median CPU time per call, all threads of the process
    setup_s: float = 0.0                                  # session creation: load, trace/freeze or compile
    parity: dict = dataclasses.field(default_factory=dict)   # output -> (max abs diff, bound, ok)
    error: str | None = None
    gflop: float = float("nan")                             # conv + linear work of one call
    gemm_gflops: float = float("nan")                       # the machine's fp32 GEMM rate, same run
    drift: list = dataclasses.field(default_factory=list)     # precision.Drift per output (reduced precision)

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.precision}"

    @property
    def fraction_of_gemm(self) -> float:
        """The rate this call reaches (counted FLOPs / p50) as a fraction of the GEMM rate."""
        if self.stats is None:
            return float("nan")
        return self.gflop / (self.stats.p50_ms / 1e3) / self.gemm_gflops

    @property
    def parity_ok(self) -> bool:
        if self.precision != "fp32":
            return self.error is None and bool(self.drift) and all(map(precisions.within_bounds, self.drift))
        return self.error is None and bool(self.parity) and all(ok for *_, ok in self.parity.values())

    @property
    def worst_diff(self) -> str:
        """The output closest to its bound, as 'diff / bound' (fp32), or the drift figures (reduced precision)."""
        if self.precision != "fp32":
            return "; ".join(d.describe().split(": ", 1)[1] if precisions.within_bounds(d) else
                             f"{d.describe()} ({', '.join(precisions.problems(d))})" for d in self.drift[:2])
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


def candidates(kinds, precisions_wanted=None, machine: str | None = None) -> list[tuple[str, str]]:
    """(kind, precision) pairs to time: each kind in each of its precisions this machine's CPU runs natively
    (and in `precisions_wanted`, default all), fp32 first."""
    native = precisions.native_precisions("cpu", machine)
    wanted = precisions_wanted or native
    return [(k, p) for p in native if p in wanted for k in kinds if p in runtimes.PRECISIONS_OF_KIND.get(k, ("fp32",))]


def compare_runtimes(weights_dir, config: str, repository, samples: dict[str, list[dict]], models, kinds, batches,
                     threads: int, budget_s: float = 10.0, flops: dict | None = None,
                     gemm_rate: float = float("nan"), precisions_wanted=None) -> list[RuntimeResult]:
    """Time every (model, kind, precision, batch) on recorded real inputs, with parity (fp32) or drift (reduced
    precision) against PyTorch eager fp32; `flops` ({model: conv + linear FLOPs per item}) and `gemm_rate`
    (FLOP/s) give each result its share of the rate.

    Each (kind, precision) runs in a fresh process (like each served sub-network in its own Python-backend stub),
    so no other runtime's thread pool (TBB, ONNX Runtime, OpenMP) is alive to compete for the cores or skew its
    timing.
    """
    import concurrent.futures
    import multiprocessing
    pairs = candidates(kinds, precisions_wanted)
    ordered = [("torch", "fp32")] + [p for p in pairs if p != ("torch", "fp32")]   # the reference first
    results, reference = [], {}
    downstream = Downstream(weights_dir, config, samples, threads)
    for kind, precision in ordered:
        chosen = [m for m in models if precision == "fp32" or m not in precisions.ALWAYS_FP32]
        if not chosen:
            continue
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            measured, outputs = pool.submit(measure_kind, kind, str(weights_dir), config, str(repository), samples,
                                            chosen, list(batches), threads, budget_s, precision).result()
        if (kind, precision) == ("torch", "fp32"):
            reference = outputs
        for r in measured:
            r.gflop = (flops or {}).get(r.model, float("nan")) * r.batch / 1e9
            r.gemm_gflops = gemm_rate / 1e9
            if (r.model, r.batch) in outputs and (r.model, r.batch) in reference:
                got, want = outputs[(r.model, r.batch)], reference[(r.model, r.batch)]
                r.parity = parity(got, want, r.model)
                if precision != "fp32":
                    r.drift = [precisions.output_drift(r.model, name, got[name], want[name]) for name in want]
                    r.drift += downstream.drift(r.model, got, want)
            print(format_row(r), flush=True)
        if (kind, precision) in pairs:
            results += measured
    return results


class Downstream:
    """precision.downstream_drift over PyTorch fp32 networks loaded on first use, the other inputs from the
    recorded samples, the fp32 outputs' image computed once per (model, batch)."""

    def __init__(self, weights_dir, config: str, samples: dict[str, list[dict]], threads: int):
        self.weights_dir, self.config, self.samples, self.threads = weights_dir, config, samples, threads
        self._runner = None
        self._images: dict[tuple[str, int], object] = {}

    def drift(self, model: str, got: dict, want: dict) -> list:
        from .. import spec
        if model not in (spec.APPEARANCE, spec.WARPING):
            return []
        if self._runner is None:
            import torch

            from ..pipeline import TorchRunner
            from ..weights import load_networks
            torch.set_num_threads(self.threads)
            self._runner = TorchRunner(load_networks(self.weights_dir, self.config), threads=self.threads)
        batch = next(iter(want.values())).shape[0]
        kp = {k: v for k, v in batch_of(self.samples[spec.WARPING], batch).items() if k != "feature_volume"}
        if (model, batch) not in self._images:
            self._images[(model, batch)] = precisions.downstream_image(self._runner, model, want, kp)
        return precisions.downstream_drift(self._runner, model, got, want, kp, self._images[(model, batch)])


def rounded_networks(networks, dtype):
    """A copy of `networks` whose convolutions and linear layers take operands (inputs, weights, biases) rounded to
    `dtype` and round their outputs to it, accumulating in fp32 between: how a GPU's half-precision tensor cores
    compute (normalisation, softmax and W's grid-sample maths stay fp32, as the TensorRT fp16 engines keep them),
    at fp32 speed on the CPU. Overflow shows as it would on the GPU: inf."""
    import copy

    import torch
    from torch import nn

    def rounded(t):
        return t.to(dtype).float() if torch.is_tensor(t) and t.is_floating_point() else t

    out = copy.deepcopy(networks)
    for field in ("appearance_feature_extractor", "motion_extractor", "warping_module", "spade_generator"):
        for module in getattr(out, field).modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                module.weight.data = rounded(module.weight.data)
                if module.bias is not None:
                    module.bias.data = rounded(module.bias.data)
                module.register_forward_pre_hook(lambda _, args: tuple(rounded(a) for a in args))
                module.register_forward_hook(lambda _, args, result: rounded(result))
    return out


def emulated_fp16_drift(weights_dir, config: str, samples: dict[str, list[dict]], models, threads: int) -> list:
    """precision.Drift of every output of `models` (F, W, G: those a GPU plan runs in half precision), and of the
    image F and W give through fp32 downstream networks, with fp16 operands (`rounded_networks`) against fp32, at
    batch 1 on the recorded inputs: the numerics of fp16 on a GPU without a GPU. (PyTorch's CPU fp16 autocast
    would compute the same but has no fast fp16 convolution here: one 256-channel 3x3 convolution on 64x64 took
    over 120 s against 0.29 s in fp32.)"""
    import torch

    from .. import spec
    from ..weights import load_networks
    torch.set_num_threads(threads)
    networks = load_networks(weights_dir, config)
    half_networks = rounded_networks(networks, torch.float16)
    specs = spec.submodel_specs(config)
    downstream = Downstream(weights_dir, config, samples, threads)
    drifts = []
    for model in models:
        feeds = batch_of(samples[model], 1)
        exact = runtimes.create_subnetwork(runtimes.RuntimePlanEntry.of(model, "torch"), specs[model],
                                           networks=networks, threads=threads)
        half = runtimes.create_subnetwork(runtimes.RuntimePlanEntry.of(model, "torch"), specs[model],
                                          networks=half_networks, threads=threads)
        want, got = exact.run(feeds), half.run(feeds)
        found = [precisions.output_drift(model, name, got[name], want[name]) for name in want]
        found += downstream.drift(model, got, want)
        found = [dataclasses.replace(d, what=f"{d.what} (fp16 operands)") for d in found]
        for d in found:
            print(f"fp16 by emulation: {d.describe()}", flush=True)
        drifts += found
    return drifts


def timed_subnetwork(kind: str, model_spec, repository, networks=None, threads: int | None = None,
                     precision: str = "fp32"):
    """The runner a benchmark times: `kind` on the CPU in `precision`, built from its plan entry. The torch kinds
    run `networks`; the others the repository's files, except an openvino_fastconv file that export did not write
    (the kind was not chosen for that sub-network), which is exported from `networks` into a folder living with the
    runner."""
    entry = runtimes.RuntimePlanEntry.of(model_spec.name, kind, precision=precision)
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
                 models: list[str], batches: list[int], threads: int, budget_s: float, precision: str = "fp32"):
    """In this process: every model on runtime `kind` in `precision`, one session at a time; (results,
    {(model, batch): outputs})."""
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
            session = timed_subnetwork(kind, specs[model], repository, networks, threads, precision)
        except Exception as exc:    # a runtime that cannot load this graph is a result, not a crash
            results += [RuntimeResult(model, kind, b, precision, error=f"{type(exc).__name__}: {exc}")
                        for b in batches]
            continue
        setup = time.perf_counter() - start
        for b in batches:
            result = RuntimeResult(model, kind, b, precision, setup_s=setup)
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
        return f"{r.model:30s} {r.label:22s} b{r.batch}: {r.error}"
    return (f"{r.model:30s} {r.label:22s} b{r.batch}: p50 {r.stats.p50_ms:9.2f} ms, cpu {r.cpu_ms:9.2f} ms "
            f"(n={r.stats.count}, setup {r.setup_s:.1f} s), {r.gflop:.2f} GFLOP = {r.fraction_of_gemm:.0%} of GEMM, "
            f"parity {'ok' if r.parity_ok else 'FAIL'} {r.worst_diff}")


def winners(results: list[RuntimeResult], batch: int = 1, policy: str = precisions.EXACT
            ) -> dict[str, runtimes.RuntimePlanEntry]:
    """{model: plan entry of the fastest runner at `batch` that passes (fp32: the validation rule; reduced: the
    drift bounds)}, among fp32 runners for the exact policy and all for the reduced one; among those within TIE
    of the fastest, fp32 before bf16, then runtimes.KINDS order."""
    found: dict[str, list[RuntimeResult]] = {}
    for r in results:
        if (r.batch == batch and r.parity_ok and r.stats is not None and r.kind in runtimes.KINDS
                and (policy == precisions.REDUCED or r.precision == "fp32")):
            found.setdefault(r.model, []).append(r)
    order = list(runtimes.KINDS)
    chosen = {}
    for model, passing in found.items():
        fastest = min(r.stats.p50_ms for r in passing)
        ties = [r for r in passing if r.stats.p50_ms <= fastest * (1 + TIE)]
        best = min(ties, key=lambda r: (runtimes.PRECISIONS.index(r.precision), order.index(r.kind)))
        chosen[model] = runtimes.RuntimePlanEntry.of(model, best.kind, precision=best.precision)
    return chosen


def frame_checked(exact: dict, reduced: dict, results: list[RuntimeResult], frame_drift, batch: int = 1):
    """The reduced winners whose plan, all together, keeps the whole frame within the bounds: sub-networks within
    the bounds one by one can exceed them together, so while the frame of (exact entries, then the reduced ones
    left) drifts beyond precision.BOUNDS against the exact frame (`frame_drift(entries) -> Drift`), the reduced
    entry that saves the least time goes back to exact. Returns (the reduced entries kept, [(labels, Drift) of
    each plan tried])."""
    p50 = {(r.model, r.kind, r.precision): r.stats.p50_ms for r in results if r.batch == batch and r.stats}

    def saving(model):
        e, x = reduced[model], exact.get(model)
        if x is None or (model, x.kind, x.precision) not in p50:
            return 0.0
        return p50[(model, x.kind, x.precision)] - p50.get((model, e.kind, e.precision), float("inf"))
    kept = {m: e for m, e in reduced.items() if not e.exact}
    tried = []
    while kept:
        drift = frame_drift({**exact, **kept})
        tried.append((", ".join(f"{m} {e.label()}" for m, e in kept.items()), drift))
        if precisions.within_bounds(drift):
            break
        del kept[min(kept, key=saving)]
    return {**{m: e for m, e in reduced.items() if e.exact}, **kept}, tried


def refused(results: list[RuntimeResult], batch: int = 1) -> list[str]:
    """The reduced-precision runners refused for their drift, with the figures (precision.check's message)."""
    out = []
    for r in results:
        if r.batch == batch and r.precision != "fp32" and r.drift and r.error is None:
            try:
                precisions.check(r.drift, f"{r.model} on {r.label}")
            except precisions.DriftOutOfBounds as exc:
                out.append(str(exc))
    return out


def speedups(results: list[RuntimeResult]) -> dict[tuple[str, str, str, int], float]:
    """{(model, kind, precision, batch): torch eager fp32 p50 / this p50}."""
    torch_p50 = {(r.model, r.batch): r.stats.p50_ms for r in results
                 if (r.kind, r.precision) == ("torch", "fp32") and r.stats}
    return {(r.model, r.kind, r.precision, r.batch): torch_p50[(r.model, r.batch)] / r.stats.p50_ms
            for r in results if r.stats and (r.model, r.batch) in torch_p50}


def _choice_value(entry: runtimes.RuntimePlanEntry):
    return entry.kind if entry.exact else {"kind": entry.kind, "precision": entry.precision}


def write_choice(path: str | Path, exact: dict[str, runtimes.RuntimePlanEntry],
                 reduced: dict[str, runtimes.RuntimePlanEntry] | None = None, machine: str | None = None,
                 source: str = "", target: str = "local") -> dict:
    """Update `target`'s entry of the choice file (the committed one by default) with the measured winners: the
    exact kinds, and the reduced-precision entries of machine class `machine` (default this machine's;
    sub-networks whose reduced winner is fp32 are left out: they run their exact entry). Sub-networks not
    measured keep what the file has. Returns the target's entry written."""
    path = Path(path)
    document = json.loads(path.read_text()) if path.is_file() else {"targets": {}}
    entry = document["targets"].setdefault(target, {})
    before = {m: runtimes.choice_entry(m, v) for m, v in entry.get("exact", {}).items()}
    entry["exact"] = {m: e.kind for m, e in runtimes.plan_of({**before, **exact}).items()}
    if reduced is not None:
        machine = machine or precisions.machine_class()
        classes = entry.setdefault("reduced", {})
        kept = {m: v for m, v in classes.get(machine, {}).get("plan", {}).items() if m not in reduced}
        kept.update({m: _choice_value(e) for m, e in reduced.items() if not e.exact})
        classes[machine] = {"source": source, "plan": {m: kept[m] for m in runtimes.plan_of(
            {**{m: runtimes.choice_entry(m, v) for m, v in entry["exact"].items()},
             **{m: runtimes.choice_entry(m, v) for m, v in kept.items()}}) if m in kept}}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return entry


def markdown(results: list[RuntimeResult], command: str, machine: dict, fp16: list | None = None,
             frames: list | None = None, reduced: dict | None = None) -> str:
    """runtime_choice.md: the command, machine, the full table, the drift table, the bounds and the winners per
    sub-network (exact and reduced)."""
    ratio = speedups(results)
    lines = ["# Runtime kind and precision per sub-network (local target)", "",
             "Every (kind, precision) of `liveportrait_triton/runtimes.py` this CPU runs natively, timed on the same "
             "real inputs (recorded while the pipeline animated real driving crops); each runtime in a fresh process "
             "of its own, one session at a time (as each served sub-network runs in its own Python-backend process). "
             "Parity: fp32 runners: max abs difference from PyTorch eager fp32 against the export's per-output "
             "bound (worst output shown); reduced-precision runners: drift against PyTorch fp32 within "
             "`precision.BOUNDS` (below). Speed-up: PyTorch eager fp32 p50 / this p50. CPU ms: median CPU time of "
             "the process per call (all threads); it leaves out time spent waiting for a core, so other processes "
             "on the machine disturb it less than wall time. GFLOP: convolution and linear work per call, counted "
             "from the layers; % of GEMM: GFLOP / p50 as a share of the fp32 GEMM rate measured in the same run "
             "(benchmarks/flops.py).", "",
             "Command:", "", "```", command, "```", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "Kinds (`runtimes.KINDS`):", ""]
    lines += [f"- `{k}`: {v}" for k, v in runtimes.KINDS.items() if any(r.kind == k for r in results)]
    lines += ["", "| sub-network | runtime | precision | batch | p50 ms | p95 ms | CPU ms | calls | speed-up vs torch "
              "fp32 | GFLOP | % of GEMM | setup s | parity / drift |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if r.stats is None:
            lines.append(f"| {r.model} | {r.kind} | {r.precision} | {r.batch} | | | | | | | | | error: {r.error} |")
            continue
        verdict = ("ok " if r.parity_ok else "FAIL ") + r.worst_diff
        lines.append(f"| {r.model} | {r.kind} | {r.precision} | {r.batch} | {r.stats.p50_ms:.2f} | "
                     f"{r.stats.p95_ms:.2f} | {r.cpu_ms:.2f} | {r.stats.count} | "
                     f"{ratio.get((r.model, r.kind, r.precision, r.batch), float('nan')):.2f} | "
                     f"{r.gflop:.3g} | {r.fraction_of_gemm:.1%} | {r.setup_s:.1f} | {verdict} |")
    drifts = [d for r in results if r.batch == 1 for d in r.drift]
    if drifts:
        lines += ["", "## Drift of the reduced-precision runners against PyTorch fp32 (batch 1)", "",
                  "`runtime` column left out: each output's row names its sub-network; rows in the order of the "
                  "table above.", ""]
        lines += precisions.drift_markdown(
            [dataclasses.replace(d, what=f"{d.what} ({r.label})") for r in results if r.batch == 1
             for d in r.drift])
    if fp16:
        lines += ["", "## fp16 by emulation (fp16 operands, fp32 accumulation, vs fp32; batch 1)", "",
                  "The numerics of half precision on a GPU's tensor cores, measured without one "
                  "(benchmarks/runtime_choice.py `rounded_networks`); export/tensorrt_build.py holds FP16 engines "
                  "to the same bounds:", ""]
        lines += precisions.drift_markdown(fp16)
    lines += ["", "## Bounds (`liveportrait_triton/precision.py` BOUNDS)", ""] + precisions.bounds_markdown()
    no = refused(results)
    if no:
        lines += ["", "## Refused for their drift", ""] + [f"- {line}" for line in no]
    if frames:
        lines += ["", "## Whole frame of the reduced plan against the exact plan's", "",
                  "The reduced winners together, on the recorded driving crops; while the frame drifts beyond the "
                  "bounds, the one that saves the least time goes back to exact (`frame_checked`).", "",
                  "| reduced entries | max | mean | > 1 level | > 4 levels | within bounds |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for labels, d in frames:
            verdict = "yes" if precisions.within_bounds(d) else "**no**: " + ", ".join(precisions.problems(d))
            lines.append(f"| {labels} | {d.max:.0f} | {d.mean:.3f} | {d.over_1:.2%} | {d.over_4:.2%} | {verdict} |")
    p50 = {(r.model, r.kind, r.precision): r.stats.p50_ms for r in results if r.batch == 1 and r.stats}
    for policy in precisions.POLICIES:
        chosen = winners(results, policy=policy) if policy == precisions.EXACT or reduced is None else reduced
        lines += ["", f"## Winner per sub-network, {policy} policy (batch 1, servable runners that pass"
                  + (", whole frame within the bounds" if policy == precisions.REDUCED and frames else "") + ")", "",
                  "| sub-network | runtime | precision | p50 ms | speed-up vs torch fp32 |",
                  "| --- | --- | --- | ---: | ---: |"]
        for model, e in chosen.items():
            lines.append(f"| {model} | {e.kind} | {e.precision} | {p50[(model, e.kind, e.precision)]:.2f} | "
                         f"{ratio.get((model, e.kind, e.precision, 1), float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def csv_rows(results: list[RuntimeResult]) -> list[dict]:
    ratio = speedups(results)
    rows = []
    for r in results:
        s = r.stats
        key = (r.model, r.kind, r.precision, r.batch)
        rows.append({"model": r.model, "runtime": r.kind, "precision": r.precision, "batch": r.batch,
                     "p50_ms": s and round(s.p50_ms, 3), "p95_ms": s and round(s.p95_ms, 3),
                     "mean_ms": s and round(s.mean_ms, 3), "cpu_ms": round(r.cpu_ms, 3), "calls": s and s.count,
                     "speedup_vs_torch": round(ratio[key], 3) if key in ratio else None,
                     "setup_s": round(r.setup_s, 2), "flop": round(r.gflop * 1e9) if r.gflop == r.gflop else None,
                     "fraction_of_gemm": round(r.fraction_of_gemm, 4), "parity_ok": r.parity_ok,
                     "max_abs_diff": max((d for d, *_ in r.parity.values()), default=None)
                     if r.parity else None,
                     "drift": "; ".join(d.describe() for d in r.drift), "error": r.error})
    return rows
