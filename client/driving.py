"""Driving frames -> network crops, with the face tracked from frame to frame."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from .. import crop as C
from .. import spec
from .faces import Face, make_analyzer
from .profiling import StageTimer


@dataclasses.dataclass
class CroppedFrame:
    crop: np.ndarray | None             # (256, 256, 3) network input; None before the first face (cropping on)
    face: Face | None                   # the latest tracked face (None if not tracking or none found yet)
    preview: np.ndarray | None = None   # (512, 512, 3) picture of what was sent, for comparison videos
    found: bool | None = None           # whether this frame showed a face (None: not looked for)


class DrivingCropper:
    """Crops driving frames the official way, one frame at a time.

    With cropping off (the official default) the whole frame is resized to 256x256: the driving video is taken to
    be a face crop already. With cropping on, the box (scale 2.2, vy -0.1, not rotated, so the driving head's roll
    stays in the picture) is fixed from the first frame with a face; the head's own motion in the video
    (translation, scale, roll) then reaches the motion extractor. The official cropper fixes the box to the
    average over the whole video, which a stream cannot know in advance. With `track`, landmarks are followed in
    every frame (for the eye/lip ratios), seeded by the previous frame's face. With `check_faces`, every frame
    is looked at for a face (`CroppedFrame.found`), so the caller can say which frames had none.
    """

    def __init__(self, crop: bool, settings: C.CropSettings = C.DRIVING_CROP, face_models=None, track: bool = False,
                 timer: StageTimer | None = None, preview: bool = False, check_faces: bool = False):
        self.crop, self.settings, self.track, self.preview = crop, settings, track, preview
        self.check_faces = check_faces
        self.timer = timer or StageTimer()
        self.analyzer = make_analyzer(face_models) if (crop or track or check_faces) else None
        self.face: Face | None = None
        self.box: C.CropBox | None = None

    def _look(self, frame: np.ndarray) -> bool | None:
        """Find this frame's face (tracked from the previous one when tracking); None when not looked for."""
        if self.analyzer is None:
            return None
        if self.track or (self.crop and self.box is None):
            with self.timer("driving: landmarks (tracking)"):
                face = self.analyzer.track(frame, self.face)
        elif self.check_faces:
            with self.timer("driving: face detection (check)"):
                face = self.analyzer.detect(frame)
        else:
            return None
        if face is not None:
            self.face = face
        return face is not None

    def __call__(self, frame: np.ndarray) -> CroppedFrame:
        found = self._look(frame)
        with self.timer("driving: crop"):
            if self.crop:
                if self.box is None and self.face is not None:
                    self.box = self.face.crop_box(self.settings)
                if self.box is None:
                    return CroppedFrame(None, self.face, found=found)
                crop512 = C.warp_crop(frame, self.box)
                return CroppedFrame(C.network_input(crop512), self.face, crop512 if self.preview else None, found)
            crop = cv2.resize(frame, (spec.SOURCE_SIZE, spec.SOURCE_SIZE), interpolation=cv2.INTER_LINEAR)
            preview = cv2.resize(frame, (C.CROP_SIZE, C.CROP_SIZE)) if self.preview else None
            return CroppedFrame(crop, self.face, preview, found)

    def close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()
