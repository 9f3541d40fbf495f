"""`animate --draw-keypoints` / `edit --draw-keypoints`: the implicit keypoints drawn over the 512x512 crop, shown
beside the pasted-back result (or alone with `--no-paste-back`).

The keypoints are what the networks are told: for `animate`, the driving frame's motion (from a template, or from
the served motion extractor on the driving crop) combined with the source's by the official motion-transfer rule
(relative to the first driving frame, or absolute; the animation region) and applied to the source's canonical
keypoints, before stitching, eye/lip retargeting and the multiplier; for `edit`, the edited keypoints of the
official editing formula (before the eye/lip MLP deltas and stitching). With synthetic weights the generated face is
noise and the keypoints sit in a small cluster, so the drawing is zoomed: the source's own keypoints x_s are
fitted to the middle of the crop (the zoom is printed in a corner), drawn as rings, and this frame's keypoints as
dots (eyes cyan, lips magenta, others yellow) joined to their ring by a line. A head turn or a blink then shows as
dots leaving their rings, which is what a synthetic-weights run can show honestly.
"""
from __future__ import annotations

import numpy as np

from .. import keypoints as K
from ..crop import CROP_SIZE

COLOURS = {"eyes": (0, 255, 255), "lip": (255, 0, 255), "other": (255, 255, 0)}    # RGB
FILL = 0.55             # the source keypoints' larger extent covers this share of the crop side
DOT, RING = 6, 9        # radii in pixels


class KeypointOverlay:
    def __init__(self, client, source_crop256: np.ndarray, relative: bool = True, region: str = "all"):
        self.client, self.relative, self.region = client, relative, region
        self.anchor: K.MotionInfo | None = None        # the first driving frame (relative motion)
        info = client.extract_motion(source_crop256[None])
        self.source_info = info
        self.source_kp = info.kp                                                  # (1, 21, 3)
        self.source_points = info.transformed()[0]                                # x_s, (21, 3)
        xy = self.source_points[:, :2]
        low, high = xy.min(0), xy.max(0)
        self.center = (low + high) / 2
        self.pixels_per_unit = FILL * CROP_SIZE / max(float((high - low).max()), 1e-6)

    @property
    def zoom(self) -> float:
        """How much larger than the crop's own coordinates (256 pixels per unit) the keypoints are drawn."""
        return self.pixels_per_unit / (CROP_SIZE / 2)

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """(21, 2) drawing positions of (21, 3) keypoints."""
        return (points[:, :2] - self.center) * self.pixels_per_unit + CROP_SIZE / 2

    def keypoints(self, driving) -> np.ndarray:
        """(21, 3) implicit keypoints of one DrivingFrame (the first one call is the relative-motion anchor)."""
        info = driving.motion.info() if driving.motion is not None else self.client.extract_motion(driving.crop[None])
        if self.anchor is None:
            self.anchor = info
        motion = K.new_motion(self.source_info, info, self.anchor, self.region, self.relative)
        return K.compose_keypoints(self.source_kp, *motion)[0]

    def edited_keypoints(self, controls: dict) -> np.ndarray:
        """(21, 3) keypoints of an edit (the official editing formula, before the MLP deltas and stitching)."""
        from ..editing import edited_keypoints
        return edited_keypoints(self.source_info, controls)[0]

    @staticmethod
    def beside(frame: np.ndarray, panel: np.ndarray) -> np.ndarray:
        """[frame | panel], the (512, 512) panel resized to the frame's height (the pasted-back face is often small
        in the frame, so the keypoints are drawn on a panel of their own beside it)."""
        import cv2
        height = frame.shape[0] - frame.shape[0] % 2          # H.264 wants even sizes
        panel = cv2.resize(panel, (height, height), interpolation=cv2.INTER_AREA)
        if height != frame.shape[0]:
            panel = np.concatenate([panel, panel[-1:]], axis=0)
        return np.concatenate([frame, panel], axis=1)

    def draw(self, image: np.ndarray, points: np.ndarray) -> np.ndarray:
        """A copy of the (512, 512, 3) RGB crop with the source keypoints as rings and `points` as dots joined to
        them; what falls outside the crop is clipped by the drawing."""
        import cv2
        out = np.ascontiguousarray(image).copy()
        rings, dots = self.to_pixels(self.source_points), self.to_pixels(points)
        rings_i, dots_i = np.round(rings).astype(int), np.round(dots).astype(int)
        for (rx, ry), (dx, dy) in zip(rings_i, dots_i):
            cv2.line(out, (rx, ry), (dx, dy), (255, 255, 255), 2, cv2.LINE_AA)
        for rx, ry in rings_i:
            cv2.circle(out, (rx, ry), RING, (0, 0, 0), 4, cv2.LINE_AA)
            cv2.circle(out, (rx, ry), RING, (255, 255, 255), 2, cv2.LINE_AA)
        for i, (dx, dy) in enumerate(dots_i):
            region = "eyes" if i in K.EYE_KEYPOINTS else "lip" if i in K.LIP_KEYPOINTS else "other"
            cv2.circle(out, (dx, dy), DOT + 2, (0, 0, 0), -1, cv2.LINE_AA)
            cv2.circle(out, (dx, dy), DOT, COLOURS[region], -1, cv2.LINE_AA)
        label = f"keypoints x{self.zoom:.1f}: rings source, dots this frame"
        cv2.putText(out, label, (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(out, label, (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        return out
