"""`liveportrait-triton animate`: a portrait, a driving video / image / motion template / camera -> a video or image.

The client does what needs the full-resolution pictures: face detection and landmarks, the rotation-aligned
crop, the eye/lip ratios, paste-back and video encoding with the driving audio. The server does the networks.
Frames stream: a background thread decodes and crops the next frames while earlier ones are on the server
(several in flight on one gRPC stream); memory stays flat whatever the video's length.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping

import cv2
import numpy as np

from .. import crop as C
from .. import spec
from ..wire import DrivingFrame, MotionFrame
from . import animals, media
from .client import DEFAULT_URL, LivePortraitClient
from .errors import RequestFailed, ServerMismatch, ServerUnavailable
from .requests import new_sequence_id
from .driving import DrivingCropper
from .faces import NoFaceError, make_analyzer
from .multiface import SourceFaces, parse_faces
from .profiling import StageTimer, server_statistics, statistics_delta
from .keypoint_overlay import KeypointOverlay
from .smoothing import MotionSmoother, SmoothingSettings
from .source_video import animate_source_video
from .templates import TemplateError, is_template, load_template

# driving_type follows the driving input, source_video the source input
CLI_OPTIONS = [name for name in spec.PIPELINE_OPTIONS if name not in ("driving_type", "source_video")]
DROPPED = -1        # a live frame not sent because the server was behind (AnimationStream.offer)


@dataclasses.dataclass(frozen=True)
class AnimateSettings:
    """Everything one animation run is told: the `animate` command builds it from its flags (`from_args`), the web
    page and the live session from their controls (`from_values`), library callers directly. Defaults are the
    command's; the pipeline options (`CLI_OPTIONS`) sit in `options`, unset ones take the server's defaults."""
    source: str
    driving: str
    output: str
    server: str = DEFAULT_URL
    comparison: str | None = None
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    source_scale: float = C.SOURCE_CROP.scale
    source_vx: float = C.SOURCE_CROP.vx
    source_vy: float = C.SOURCE_CROP.vy
    source_box: C.PixelBox | str | None = None  # animals: the box to animate, "auto" (cat-face detector), None: all
    driving_scale: float = C.DRIVING_CROP.scale
    driving_vx: float = C.DRIVING_CROP.vx
    driving_vy: float = C.DRIVING_CROP.vy
    crop_driving: bool = False
    paste_back: bool = True
    faces: str | int = "largest"            # "largest", "all" or a count (parse_faces)
    source_max_dim: int = C.SOURCE_MAX_DIM
    draw_keypoints: bool = False
    face_models: str | None = None
    smooth: bool | None = None              # None: on for a camera
    smooth_min_cutoff: float = SmoothingSettings.min_cutoff
    smooth_beta: float = SmoothingSettings.beta
    fps: float | None = None
    max_frames: int | None = None
    in_flight: int = 4
    retry: float = 0.0
    profile: bool = False
    quiet: bool = False

    def __post_init__(self):
        unknown = set(self.options) - set(CLI_OPTIONS)
        if unknown:
            raise ValueError(f"unknown animation option(s) {sorted(unknown)}; known: {CLI_OPTIONS}")
        object.__setattr__(self, "options", {k: v for k, v in self.options.items() if v is not None})
        object.__setattr__(self, "faces", parse_faces(str(self.faces)))
        if isinstance(self.source_box, str):        # "x,y,w,h", "auto" (animals.AUTO) or "" (none)
            object.__setattr__(self, "source_box", animals.parse_box(self.source_box))
        self.source_crop, self.driving_crop        # crop limits checked here (crop.py), before any work
        spec.parse_options(self.options)            # and the options by the server's rule
        self._check_subject()

    def _check_subject(self) -> None:
        """What an animal source can do: one box instead of the face crop (the option rules are the spec's)."""
        if not self.animal:
            if self.source_box is not None:
                raise ValueError("--source-box is for --subject animal (a human source is cropped around its face)")
            return
        refused = [_flag(name) for name, default in (("faces", "largest"), ("draw_keypoints", False),
                                                     ("source_scale", C.SOURCE_CROP.scale),
                                                     ("source_vx", C.SOURCE_CROP.vx), ("source_vy", C.SOURCE_CROP.vy))
                   if getattr(self, name) != default]
        if refused:
            raise ValueError(f"{', '.join(refused)}: for human faces only; an animal source is the whole image or "
                             "the box --source-box x,y,w,h, and the keypoint panel draws the human set's keypoints")

    @classmethod
    def from_values(cls, **values) -> "AnimateSettings":
        """From flat names, as the command's flags and the page's controls name them (pipeline options among
        them); an unknown name raises ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"options"}
        unknown = set(values) - fields - set(CLI_OPTIONS)
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}")
        options = {k: values.pop(k) for k in list(values) if k in CLI_OPTIONS}
        return cls(options=options, **values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AnimateSettings":
        """From the parsed flags of `add_arguments`."""
        names = {f.name for f in dataclasses.fields(cls)} | set(CLI_OPTIONS)
        return cls.from_values(**{k: v for k, v in vars(args).items() if k in names})

    @property
    def source_crop(self) -> C.CropSettings:
        return C.CropSettings(self.source_scale, self.source_vx, self.source_vy, rotate=True)

    @property
    def driving_crop(self) -> C.CropSettings:
        return C.CropSettings(self.driving_scale, self.driving_vx, self.driving_vy, rotate=False)

    @property
    def animal(self) -> bool:
        """The source is animated by the Animals model set (option subject=animal)."""
        return self.options.get("subject") == spec.ANIMAL

    def pastes_back(self, options: dict) -> bool:
        """Whether the result is pasted into the source picture (an animal's only with a box and stitching on:
        `animals.pastes_back`)."""
        return animals.pastes_back(self.source_box, options, self.paste_back) if self.animal else self.paste_back

    @property
    def needs_ratios(self) -> bool:
        """Eye or lip retargeting is on: each driving frame carries its ratios."""
        return bool(self.options.get("eye_retargeting") or self.options.get("lip_retargeting"))

    def pipeline_options(self, kind: str, source_video: bool = False) -> dict:
        """The sequence options sent with START for this driving kind and source (checked by the server's rule,
        `spec.parse_options`, which also refuses what an animal sequence cannot do)."""
        options = dict(self.options)
        implied = []
        if kind == "image":
            options["driving_type"] = "image"
            implied.append(f"driving_type=image: the driving input {self.driving} is an image")
        if source_video:
            options["source_video"] = True
            implied.append(f"source_video: the source {self.source} is a video")
        try:
            spec.parse_options(options)
        except spec.OptionError as exc:
            raise spec.OptionError(f"{exc} ({'; '.join(implied)})" if implied else str(exc)) from None
        return options


DEFAULTS = {f.name: f.default for f in dataclasses.fields(AnimateSettings)}


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--source", required=True, help="source portrait image, or a source video (v2v: see README)")
    io.add_argument("--driving", required=True,
                    help="driving video, driving image, motion template (.pkl official / .npz), or webcam:N")
    io.add_argument("--output", required=True, help="output .mp4 (video/template/webcam driving) or image file")
    io.add_argument("--comparison", help="also write a side-by-side video: driving | source | result")
    io.add_argument("--server", default=DEFAULTS["server"],
                    help=f"Triton gRPC address HOST:PORT (default {DEFAULTS['server']})")

    motion = parser.add_argument_group("motion (sent to the server with the sequence)")
    for name in CLI_OPTIONS:
        opt = spec.PIPELINE_OPTIONS[name]
        help_text = f"{opt.help} (server default: {opt.default}"
        help_text += f"; {spec.ANIMAL_DEFAULTS[name]} for --subject animal)" if name in spec.ANIMAL_DEFAULTS else ")"
        if opt.kind is bool:
            motion.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif opt.choices:
            motion.add_argument(_flag(name), dest=name, choices=opt.choices, default=None, help=help_text)
        else:
            motion.add_argument(_flag(name), dest=name, type=opt.kind, default=None, help=help_text)

    crop = parser.add_argument_group("crop and paste-back")
    for who, settings in (("source", C.SOURCE_CROP), ("driving", C.DRIVING_CROP)):
        crop.add_argument(f"--{who}-scale", type=float, default=settings.scale,
                          help=f"{who} crop box size / face size, [{C.SCALE_BOUNDS[0]:g}, {C.SCALE_BOUNDS[1]:g}] "
                               f"(default {settings.scale})")
        crop.add_argument(f"--{who}-vx", type=float, default=settings.vx,
                          help=f"{who} crop shift along the face's x axis, in box sides (default {settings.vx})")
        crop.add_argument(f"--{who}-vy", type=float, default=settings.vy,
                          help=f"{who} crop shift along the face's y axis, in box sides (default {settings.vy})")
    crop.add_argument("--source-box", metavar="X,Y,W,H|auto",
                      help="--subject animal: animate this box of the source image (pixels: top-left x, y, width, "
                           "height), resized to 256x256 as the official no-crop rule resizes the whole image; the "
                           "result is pasted back into it when stitching is on (default: the whole image, no "
                           "paste-back). auto: the crop around a frontal cat face found by OpenCV's cat-face "
                           "cascade (cats only; see README, Animals)")
    crop.add_argument("--crop-driving", action=argparse.BooleanOptionalAction, default=DEFAULTS["crop_driving"],
                      help="crop the face out of driving frames (default off: the driving video is taken as an "
                           "already cropped face and resized to 256x256, as the official default)")
    crop.add_argument("--paste-back", action=argparse.BooleanOptionalAction, default=DEFAULTS["paste_back"],
                      help="paste the animated face into the full source image (default on; off: the 512x512 crop)")
    crop.add_argument("--faces", type=parse_faces, default=DEFAULTS["faces"], metavar="all|largest|N",
                      help="which faces of the source to animate, each with the same driving motion: the largest "
                           "(default), all, or the N largest; faces found but not animated are reported and stay "
                           "as in the source")
    crop.add_argument("--source-max-dim", type=int, default=DEFAULTS["source_max_dim"],
                      help=f"shrink larger sources to this longer side first (default "
                           f"{DEFAULTS['source_max_dim']}; 0: never)")
    crop.add_argument("--draw-keypoints", action="store_true",
                      help="draw each frame's implicit keypoints (the driving motion applied to the source's "
                           "canonical keypoints; dots: eyes cyan, lips magenta; rings: the source's own), zoomed, "
                           "over the animated crop, shown beside the pasted-back result (the video is then wider); "
                           "video driving then also runs the served motion extractor per frame")
    crop.add_argument("--face-models", metavar="DIR",
                      help="use the official InsightFace det_10g.onnx + 2d106det.onnx and LivePortrait "
                           "landmark.onnx found in DIR instead of the built-in MediaPipe models")

    live = parser.add_argument_group("live input and smoothing")
    live.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                      help="causal One-Euro smoothing of head pose, expression and eye/lip ratios (default: on for "
                           "webcam input, off otherwise); video frames then go through the served motion extractor "
                           "first and the smoothed motion is sent")
    live.add_argument("--smooth-min-cutoff", type=float, default=SmoothingSettings.min_cutoff,
                      help="One-Euro minimum cutoff in Hz: lower is smoother but lags more "
                           f"(default {SmoothingSettings.min_cutoff})")
    live.add_argument("--smooth-beta", type=float, default=SmoothingSettings.beta,
                      help=f"One-Euro speed coefficient: higher follows fast moves sooner "
                           f"(default {SmoothingSettings.beta})")
    live.add_argument("--fps", type=float, help="frame rate of webcam input and its output (default: the camera's)")

    run_ = parser.add_argument_group("running")
    run_.add_argument("--max-frames", type=int, help="stop after this many driving frames")
    run_.add_argument("--in-flight", type=int, default=DEFAULTS["in_flight"],
                      help=f"frames awaiting the server at once (default {DEFAULTS['in_flight']})")
    run_.add_argument("--retry", type=float, default=DEFAULTS["retry"], metavar="SECONDS",
                      help="if the server restarts mid-stream, reconnect for up to SECONDS and continue without "
                           "losing or repeating frames; if it is full (\"server at capacity\"), keep starting new "
                           "streams for up to SECONDS (default 0: fail)")
    run_.add_argument("--profile", action="store_true", help="print where the time went, stage by stage")
    run_.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """The `animate` command: its flags as AnimateSettings, then `run_settings`."""
    try:
        settings = AnimateSettings.from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return run_settings(settings)


def run_settings(settings: AnimateSettings) -> int:
    """Animate and report as the command does: errors as one line on stderr (exit 1), notes, what was written."""
    try:
        summary = animate(settings)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (media.MediaError, NoFaceError, TemplateError, ServerUnavailable, ServerMismatch, RequestFailed,
            FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    if not settings.quiet:
        print(f"wrote {summary.output} ({summary.frames} frame{'s' if summary.frames != 1 else ''})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Summary:
    output: Path
    frames: int
    wall_s: float
    profile: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)     # what the user must be told (one line each)


@dataclasses.dataclass
class Prepared:
    """One driving frame ready to send (driving None: no face yet, the output shows the still source)."""
    number: int
    driving: DrivingFrame | None
    preview: np.ndarray | None = None       # 512x512 driving picture for the comparison video


def driving_kind(driving: str) -> str:
    if media.is_webcam(driving):
        return "webcam"
    if is_template(driving):
        return "template"
    if media.is_image(driving):
        return "image"
    return "video"


def check_output(path: Path, kind: str, what: str = "--output") -> None:
    if kind == "image":
        if not media.is_image(path):
            raise ValueError(f"{what} {path}: image driving writes an image; use one of {media.IMAGE_SUFFIXES}")
    elif path.suffix.lower() != ".mp4":
        raise ValueError(f"{what} {path}: {kind} driving writes an H.264 video; the name must end in .mp4")
    if not path.parent.is_dir():
        raise ValueError(f"{what} {path}: folder {path.parent} does not exist")


def prepare_source(path: str, analyzer, settings: C.CropSettings, max_dim: int, even: bool, timer: StageTimer,
                   options: dict, faces: str | int = "largest") -> SourceFaces:
    image = media.read_image(path, "source image")
    image = C.limit_size(image, max_dim)
    if even:
        image = np.ascontiguousarray(C.trim_to_even(image))
    with timer("source: detect + landmarks"):
        return SourceFaces.detect(image, analyzer, settings, options, faces, what=f"the source image {path}")


def source_faces(settings: AnimateSettings, analyzer, even: bool, timer: StageTimer, options: dict) -> SourceFaces:
    """The source image's faces to animate (settings.faces), or an animal source (its box or the whole image)."""
    if settings.animal:
        return animals.animal_source(settings.source, settings.source_box, settings.source_max_dim, even, options)
    return prepare_source(settings.source, analyzer, settings.source_crop, settings.source_max_dim, even, timer,
                          options, settings.faces)


class DrivingFrames:
    """Driving video/camera frames -> Prepared (runs in the prefetch thread): crop, ratios, optional smoothing.
    Every frame is looked at for a face; `faceless` lists the frames that showed none (see `faceless_note`)."""

    def __init__(self, settings, client: LivePortraitClient, timer: StageTimer, fps: float, smooth: bool,
                 comparison: bool):
        self.need_ratios = settings.needs_ratios
        self.crop_driving = bool(settings.crop_driving)
        self.cropper = DrivingCropper(settings.crop_driving, settings.driving_crop, settings.face_models,
                                      track=self.need_ratios,
                                      timer=timer, preview=comparison, check_faces=True)
        self.seen = 0
        self.faceless: list[int] = []
        self.client, self.timer = client, timer
        self.smoother = MotionSmoother(fps, SmoothingSettings(settings.smooth_min_cutoff, settings.smooth_beta)) \
            if smooth else None

    def __call__(self, number: int, frame: np.ndarray) -> Prepared:
        cropped = self.cropper(frame)
        self.seen += 1
        if cropped.found is False:
            self.faceless.append(number)
        if cropped.crop is None or (self.need_ratios and cropped.face is None):
            return Prepared(number, None)
        eye = lip = None
        if self.need_ratios:
            eye, lip = float(cropped.face.eye_ratio()[0]), float(cropped.face.lip_ratio()[0])
        driving = DrivingFrame(crop=cropped.crop, eye_ratio=eye, lip_ratio=lip)
        if self.smoother is not None:
            with self.timer("driving: motion extractor (smoothing)"):
                info = self.client.extract_motion(cropped.crop[None])
            motion = MotionFrame(R=info.R[0], exp=info.exp[0], t=info.t[0], scale=info.scale[0])
            driving = DrivingFrame(motion=self.smoother.motion(motion), eye_ratio=self.smoother.ratio("eye", eye),
                                   lip_ratio=self.smoother.ratio("lip", lip))
        return Prepared(number, driving, cropped.preview)

    def close(self) -> None:
        self.cropper.close()


def faceless_note(frames: DrivingFrames, driving: str, fail_if_none: bool = True) -> str | None:
    """One line naming the driving frames without a face (None if every frame had one); raises NoFaceError when
    no frame had one (`fail_if_none`): the result would show no facial motion at all."""
    if not frames.faceless:
        return None
    count, seen = len(frames.faceless), frames.seen
    if count == seen and fail_if_none:
        raise NoFaceError(f"no face found in any of the {seen} driving frame{'s' if seen != 1 else ''} of {driving}: "
                          "the driving input must show a face; nothing was written")
    shown = ", ".join(map(str, frames.faceless[:MAX_LISTED_FRAMES]))
    if count > MAX_LISTED_FRAMES:
        shown += f", ... ({count - MAX_LISTED_FRAMES} more)"
    if frames.crop_driving or frames.need_ratios:
        effect = "before the first face the output shows the still source; later ones keep the last face's crop"
    else:
        effect = "they were animated from the whole frame as it is"
    return f"no face found in {count} of {seen} driving frames (0-based: {shown}); {effect}"


MAX_LISTED_FRAMES = 20


def timed(iterable, timer: StageTimer, stage: str) -> Iterator:
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            timer.add(stage, time.perf_counter() - start)
        yield item


def check_template_ratios(template, settings) -> None:
    need = {"eye": bool(settings.options.get("eye_retargeting")), "lip": bool(settings.options.get("lip_retargeting"))}
    for name, needed in need.items():
        if needed and getattr(template, f"{name}_ratio") is None:
            raise TemplateError(f"{name} retargeting needs driving {name} ratios, and this template has none "
                                "(official .pkl templates often lack them; `liveportrait-triton template` records them)")


def template_frames(template, settings, smooth: bool) -> Iterator[Prepared]:
    smoother = MotionSmoother(template.fps, SmoothingSettings(settings.smooth_min_cutoff, settings.smooth_beta)) \
        if smooth else None
    for i in range(len(template)):
        motion = template.frame(i)
        eye, lip = template.ratios(i)
        if smoother is not None:
            motion, eye, lip = smoother.motion(motion), smoother.ratio("eye", eye), smoother.ratio("lip", lip)
        yield Prepared(i, DrivingFrame(motion=motion, eye_ratio=eye, lip_ratio=lip))


# ---------------------------------------------------------------------------------------------------------------
# The run


def animate(settings: AnimateSettings) -> Summary:
    """Everything `animate` does; raises the errors `run` reports."""
    started = time.perf_counter()
    timer = StageTimer()
    kind = driving_kind(settings.driving)
    output = Path(settings.output)
    source_is_video = not media.is_image(settings.source)
    if source_is_video:
        if kind == "webcam":
            raise ValueError("a source video needs a driving video, image or template, not a camera")
        if settings.comparison or settings.faces != "largest" or settings.smooth or settings.draw_keypoints:
            raise ValueError("--comparison, --faces, --smooth and --draw-keypoints are for source images")
    check_output(output, "video" if source_is_video else kind)
    comparison = Path(settings.comparison) if settings.comparison else None
    if comparison is not None:
        if kind == "image":
            raise ValueError("--comparison is for video outputs")
        check_output(comparison, kind, "--comparison")
    if settings.max_frames is not None and settings.max_frames < 1:
        raise ValueError("--max-frames must be >= 1")
    if settings.in_flight < 1:
        raise ValueError("--in-flight must be >= 1")
    options = settings.pipeline_options(kind, source_video=source_is_video)

    # local inputs first: a missing file or a face-less source fails before any server is needed
    media.require_file(settings.source, "source video" if source_is_video else "source image")
    template = reader = driving_image = client = None
    if kind == "template":
        template = load_template(settings.driving)
        check_template_ratios(template, settings)
    elif kind == "image":
        driving_image = media.read_image(settings.driving, "driving image")
    elif kind == "video":
        reader = media.VideoReader(settings.driving)
    else:
        reader = media.WebcamReader(settings.driving, settings.fps)
    analyzer = None if settings.animal else make_analyzer(settings.face_models)     # an animal has no landmarks
    try:
        if source_is_video:
            with timer("connect + check server"):
                client = LivePortraitClient(settings.server)
                client.check_model(spec.MOTION)
            return _animate_source_video(settings, client, analyzer, options, kind, template, reader, driving_image,
                                         output, started)
        faces = source_faces(settings, analyzer, even=kind != "image", timer=timer, options=options)
        if len(faces) > 1 and (not settings.paste_back or settings.draw_keypoints):
            raise ValueError(f"--no-paste-back and --draw-keypoints are for one face; {len(faces)} faces were chosen "
                             "(--faces)")
        if faces.selection.note and not settings.quiet:
            print(f"note: {faces.selection.note}", file=sys.stderr)
        with timer("connect + check server"):
            client = LivePortraitClient(settings.server)
            if settings.smooth or (settings.smooth is None and kind == "webcam"):
                client.check_model(spec.MOTION)
        if kind == "image":
            summary = _animate_image(settings, client, analyzer, faces, driving_image, output, timer, started)
        else:
            summary = _animate_stream(settings, client, kind, faces, template, reader, output, comparison, timer,
                                      started)
        if settings.animal:
            note = animals.paste_note(settings.source_box, options, settings.paste_back)
            summary.notes += [note] if note else []
        return summary
    finally:
        if analyzer is not None:
            analyzer.close()
        if reader is not None:
            reader.close()
        if client is not None:
            client.close()


def _animate_source_video(settings, client, analyzer, options, kind, template, reader, driving_image, output,
                          started) -> Summary:
    timer = StageTimer()
    if kind == "image":
        face = analyzer.detect(driving_image)
        if settings.crop_driving and face is None:
            raise NoFaceError(f"no face found in the driving image {settings.driving}")
        if settings.crop_driving:
            crop = C.network_input(C.warp_crop(driving_image, face.crop_box(settings.driving_crop)))
        else:
            crop = cv2.resize(driving_image, (spec.SOURCE_SIZE, spec.SOURCE_SIZE), interpolation=cv2.INTER_LINEAR)
        drivings = [Prepared(0, DrivingFrame(crop=crop, eye_ratio=None if face is None else float(face.eye_ratio()[0]),
                                             lip_ratio=None if face is None else float(face.lip_ratio()[0])))]
        audio = None
    prepare = None
    if kind == "video":
        prepare = DrivingFrames(settings, client, timer, reader.info.fps, smooth=False, comparison=False)
        drivings = (prepare(n, frame) for n, frame in enumerate(reader))
        audio = reader.info.audio_codec
    elif kind == "template":
        drivings, audio = None, None
    try:
        written = animate_source_video(settings, client, analyzer, options, kind, template, drivings, audio, output,
                                       _progress)
    finally:
        if prepare is not None:
            prepare.close()
    note = faceless_note(prepare, settings.driving, fail_if_none=False) if prepare is not None else None
    return Summary(output, written, time.perf_counter() - started, notes=[note] if note else [])


def _animate_image(settings, client, analyzer, faces, driving_image, output, timer, started) -> Summary:
    with timer("driving: detect"):
        face = analyzer.detect(driving_image)
    if face is None:
        raise NoFaceError(f"no face found in the driving image {settings.driving}: the driving input must show a face; "
                          "nothing was written")
    if settings.crop_driving:
        crop = C.network_input(C.warp_crop(driving_image, face.crop_box(settings.driving_crop)))
    else:
        crop = cv2.resize(driving_image, (spec.SOURCE_SIZE, spec.SOURCE_SIZE), interpolation=cv2.INTER_LINEAR)
    ratios = settings.crop_driving or settings.needs_ratios
    driving = DrivingFrame(crop=crop, eye_ratio=float(face.eye_ratio()[0]) if ratios else None,
                           lip_ratio=float(face.lip_ratio()[0]) if ratios else None)
    with timer("server (one request per face)"):
        animated = faces.animate_image(client, driving)
    result = faces.paste(animated) if settings.pastes_back(faces.faces[0].source.options) else animated[0]
    media.write_image(output, result)
    wall = time.perf_counter() - started
    summary = Summary(output, 1, wall)
    if settings.profile:
        summary.profile = timer.report(1, wall)
        print(summary.profile, file=sys.stderr)
    return summary


def _animate_stream(settings, client, kind, faces, template, reader, output, comparison, timer, started) -> Summary:
    smooth = settings.smooth if settings.smooth is not None else kind == "webcam"
    if template is not None:
        fps, total, audio = template.fps, len(template), None
        frames = template_frames(template, settings, smooth)
        prefetch = prepare = None
    else:
        info = reader.info
        fps, total = info.fps, info.frame_count
        audio = settings.driving if info.audio_codec else None
        prepare = DrivingFrames(settings, client, timer, fps, smooth, comparison is not None)
        decoded = timed(reader, timer, "driving: decode")
        if settings.max_frames:
            decoded = itertools.islice(decoded, settings.max_frames)
        prefetch = media.Prefetcher(decoded, prepare, depth=max(8, 2 * settings.in_flight), name="driving-prefetch")
        frames = iter(prefetch)
    if settings.max_frames:
        frames = itertools.islice(frames, settings.max_frames)
        total = min(total, settings.max_frames) if total else settings.max_frames
    source_crop512 = faces.crop512
    paste = faces.paste if settings.pastes_back(faces.faces[0].source.options) else None
    still = faces.image if paste is not None else source_crop512
    overlay = None
    if settings.draw_keypoints:
        options = spec.parse_options(faces.faces[0].source.options)
        overlay = KeypointOverlay(client, faces.faces[0].source.crop, options["relative_motion"],
                                  options["animation_region"])
    if overlay is not None and paste is not None:       # [result | keypoint panel]: the panel at the frame's height
        still = overlay.beside(still, overlay.draw(source_crop512, overlay.source_points))
    out_size = (still.shape[1], still.shape[0])
    server_models = [spec.PIPELINE, *spec.SUBJECT_MODELS[spec.ANIMAL if settings.animal else spec.HUMAN]]
    stats_before = server_statistics(client._client, server_models) if settings.profile else None
    writer = media.VideoWriter(output, out_size, fps, audio_from=audio)
    side = media.VideoWriter(comparison, (3 * C.CROP_SIZE, C.CROP_SIZE), fps) if comparison else None
    progress = _progress(total, settings.quiet)
    written, stream = 0, None
    try:
        stream = faces.stream(client, max_in_flight=settings.in_flight, retry_s=settings.retry)
        waiting: collections.deque = collections.deque()     # (Prepared, send number or None), in frame order
        results: dict = {}
        latencies: list[float] = []

        previous = None                 # the last animated frame written: stands in for a dropped live frame

        def write_ready(final: bool = False) -> None:
            nonlocal written, previous
            while waiting:
                prepared, number = waiting[0]
                if number not in (None, DROPPED) and number not in results:
                    if not final:
                        return
                    raise RequestFailed(f"driving frame {prepared.number} got no answer")
                waiting.popleft()
                if number == DROPPED:
                    animated = previous
                else:
                    animated = previous = results.pop(number).image if number is not None else None
                panel = None
                if overlay is not None and animated is not None:
                    with timer("draw keypoints"):
                        panel = overlay.draw(animated, overlay.keypoints(prepared.driving))
                        if paste is None:
                            animated = panel
                with timer("paste-back"):
                    if animated is None:
                        frame = still
                    else:
                        frame = paste(animated) if paste is not None else animated
                        if panel is not None and paste is not None:
                            frame = overlay.beside(frame, panel)
                with timer("encode (write to ffmpeg)"):
                    writer.write(frame)
                    if side is not None:
                        blank = np.zeros((C.CROP_SIZE, C.CROP_SIZE, 3), np.uint8)
                        preview = prepared.preview if prepared.preview is not None else blank
                        shown = source_crop512 if animated is None else \
                            animated if isinstance(animated, np.ndarray) else animated[0]
                        side.write(np.concatenate([preview, source_crop512, shown], axis=1))
                written += 1
                progress.update(1)

        def collect(items) -> None:
            for result in items:
                results[result.number] = result
                latencies.append(result.latency_s)

        interrupted = False
        try:
            upcoming = next(frames, None)
            while upcoming is not None:
                current, upcoming = upcoming, next(frames, None)
                number = None
                if current.driving is not None and kind == "webcam":     # live: newest frame wins, see offer()
                    number = stream.offer(current.driving, last=upcoming is None)
                    number = DROPPED if number is None else number
                elif current.driving is not None:
                    with timer("send (blocks while the window is full)"):
                        number = stream.send(current.driving, last=upcoming is None)
                waiting.append((current, number))
                collect(stream.ready())
                write_ready()
        except KeyboardInterrupt:
            if kind != "webcam":
                raise
            interrupted = True          # a camera runs until Ctrl+C: finish what was sent
        with timer("wait for the last answers"):
            collect(stream.finish())
        write_ready(final=True)
        if written == 0:
            raise media.MediaError(f"the driving input {settings.driving} has no frames")
        note = faceless_note(prepare, settings.driving) if prepare is not None else None    # raises if no face at all
        with timer("encode (finish)"):
            if side is not None:
                side.close()
            writer.close()
    except BaseException:
        writer.abort()
        if side is not None:
            side.abort()
        if stream is not None:
            stream.close()
        raise
    finally:
        progress.close()
        if prefetch is not None:
            prefetch.close()
            prepare.close()
    wall = time.perf_counter() - started
    summary = Summary(output, written, wall, notes=[note] if note else [])
    if interrupted:
        print(f"stopped by Ctrl+C after {written} frames", file=sys.stderr)
    if stream.dropped:
        print(f"the server was behind: {stream.dropped} of {written} camera frames were not sent (the previous "
              "animated frame stands in for each; a live stream sends the newest frame)", file=sys.stderr)
    if settings.profile:
        summary.profile = _profile_report(timer, written, wall, latencies, stream,
                                          statistics_delta(stats_before, server_statistics(client._client,
                                                                                           server_models)))
        print(summary.profile, file=sys.stderr)
    return summary


class LiveAnimation:
    """A live source animated frame by frame, one request per frame: the source is cropped and STARTed on
    creation, `animate(rgb)` returns each camera frame's animated portrait (the still portrait until a face is
    found), `close()` ENDs the sequence. Thread-safe (the web page's live tab calls it from WebRTC threads)."""

    def __init__(self, settings: AnimateSettings, fps: float):
        self.lock = threading.Lock()
        options = settings.pipeline_options("webcam")
        analyzer = make_analyzer(settings.face_models)
        try:
            faces = source_faces(settings, analyzer, even=False, timer=StageTimer(), options=options)
        finally:
            analyzer.close()
        self.client = LivePortraitClient(settings.server)
        smooth = bool(settings.smooth)
        if smooth:
            self.client.check_model(spec.MOTION)
        self.paste = faces.paste if settings.pastes_back(options) else None
        self.still = faces.image if self.paste is not None else faces.crop512
        self.frames = DrivingFrames(settings, self.client, StageTimer(), fps, smooth, comparison=False)
        self.sequence_id = new_sequence_id()
        self.number = 0
        self.closed = False
        self.client.infer(faces.faces[0].source.tensors(), self.sequence_id, start=True, options=options)

    def animate(self, frame: np.ndarray) -> np.ndarray:
        """One camera frame (RGB) -> the animated portrait (the still portrait until a face is found)."""
        with self.lock:
            if self.closed:
                raise RequestFailed("the live session has ended")
            prepared = self.frames(self.number, np.ascontiguousarray(frame[..., :3]))
            self.number += 1
            if prepared.driving is None:
                return self.still
            image, _ = self.client.infer(prepared.driving.tensors(), self.sequence_id)
            return self.paste(image) if self.paste is not None else image

    def close(self) -> None:
        """END the sequence (the server frees its state now rather than at the idle timeout)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.client.infer({}, self.sequence_id, end=True)
            except RequestFailed:       # the server went away: its idle timeout frees the state
                pass
            self.frames.close()
            self.client.close()


def _progress(total: int | None, quiet: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="frame", desc="animate", disable=quiet, dynamic_ncols=True, smoothing=0.1)


def _profile_report(timer: StageTimer, frames: int, wall: float, latencies: list[float], stream, stats: dict) -> str:
    extra = []
    if latencies:
        extra.append(("request latency (send -> answer)", float(np.sum(latencies)), len(latencies)))
    pipeline = stats.get(spec.PIPELINE)
    if pipeline and pipeline["count"]:
        requests = int(pipeline["count"])          # the frames, plus the START (and an END without a frame)
        extra.append((f"server: {spec.PIPELINE} queue", pipeline["queue"], requests))
        extra.append((f"server: {spec.PIPELINE} compute", pipeline["compute"], requests))
        if latencies:
            # what the client waited for beyond the server's own queue + compute: gRPC transfer, (de)serialization
            network = max(float(np.sum(latencies)) - pipeline["queue"] - pipeline["compute"], 0.0)
            extra.append(("network + (de)serialization (est.)", network, len(latencies)))
    for model in stats:
        if model == spec.PIPELINE:
            continue
        entry = stats.get(model)
        if entry and entry["count"]:
            extra.append((f"server:   {model}", entry["compute"] + entry["queue"], int(entry["count"])))
    text = timer.report(frames, wall, extra)
    if stream.reconnects:
        text += f"\nreconnected {stream.reconnects} time(s) after the server went away"
    return text
