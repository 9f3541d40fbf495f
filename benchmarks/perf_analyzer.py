"""perf_analyzer, Triton's load generator: find the installed binary, write its `--input-data` JSON from real
inputs, run batch sweeps on sub-networks and concurrency sweeps on the `liveportrait` sequence model, parse results.

The binary comes from the tritonclient 2.51.0 wheel and links libcudart.so.12 and libb64
(scripts/install_perf_analyzer.sh installs all three); this module sets LD_LIBRARY_PATH for it.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np

from .. import spec

INSTALLER = "scripts/install_perf_analyzer.sh"
DIR_VARIABLE = "LP_PERF_ANALYZER_DIR"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, does not start, or a run failed (the message says which and why)."""


def default_dir() -> Path:
    """Where the installer puts perf_analyzer unless told otherwise (kept in step with the installer)."""
    if os.environ.get(DIR_VARIABLE):
        return Path(os.environ[DIR_VARIABLE])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "liveportrait-triton" / "perf_analyzer"


@dataclasses.dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dir: Path

    @classmethod
    def locate(cls, path: str | os.PathLike | None = None) -> "PerfAnalyzer":
        """The installed perf_analyzer: `path` (the install dir or the binary), else $LP_PERF_ANALYZER_DIR, else
        the installer's default dir. Raises PerfAnalyzerError pointing at the installer when missing or broken."""
        root = Path(path) if path else default_dir()
        binary = root if root.is_file() else root / "bin" / "perf_analyzer"
        lib_dir = binary.parent.parent / "lib"
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise PerfAnalyzerError(f"perf_analyzer not found at {binary}: install it with `bash {INSTALLER}` "
                                    f"(or set {DIR_VARIABLE} / --perf-analyzer to where it is installed)")
        found = cls(binary, lib_dir)
        check = subprocess.run([str(binary), "--version"], env=found.environment(), capture_output=True, text=True,
                               timeout=60)
        if check.returncode != 0:
            raise PerfAnalyzerError(f"{binary} does not start ({(check.stderr or check.stdout).strip()[-300:]}); "
                                    f"re-run `bash {INSTALLER}` (it installs libb64-0d and libcudart.so.12)")
        return found

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH")) if p)
        return env

    def run(self, arguments: list[str], timeout_s: float) -> str:
        """Run with `arguments`; its stdout, or PerfAnalyzerError with the tail of its output."""
        try:
            done = subprocess.run([str(self.binary), *arguments], env=self.environment(), capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(f"perf_analyzer {' '.join(arguments)} ran past {timeout_s:.0f} s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise PerfAnalyzerError(f"perf_analyzer {' '.join(arguments)} failed (exit {done.returncode}):\n{tail}")
        return done.stdout


# ---------------------------------------------------------------------------------------------------------------
# --input-data JSON

def _b64(array: np.ndarray, dtype) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")}


def write_submodel_data(path: str | os.PathLike, model_spec: spec.ModelSpec,
                        samples: list[dict[str, np.ndarray]]) -> Path:
    """One step per recorded batch-1 sample (perf_analyzer cycles through them), every input as b64 bytes."""
    steps = []
    for sample in samples:
        step = {}
        for t in model_spec.inputs:
            array = np.asarray(sample[t.name])
            if array.shape != (1, *t.shape):
                raise ValueError(f"{model_spec.name}: sample {t.name!r} has shape {list(array.shape)}, "
                                 f"expected [1, {', '.join(map(str, t.shape))}]")
            step[t.name] = _b64(array, t.numpy_dtype)
        steps.append(step)
    path = Path(path)
    path.write_text(json.dumps({"data": steps}))
    return path


def write_sequence_data(path: str | os.PathLike, source: np.ndarray, driving: list[np.ndarray], streams: int,
                        length: int) -> Path:
    """Streams for the `liveportrait` sequence model: each a list of `length` steps, the first carrying `source`
    and a driving crop (the START request), the others one driving crop each. Stream k starts k frames later
    in the driving video, so concurrent streams do not send identical frames."""
    if length < 1 or streams < 1 or not driving:
        raise ValueError("need at least one stream, one step per stream and one driving frame")
    uint8 = spec.PIPELINE_SPEC.input("driving").numpy_dtype
    encoded = [_b64(crop, uint8) for crop in driving]
    data = []
    for k in range(streams):
        steps = [{"driving": encoded[(k + i) % len(encoded)]} for i in range(length)]
        steps[0] = {"source": _b64(source, uint8), **steps[0]}
        data.append(steps)
    path = Path(path)
    path.write_text(json.dumps({"data": data}))
    return path


# ---------------------------------------------------------------------------------------------------------------
# runs and results

@dataclasses.dataclass
class PerfResult:
    """One perf_analyzer measurement (latencies in ms)."""
    model: str
    batch: int
    concurrency: int
    requests: int
    throughput: float                    # items per second: concurrency * batch / mean latency (Little's law)
    reported_throughput: float           # perf_analyzer's own figure (see parse)
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    server_queue_ms: float
    server_compute_ms: float             # compute input + infer + output


def _common(url: str, csv_path: Path, requests: int) -> list[str]:
    return ["-u", url, "-i", "grpc", "--request-count", str(requests), "-f", str(csv_path), "--verbose-csv"]


def run_submodel(pa: PerfAnalyzer, url: str, model: str, batch: int, data: Path, requests: int, csv_path: Path,
                 timeout_s: float) -> PerfResult:
    """`requests` requests of `batch` items each, one at a time (the offline batch sweep)."""
    stdout = pa.run(["-m", model, "-b", str(batch), "--input-data", str(data), "--concurrency-range", "1",
                     *_common(url, csv_path, requests)], timeout_s)
    return parse(csv_path, stdout, model, batch, requests)


def run_pipeline(pa: PerfAnalyzer, url: str, concurrency: int, data: Path, requests: int, sequence_ids: tuple,
                 csv_path: Path, timeout_s: float, streaming: bool = True) -> PerfResult:
    """`concurrency` sequences in flight over gRPC (streaming or unary), `requests` frames in all.

    No `--bls-composing-models`: perf_analyzer 2.51 then drops the sequence controls (see server_stats)."""
    stdout = pa.run(["-m", spec.PIPELINE, *(["--streaming"] if streaming else []), "--input-data", str(data),
                     "--concurrency-range", str(concurrency),
                     "--sequence-id-range", f"{sequence_ids[0]}:{sequence_ids[1]}",
                     *_common(url, csv_path, requests)], timeout_s)
    return parse(csv_path, stdout, spec.PIPELINE, 1, requests)


def _us(row: dict, key: str) -> float:
    return float(row.get(key) or 0.0) / 1e3


def parse(csv_path: Path, stdout: str, model: str, batch: int, requests: int) -> PerfResult:
    """The CSV row perf_analyzer wrote (one measurement).

    Throughput is derived from the mean latency with Little's law (closed loop: `concurrency` requests of `batch`
    items always in flight): perf_analyzer 2.51 in --request-count mode divides by a measurement window that is
    rounded up (to 1 s or more), which makes short runs look slower. Its own figure is kept as reported_throughput.
    """
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PerfAnalyzerError(f"{csv_path} has no measurement (perf_analyzer output:\n{stdout[-800:]})")
    row = rows[0]
    latency = {p: _us(row, f"p{p} latency") for p in (50, 90, 95, 99)}
    avg = _us(row, "Avg latency")       # a --verbose-csv column
    concurrency = int(row["Concurrency"])
    return PerfResult(model=model, batch=batch, concurrency=concurrency, requests=requests,
                      throughput=concurrency * batch * 1e3 / avg if avg > 0 else float("nan"),
                      reported_throughput=float(row["Inferences/Second"]), p50_ms=latency[50], p90_ms=latency[90],
                      p95_ms=latency[95], p99_ms=latency[99], avg_ms=avg,
                      server_queue_ms=_us(row, "Server Queue"),
                      server_compute_ms=_us(row, "Server Compute Input") + _us(row, "Server Compute Infer")
                      + _us(row, "Server Compute Output"))

