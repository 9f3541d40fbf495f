"""Keypoint maths of LivePortrait in numpy (the server runs it without torch).

Conventions follow the official pipeline: pose bins -> degrees by expectation, R = (Rz Ry Rx)^T applied to row
vectors (``kp @ R``), transformed keypoints ``scale * (kp @ R + exp)`` plus (tx, ty), and the motion-transfer rules
of `LivePortraitPipeline.execute` (relative / absolute, animation regions, driving multiplier, stitching and
eye/lip retargeting). Arrays carry a leading batch dimension and are float32.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .config import NUM_BINS, NUM_KP

REGIONS = ("all", "exp", "pose", "lip", "eyes")
# expression entries that the absolute mode (and source-video 'exp') copies from the driving frame
ABSOLUTE_EXP_KEYPOINTS = (1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)
LIP_KEYPOINTS = (6, 12, 14, 17, 19, 20)
EYE_KEYPOINTS = (11, 13, 15, 16, 18)
_BIN_INDEX = np.arange(NUM_BINS, dtype=np.float32)


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def headpose_bins_to_degrees(logits: np.ndarray) -> np.ndarray:
    """(B, 66) bin logits -> (B,) degrees: softmax, expected bin index, x3 - 97.5."""
    logits = _f32(logits)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return (p * _BIN_INDEX).sum(axis=1, dtype=np.float32) * np.float32(3) - np.float32(97.5)


def rotation_matrix(pitch: np.ndarray, yaw: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Degrees (B,) -> (B, 3, 3) rotation R = (Rz(roll) Ry(yaw) Rx(pitch))^T, for row vectors (kp @ R)."""
    x, y, z = (_f32(a).reshape(-1) / np.float32(180) * np.float32(np.pi) for a in (pitch, yaw, roll))
    one, zero = np.ones_like(x), np.zeros_like(x)
    rx = np.stack([one, zero, zero, zero, np.cos(x), -np.sin(x), zero, np.sin(x), np.cos(x)], 1).reshape(-1, 3, 3)
    ry = np.stack([np.cos(y), zero, np.sin(y), zero, one, zero, -np.sin(y), zero, np.cos(y)], 1).reshape(-1, 3, 3)
    rz = np.stack([np.cos(z), -np.sin(z), zero, np.sin(z), np.cos(z), zero, zero, zero, one], 1).reshape(-1, 3, 3)
    return np.transpose(rz @ ry @ rx, (0, 2, 1)).astype(np.float32)


@dataclasses.dataclass
class MotionInfo:
    """Processed motion of one image: pose (degrees and R), translation, expression, scale, canonical kp."""
    R: np.ndarray           # (B, 3, 3)
    t: np.ndarray           # (B, 3)
    exp: np.ndarray         # (B, 21, 3)
    scale: np.ndarray       # (B, 1)
    kp: np.ndarray | None = None          # (B, 21, 3) canonical keypoints; None for template frames
    pitch: np.ndarray | None = None       # (B,) degrees
    yaw: np.ndarray | None = None
    roll: np.ndarray | None = None

    @classmethod
    def from_raw(cls, raw: dict) -> "MotionInfo":
        """From the motion extractor's raw outputs (pitch/yaw/roll logits, t, exp, scale, kp)."""
        b = np.asarray(raw["kp"]).shape[0]
        pitch, yaw, roll = (headpose_bins_to_degrees(raw[k]) for k in ("pitch", "yaw", "roll"))
        return cls(R=rotation_matrix(pitch, yaw, roll), t=_f32(raw["t"]).reshape(b, 3),
                   exp=_f32(raw["exp"]).reshape(b, NUM_KP, 3), scale=_f32(raw["scale"]).reshape(b, 1),
                   kp=_f32(raw["kp"]).reshape(b, NUM_KP, 3), pitch=pitch, yaw=yaw, roll=roll)

    def transformed(self) -> np.ndarray:
        """x = scale * (kp @ R + exp) + (tx, ty, 0)."""
        if self.kp is None:
            raise ValueError("canonical keypoints are needed to transform keypoints")
        return transform_keypoints(self.kp, self.R, self.exp, self.scale, self.t)


def transform_keypoints(kp, R, exp, scale, t) -> np.ndarray:
    """scale * (kp @ R + exp), then + t on x and y only (tz dropped)."""
    out = (_f32(kp) @ _f32(R) + _f32(exp)) * _f32(scale).reshape(-1, 1, 1)
    out[..., :2] += _f32(t).reshape(-1, 1, 3)[..., :2]
    return out


def new_motion(source: MotionInfo, driving: MotionInfo, anchor: MotionInfo, region: str = "all",
               relative: bool = True, lip_array: np.ndarray | None = None):
    """(R_new, delta_new, scale_new, t_new) of the official per-frame block.

    anchor is the first driving frame (the driving image itself for image driving). lip_array, when given, marks
    image driving in relative mode: the expression moves by (exp_d - lip_array) instead of (exp_d - exp_anchor).
    """
    if region not in REGIONS:
        raise ValueError(f"unknown animation region {region!r}; choose one of {list(REGIONS)}")
    pose = region in ("all", "pose")
    delta = source.exp.copy()
    if relative:
        R_new = (driving.R @ np.transpose(anchor.R, (0, 2, 1))) @ source.R if pose else source.R
        reference = anchor.exp if lip_array is None else _f32(lip_array)
        moved = source.exp + (driving.exp - reference)
        if region in ("all", "exp"):
            delta = moved
        elif region == "lip":
            delta[:, LIP_KEYPOINTS] = moved[:, LIP_KEYPOINTS]
        elif region == "eyes":
            eyes = moved if lip_array is None else source.exp + driving.exp
            delta[:, EYE_KEYPOINTS] = eyes[:, EYE_KEYPOINTS]
        scale_new = source.scale * (driving.scale / anchor.scale) if region == "all" else source.scale
        t_new = source.t + (driving.t - anchor.t) if pose else source.t.copy()
    else:
        R_new = driving.R if pose else source.R
        if region in ("all", "exp"):
            idx = list(ABSOLUTE_EXP_KEYPOINTS)
            delta[:, idx] = driving.exp[:, idx]
            delta[:, 3:5, 1] = driving.exp[:, 3:5, 1]
            delta[:, 5, 2] = driving.exp[:, 5, 2]
            delta[:, 8, 2] = driving.exp[:, 8, 2]
            delta[:, 9, 1:] = driving.exp[:, 9, 1:]
        elif region == "lip":
            delta[:, LIP_KEYPOINTS] = driving.exp[:, LIP_KEYPOINTS]
        elif region == "eyes":
            delta[:, EYE_KEYPOINTS] = driving.exp[:, EYE_KEYPOINTS]
        scale_new = source.scale
        t_new = driving.t.copy() if pose else source.t.copy()
    t_new = np.array(t_new, dtype=np.float32)
    t_new[..., 2] = 0
    return R_new.astype(np.float32), delta.astype(np.float32), _f32(scale_new), t_new


def compose_keypoints(kp_canonical, R_new, delta_new, scale_new, t_new) -> np.ndarray:
    """x_new = scale_new * (kp_c @ R_new + delta_new) + t_new (t_new's z already 0)."""
    return (_f32(scale_new).reshape(-1, 1, 1) * (_f32(kp_canonical) @ _f32(R_new) + _f32(delta_new))
            + _f32(t_new).reshape(-1, 1, 3))


def animal_driving_keypoints(source: MotionInfo, driving: MotionInfo) -> np.ndarray:
    """x_d of the official Animals mode: s_s * (kp_c_s @ R_d + exp_d) + t_d, with t_d's z set to 0; the source's
    scale, not the driving frame's (live_portrait_pipeline_animal.py)."""
    t = np.array(driving.t, dtype=np.float32).reshape(-1, 3)
    t[:, 2] = 0
    return compose_keypoints(source.kp, driving.R, driving.exp, source.scale, t)


def relative_to_anchor(x_d: np.ndarray, x_d0: np.ndarray, x_s: np.ndarray, multiplier: float) -> np.ndarray:
    """(x_d - x_d0) * multiplier + x_s: the motion since the anchor frame, scaled onto the source."""
    return (_f32(x_d) - _f32(x_d0)) * np.float32(multiplier) + _f32(x_s)


def convex_hull_multiplier(x_s: np.ndarray, x_d0: np.ndarray) -> float:
    """'expression-friendly' motion scale: sqrt(hull volume of x_s) / sqrt(hull volume of the frame-0 result).

    Degenerate keypoint sets (coplanar, e.g. from untrained weights) have no 3-D hull; the official code would
    raise there. The motion is then left unscaled (1.0) instead of failing the stream.
    """
    from scipy.spatial import ConvexHull, QhullError
    try:
        source, driving = ConvexHull(np.asarray(x_s)[0]).volume, ConvexHull(np.asarray(x_d0)[0]).volume
    except QhullError:
        return 1.0
    if not (source > 0 and driving > 0):
        return 1.0
    return float(np.sqrt(source) / np.sqrt(driving))


def stitching_input(x_s: np.ndarray, x_d: np.ndarray) -> np.ndarray:
    """(B, 126) input of the stitching MLP."""
    b = x_s.shape[0]
    return np.concatenate([_f32(x_s).reshape(b, -1), _f32(x_d).reshape(b, -1)], axis=1)


def apply_stitching(x_d: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """x_d + delta[:63] per keypoint, then delta[63:65] added to every keypoint's x and y."""
    b = x_d.shape[0]
    delta = _f32(delta).reshape(b, -1)
    out = _f32(x_d) + delta[:, : 3 * NUM_KP].reshape(b, NUM_KP, 3)
    out[..., :2] += delta[:, 3 * NUM_KP: 3 * NUM_KP + 2].reshape(b, 1, 2)
    return out


def retarget_input(x_s: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """(B, 63 + r) input of the eye (r=3) or lip (r=2) retargeting MLP."""
    b = x_s.shape[0]
    return np.concatenate([_f32(x_s).reshape(b, -1), _f32(ratio).reshape(b, -1)], axis=1)


def apply_driving_multiplier(x_s: np.ndarray, x_d: np.ndarray, multiplier: float) -> np.ndarray:
    """x_s + (x_d - x_s) * multiplier (the official pipeline applies it always, even at 1.0)."""
    return _f32(x_s) + (_f32(x_d) - _f32(x_s)) * np.float32(multiplier)


def _distance_ratio(lmk: np.ndarray, a: int, b: int, c: int, d: int, eps: float = 1e-6) -> np.ndarray:
    return (np.linalg.norm(lmk[:, a] - lmk[:, b], axis=1, keepdims=True)
            / (np.linalg.norm(lmk[:, c] - lmk[:, d], axis=1, keepdims=True) + eps))


def eye_close_ratio(lmk203: np.ndarray) -> np.ndarray:
    """(B, 203, 2) landmarks -> (B, 2) left/right eye opening ratios (the official 203-point indices)."""
    lmk = np.asarray(lmk203, dtype=np.float64)
    return np.concatenate([_distance_ratio(lmk, 6, 18, 0, 12), _distance_ratio(lmk, 30, 42, 24, 36)], axis=1)


def lip_close_ratio(lmk203: np.ndarray) -> np.ndarray:
    """(B, 203, 2) landmarks -> (B, 1) lip opening ratio."""
    return _distance_ratio(np.asarray(lmk203, dtype=np.float64), 90, 102, 48, 66)
