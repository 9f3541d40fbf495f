"""`liveportrait-triton bench` end to end on the tiny networks: in-process runs, a real Triton server, perf_analyzer
on every sub-network and on the sequence pipeline, and the written CSV / markdown / plots; plus the runtime choice.

perf_analyzer is part of the project's setup (scripts/install_perf_analyzer.sh): when it is missing these tests fail.
"""
from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ASSETS
from liveportrait_triton import precision, runtimes, spec
from liveportrait_triton.benchmarks import perf_analyzer as P
from liveportrait_triton.benchmarks.runtime_choice import TIE, RuntimeResult, winners
from liveportrait_triton.benchmarks.timing import Stats

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]

SOURCE = ASSETS / "source" / "s0.jpg"
DRIVING = ASSETS / "driving" / "d0.mp4"


def bench(*arguments: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "liveportrait_triton", "bench", *arguments], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"bench failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_perf_analyzer_is_installed():
    P.PerfAnalyzer.locate()     # raises, naming the installer, when setup did not install it


def test_missing_perf_analyzer_names_the_installer(tmp_path):
    with pytest.raises(P.PerfAnalyzerError, match="install_perf_analyzer.sh"):
        P.PerfAnalyzer.locate(tmp_path)


def test_sequence_data_starts_each_stream_with_the_source(tmp_path):
    import base64
    import json
    source = np.full((256, 256, 3), 7, np.uint8)
    driving = [np.full((256, 256, 3), i, np.uint8) for i in range(3)]
    data = json.loads(P.write_sequence_data(tmp_path / "seq.json", source, driving, streams=2, length=4).read_text())
    streams = data["data"]
    assert [len(s) for s in streams] == [4, 4]
    for k, steps in enumerate(streams):
        assert set(steps[0]) == {"source", "driving"} and all(set(s) == {"driving"} for s in steps[1:])
        assert base64.b64decode(steps[0]["source"]["b64"]) == source.tobytes()
        firsts = [base64.b64decode(s["driving"]["b64"])[0] for s in steps]
        assert firsts == [(k + i) % 3 for i in range(4)]


def test_bench_end_to_end(tmp_path, tiny_weights_dir, tiny_repository, tiny_server):
    out = tmp_path / "results"
    done = bench("--config", "tiny", "--weights", str(tiny_weights_dir), "--repository", str(tiny_repository),
                 "--server-url", tiny_server.grpc_url, "--source", str(SOURCE), "--driving", str(DRIVING),
                 "--out", str(out), "--warmup", "1", "--frames", "2", "--batch-sizes", "1,2",
                 "--submodel-requests", "2", "--concurrency", "1,2", "--pipeline-requests-per-stream", "2",
                 "--sequence-length", "3")
    rows = read_rows(out / "benchmark.csv")
    sections = {}
    for row in rows:
        sections.setdefault(row["section"], []).append(row)
    assert {r["runner"] for r in sections["inprocess"]} == {"torch", "exact", "served"}
    assert len(sections["server_stream"]) == 1
    # every sub-network on PyTorch and on its served entry (and its exact entry when reduced), with counted FLOPs
    # and a share of the GEMM rate
    from liveportrait_triton.repository import served_plan
    exact = runtimes.runtime_plan("local")
    modules = {(r["model"], r["runner"]): r for r in sections["module"]}
    expected = set()
    for m, e in served_plan(tiny_repository).items():
        expected |= {(m, "torch"), (m, e.kind if e.exact else e.label())} | (set() if e.exact else {(m, exact[m].kind)})
    assert set(modules) == expected
    for row in modules.values():
        assert float(row["flop"]) > 0 and 0 < float(row["gemm_fraction"]) < 5, row
    generator = {k: float(r["flop"]) for (m, k), r in modules.items() if m == spec.GENERATOR}
    assert len(set(generator.values())) == 1, "the FLOP count is the layers', whatever the runtime"
    assert {(r["model"], r["batch"]) for r in sections["pa_submodel"]} == {
        (m, b) for m in spec.SUBMODELS for b in ("1", "2")}
    assert [r["concurrency"] for r in sections["pa_pipeline"]] == ["1", "2"]
    # the pipeline's time split by sub-model (server statistics): W and G ran for every frame
    composing = {(r["concurrency"], r["model"]) for r in sections["pa_composing"]}
    assert {("1", spec.WARPING), ("1", spec.GENERATOR), ("2", spec.WARPING)} <= composing
    for row in sections["inprocess"] + sections["server_stream"] + sections["pa_submodel"] + sections["pa_pipeline"]:
        p50, p95, p99 = (float(row[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
        assert 0 < p50 <= p95 <= p99 < 600_000, (row["section"], row["model"], p50, p95, p99)
        # at least one item per p99 latency (10x margin): a rate that does not belong to these latencies fails
        assert math.isfinite(float(row["items_per_s"])) and float(row["items_per_s"]) > 1000 / p99 / 10, row
    assert rows[0]["cpu"] and rows[0]["torch"] and rows[0]["triton_server"].startswith("2.")
    text = (out / "benchmark.md").read_text()
    assert "liveportrait-triton bench " in text and "--config tiny" in text and "## Targets" in text
    assert "Served pipeline per frame" in text and "vs PyTorch eager per frame" in text
    assert "fp32 GEMM rate of this machine" in text and "fp32 floor per frame" in text
    assert "## Per sub-network, batch 1" in text
    assert "## Drift against fp32" in text and "| served frame: served vs exact | levels |" in text
    assert "| served frame: exact vs torch | levels |" in text and "In-process per frame: served" in text
    for name in ("throughput_vs_concurrency.png", "latency_by_submodel.png", "submodel_batch_sweep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in done.stdout


def test_runtime_winners_break_ties_by_kind_order():
    """The fastest passing servable kind wins; within TIE the plainer kind (earlier in runtimes.KINDS) does; the
    exact policy picks among fp32 runners, the reduced one among all that lie within the drift bounds, fp32 first
    within TIE."""
    from liveportrait_triton.benchmarks.runtime_choice import refused
    from liveportrait_triton.precision import Drift
    m, w, g, f = spec.MOTION, spec.WARPING, spec.GENERATOR, spec.APPEARANCE

    def result(model, kind, p50_ms, ok=True, precision="fp32", mean=0.5):
        r = RuntimeResult(model, kind, 1, precision, stats=Stats(5, p50_ms, p50_ms, p50_ms, p50_ms, p50_ms))
        r.parity = {"out": (0.0, 1.0, ok)}
        if precision != "fp32":
            r.drift = [Drift(f"{model}.image", "levels", 3.0, mean, 0.1, 0.001)]
        return r
    results = [result(m, "openvino", 100.0), result(m, "openvino_fastconv", 98.0),
               result(w, "openvino", 100.0), result(w, "openvino_fastconv", 60.0),
               result(g, "onnxruntime", 50.0, ok=False), result(g, "torch", 90.0),
               result(g, "openvino", 40.0, precision="bf16", mean=1.5),       # faster, beyond the bounds
               result(w, "torch", 59.0, precision="bf16"),                     # within TIE of fp32: fp32 wins
               result(f, "openvino", 100.0), result(f, "openvino", 50.0, precision="bf16")]
    exact = winners(results)
    assert {k: e.kind for k, e in exact.items()} == {m: "openvino", w: "openvino_fastconv", g: "torch",
                                                     f: "openvino"}
    assert all(e.precision == "fp32" for e in exact.values())
    reduced = winners(results, policy="reduced")
    assert {k: e.label() for k, e in reduced.items()} == {m: "openvino/fp32", w: "openvino_fastconv/fp32",
                                                          g: "torch/fp32", f: "openvino/bf16"}
    [no] = refused(results)
    assert no.startswith(f"{g} on openvino/bf16 refused:") and "mean 1.5 > 1" in no


def test_reduced_entries_that_together_exceed_the_frame_bounds_go_back_to_exact():
    """Each within the bounds, two reduced entries can exceed them together: the one saving the least time goes
    back to exact until the whole frame is within the bounds."""
    from liveportrait_triton.benchmarks.runtime_choice import frame_checked
    from liveportrait_triton.precision import Drift
    f, g = spec.APPEARANCE, spec.GENERATOR

    def result(model, kind, p50_ms, precision="fp32"):
        r = RuntimeResult(model, kind, 1, precision, stats=Stats(5, p50_ms, p50_ms, p50_ms, p50_ms, p50_ms))
        r.parity = {"out": (0.0, 1.0, True)}
        return r
    results = [result(f, "openvino", 1900.0), result(f, "openvino", 760.0, "bf16"),
               result(g, "openvino_fastconv", 15000.0), result(g, "openvino", 10000.0, "bf16")]
    exact = {f: runtimes.RuntimePlanEntry.of(f, "openvino"), g: runtimes.RuntimePlanEntry.of(g, "openvino_fastconv")}
    reduced = {f: runtimes.RuntimePlanEntry.of(f, "openvino", precision="bf16"),
               g: runtimes.RuntimePlanEntry.of(g, "openvino", precision="bf16")}

    def frame(entries):      # 0.6 levels of mean drift per reduced sub-network
        mean = 0.6 * sum(not e.exact for e in entries.values())
        return Drift("frame", "levels", 8.0, mean, 0.2, 0.001)
    kept, tried = frame_checked(exact, reduced, results, frame)
    assert kept == {g: reduced[g]}, "F saves 1.1 s, G 5 s: F goes back to exact"
    assert [labels for labels, _ in tried] == [f"{f} openvino/bf16, {g} openvino/bf16", f"{g} openvino/bf16"]
    assert frame_checked(exact, reduced, results, lambda entries: Drift("frame", "levels", 1, 0.1, 0, 0))[0] == reduced


def test_runtime_choice(tmp_path, tiny_weights_dir, tiny_repository):
    """Every kind measured with parity and FLOP rate; the winners land in the choice file that export renders
    (unmeasured sub-networks keep their committed kind)."""
    import json
    out = tmp_path / "choice"
    choice_file = tmp_path / "runtime_choice.json"
    choice_file.write_text(runtimes.RUNTIME_CHOICE_FILE.read_text())
    done = bench("--runtime-choice", "--config", "tiny", "--weights", str(tiny_weights_dir), "--repository",
                 str(tiny_repository), "--source", str(SOURCE), "--driving", str(DRIVING), "--out", str(out),
                 "--runtime-budget-s", "0.2", "--submodels", f"{spec.WARPING},{spec.STITCHING}",
                 "--choice-file", str(choice_file))
    rows = read_rows(out / "runtime_choice.csv")
    assert {r["runtime"] for r in rows} == {"torch", "torch_fastconv", "onnxruntime", "openvino", "openvino_fastconv"}
    for row in rows:
        if row["precision"] == "fp32":
            assert row["error"] == "" and row["parity_ok"] == "True", row
            assert float(row["flop"]) > 0 and float(row["fraction_of_gemm"]) > 0, row
    reduced = [r for r in rows if r["precision"] != "fp32"]
    assert all(r["model"] != spec.STITCHING for r in reduced), "the MLPs stay fp32"
    if "bf16" in precision.native_precisions("cpu"):
        assert {r["runtime"] for r in reduced} == {"torch", "torch_fastconv", "openvino", "openvino_fastconv"}
        for row in reduced:      # OpenVINO bf16 breaks W's grid-sample indices; every other runner has figures
            assert row["drift"] or "GatherElements" in row["error"], row
    text = (out / "runtime_choice.md").read_text()
    assert "## Winner per sub-network, exact policy" in text and f"| {spec.WARPING} |" in text
    assert "## Winner per sub-network, reduced policy" in text and "## Bounds" in text and "% of GEMM" in text
    assert "## fp16 by emulation" in text
    document = json.loads(choice_file.read_text())["targets"]["local"]
    written = document["exact"]
    assert precision.machine_class() in document["reduced"]
    committed = {m: e.kind for m, e in runtimes.runtime_choice("local").items()}
    served = [r for r in rows if r["batch"] == "1" and r["runtime"] in runtimes.KINDS and r["precision"] == "fp32"]
    fastest = {r["model"]: min(float(o["p50_ms"]) for o in served if o["model"] == r["model"]) for r in served}
    for model, best in fastest.items():     # within TIE of the fastest, the first kind in runtimes.KINDS order
        ties = [r["runtime"] for r in served if r["model"] == model and float(r["p50_ms"]) <= best * (1 + TIE)]
        assert written[model] == min(ties, key=list(runtimes.KINDS).index), (model, ties)
    assert {m: written[m] for m in committed if m not in fastest} == {m: k for m, k in committed.items()
                                                                      if m not in fastest}
    assert "wrote the local target's choice" in done.stdout


def test_serving_layout_rerenders_the_configs(tmp_path):
    """--pipeline-instances / --model-threads re-render the repository's configs (the plan it serves stays); the
    note says the layout."""
    import argparse
    from liveportrait_triton import repository
    from liveportrait_triton.benchmarks.cli import _serving_layout
    plan = runtimes.runtime_plan("local", {spec.WARPING: "torch"})
    repository.write_repository_configs(tmp_path, "local", "tiny", plan=plan)
    note = _serving_layout(argparse.Namespace(pipeline_instances=2, model_threads=1, config="tiny"), tmp_path)
    assert note == "serving layout: 2 pipeline instance(s), one instance of each sub-network with 1 thread(s) each"
    assert repository.read_config(tmp_path / spec.PIPELINE / "config.pbtxt").instance_group[0].count == 2
    warping = repository.config_parameters(repository.read_config(tmp_path / spec.WARPING / "config.pbtxt"))
    assert (warping["threads"], warping["models_at_once"]) == ("1", "2")
    assert repository.served_plan(tmp_path) == plan
