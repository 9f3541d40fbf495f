"""Reduced precision: which precisions a machine runs natively, the drift a reduced-precision runner shows against
fp32, and THE table of bounds that drift must stay within.

One module, used by export validation (export/validate.py), the runtime choice (benchmarks/runtime_choice.py),
the pipeline benchmark (benchmarks/cli.py) and the device check (benchmarks/device_check.py), so the same files
give the same figures everywhere.

- Machine class (`machine_class`): `amx` (the CPU has AMX bf16 tiles: bf16 matrix products several times faster
  than fp32), `avx512_bf16` (bf16 dot-product instructions without AMX: about the fp32 rate), `fp32` (neither: bf16
  would be emulated, slower than fp32, so it is never served). The committed runtime choice is kept per class.
- Geometry stays exact: the motion extractor (keypoints move every pixel of the frame) and the MLPs (keypoint
  deltas, microseconds) always run fp32 (`ALWAYS_FP32`); a plan entry putting them lower is refused.
- Drift (`Drift`): for an image (uint8) the max and mean level difference and the share of values off by more
  than 1 and more than 4 levels; for a float output max and mean |difference| relative to the reference's scale;
  for keypoints the max and mean error in pixels of the 256x256 crop.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np

from . import spec

MACHINE_CLASSES = ("amx", "avx512_bf16", "fp32")
EXACT, REDUCED = "exact", "reduced"          # the two precision policies of a CPU plan
POLICIES = (EXACT, REDUCED)
ALWAYS_FP32 = {
    spec.MOTION: "keypoints, pose and scale move every pixel of the frame (FasterLivePortrait keeps M fp32 too)",
    spec.STITCHING: "keypoint deltas; a microsecond MLP gains nothing from fewer bits",
    spec.RETARGET_EYE: "keypoint deltas; a microsecond MLP gains nothing from fewer bits",
    spec.RETARGET_LIP: "keypoint deltas; a microsecond MLP gains nothing from fewer bits",
}


# ---------------------------------------------------------------------------------------------------------------
# What the machine runs natively.

def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (the first `flags` line of /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def machine_class(flags: str | Iterable[str] | None = None) -> str:
    """`amx`, `avx512_bf16` or `fp32` from CPU flags (a string as lscpu or /proc/cpuinfo print them, or a set;
    default: this machine's)."""
    flags = cpu_flags() if flags is None else frozenset(flags.split() if isinstance(flags, str) else flags)
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "fp32"


def native_precisions(device: str = "cpu", machine: str | None = None) -> tuple[str, ...]:
    """The precisions a runner on `device` computes natively: on a CUDA GPU fp32, fp16 and bf16; on the CPU fp32,
    plus bf16 on a machine class with bf16 instructions (`machine`, default this machine's)."""
    if device != "cpu":
        return ("fp32", "fp16", "bf16")
    machine = machine or machine_class()
    if machine not in MACHINE_CLASSES:
        raise ValueError(f"unknown machine class {machine!r}; one of {list(MACHINE_CLASSES)}")
    return ("fp32",) if machine == "fp32" else ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------------------------
# Drift figures.

@dataclasses.dataclass(frozen=True)
class Drift:
    """How far a reduced-precision output lies from fp32. `unit`: levels (uint8 image), relative (float output:
    max |d| / max(1, max |ref|), mean |d| / mean |ref|) or px (keypoints, pixels of the 256x256 crop)."""
    what: str
    unit: str
    max: float
    mean: float
    over_1: float | None = None        # share of values off by more than 1 level (images)
    over_4: float | None = None        # share off by more than 4 levels (images)

    def describe(self) -> str:
        if self.unit == "levels":
            return (f"{self.what}: max {self.max:.0f} levels, mean {self.mean:.3f}, {self.over_1:.2%} of values off "
                    f"by > 1 level, {self.over_4:.2%} by > 4")
        if self.unit == "px":
            return f"{self.what}: keypoints off by max {self.max:.3f} px, mean {self.mean:.3f} px (256x256 crop)"
        return f"{self.what}: max |diff| {self.max:.2e} of the output's scale, mean {self.mean:.2e}"

    def row(self) -> dict:
        return {"what": self.what, "unit": self.unit, "max": round(self.max, 6), "mean": round(self.mean, 6),
                "over_1": None if self.over_1 is None else round(self.over_1, 6),
                "over_4": None if self.over_4 is None else round(self.over_4, 6)}


def image_drift(what: str, got, want) -> Drift:
    """Level differences of two uint8 images (any shape, e.g. a batch of frames)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != np.uint8 or want.dtype != np.uint8:
        raise ValueError(f"{what}: image drift needs two uint8 arrays of one shape, got {got.dtype}{list(got.shape)} "
                         f"and {want.dtype}{list(want.shape)}")
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if not diff.size:
        return Drift(what, "levels", 0.0, 0.0, 0.0, 0.0)
    return Drift(what, "levels", float(diff.max()), float(diff.mean()), float(np.mean(diff > 1)),
                 float(np.mean(diff > 4)))


def float_drift(what: str, got, want) -> Drift:
    """max |d| relative to max(1, max |want|) and mean |d| relative to mean |want| of two float arrays."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"{what}: shapes {list(got.shape)} and {list(want.shape)} differ")
    if not want.size:
        return Drift(what, "relative", 0.0, 0.0)
    diff = np.abs(got - want)
    if not np.isfinite(diff).all():
        return Drift(what, "relative", float("inf"), float("inf"))
    return Drift(what, "relative", float(diff.max()) / max(1.0, float(np.abs(want).max())),
                 float(diff.mean()) / max(float(np.abs(want).mean()), 1e-12))


def keypoint_drift(what: str, got, want) -> Drift:
    """Keypoint errors in pixels of the 256x256 crop (keypoints are in [-1, 1]: one unit is 128 px)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or got.size % 3:
        raise ValueError(f"{what}: keypoint shapes {list(got.shape)} and {list(want.shape)}")
    error = np.linalg.norm((got - want).reshape(-1, 3)[:, :2], axis=1) * spec.SOURCE_SIZE / 2
    return Drift(what, "px", float(error.max(initial=0.0)), float(error.mean()) if error.size else 0.0)


def output_drift(model: str, output: str, got, want) -> Drift:
    """The drift of one output of a sub-network by its kind: image, keypoints or float."""
    what = f"{model}.{output}"
    if np.asarray(want).dtype == np.uint8:
        return image_drift(what, got, want)
    if output == "kp":
        return keypoint_drift(what, got, want)
    return float_drift(what, got, want)


def downstream_image(runner, model: str, outputs: dict, warping_inputs: dict | None = None):
    """The generator's image from the outputs of F or W through the following networks of `runner` (a
    pipeline.Runner in fp32: W, then G); F's needs W's keypoint inputs (`warping_inputs`, batch-matched)."""
    if model == spec.APPEARANCE:
        outputs = runner.run(spec.WARPING, {**warping_inputs, "feature_volume": outputs["feature_volume"]})
    return runner.run(spec.GENERATOR, {"warped_feature": outputs["warped_feature"]})["image"]


def downstream_drift(runner, model: str, got: dict, want: dict, warping_inputs: dict | None = None,
                     want_image=None) -> list[Drift]:
    """[Drift of the image a reduced-precision F or W gives through fp32 downstream networks] ([] for other
    sub-networks): half a percent of feature drift can move the image by levels (G amplifies it), so for F and W
    the image decides, as for the whole served frame. `want_image`: the fp32 outputs' image when known."""
    if model not in (spec.APPEARANCE, spec.WARPING):
        return []
    if want_image is None:
        want_image = downstream_image(runner, model, want, warping_inputs)
    return [image_drift(f"{model} -> {spec.GENERATOR}.image (fp32 downstream)",
                        downstream_image(runner, model, got, warping_inputs), want_image)]


# ---------------------------------------------------------------------------------------------------------------
# THE bounds.

@dataclasses.dataclass(frozen=True)
class Bound:
    """Largest allowed figures of one kind of output (None: not bounded), and why."""
    max: float | None
    mean: float
    over_4: float | None
    reason: str


BOUNDS = {
    "levels": Bound(
        max=48, mean=1.0, over_4=0.02,
        reason="an image (the generator's, and the whole served frame) may differ from fp32 by about one level on "
               "average and by more than 4 levels (a step the eye starts to see in smooth skin) in at most 2% of "
               "its values; 48 levels at most anywhere catches what averages hide (fp16 overflow's black boxes, a "
               "kernel computing garbage in one tile). Measured: OpenVINO bf16 G on AMX max 3, mean 0.43 (issue "
               "26); Winograd in bf16 max 19, 55% off by > 1 level, which these bounds refuse where its mean or "
               "share > 4 levels exceeds them"),
    "relative": Bound(
        max=0.25, mean=0.02,  over_4=None,
        reason="a float feature (F's volume, W's warped feature and occlusion) in bf16 keeps 8 significant bits "
               "(rounding 0.4% per value) and sums round further: a mean above 2% of the output's mean magnitude, "
               "or any value off by a quarter of the output's scale, is no longer rounding"),
    "px": Bound(
        max=0.25, mean=0.05, over_4=None,
        reason="keypoints place every pixel: a quarter pixel of the 256x256 crop is half a pixel of the 512x512 "
               "result; M stays fp32 (ALWAYS_FP32), this bound refuses any other choice for it"),
}


class DriftOutOfBounds(ValueError):
    """A reduced-precision choice whose drift exceeds the bounds; the message gives the figures and the bound."""


def problems(drift: Drift) -> list[str]:
    """What in `drift` exceeds BOUNDS[drift.unit] (empty: within the bounds)."""
    bound = BOUNDS[drift.unit]
    out = []
    if bound.max is not None and not drift.max <= bound.max:
        out.append(f"max {drift.max:.4g} > {bound.max:g}")
    if not drift.mean <= bound.mean:
        out.append(f"mean {drift.mean:.4g} > {bound.mean:g}")
    if bound.over_4 is not None and not (drift.over_4 or 0.0) <= bound.over_4:
        out.append(f"{drift.over_4:.2%} of values off by > 4 levels > {bound.over_4:.0%}")
    return out


def within_bounds(drift: Drift) -> bool:
    return not problems(drift)


def check(drifts: Iterable[Drift], choice: str) -> list[Drift]:
    """`drifts` when all lie within BOUNDS, else DriftOutOfBounds naming `choice`, every figure and its bound."""
    drifts = list(drifts)
    refused = [(d, problems(d)) for d in drifts if problems(d)]
    if refused:
        raise DriftOutOfBounds(f"{choice} refused: drift against fp32 outside the bounds: " + "; ".join(
            f"{d.describe()} ({', '.join(p)}; {BOUNDS[d.unit].reason.split(';')[0]})" for d, p in refused))
    return drifts


def bounds_markdown() -> list[str]:
    """The bounds table, for the reports and the README."""
    lines = ["| output | max | mean | share off by > 4 levels | why |", "| --- | ---: | ---: | ---: | --- |"]
    names = {"levels": "image (levels)", "relative": "float feature (relative)", "px": "keypoints (px, 256 crop)"}
    for unit, b in BOUNDS.items():
        lines.append(f"| {names[unit]} | {'' if b.max is None else f'{b.max:g}'} | {b.mean:g} | "
                     f"{'' if b.over_4 is None else f'{b.over_4:.0%}'} | {b.reason} |")
    return lines


def drift_markdown(drifts: Iterable[Drift]) -> list[str]:
    """One table of drift figures with the verdict of each against BOUNDS."""
    lines = ["| output | unit | max | mean | > 1 level | > 4 levels | within bounds |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for d in drifts:
        share = (lambda v: "" if v is None else f"{v:.2%}")
        verdict = "yes" if within_bounds(d) else "**no**: " + ", ".join(problems(d))
        lines.append(f"| {d.what} | {d.unit} | {d.max:.4g} | {d.mean:.4g} | {share(d.over_1)} | {share(d.over_4)} | "
                     f"{verdict} |")
    return lines
