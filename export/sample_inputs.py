"""Deterministic, realistic inputs for validating and timing the served sub-networks.

No media ships with an install, so images are generated: a smooth background gradient with soft coloured blobs
(smooth like a photo crop, no pixel noise). Keypoints come from running the motion extractor on such images and
applying the keypoint maths, so they are what W and S see in the pipeline (mostly inside W's [-1, 1]^3 grid).
"""
from __future__ import annotations

import numpy as np

from .. import keypoints as K
from .. import spec
from ..pipeline import Runner

DRIVING_SEED_OFFSET = 1000   # driving images use other seeds than source images


def synthetic_portrait(seed: int, size: int = spec.SOURCE_SIZE) -> np.ndarray:
    """(3, size, size) float32 in [0, 1]: a vertical gradient plus a large face-like blob and smaller blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size - 1)
    top, bottom = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    image = top[:, None, None] * (1 - y) + bottom[:, None, None] * y
    centres = [(0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05), rng.uniform(0.18, 0.25))]
    centres += [(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.08)) for _ in range(5)]
    for cx, cy, radius in centres:
        colour = rng.uniform(0, 1, 3)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))
        image = image * (1 - weight) + colour[:, None, None] * weight
    return np.clip(image, 0, 1).astype(np.float32)


def synthetic_images(batch: int, first_seed: int = 0) -> np.ndarray:
    """(batch, 3, 256, 256) float32: synthetic_portrait for seeds first_seed .. first_seed + batch - 1."""
    return np.stack([synthetic_portrait(first_seed + i) for i in range(batch)])


def sample_inputs(runner: Runner, batch: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of every served model at this batch size, computed with `runner` the way the pipeline computes them.

    kp_source / kp_driving are the transformed keypoints of source / driving images, warped_feature is W's output
    on them, and the eye / lip ratios are plausible open-ness ratios.
    """
    source = synthetic_images(batch, seed)
    driving = synthetic_images(batch, seed + DRIVING_SEED_OFFSET)
    volume = runner.run(spec.APPEARANCE, {"image": source})["feature_volume"]
    x_s = K.MotionInfo.from_raw(runner.run(spec.MOTION, {"image": source})).transformed()
    x_d = K.MotionInfo.from_raw(runner.run(spec.MOTION, {"image": driving})).transformed()
    warped = runner.run(spec.WARPING, {"feature_volume": volume, "kp_source": x_s, "kp_driving": x_d})
    rng = np.random.default_rng(seed)
    eye_ratio = rng.uniform(0.15, 0.45, (batch, 3)).astype(np.float32)
    lip_ratio = rng.uniform(0.0, 0.8, (batch, 2)).astype(np.float32)
    return {
        spec.APPEARANCE: {"image": source},
        spec.MOTION: {"image": driving},
        spec.WARPING: {"feature_volume": volume, "kp_source": x_s, "kp_driving": x_d},
        spec.GENERATOR: {"warped_feature": warped["warped_feature"]},
        spec.STITCHING: {"kp_source": x_s, "kp_driving": x_d},
        spec.RETARGET_EYE: {"kp_source": x_s, "eye_ratio": eye_ratio},
        spec.RETARGET_LIP: {"kp_source": x_s, "lip_ratio": lip_ratio},
    }


def fraction_inside_grid(keypoints: np.ndarray) -> float:
    """Share of keypoints whose three coordinates all lie in [-1, 1] (W samples its volume there)."""
    inside = np.all(np.abs(np.asarray(keypoints)) <= 1.0, axis=-1)
    return float(inside.mean())
