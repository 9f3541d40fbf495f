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
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
WEBCAM_PREFIX = "webcam:"


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


def default_file_mode() -> int:
    """0o666 less the process umask: the mode a plainly created file gets (mkstemp's temporary files are 0600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:             # not Linux: read the umask by setting it (and back at once)
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class atomic_output:
    """Context manager yielding a temporary path beside `path` (same suffix); renamed onto `path` on success, with
    the mode the user's umask gives new files."""

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
            os.chmod(self.tmp, default_file_mode())
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

    HEADER_ATTEMPTS = 3
    HEADER_WAIT_S = 9.5         # imageio-ffmpeg's own wait for ffmpeg's header is 10 s

    def __init__(self, path: str | Path):
        import imageio_ffmpeg
        self.path = require_file(path, "driving video")
        for attempt in range(self.HEADER_ATTEMPTS):
            self._frames = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
            began = time.monotonic()
            try:
                meta = next(self._frames)
                break
            except (OSError, RuntimeError, StopIteration) as exc:
                self._frames.close()
                # imageio-ffmpeg gives ffmpeg 10 s to print the header: on a loaded machine a good file can miss
                # that, so a failure that took the whole wait is tried again; a file ffmpeg refuses fails at once
                if time.monotonic() - began < self.HEADER_WAIT_S or attempt == self.HEADER_ATTEMPTS - 1:
                    raise MediaError(f"driving video {self.path} is not a video ffmpeg can decode "
                                     f"({str(exc).splitlines()[0]})") from exc
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
    """H.264 mp4 written frame by frame, optionally with the audio track of another file.

    Every frame written is in the video: the audio is trimmed or padded with silence to the video's length, never
    the video to the audio's (`-shortest` would end it with the audio and could drop the last frames). With audio
    the frames go to a video-only temporary file first; `close()` then muxes the audio in (video stream copied,
    audio encoded to AAC, padded by `apad` and cut at frames / fps). The file appears at `path` only after
    `close()` succeeds; `abort()` (or an exception inside a `with`) removes the partial output.
    """

    def __init__(self, path: str | Path, size: tuple[int, int], fps: float, audio_from: str | Path | None = None,
                 quality: float = 7):
        import imageio_ffmpeg
        w, h = size
        if w % 2 or h % 2:
            raise MediaError(f"H.264 output needs even sides, got {w}x{h}")
        self._atomic = atomic_output(path)
        self._tmp = self._atomic.__enter__()
        self._audio_from, self._fps = audio_from, fps
        self._video_only = None if audio_from is None else self._tmp.with_name(self._tmp.stem + ".video.mp4")
        self._gen = imageio_ffmpeg.write_frames(str(self._video_only or self._tmp), (w, h), fps=fps, quality=quality,
                                                codec="libx264", macro_block_size=2,
                                                output_params=["-movflags", "+faststart"], ffmpeg_log_level="error")
        self._gen.send(None)
        self.size, self.frames = (w, h), 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape[1::-1] != self.size:
            raise MediaError(f"frame size {frame.shape[1::-1]} differs from the video's {self.size}")
        self._gen.send(np.ascontiguousarray(frame, dtype=np.uint8))
        self.frames += 1

    def _mux_audio(self) -> None:
        """The video-only file plus the audio, cut or padded to exactly the video's duration, into the output."""
        import subprocess
        import imageio_ffmpeg
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(self._video_only),
                   "-i", str(self._audio_from), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
                   "-af", "apad", "-t", f"{self.frames / self._fps:.6f}", "-movflags", "+faststart", str(self._tmp)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise MediaError(f"ffmpeg failed adding the audio of {self._audio_from}: "
                             f"{(done.stderr.strip() or 'no message').splitlines()[-1]}")

    def close(self) -> None:
        try:
            self._gen.close()
            if self._video_only is not None:
                self._mux_audio()
        except BaseException as exc:
            self._discard_video_only()
            self._atomic.__exit__(type(exc), exc, None)
            if isinstance(exc, MediaError):
                raise
            raise MediaError(f"ffmpeg failed writing {self._atomic.path}: {exc}") from exc
        self._discard_video_only()
        self._atomic.__exit__(None, None, None)

    def _discard_video_only(self) -> None:
        if self._video_only is not None:
            self._video_only.unlink(missing_ok=True)

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
        self._discard_video_only()
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
