"""Test media generated from scikit-image's astronaut portrait (the package ships it), so the suite needs no files
from outside the repository.

`ensure()` writes, once per version and user, a folder laid out like shared/assets:

| file | what |
| --- | --- |
| source/s0.jpg 600x704, s1.jpg 1145x1145, s5.jpg 720x720 (mirrored), s12.jpg 375x500 | portraits, eyes open, mouth shut |
| driving/d0.mp4 | 512x512, 78 frames, 25 fps, no audio: the face turns, tilts and moves, blinks twice and talks |
| driving/d3.mp4 | 512x512, 60 frames, 30 fps, with an AAC tone: the same kind of motion |
| driving/d30.jpg 600x900, d19.jpg 512x512 | driving images (d30: the head tilted with the mouth shut, d19: upright) |
| templates/wink.pkl, talking.pkl | motion templates in the official pickle layout (made here: n_frames, output_fps, motion list of R/exp/t/scale, c_eyes_lst, c_lip_lst) |

The blink and the talking are painted with the face's own colours over the eye and inner-lip outlines that
MediaPipe finds on the astronaut (skin over the eyes, lip over the open mouth), so MediaPipe sees the eyes close
and the mouth shut; the head motion is a similarity transform of the painted frame. Everything is deterministic.
`LP_TEST_MEDIA_DIR` chooses the folder (default: the system temp folder).
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

VERSION = 2
LEFT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
RIGHT_EYE = (362, 398, 384, 385, 386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382)
INNER_LIPS = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
FACE_BOX = (96, 16, 352, 272)           # x0, y0, x1, y1 of the astronaut around her face (256 x 256)
AUDIO_RATE = 44100
EYE_GROWTH, LIP_GROWTH = 1.4, 1.2      # outline growth that MediaPipe reads as closed eyes / shut lips
SEAM = (70, 40, 40)


def media_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"liveportrait-test-media-v{VERSION}-{os.getuid()}"
    return Path(os.environ.get("LP_TEST_MEDIA_DIR", default))


def ensure() -> Path:
    """The generated media folder, made now if it is missing (atomically: a folder is complete or absent)."""
    target = media_dir()
    if (target / "complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        generate(work)
        (work / "complete").write_text(f"version {VERSION}\n")
        try:
            os.rename(work, target)
        except OSError:                 # another process finished first
            if not (target / "complete").is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Painting a face state and moving the head


class Face:
    """The astronaut with MediaPipe's eye and inner-lip outlines, painted into any eye/mouth state."""

    def __init__(self):
        from skimage import data
        from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
        self.image = np.ascontiguousarray(data.astronaut())
        analyzer = MediapipeFaceAnalyzer()
        try:
            face = analyzer.detect(self.image)
        finally:
            analyzer.close()
        if face is None:
            raise RuntimeError("MediaPipe found no face in scikit-image's astronaut")
        points = face.crop_points.points
        self.eyes = [points[list(outline)] for outline in (LEFT_EYE, RIGHT_EYE)]
        self.lips = points[list(INNER_LIPS)]
        self.skin = self._colour_below(self.eyes, 0.9)
        self.lip_colour = self._colour_below([self.lips], 0.35)

    def _colour_below(self, outlines, fraction: float) -> np.ndarray:
        """The median colour a little below the outlines (cheek under the eyes, lower lip under the mouth)."""
        samples = []
        for outline in outlines:
            height = outline[:, 1].max() - outline[:, 1].min()
            y = int(round(outline[:, 1].max() + fraction * max(height, 4)))
            x0, x1 = int(outline[:, 0].min()), int(outline[:, 0].max())
            samples.append(self.image[y - 1:y + 2, x0:x1 + 1].reshape(-1, 3))
        return np.median(np.concatenate(samples), axis=0)

    def painted(self, eye_closure: float, mouth_closure: float) -> np.ndarray:
        """The portrait with the eyes closed by `eye_closure` and the open mouth shut by `mouth_closure` (0..1)."""
        import cv2
        out = self.image.copy()
        for outline, colour, grow, closure in [*((e, self.skin, EYE_GROWTH, eye_closure) for e in self.eyes),
                                               (self.lips, self.lip_colour, LIP_GROWTH, mouth_closure)]:
            if closure <= 0:
                continue
            centre = outline.mean(0)
            grown = centre + (outline - centre) * grow          # cover the lid and lip edges too
            top = grown[:, 1].min()
            covered = grown.copy()        # everything above the closing edge, which moves from the top down
            covered[:, 1] = np.minimum(covered[:, 1], top + closure * (grown[:, 1].max() - top))
            cv2.fillPoly(out, [np.round(covered * 16).astype(np.int32)], tuple(float(c) for c in colour),
                         lineType=cv2.LINE_AA, shift=4)
            if closure > 0.8:             # the line where the lids (or lips) meet
                y = int(round(centre[1] + 0.3 * (outline[:, 1].max() - centre[1])))
                cv2.line(out, (int(outline[:, 0].min()), y), (int(outline[:, 0].max()), y), SEAM, 1, cv2.LINE_AA)
        return out

    def frame(self, eye_closure: float, mouth_closure: float, angle: float, shift: tuple[float, float],
              zoom: float, size: tuple[int, int], box=FACE_BOX) -> np.ndarray:
        """The painted portrait, `box` mapped onto a (w, h) frame, turned by `angle` degrees, moved and zoomed."""
        import cv2
        w, h = size
        x0, y0, x1, y1 = box
        scale = zoom * min(w / (x1 - x0), h / (y1 - y0))
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        matrix = cv2.getRotationMatrix2D(centre, angle, scale)
        matrix[:, 2] += (w / 2 + shift[0] - centre[0], h / 2 + shift[1] - centre[1])
        return cv2.warpAffine(self.painted(eye_closure, mouth_closure), matrix, (w, h), flags=cv2.INTER_AREA,
                              borderMode=cv2.BORDER_REFLECT)


def blink(phase: np.ndarray, at: float, width: float = 0.05) -> np.ndarray:
    """Eye closure over the clip's phase (0..1): a triangular blink centred on `at`."""
    return np.clip(1 - np.abs(phase - at) / width, 0, 1)


def driving_frames(face: Face, count: int, size=(512, 512)) -> list[np.ndarray]:
    """A head turning and moving, two blinks, the mouth opening and shutting (talking) about every 0.4 clip."""
    phase = np.arange(count) / max(count - 1, 1)
    eyes = np.maximum(blink(phase, 0.3), blink(phase, 0.75))
    mouth = 0.5 + 0.5 * np.cos(2 * np.pi * phase * 2.5)          # 1: shut, 0: open as in the portrait
    frames = []
    for i in range(count):
        angle = 10 * np.sin(2 * np.pi * phase[i])
        shift = (20 * np.sin(2 * np.pi * phase[i] * 1.5), 10 * np.cos(2 * np.pi * phase[i]))
        frames.append(face.frame(eyes[i], mouth[i], angle, shift, 1.0 + 0.05 * np.sin(np.pi * phase[i]), size))
    return frames


# ---------------------------------------------------------------------------------------------------------------
# Writing files


def tone(seconds: float, rate: int = AUDIO_RATE) -> np.ndarray:
    """A 440 Hz tone with a 3 Hz tremolo, int16 mono."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (8000 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.int16)


def write_video(path: Path, frames: list[np.ndarray], fps: float, audio_seconds: float | None = None) -> Path:
    """H.264 mp4 of RGB frames at `fps`, with an AAC tone of `audio_seconds` (None: no audio track)."""
    import imageio_ffmpeg
    h, w = frames[0].shape[:2]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-"]
    audio = None
    if audio_seconds is not None:
        audio = path.with_suffix(".pcm")
        audio.write_bytes(tone(audio_seconds).tobytes())
        command += ["-f", "s16le", "-ar", str(AUDIO_RATE), "-ac", "1", "-i", str(audio), "-c:a", "aac"]
    command += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-preset", "fast", str(path)]
    try:
        subprocess.run(command, input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True)
    finally:
        if audio is not None:
            audio.unlink(missing_ok=True)
    return path


def write_image(path: Path, rgb: np.ndarray) -> Path:
    import cv2
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise RuntimeError(f"cannot write {path}")
    return path


def official_template(count: int, fps: float, seed: int, wink: bool) -> dict:
    """A motion template in the official pickle layout with plausible motion (small rotations, positive scale)."""
    from liveportrait_triton.keypoints import rotation_matrix
    rng = np.random.default_rng(seed)
    phase = np.arange(count) / count
    pitch, yaw, roll = (amp * np.sin(2 * np.pi * (phase + off)) for amp, off in ((5, 0.0), (12, 0.25), (4, 0.5)))
    R = rotation_matrix(pitch.astype(np.float32), yaw.astype(np.float32), roll.astype(np.float32))
    base = rng.normal(0, 0.02, (21, 3)).astype(np.float32)
    eyes = 1 - (blink(phase, 0.5, 0.15) if wink else np.zeros(count))
    motion = []
    for i in range(count):
        exp = base + np.float32(0.01 * np.sin(2 * np.pi * 3 * phase[i]))
        motion.append({"scale": np.float32([[1.4 + 0.02 * np.sin(2 * np.pi * phase[i])]]), "R": R[i][None],
                       "exp": exp[None], "t": np.float32([[0.01 * np.sin(2 * np.pi * phase[i]), 0.0, 0.0]])})
    return {"n_frames": count, "output_fps": fps, "motion": motion,
            "c_eyes_lst": [np.float32([[0.35 * e, 0.35 * e]]) for e in eyes],
            "c_lip_lst": [np.float32([[0.05 + 0.2 * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * p))]]) for p in phase]}


def generate(out: Path) -> None:
    face = Face()
    for folder in ("source", "driving", "templates"):
        (out / folder).mkdir()
    portrait = face.painted(0.0, 1.0)          # mouth shut: the driving videos open it
    import cv2
    write_image(out / "source" / "s0.jpg", cv2.resize(portrait[0:470, 56:456], (600, 704), interpolation=cv2.INTER_AREA))
    write_image(out / "source" / "s1.jpg", cv2.resize(portrait, (1145, 1145), interpolation=cv2.INTER_CUBIC))
    write_image(out / "source" / "s5.jpg", cv2.resize(portrait[0:360, 44:404, :][:, ::-1], (720, 720),
                                                      interpolation=cv2.INTER_CUBIC))
    write_image(out / "source" / "s12.jpg", cv2.resize(portrait[10:310, 112:337], (375, 500),
                                                       interpolation=cv2.INTER_AREA))
    write_video(out / "driving" / "d0.mp4", driving_frames(face, 78), 25.0)
    write_video(out / "driving" / "d3.mp4", driving_frames(face, 60), 30.0, audio_seconds=2.0)
    write_image(out / "driving" / "d30.jpg", face.frame(0.0, 1.0, 12.0, (0, 40), 0.9, (600, 900)))
    write_image(out / "driving" / "d19.jpg", face.frame(0.0, 0.0, 0.0, (0, 0), 1.0, (512, 512)))
    for name, count, fps, seed, wink in (("wink", 57, 25.0, 1, True), ("talking", 100, 20.0, 2, False)):
        with open(out / "templates" / f"{name}.pkl", "wb") as f:
            pickle.dump(official_template(count, fps, seed, wink), f, protocol=4)
