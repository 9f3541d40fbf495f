"""The wire types shared by the client and the server: what a sequence's START and each driving request carry.

The client builds them and sends `tensors()` (names from `spec`); the served pipeline parses and validates a
request back into the same types once (backend/requests.py) and `Animator` computes on them (pipeline.py).
This module imports only the spec and the keypoint maths, so the server never imports the client.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import keypoints as K
from . import spec
from .config import NUM_KP


@dataclasses.dataclass
class MotionFrame:
    """One frame of template motion (official template keys R, exp, t, scale)."""
    R: np.ndarray
    exp: np.ndarray
    t: np.ndarray
    scale: np.ndarray

    def info(self) -> K.MotionInfo:
        """As a batch of one, in float32 (the server's requests are checked against the spec before they get here:
        backend/requests.py)."""
        def batch_of_one(value, *shape):
            return np.asarray(value, np.float32).reshape(1, *shape)
        return K.MotionInfo(R=batch_of_one(self.R, 3, 3), t=batch_of_one(self.t, 3),
                            exp=batch_of_one(self.exp, NUM_KP, 3), scale=batch_of_one(self.scale, 1))


@dataclasses.dataclass
class DrivingFrame:
    """One driving input: a 256x256 RGB crop (the motion extractor runs) or a template motion frame, plus
    optional ratios (c_d_eye, c_d_lip)."""
    crop: np.ndarray | None = None
    motion: MotionFrame | None = None
    eye_ratio: float | None = None
    lip_ratio: float | None = None
    # a source-video frame's own source crop (256, 256, 3) and its ratios (2,), (1,) (option source_video)
    source: np.ndarray | None = None
    source_eye_ratio: np.ndarray | None = None
    source_lip_ratio: np.ndarray | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """The request's input tensors by spec name (a frame that is neither a crop nor motion raises ValueError)."""
        if (self.crop is None) == (self.motion is None):
            raise ValueError("a driving input is either a crop or template motion")
        out = {}
        if self.crop is not None:
            out["driving"] = self.crop
        else:
            out.update(motion_R=self.motion.R, motion_exp=self.motion.exp, motion_t=self.motion.t,
                       motion_scale=self.motion.scale)
        if self.eye_ratio is not None:
            out["driving_eye_ratio"] = np.float32([self.eye_ratio])
        if self.lip_ratio is not None:
            out["driving_lip_ratio"] = np.float32([self.lip_ratio])
        for name in ("source", "source_eye_ratio", "source_lip_ratio"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclasses.dataclass
class SourceInput:
    """What a sequence starts with: the 256x256 RGB source crop, its ratios and the sequence's options."""
    crop: np.ndarray
    options: dict = dataclasses.field(default_factory=dict)
    eye_ratio: np.ndarray | None = None     # (2,)
    lip_ratio: np.ndarray | None = None     # (1,)

    def __post_init__(self):
        spec.parse_options(self.options)        # fail here, before anything is sent

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"source": self.crop}
        if self.eye_ratio is not None:
            out["source_eye_ratio"] = self.eye_ratio
        if self.lip_ratio is not None:
            out["source_lip_ratio"] = self.lip_ratio
        return out
