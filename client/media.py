"""Reading and writing images and videos, frame by frame, with outputs written atomically.

Videos are decoded, encoded and muxed in-process by PyAV (FFmpeg's libraries), one frame at a time, so memory
does not grow with the video's length. No ffmpeg process is started: forking one from a process whose gRPC
channels are active killed the child before it could exec (grpcio's fork handler restarts its poller thread in the
child, whose epoll descriptor subprocess then closes: SIGABRT), which showed as a broken pipe when writing and as
"Could not load meta information" when reading a valid video; and nothing waits a fixed time for a header.
Outputs go to a temporary file beside the target and are renamed into place only when complete: an error or an
interrupt leaves no half-written file behind. Every failure is a MediaError naming the file and the cause.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import tempfile
import threading
from fractions import Fraction
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
    """Iterates a video file's frames as RGB uint8 arrays, decoding one at a time (shown upright: the display
    rotation a phone records is applied, as ffmpeg's autorotate does). The first frame is decoded on opening, so a
    file that does not decode fails there."""

    def __init__(self, path: str | Path, what: str = "driving video"):
        import av
        self.path = require_file(path, what)
        self._what = what
        try:
            self._container = av.open(str(self.path), metadata_errors="ignore")
        except (av.FFmpegError, UnicodeDecodeError) as exc:
            raise MediaError(f"{what} {self.path} is not a video ffmpeg can decode ({_first_line(exc)})") from exc
        if not self._container.streams.video:
            self._container.close()
            raise MediaError(f"{what} {self.path} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self._frames = self._decode()
        try:
            self._first = next(self._frames, None)
        except MediaError:
            self._container.close()
            raise
        rate = self._stream.average_rate or self._stream.guessed_rate
        fps = float(rate) if rate else 25.0
        count = self._stream.frames or None
        if count is None and self._container.duration:
            count = int(round(self._container.duration / 1e6 * fps))
        if self._first is not None:
            size = (self._first.shape[1], self._first.shape[0])
        else:
            size = (self._stream.codec_context.width, self._stream.codec_context.height)
        audio = self._container.streams.audio
        self.info = VideoInfo(fps=fps, size=size, frame_count=count,
                              audio_codec=audio[0].codec_context.name if audio else None)

    def _decode(self) -> Iterator[np.ndarray]:
        import av
        try:
            for frame in self._container.decode(self._stream):
                image = frame.to_ndarray(format="rgb24")
                turns = int(round(frame.rotation / 90)) % 4 if frame.rotation else 0
                yield np.ascontiguousarray(np.rot90(image, turns)) if turns else image
        except av.FFmpegError as exc:
            raise MediaError(f"{self._what} {self.path}: decoding failed ({_first_line(exc)})") from exc

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            yield from self._frames

    def close(self) -> None:
        self._frames.close()
        self._container.close()


def _first_line(exc: BaseException) -> str:
    """The cause in one line (an FFmpeg error's own text, without its errno and file name)."""
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0]


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
    the video to the audio's. With audio the frames go to a video-only temporary file first; `close()` then muxes
    the audio in (video packets copied, audio encoded to AAC, padded with silence and cut at frames / fps). The file
    appears at `path` only after `close()` succeeds; `abort()` (or an exception inside a `with`) removes the partial
    output. `quality` 0..10 as imageio-ffmpeg's: x264 CRF = int((1 - quality / 10) * 51).
    """

    def __init__(self, path: str | Path, size: tuple[int, int], fps: float, audio_from: str | Path | None = None,
                 quality: float = 7):
        import av
        w, h = size
        if w % 2 or h % 2:
            raise MediaError(f"H.264 output needs even sides, got {w}x{h}")
        self._atomic = atomic_output(path)
        self._tmp = self._atomic.__enter__()
        self._audio_from, self._fps = audio_from, fps
        self._video_only = None if audio_from is None else self._tmp.with_name(self._tmp.stem + ".video.mp4")
        try:
            self._container = av.open(str(self._video_only or self._tmp), mode="w", format="mp4",
                                      options={"movflags": "+faststart"})
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100_000))
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
            self._stream.options = {"crf": str(int((1 - quality / 10) * 51))}
        except (av.FFmpegError, ValueError) as exc:
            self._discard()
            raise MediaError(f"cannot start an H.264 video {self._atomic.path}: {_first_line(exc)}") from exc
        self.size, self.frames = (w, h), 0

    def write(self, frame: np.ndarray) -> None:
        import av
        if frame.shape[1::-1] != self.size:
            raise MediaError(f"frame size {frame.shape[1::-1]} differs from the video's {self.size}")
        # RGB -> YUV 4:2:0 with bicubic chroma filtering, as the ffmpeg command's scaler does (PyAV's default is
        # bilinear, which moves textured pixels a little more)
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24") \
            .reformat(format="yuv420p", interpolation="BICUBIC")
        picture.pts = self.frames
        try:
            self._container.mux(self._stream.encode(picture))
        except av.FFmpegError as exc:
            raise MediaError(f"encoding frame {self.frames} of {self._atomic.path} failed: {_first_line(exc)}") \
                from exc
        self.frames += 1

    def _mux_audio(self) -> None:
        """The video-only file plus the audio, cut or padded to exactly the video's duration, into the output."""
        import av
        try:
            source = av.open(str(self._audio_from), metadata_errors="ignore")
        except av.FFmpegError as exc:
            raise MediaError(f"cannot read the audio of {self._audio_from}: {_first_line(exc)}") from exc
        with source, av.open(str(self._video_only)) as video, \
                av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            if not source.streams.audio:
                raise MediaError(f"{self._audio_from} has no audio stream")
            audio_in = source.streams.audio[0]
            video_out = out.add_stream_from_template(video.streams.video[0])
            rate = audio_in.codec_context.sample_rate or 48_000
            audio_out = out.add_stream("aac", rate=rate)
            audio_out.layout = audio_in.codec_context.layout.name if audio_in.codec_context.layout else "stereo"
            for packet in video.demux(video.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = video_out
                    out.mux(packet)
            wanted = int(round(self.frames / self._fps * rate))
            resampler = av.AudioResampler(format="fltp", layout=audio_out.layout.name, rate=rate)
            written = 0
            for frame in source.decode(audio_in):
                for chunk in resampler.resample(frame):
                    written = self._encode_audio(out, audio_out, chunk.to_ndarray(), written, wanted, rate)
            for chunk in resampler.resample(None):
                written = self._encode_audio(out, audio_out, chunk.to_ndarray(), written, wanted, rate)
            channels = audio_out.layout.nb_channels
            while written < wanted:                 # pad with silence to the video's length
                silence = np.zeros((channels, min(1024, wanted - written)), np.float32)
                written = self._encode_audio(out, audio_out, silence, written, wanted, rate)
            out.mux(audio_out.encode(None))

    @staticmethod
    def _encode_audio(out, stream, samples: np.ndarray, written: int, wanted: int, rate: int) -> int:
        """Encode planar float samples (channels, n), cut at `wanted` samples in all; returns samples written."""
        import av
        samples = samples[:, :max(wanted - written, 0)]
        if samples.shape[1] == 0:
            return written
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32), format="fltp",
                                           layout=stream.layout.name)
        frame.sample_rate, frame.pts, frame.time_base = rate, written, Fraction(1, rate)
        out.mux(stream.encode(frame))
        return written + samples.shape[1]

    def close(self) -> None:
        import av
        try:
            try:
                self._container.mux(self._stream.encode(None))
                self._container.close()
            except av.FFmpegError as exc:
                raise MediaError(f"finishing {self._atomic.path} failed: {_first_line(exc)}") from exc
            if self._video_only is not None:
                try:
                    self._mux_audio()
                except av.FFmpegError as exc:
                    raise MediaError(f"adding the audio of {self._audio_from} to {self._atomic.path} failed: "
                                     f"{_first_line(exc)}") from exc
        except BaseException as exc:
            self._discard()
            self._atomic.__exit__(type(exc), exc, None)
            raise
        self._discard_video_only()
        self._atomic.__exit__(None, None, None)

    def _discard_video_only(self) -> None:
        if self._video_only is not None:
            self._video_only.unlink(missing_ok=True)

    def _discard(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except Exception:           # the output is discarded anyway
                pass
        self._discard_video_only()

    def abort(self) -> None:
        self._discard()
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
    reader = VideoReader(path, "video")
    try:
        frames = sum(1 for _ in reader)
    finally:
        reader.close()
    return {"frames": frames, "fps": reader.info.fps, "size": reader.info.size, "audio_codec": reader.info.audio_codec}
