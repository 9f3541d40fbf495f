"""`animate --draw-keypoints`: each frame's implicit keypoints drawn over the animated 512x512 crop.

The keypoints are the driving frame's motion (rotation, expression, translation, scale: from a template, or from
the served motion extractor on the driving crop) applied to the source's canonical keypoints, x = s (kp R + exp)
+ (tx, ty), projected from the crop's [-1, 1] coordinates to pixels. They show what the networks are told,
which is what a synthetic-weights run can show honestly: the head turn and the blink moving the keypoints.
"""
from __future__ import annotations

import numpy as np

from .. import keypoints as K
from ..crop import CROP_SIZE

COLOURS = {"eyes": (0, 255, 255), "lip": (255, 0, 255), "other": (255, 255, 0)}    # RGB


class KeypointOverlay:
    def __init__(self, client, source_crop256: np.ndarray):
        self.client = client
        self.source_kp = client.extract_motion(source_crop256[None]).kp           # (1, 21, 3)

    def keypoints(self, driving) -> np.ndarray:
        """(21, 3) implicit keypoints of one DrivingInput."""
        if driving.motion is not None:
            m = driving.motion
            R, exp, t, scale = m.R[None], m.exp[None], np.asarray(m.t, np.float32).reshape(1, 3), m.scale
        else:
            info = self.client.extract_motion(driving.crop[None])
            R, exp, t, scale = info.R, info.exp, info.t, info.scale
        return K.transform_keypoints(self.source_kp, R, exp, scale, t)[0]

    @staticmethod
    def draw(image: np.ndarray, points: np.ndarray) -> np.ndarray:
        """A copy of the (512, 512, 3) RGB crop with the keypoints as dots (eyes cyan, lips magenta, others
        yellow); keypoints outside the crop are left out."""
        import cv2
        out = np.ascontiguousarray(image).copy()
        pixels = (points[:, :2] + 1) * (CROP_SIZE / 2)
        for i, (x, y) in enumerate(pixels):
            if not (0 <= x < CROP_SIZE and 0 <= y < CROP_SIZE):
                continue
            region = "eyes" if i in K.EYE_KEYPOINTS else "lip" if i in K.LIP_KEYPOINTS else "other"
            cv2.circle(out, (int(round(x)), int(round(y))), 6, (0, 0, 0), -1, cv2.LINE_AA)
            cv2.circle(out, (int(round(x)), int(round(y))), 4, COLOURS[region], -1, cv2.LINE_AA)
        return out
