"""Real benchmark inputs: 256x256 crops of a source portrait and of driving-video frames, and the tensors every
sub-network sees when the pipeline animates them.

Crops are a centred square cut resized to 256x256 (the benchmark needs realistic pixels, not face alignment).
Per-sub-network inputs are recorded while `Animator` runs on our PyTorch networks, so W, G and the MLPs are timed
on the feature volumes and keypoints the pipeline really produces.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import spec
from ..pipeline import Animator, DrivingFrame, Runner

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LP_SHARED_DIR", REPO.parent / "shared"))
DEFAULT_SOURCE = SHARED / "assets" / "source" / "s0.jpg"
DEFAULT_DRIVING = SHARED / "assets" / "driving" / "d0.mp4"

# Plausible eye/lip open-ness ratios, so the retargeting MLPs get recorded inputs too (their time does not depend
# on the values; real ratios need the face landmarks, which the client computes).
SOURCE_EYE_RATIO = (0.32, 0.30)
SOURCE_LIP_RATIO = 0.05
DRIVING_EYE_RATIO = 0.28
DRIVING_LIP_RATIO = 0.20


class MediaError(ValueError):
    """A source or driving file that is missing or cannot be read."""


def square_crop(image: np.ndarray, size: int = spec.SOURCE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the centred square, resized to (size, size, 3) uint8."""
    import cv2
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(square, (size, size), interpolation=interpolation))


def read_source(path: str | os.PathLike) -> np.ndarray:
    """The source portrait as a 256x256 RGB crop."""
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"cannot read source image {str(path)!r} (missing or not an image)")
    return square_crop(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def read_driving(path: str | os.PathLike, max_frames: int) -> list[np.ndarray]:
    """Up to `max_frames` frames of a driving video (or one image) as 256x256 RGB crops, looping a short video."""
    import cv2
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"driving file {str(path)!r} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.suffix.lower() in (".jpg", ".jpeg", ".png") else None
    if image is not None:
        return [square_crop(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))] * max_frames
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(square_crop(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()
    if not frames:
        raise MediaError(f"cannot read frames from driving video {str(path)!r}")
    return [frames[i % len(frames)] for i in range(max_frames)]


class RecordingRunner:
    """A Runner that passes calls through and keeps a copy of every sub-network's inputs."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.setdefault(model, []).append({k: np.array(v, dtype=np.float32) for k, v in inputs.items()})
        return self.runner.run(model, inputs)


def pipeline_options(retargeting: bool = False) -> dict:
    """The pipeline's default per-sequence options (official defaults), optionally with eye/lip retargeting."""
    return spec.parse_options({"eye_retargeting": retargeting, "lip_retargeting": retargeting})


def record_submodel_inputs(runner: Runner, source: np.ndarray, driving: list[np.ndarray]
                           ) -> dict[str, list[dict[str, np.ndarray]]]:
    """{model: [batch-1 input dicts]} seen while animating `driving` from `source`, every sub-network included
    (retargeting on, so the eye and lip MLPs run too)."""
    recorder = RecordingRunner(runner)
    animator = Animator(recorder)
    [state] = animator.register_sources([source], [pipeline_options(retargeting=True)],
                                        eye_ratios=[SOURCE_EYE_RATIO], lip_ratios=[SOURCE_LIP_RATIO])
    for crop in driving:
        animator.animate([state], [DrivingFrame(crop=crop, eye_ratio=DRIVING_EYE_RATIO, lip_ratio=DRIVING_LIP_RATIO)])
    missing = [m for m in spec.SUBMODELS if m not in recorder.calls]
    if missing:
        raise RuntimeError(f"the pipeline did not call {missing}")
    return recorder.calls


def batch_of(samples: list[dict[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """A batch built from recorded batch-1 samples (cycled when there are fewer samples than the batch)."""
    picks = [samples[i % len(samples)] for i in range(batch)]
    return {name: np.concatenate([p[name] for p in picks]) for name in picks[0]}
