"""Source videos (v2v): the official rules when the source is a video, as numpy maths.

The official pipeline computes, for every source frame i, a target rotation and expression from the source frame's
motion and the driving motion, smooths both over the whole video with a Kalman smoother, and then animates frame i
from its own crop's features and keypoints:

- relative motion, video driving: R_i = (R_d,i R_d,0^T) R_s,i and exp_i = exp_s,i + exp_d,i - exp_d,0;
- relative motion, image driving (one driving frame for all): R_i = R_s,i, exp_i = exp_s,i + exp_d - lip_array
  (not smoothed);
- absolute: R_i = R_d,i, exp_i = exp_d,i (smoothed for video driving);
- the frame's expression is exp_s,i with the entries of the absolute set taken from exp_i (region all/exp), or
  the lip / eye keypoints (region lip / eyes); scale and translation stay the source frame's (absolute motion takes
  the driving translation for region all/pose); no expression-friendly scaling.

Frame count: min(source, driving) frames for video driving, the source's frames for image driving; the output
has the source video's frame rate; audio from the driving video when it has audio, else from the source video.
"""
from __future__ import annotations

import numpy as np

from . import keypoints as K

OBSERVATION_VARIANCE = 3e-7     # the official driving_smooth_observation_variance default
PROCESS_VARIANCE = 1e-5         # the official smoother's process variance


def kalman_smooth(values: np.ndarray, observation_variance: float = OBSERVATION_VARIANCE,
                  process_variance: float = PROCESS_VARIANCE) -> np.ndarray:
    """Rauch-Tung-Striebel smoother of (T, ...) observations under a random walk, as the official smoother
    (identity dynamics and observations, isotropic covariances, initial mean the first observation and initial
    covariance 1). Every entry is independent with the same gains, so it runs on scalars per step."""
    x = np.asarray(values, dtype=np.float64)
    shape, T = x.shape, x.shape[0]
    x = x.reshape(T, -1)
    filtered = np.empty_like(x)
    variances = np.empty(T)
    mean, variance = x[0], 1.0
    for t in range(T):
        if t:
            mean, variance = filtered[t - 1], variances[t - 1] + process_variance
        gain = variance / (variance + observation_variance)
        filtered[t] = mean + gain * (x[t] - mean)
        variances[t] = (1 - gain) * variance
    smoothed = filtered.copy()
    for t in range(T - 2, -1, -1):
        back = variances[t] / (variances[t] + process_variance)
        smoothed[t] = filtered[t] + back * (smoothed[t + 1] - filtered[t])
    return smoothed.reshape(shape).astype(np.float32)


def frame_count(source_frames: int, driving_frames: int, driving_is_video: bool) -> int:
    """The official number of animated frames."""
    return min(source_frames, driving_frames) if driving_is_video else source_frames


def audio_source(driving_has_audio: bool, source_has_audio: bool) -> str | None:
    """Which input's audio the output carries (the official default priority: the driving video's)."""
    if driving_has_audio:
        return "driving"
    return "source" if source_has_audio else None


def motion_targets(source: K.MotionInfo, driving: K.MotionInfo, relative: bool, driving_is_video: bool,
                   lip_array: np.ndarray, smooth: bool = True,
                   observation_variance: float = OBSERVATION_VARIANCE) -> tuple[np.ndarray, np.ndarray]:
    """Per source frame (T = len(source)) target rotations (T, 3, 3) and expressions (T, 21, 3).

    `driving` holds the driving frames (at least T of them for video driving; its first frame for image driving).
    """
    T = source.R.shape[0]
    if driving_is_video:
        R_d, exp_d = driving.R[:T], driving.exp[:T]
        if relative:
            R = R_d @ np.transpose(driving.R[:1], (0, 2, 1)) @ source.R
            exp = source.exp + exp_d - driving.exp[:1]
        else:
            R, exp = R_d, exp_d
        if smooth:
            R, exp = kalman_smooth(R, observation_variance), kalman_smooth(exp, observation_variance)
        return R.astype(np.float32), exp.astype(np.float32)
    if relative:
        return source.R.copy(), (source.exp + (driving.exp[:1] - np.asarray(lip_array, np.float32))).astype(np.float32)
    return np.repeat(driving.R[:1], T, 0), np.repeat(driving.exp[:1], T, 0)


def frame_motion(source: K.MotionInfo, R_target: np.ndarray, exp_target: np.ndarray, t_driving: np.ndarray,
                 relative: bool, region: str = "all"):
    """(R_new, delta_new, scale_new, t_new) of one source-video frame (batch 1 each), from its targets."""
    if region not in K.REGIONS:
        raise ValueError(f"unknown animation region {region!r}; choose one of {list(K.REGIONS)}")
    pose = region in ("all", "pose")
    R_new = np.asarray(R_target, np.float32).reshape(1, 3, 3) if pose else source.R
    target = np.asarray(exp_target, np.float32).reshape(1, -1, 3)
    delta = source.exp.copy()
    if region in ("all", "exp"):
        idx = list(K.ABSOLUTE_EXP_KEYPOINTS)
        delta[:, idx] = target[:, idx]
        delta[:, 3:5, 1] = target[:, 3:5, 1]
        delta[:, 5, 2] = target[:, 5, 2]
        delta[:, 8, 2] = target[:, 8, 2]
        delta[:, 9, 1:] = target[:, 9, 1:]
    elif region == "lip":
        delta[:, list(K.LIP_KEYPOINTS)] = target[:, list(K.LIP_KEYPOINTS)]
    elif region == "eyes":
        delta[:, list(K.EYE_KEYPOINTS)] = target[:, list(K.EYE_KEYPOINTS)]
    t_new = (np.asarray(t_driving, np.float32).reshape(1, 3) if (not relative and pose) else source.t).copy()
    t_new[..., 2] = 0
    return R_new.astype(np.float32), delta.astype(np.float32), source.scale, t_new
