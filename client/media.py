"""Reading and writing images and videos, frame by frame, with outputs written atomically.

Videos are decoded and encoded by the ffmpeg binary of `imageio-ffmpeg` through pipes, one frame at a time, so
memory does not grow with the video's length. Outputs go to a temporary file beside the target and are renamed
into place only when complete: an error or an interrupt leaves no half-written file behind.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
WEBCAM_PREFIX = "webcam:"
MP4_AUDIO_CODECS = ("aac", "mp3", "alac", "opus", "ac3", "eac3")     # copied into mp4 as they are


class MediaError(RuntimeError):
    """A file that cannot be read or written as media."""


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_webcam(spec: str) -> bool:
    return str(spec).startswith(WEBCAM_PREFIX)


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{what} {path} not found")
    if not path.is_file():
        raise MediaError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{what} {path} is not readable (permissions)")
    return path


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """An RGB uint8 image, or MediaError naming the file and the problem."""
    path = require_file(path, what)
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise MediaError(f"{what} {path} is not an image OpenCV can decode")
    return np.ascontiguousarray(image[:, :, ::-1])


def write_image(path: str | Path, image_rgb: np.ndarray) -> Path:
    """Encode by the path's suffix and write atomically."""
    path = Path(path)
    suffix = path.suffix.lower() or ".png"
    try:
        ok, data = cv2.imencode(suffix, np.ascontiguousarray(image_rgb[:, :, ::-1]))
    except cv2.error:
        ok = False
    if not ok:
        raise MediaError(f"cannot encode an image as {suffix!r} for {path}")
    with atomic_output(path) as tmp:
        data.tofile(tmp)
    return path


class atomic_output:
    """Context manager yielding a temporary path beside `path` (same suffix); renamed onto `path` on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise MediaError(f"output folder {self.path.parent} does not exist")

    def __enter__(self) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".part{self.path.suffix}",
                                   dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class VideoInfo:
    fps: float
    size: tuple[int, int]                   # (width, height)
    frame_count: int | None                 # estimate from the container's duration (None: live)
    audio_codec: str | None = None


class VideoReader:
    """Iterates a video file's frames as RGB uint8 arrays, decoding one at a time."""

    def __init__(self, path: str | Path):
        import imageio_ffmpeg
        self.path = require_file(path, "driving video")
        self._frames = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
        try:
            meta = next(self._frames)
        except (OSError, RuntimeError, StopIteration) as exc:
            self._frames.close()
            raise MediaError(f"driving video {self.path} is not a video ffmpeg can decode "
                             f"({str(exc).splitlines()[0]})") from None
        fps = float(meta.get("fps") or 25.0)
        duration = meta.get("duration")
        count = int(round(duration * fps)) if duration else None
        self.info = VideoInfo(fps=fps, size=tuple(meta["size"]), frame_count=count,
                              audio_codec=meta.get("audio_codec"))

    def __iter__(self) -> Iterator[np.ndarray]:
        w, h = self.info.size
        for raw in self._frames:
            yield np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)

    def close(self) -> None:
        self._frames.close()


class WebcamReader:
    """Frames from a camera (`webcam:N`), RGB, until closed."""

    def __init__(self, spec: str, fps: float | None = None):
        try:
            self.index = int(spec[len(WEBCAM_PREFIX):])
        except ValueError:
            raise MediaError(f"bad camera {spec!r}: use webcam:N with N the camera number") from None
        self._capture = cv2.VideoCapture(self.index)
        if not self._capture.isOpened():
            raise MediaError(f"camera {self.index} cannot be opened (is a camera connected and free?)")
        fps = fps or self._capture.get(cv2.CAP_PROP_FPS) or 25.0
        w = int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.info = VideoInfo(fps=float(fps), size=(w, h), frame_count=None)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            ok, frame = self._capture.read()
            if not ok:
                return
            yield np.ascontiguousarray(frame[:, :, ::-1])

    def close(self) -> None:
        self._capture.release()


class Prefetcher:
    """Runs `prepare` over an iterable in a background thread, keeping at most `depth` results ahead.

    Decoding and face cropping of the next frames overlap with the caller's work; the bounded queue keeps
    memory flat. An exception in the thread is raised in the consumer.
    """

    _END = object()

    def __init__(self, items: Iterable, prepare: Callable, depth: int = 8, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(items, prepare), name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items, prepare):
        try:
            for i, item in enumerate(items):
                if self._stop.is_set() or not self._put((prepare(i, item), None)):
                    return
        except BaseException as exc:      # handed to the consumer
            self._put((None, exc))
            return
        self._put((self._END, None))

    def __iter__(self):
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# Writing


class VideoWriter:
    """H.264 mp4 written frame by frame, optionally with an audio track copied from another file.

    The file appears at `path` only after `close()` succeeds; `abort()` (or an exception inside a `with`)
    removes the partial output.
    """

    def __init__(self, path: str | Path, size: tuple[int, int], fps: float, audio_from: str | Path | None = None,
                 audio_codec: str | None = None, quality: float = 7):
        import imageio_ffmpeg
        w, h = size
        if w % 2 or h % 2:
            raise MediaError(f"H.264 output needs even sides, got {w}x{h}")
        self._atomic = atomic_output(path)
        self._tmp = self._atomic.__enter__()
        params = ["-movflags", "+faststart"]
        codec = None
        if audio_from is not None:
            codec = "copy" if (audio_codec or "").lower() in MP4_AUDIO_CODECS else "aac"
            params += ["-shortest"]
        self._gen = imageio_ffmpeg.write_frames(str(self._tmp), (w, h), fps=fps, quality=quality,
                                                codec="libx264", macro_block_size=2, output_params=params,
                                                audio_path=None if audio_from is None else str(audio_from),
                                                audio_codec=codec, ffmpeg_log_level="error")
        self._gen.send(None)
        self.size, self.frames = (w, h), 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape[1::-1] != self.size:
            raise MediaError(f"frame size {frame.shape[1::-1]} differs from the video's {self.size}")
        self._gen.send(np.ascontiguousarray(frame, dtype=np.uint8))
        self.frames += 1

    def close(self) -> None:
        try:
            self._gen.close()
        except BaseException as exc:
            self._atomic.__exit__(type(exc), exc, None)
            raise MediaError(f"ffmpeg failed writing {self._atomic.path}: {exc}") from None
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        logger = logging.getLogger("imageio_ffmpeg")
        level = logger.level
        logger.setLevel(logging.ERROR)      # it warns that an aborted video is invalid: it is being discarded
        try:
            self._gen.close()
        except BaseException:           # the output is discarded anyway
            pass
        finally:
            logger.setLevel(level)
        self._atomic.__exit__(MediaError, None, None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def probe_video(path: str | Path) -> dict:
    """Frame count, fps, size and audio codec of a video file (decodes it fully: use for checks, not hot paths)."""
    import imageio_ffmpeg
    reader = VideoReader(path)
    reader.close()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return {"frames": frames, "fps": reader.info.fps, "size": reader.info.size, "audio_codec": reader.info.audio_codec}
