"""Causal smoothing of driving motion for live input (One-Euro filter).

A webcam's motion estimate jitters from frame to frame; a low-pass filter removes the jitter but lags fast
moves. The One-Euro filter (Casiez, Roussel, Vogel, CHI 2012) adapts: its cutoff rises with the signal's speed,
so slow drift is smoothed hard and fast moves pass with little lag. It only looks at past samples, so it works
on a live stream. Rotations are filtered entry-wise and projected back onto SO(3).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..wire import MotionFrame


def _alpha(cutoff: float, dt: float) -> float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over arrays of a fixed shape; call once per sample with the time step in seconds."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise ValueError(f"One-Euro parameters must satisfy min_cutoff > 0, d_cutoff > 0, beta >= 0; got "
                             f"{min_cutoff}, {d_cutoff}, {beta}")
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None

    def __call__(self, x, dt: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self._x is None:
            self._x, self._dx = x.copy(), np.zeros_like(x)
            return x.copy()
        if dt <= 0:
            raise ValueError(f"time step must be positive, got {dt}")
        a_d = _alpha(self.d_cutoff, dt)
        self._dx = a_d * (x - self._x) / dt + (1 - a_d) * self._dx
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        tau = 1.0 / (2.0 * np.pi * cutoff)
        a = 1.0 / (1.0 + tau / dt)
        self._x = a * x + (1 - a) * self._x
        return self._x.copy()


def nearest_rotation(m: np.ndarray) -> np.ndarray:
    """The rotation matrix closest to m (Frobenius norm), by SVD."""
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


@dataclasses.dataclass
class SmoothingSettings:
    """One-Euro parameters. min_cutoff in Hz (lower: smoother, more lag); beta: how fast the cutoff rises."""
    min_cutoff: float = 1.0
    beta: float = 5.0
    d_cutoff: float = 1.0


class MotionSmoother:
    """Smooths a stream of template/extracted motion frames and the eye/lip ratios, sample by sample."""

    def __init__(self, fps: float, settings: SmoothingSettings = SmoothingSettings()):
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.dt = 1.0 / fps
        make = lambda: OneEuroFilter(settings.min_cutoff, settings.beta, settings.d_cutoff)  # noqa: E731
        self._filters = {name: make() for name in ("R", "exp", "t", "scale", "eye", "lip")}

    def motion(self, frame: MotionFrame) -> MotionFrame:
        f = self._filters
        rotation = nearest_rotation(f["R"](np.asarray(frame.R, np.float64).reshape(3, 3), self.dt))
        return MotionFrame(R=rotation.astype(np.float32),
                           exp=f["exp"](frame.exp, self.dt).astype(np.float32),
                           t=f["t"](frame.t, self.dt).astype(np.float32),
                           scale=f["scale"](frame.scale, self.dt).astype(np.float32))

    def ratio(self, name: str, value: float | None) -> float | None:
        """Smooth the driving eye ('eye') or lip ('lip') ratio; None passes through."""
        if value is None:
            return None
        return float(self._filters[name](value, self.dt))
