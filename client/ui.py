"""`liveportrait-triton ui`: a Gradio page on top of the Triton server (Animate, Edit, Live, status line).

Everything goes through the client library: the page's controls build one `animate.AnimateSettings` (the object
the `animate` command builds from its flags), Animate runs `animate.animate` on it (so every option and check is
the command's), Live streams the browser's camera over WebRTC (`live_webrtc`) into an `animate.LiveAnimation` (one
server sequence per browser session, START with the portrait, one request per animated frame, END when the stream
stops, the tab closes or the connection drops), and the status line reads the server's readiness and metrics.
Edit holds one PortraitEditor (one sequence) per browser session; each slider move is one edit request on it. The page binds to
loopback unless told otherwise; files come only from uploads (paths outside Gradio's upload folder are refused),
uploads are size-limited and driving inputs duration-limited.

Named API endpoints (gradio_client): `/animate` (source, driving, then every option with its default; returns the
result video first) and `/edit` (portrait, then every editing control with its default; returns the edited image).
"""

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from .. import crop as C
from .. import spec
from . import animals
from . import animate as A
from . import live_webrtc
from . import media
from .client import DEFAULT_URL, LivePortraitClient
from .errors import RequestFailed, ServerMismatch, ServerUnavailable
from .faces import NoFaceError
from .status import StatusMonitor, metrics_candidates
from .templates import TemplateError, load_template

SOURCE_SUFFIXES = [*media.IMAGE_SUFFIXES, ".mp4", ".mov", ".avi", ".mkv", ".webm"]
# no usage reports to Gradio's servers from a page that serves loopback by default (read when gradio is imported)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
DRIVING_SUFFIXES = [".mp4", ".mov", ".avi", ".mkv", ".webm", ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npz", ".pkl"]
USER_ERRORS = (media.MediaError, NoFaceError, TemplateError, ServerUnavailable, ServerMismatch, RequestFailed,
               FileNotFoundError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Settings shared by the Animate and Live tabs: one list, the `animate` command's names and defaults


@dataclasses.dataclass(frozen=True)
class Control:
    name: str               # the `animate` argument it sets
    label: str
    kind: str               # "check", "choice", "number", "text"
    default: object
    choices: tuple = ()
    bounds: tuple[float, float] | None = None
    step: float | None = None


def _motion_controls() -> list[Control]:
    out = []
    for name in A.CLI_OPTIONS:
        opt = spec.PIPELINE_OPTIONS[name]
        label = name.replace("_", " ")
        if opt.kind is bool:
            out.append(Control(name, label, "check", opt.default))
        elif opt.choices:
            out.append(Control(name, label, "choice", opt.default, choices=opt.choices))
        else:
            out.append(Control(name, label, "number", opt.default, bounds=opt.bounds, step=0.05))
    return out


def _crop_controls() -> list[Control]:
    out = []
    for who, settings in (("source", C.SOURCE_CROP), ("driving", C.DRIVING_CROP)):
        out.append(Control(f"{who}_scale", f"{who} crop scale", "number", settings.scale, bounds=C.SCALE_BOUNDS,
                           step=0.05))
        out.append(Control(f"{who}_vx", f"{who} crop x shift", "number", settings.vx, bounds=C.SHIFT_BOUNDS, step=0.01))
        out.append(Control(f"{who}_vy", f"{who} crop y shift", "number", settings.vy, bounds=C.SHIFT_BOUNDS, step=0.01))
    out.append(Control("faces", "faces to animate (source images)", "choice", "largest",
                       choices=("largest", "all", "2", "3", "4")))
    out.append(Control("source_box", "animal source box x,y,w,h (pixels; empty: the whole image; auto: cat-face "
                       "detector)", "text", ""))
    out.append(Control("crop_driving", "crop the face out of driving frames", "check", False))
    out.append(Control("paste_back", "paste back into the full source picture", "check", True))
    out.append(Control("smooth", "smooth head pose and expression (One-Euro)", "check", False))
    return out


MOTION_CONTROLS = _motion_controls()
CROP_CONTROLS = _crop_controls()
ANIMATE_CONTROLS = MOTION_CONTROLS + CROP_CONTROLS
# live animates the largest human face
LIVE_CONTROLS = [c for c in ANIMATE_CONTROLS if c.name not in ("faces", "subject", "source_box")]
ANIMAL_CONTROLS = ("subject", "source_box")      # shown in the Animate tab's Animals section
BOX_FIELDS = ("x", "y", "w", "h")
LIVE_DEFAULTS = {"crop_driving": True, "smooth": True}      # a camera is not a face crop, and it jitters
RATIO_CONTROLS = ("eye_ratio", "lip_ratio")      # unset (None) by default: a checkbox says whether to set them


def _edit_controls() -> list[Control]:
    out = []
    for name, opt in spec.EDIT_CONTROLS.items():
        low, high = opt.bounds
        default = opt.default if opt.default is not None else round((low + high) / 2, 2)
        out.append(Control(name, opt.help, "number", default, bounds=opt.bounds, step=0.01 if high - low < 3 else 0.5))
    return out


def _edit_crop_controls() -> list[Control]:
    return [Control("source_scale", "crop scale", "number", C.RETARGETING_SCALE, bounds=C.RETARGETING_SCALE_BOUNDS,
                    step=0.05),
            Control("vx", "crop x shift", "number", C.SOURCE_CROP.vx, bounds=C.SHIFT_BOUNDS, step=0.01),
            Control("vy", "crop y shift", "number", C.SOURCE_CROP.vy, bounds=C.SHIFT_BOUNDS, step=0.01),
            Control("stitching", "stitching", "check", True),
            Control("paste_back", "paste back into the full portrait", "check", True)]


EDIT_CONTROLS = _edit_controls()
EDIT_SWITCHES = [Control(f"set_{name}", f"set the {name.replace('_', ' ')}", "check", False) for name in RATIO_CONTROLS]
EDIT_CROP_CONTROLS = _edit_crop_controls()


def edit_settings(values: list) -> tuple[dict, dict]:
    """Widget values in EDIT_CONTROLS + EDIT_SWITCHES + EDIT_CROP_CONTROLS order -> (controls, crop settings)."""
    n, m = len(EDIT_CONTROLS), len(EDIT_SWITCHES)
    controls = {c.name: v for c, v in zip(EDIT_CONTROLS, values[:n])}
    for switch, on in zip(EDIT_SWITCHES, values[n:n + m]):
        if not on:
            controls[switch.name.removeprefix("set_")] = None
    crop = {c.name: v for c, v in zip(EDIT_CROP_CONTROLS, values[n + m:])}
    return controls, crop


# ---------------------------------------------------------------------------------------------------------------
# Limits


@dataclasses.dataclass(frozen=True)
class Limits:
    upload_mb: float = 50.0             # per uploaded file (Gradio refuses larger uploads with its own message)
    driving_seconds: float = 60.0       # driving videos, templates and source videos
    live_sessions: int = 4              # browser sessions streaming at once
    edit_sessions: int = 16             # portraits held open for editing at once


LIVE_IDLE_S = 20.0          # a live stream without frames for this long is ended (one that never connected)
EDIT_IDLE_S = 300.0         # an editor unused for this long is closed (API callers never close their tab)


def uploaded_file(path: str | None, what: str, upload_folder: Path) -> str:
    """An uploaded file's path; anything outside the upload folder (a path typed into an API call) is refused."""
    if not path:
        raise ValueError(f"no {what}: upload one")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(upload_folder) or not resolved.is_file():
        raise ValueError(f"the {what} must be an uploaded file")
    return str(resolved)


def media_seconds(path: str, kind: str) -> float | None:
    """Length of a video or template in seconds (None if the container does not say; 0 for an image)."""
    if kind == "template":
        template = load_template(path)
        return len(template) / template.fps
    if kind == "video":
        reader = media.VideoReader(path)
        try:
            info = reader.info
        finally:
            reader.close()
        return info.frame_count / info.fps if info.frame_count else None
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# Live: one server sequence per browser session


class Sessions:
    """Browser session id -> one open session object (a live stream, a PortraitEditor), at most `limit` at once.

    A session is replaced when its key (portrait + settings) changes, closed when its browser tab closes
    (`close`) and, as a backstop for connections that vanish silently, when unused for `idle_s` (`sweep`).
    """

    def __init__(self, what: str, limit: int, idle_s: float):
        self.what, self.limit, self.idle_s = what, limit, idle_s
        self._sessions: dict[str, tuple[object, object, float]] = {}     # id -> (key, session, last use)
        self._creating = 0              # sessions being created: they count against the limit already
        self._lock = threading.Lock()

    def get(self, session_id: str, key, create):
        """This browser session's object for `key` (made by `create()`; one for another key is closed first)."""
        self.sweep()
        with self._lock:
            current = self._sessions.pop(session_id, None)
            if current is not None and current[0] == key:
                self._sessions[session_id] = (key, current[1], time.monotonic())
                return current[1]
            if len(self._sessions) + self._creating >= self.limit:
                if current is not None:
                    self._sessions[session_id] = current
                raise ValueError(f"{self.limit} {self.what} sessions are open, the most this page allows; "
                                 "try again later")
            self._creating += 1         # held while `create` runs (seconds), so concurrent starts see it
        try:
            if current is not None:
                current[1].close()      # the portrait or a setting changed: a new sequence
            session = create()
            with self._lock:
                self._sessions[session_id] = (key, session, time.monotonic())
        finally:
            with self._lock:
                self._creating -= 1
        return session

    def touch(self, session_id: str) -> None:
        """The session is in use (it is not idle)."""
        with self._lock:
            if session_id in self._sessions:
                key, session, _ = self._sessions[session_id]
                self._sessions[session_id] = (key, session, time.monotonic())

    def find(self, accept):
        """The first open session object for which `accept(object)` is true, else None."""
        with self._lock:
            return next((session for _, session, _ in self._sessions.values() if accept(session)), None)

    def close(self, session_id: str, only=None) -> None:
        """Close the browser session's object (with `only`: if it is still that object)."""
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or (only is not None and entry[1] is not only):
                return
            del self._sessions[session_id]
        entry[1].close()

    def sweep(self) -> None:
        """Close sessions unused for idle_s."""
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, (_, _, used) in self._sessions.items() if now - used > self.idle_s]
        for session_id in idle:
            self.close(session_id)

    def close_all(self) -> None:
        for session_id in list(self._sessions):
            self.close(session_id)

    def __len__(self) -> int:
        return len(self._sessions)


# ---------------------------------------------------------------------------------------------------------------
# The app


class App:
    """The page's logic, independent of the widgets (the Gradio callbacks call these)."""

    def __init__(self, server: str = DEFAULT_URL, metrics_url: str | None = None, limits: Limits = Limits(),
                 face_models: str | None = None, live_fps: float = 10.0):
        import gradio.utils
        self.server, self.limits, self.face_models, self.live_fps = server, limits, face_models, live_fps
        self.metrics_url = metrics_url or metrics_candidates(server)     # candidates: the first that answers
        self.upload_folder = Path(gradio.utils.get_upload_folder()).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="liveportrait-ui-"))
        self.live = Sessions("live", limits.live_sessions, idle_s=LIVE_IDLE_S)
        self.editors = Sessions("edit", limits.edit_sessions, idle_s=EDIT_IDLE_S)
        self._monitor: StatusMonitor | None = None
        self._monitor_lock = threading.Lock()

    def close(self) -> None:
        self.live.close_all()
        self.editors.close_all()
        if self._monitor is not None:
            self._monitor.client.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- status -------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        self.live.sweep()
        self.editors.sweep()
        with self._monitor_lock:
            if self._monitor is None:
                try:
                    self._monitor = StatusMonitor(LivePortraitClient(self.server, check=False), self.metrics_url)
                except Exception as exc:        # grpc's own error types
                    return f"server: cannot connect to {self.server} ({exc})"
            return self._monitor.poll().line()

    # -- animate ------------------------------------------------------------------------------------------
    def animate(self, source: str | None, driving: str | None, settings: dict
                ) -> tuple[str | None, str | None, str | None, str, str]:
        """-> (result video, comparison video, result image, download, message); raises USER_ERRORS."""
        source = uploaded_file(source, "source portrait or video", self.upload_folder)
        driving = uploaded_file(driving, "driving file", self.upload_folder)
        kind = A.driving_kind(driving)
        if kind == "webcam":
            raise ValueError("the driving file must be a video, an image or a motion template")
        source_video = not media.is_image(source)
        for path, what in ((driving, kind), *([(source, "video")] if source_video else [])):
            seconds = media_seconds(path, what)
            if seconds is not None and seconds > self.limits.driving_seconds:
                raise ValueError(f"the {'source' if path == source else 'driving'} {what} is {seconds:.1f} s long; "
                                 f"this page accepts at most {self.limits.driving_seconds:g} s")
        folder = Path(tempfile.mkdtemp(dir=self.work))
        image_out = kind == "image" and not source_video
        output = folder / ("result" + (Path(driving).suffix.lower() if image_out else ".mp4"))
        comparison = folder / "comparison.mp4" if not image_out and not source_video else None
        max_frames = None
        if kind == "video":
            reader = media.VideoReader(driving)
            fps = reader.info.fps
            reader.close()
            max_frames = math.ceil(self.limits.driving_seconds * fps)      # containers may lie about length
        # quiet off: the progress bar (tqdm) is what the page's progress bar tracks
        summary = A.animate(A.AnimateSettings.from_values(
            **settings, server=self.server, source=source, driving=driving, output=str(output),
            comparison=str(comparison) if comparison else None, face_models=self.face_models, max_frames=max_frames))
        message = f"{summary.frames} frame{'s' if summary.frames != 1 else ''} in {summary.wall_s:.1f} s"
        message += "".join(f"\n\nnote: {note}" for note in summary.notes)
        if image_out:
            return None, None, str(output), str(output), message
        return str(output), str(comparison) if comparison else None, None, str(output), message

    # -- the animal source's box --------------------------------------------------------------------------
    def box_view(self, source: str | None, box_text: str | None, corner=None) -> np.ndarray | None:
        """The source image with the box to animate drawn on it in green (for `auto`, the crop the cat-face
        detector finds) and a pending first corner as a dot; None without a source image. A box that is not valid
        is not drawn (Animate names its problem)."""
        if not source or not media.is_image(source):
            return None
        image = media.read_image(uploaded_file(source, "source image", self.upload_folder), "source image")
        try:
            box = animals.source_box(image, animals.parse_box(box_text), image.shape, 1.0)
        except ValueError:
            box = None
        thickness = max(2, round(max(image.shape[:2]) / 250))
        if box is not None:
            cv2.rectangle(image, (box.x, box.y), (box.x + box.w - 1, box.y + box.h - 1), (0, 255, 0), thickness)
        if corner is not None:
            cv2.circle(image, (int(corner[0]), int(corner[1])), 2 * thickness, (0, 255, 0), -1)
        return image

    @staticmethod
    def box_click(corner, point) -> tuple[tuple[int, int] | None, str | None]:
        """A click on the box preview: the first click sets one corner (-> (corner, None)), the second the
        opposite one (-> (None, the box 'x,y,w,h'))."""
        point = (int(point[0]), int(point[1]))
        if corner is None:
            return point, None
        return None, C.PixelBox.from_corners(corner, point).text

    @staticmethod
    def box_fields(box_text: str | None) -> list[int | None]:
        """The box text as the x, y, w, h fields (None each for the whole image, `auto` or a box not valid)."""
        try:
            box = animals.parse_box(box_text)
        except ValueError:
            box = None
        return [box.x, box.y, box.w, box.h] if isinstance(box, C.PixelBox) else [None] * 4

    @staticmethod
    def box_text(*fields) -> str:
        """x, y, w, h fields -> the box text ('' until all four are filled)."""
        if any(v is None for v in fields):
            return ""
        return ",".join(str(int(v)) for v in fields)

    # -- live ---------------------------------------------------------------------------------------------
    def live_start(self, session_id: str, source: str | None, settings: dict) -> live_webrtc.LiveStream:
        """A new live stream for this browser session (its previous one ends): the sequence STARTs with the
        portrait now; the page then connects to it over WebRTC with the stream's token."""
        source = uploaded_file(source, "portrait", self.upload_folder)
        if not live_webrtc.host_addresses():
            raise ValueError("this machine has no network address other than loopback, which WebRTC cannot use: "
                             "Live needs one (a LAN or a virtual interface)")
        self.live.close(session_id)

        def create():
            live = A.LiveAnimation(A.AnimateSettings.from_values(
                **settings, server=self.server, source=source, driving=media.WEBCAM_PREFIX + "0", output="live.mp4",
                face_models=self.face_models), self.live_fps)
            stream = live_webrtc.LiveStream(live, on_frame=lambda: self.live.touch(session_id))
            stream.on_end = lambda: self.live.close(session_id, only=stream)
            return stream
        return self.live.get(session_id, secrets.token_hex(8), create)

    def live_stream(self, token: str) -> live_webrtc.LiveStream | None:
        """The open live stream a page's WebRTC offer names by its token."""
        return self.live.find(lambda stream: secrets.compare_digest(stream.token, token))

    # -- edit ---------------------------------------------------------------------------------------------
    def editor(self, session_id: str, source: str | None, crop: dict):
        """This session's PortraitEditor on the portrait (opened once; reopened when the portrait or crop change)."""
        from .editing import PortraitEditor
        source = uploaded_file(source, "portrait", self.upload_folder)
        key = (source, tuple(sorted(crop.items())))

        def create():
            image = media.read_image(source, "portrait")
            client = LivePortraitClient(self.server)
            try:
                return _OwningEditor(client, PortraitEditor(client, image, face_models=self.face_models, **crop))
            except BaseException:
                client.close()
                raise
        return self.editors.get(session_id, key, create)

    def edit(self, session_id: str, source: str | None, controls: dict, crop: dict) -> np.ndarray:
        """The edited portrait; controls left None keep the source as it is."""
        return self.editor(session_id, source, crop).edit(**controls)

    def slider_start(self, session_id: str, source: str | None, crop: dict) -> dict[str, float]:
        return self.editor(session_id, source, crop).slider_start

    def close_session(self, session_id: str) -> None:
        """The browser tab closed or its connection dropped: free its live sequence and its editor."""
        self.live.close(session_id)
        self.editors.close(session_id)


class _OwningEditor:
    """A PortraitEditor together with the client connection it uses; closing it closes both."""

    def __init__(self, client: LivePortraitClient, editor):
        self.client, self.editor = client, editor
        self.slider_start = editor.slider_start
        self.lock = threading.Lock()

    def edit(self, **controls) -> np.ndarray:
        with self.lock:
            return self.editor.edit(**controls)

    def close(self) -> None:
        with self.lock:
            self.editor.close()
            self.client.close()


def _widget(control: Control, overrides: dict, tab: str):
    import gradio as gr
    default = overrides.get(control.name, control.default)
    elem_id = f"{tab}-{control.name.replace('_', '-')}"
    if control.kind == "check":
        return gr.Checkbox(value=default, label=control.label, elem_id=elem_id)
    if control.kind == "text":
        return gr.Textbox(value=default, label=control.label, elem_id=elem_id)
    if control.kind == "choice":
        return gr.Dropdown(choices=list(control.choices), value=default, label=control.label, elem_id=elem_id)
    low, high = control.bounds
    return gr.Slider(low, high, value=default, step=control.step, label=control.label, elem_id=elem_id)


def _widgets(controls: list[Control], tab: str, overrides: dict | None = None) -> list:
    return [_widget(c, overrides or {}, tab) for c in controls]


def _named(fn, names: list[str], special: dict):
    """`fn(*values)` with a signature naming each input (the names gradio_client shows and accepts as keywords)
    and Gradio's special arguments (gr.Request, gr.Progress) appended, which Gradio fills in."""
    def call(*args):
        return fn(*args)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, kind) for name in names]
    params += [inspect.Parameter(name, kind, annotation=annotation, default=default)
               for name, (annotation, default) in special.items()]
    call.__signature__ = inspect.Signature(params)
    call.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    call.__name__ = fn.__name__
    return call


def build(app: App):
    """The Gradio Blocks of the page."""
    import gradio as gr

    def user_error(exc: Exception):
        return gr.Error(str(exc), print_exception=False)

    def animate_endpoint(source, driving, *rest):
        *values, _progress = rest          # gr.Progress(track_tqdm=True) follows tqdm inside `animate`
        settings = {c.name: v for c, v in zip(ANIMATE_CONTROLS, values)}
        try:
            return app.animate(source, driving, settings)
        except USER_ERRORS as exc:
            raise user_error(exc) from None

    def live_start(source, *rest):
        """-> what the page's script needs to connect (token, camera frame rate, offer route), as JSON."""
        *values, request = rest
        settings = {c.name: v for c, v in zip(LIVE_CONTROLS, values)}
        try:
            stream = app.live_start(request.session_hash, source, settings)
        except USER_ERRORS as exc:
            raise user_error(exc) from None
        return json.dumps({"token": stream.token, "fps": app.live_fps, "offer_path": live_webrtc.OFFER_PATH})

    def live_stop(request: gr.Request):
        app.live.close(request.session_hash)

    def close_session(request: gr.Request):
        app.close_session(request.session_hash)

    def edit_endpoint(source, *rest):
        *values, request = rest
        controls, crop = edit_settings(values)
        try:
            return app.edit(request.session_hash, source, controls, crop)
        except USER_ERRORS as exc:
            raise user_error(exc) from None

    def edit_opened(source, *rest):
        """A new portrait: the eye/lip sliders move to its own ratios (the official app's rule), then a preview."""
        *values, request = rest
        if not source:
            return [gr.update()] * len(RATIO_CONTROLS) + [None]
        controls, crop = edit_settings(values)
        try:
            start = app.slider_start(request.session_hash, source, crop)
            preview = app.edit(request.session_hash, source, controls, crop)
        except USER_ERRORS as exc:
            raise user_error(exc) from None
        return [gr.update(value=start[name]) for name in RATIO_CONTROLS] + [preview]

    def box_view(source, box_text, corner=None):
        try:
            return app.box_view(source, box_text, corner)
        except USER_ERRORS as exc:
            raise user_error(exc) from None

    def box_typed(source, *fields):
        text = app.box_text(*fields)
        return text, box_view(source, text)

    def box_clicked(source, box_text, corner, event: gr.SelectData):
        corner, clicked = app.box_click(corner, event.index)
        box_text = clicked or box_text
        return [corner, box_text, *app.box_fields(box_text), box_view(source, box_text, corner)]

    progress = {"progress": (inspect.Parameter.empty, gr.Progress(track_tqdm=True))}
    request = {"request": (gr.Request, inspect.Parameter.empty)}
    animate_names = ["source", "driving", *(c.name for c in ANIMATE_CONTROLS)]
    edit_names = ["source", *(c.name for c in EDIT_CONTROLS + EDIT_SWITCHES + EDIT_CROP_CONTROLS)]
    animate_endpoint = _named(animate_endpoint, animate_names, progress)
    live_start = _named(live_start, ["source", *(c.name for c in LIVE_CONTROLS)], request)
    edit_endpoint = _named(edit_endpoint, edit_names, request)
    edit_opened = _named(edit_opened, edit_names, request)

    with gr.Blocks(title="LivePortrait-Triton", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# LivePortrait-Triton\nPortrait animation served by Triton: every browser shares the "
                    "server's batching with every other client.")
        status = gr.Markdown("server: ...", elem_id="server-status")
        with gr.Tab("Animate", id="animate"):
            with gr.Row():
                source = gr.File(label="Source portrait (image) or source video", type="filepath",
                                 file_types=SOURCE_SUFFIXES, elem_id="animate-source")
                driving = gr.File(label="Driving video, image or motion template (.npz/.pkl)",
                                  file_types=DRIVING_SUFFIXES, type="filepath", elem_id="animate-driving")
            with gr.Accordion("Animals", open=False, elem_id="animate-animals"):
                gr.Markdown("The official Animals mode (subject `animal`): a source image, the whole image or a box "
                            "of it (type x, y, w, h, or click two opposite corners on the picture; `auto`: the crop "
                            "around a frontal cat face), driven by a human driving video or a template. No eye/lip "
                            "retargeting; stitching is off unless ticked, and only a box with stitching is pasted "
                            "back (the official rule).")
                animal = {c.name: _widget(c, {}, "animate") for c in ANIMATE_CONTROLS if c.name in ANIMAL_CONTROLS}
                with gr.Row():
                    box_fields = [gr.Number(label=f"box {n}", precision=0, minimum=0, elem_id=f"animate-box-{n}")
                                  for n in BOX_FIELDS]
                box_preview = gr.Image(label="Source box (click two opposite corners)", type="numpy",
                                       interactive=False, elem_id="animate-box-preview")
                box_corner = gr.State(None)
            with gr.Accordion("Motion", open=False):
                motion = _widgets([c for c in MOTION_CONTROLS if c.name not in ANIMAL_CONTROLS], "animate")
            with gr.Accordion("Crop, paste-back and smoothing", open=False):
                crop = _widgets([c for c in CROP_CONTROLS if c.name not in ANIMAL_CONTROLS], "animate")
            widgets = {**dict(zip((c.name for c in ANIMATE_CONTROLS if c.name not in ANIMAL_CONTROLS),
                                  motion + crop)), **animal}
            controls = [widgets[c.name] for c in ANIMATE_CONTROLS]
            run_button = gr.Button("Animate", variant="primary", elem_id="animate-button")
            message = gr.Markdown(elem_id="animate-message")
            with gr.Row():
                result = gr.Video(label="Result", elem_id="animate-result")
                comparison = gr.Video(label="Driving | source | result", elem_id="animate-comparison")
            result_image = gr.Image(label="Result (image driving)", type="filepath", elem_id="animate-result-image")
            download = gr.File(label="Download", elem_id="animate-download")
            run_button.click(animate_endpoint, inputs=[source, driving, *controls],
                             outputs=[result, comparison, result_image, download, message], api_name="animate")
            box_text = animal["source_box"]
            # an animal's stitching is off unless asked for: the checkbox follows the subject's server default
            animal["subject"].change(lambda subject: spec.parse_options({"subject": subject})["stitching"],
                                     inputs=[animal["subject"]], outputs=[widgets["stitching"]], api_name=False,
                                     queue=False)
            source.change(box_view, inputs=[source, box_text], outputs=[box_preview], api_name=False)
            box_text.input(lambda *v: [*app.box_fields(v[1]), box_view(*v)], inputs=[source, box_text],
                           outputs=[*box_fields, box_preview], api_name=False)
            for field in box_fields:
                field.input(box_typed, inputs=[source, *box_fields], outputs=[box_text, box_preview], api_name=False)
            box_preview.select(box_clicked, inputs=[source, box_text, box_corner],
                               outputs=[box_corner, box_text, *box_fields, box_preview], api_name=False)
        with gr.Tab("Edit", id="edit"):
            gr.Markdown("Pose and expression of one portrait; the preview follows the sliders.")
            with gr.Row():
                edit_source = gr.Image(type="filepath", label="Portrait", sources=["upload", "clipboard"],
                                       elem_id="edit-source")
                edit_preview = gr.Image(label="Edited", type="numpy", format="png", elem_id="edit-preview")
            edit_sliders = _widgets(EDIT_CONTROLS, "edit")
            with gr.Row():
                edit_switches = _widgets(EDIT_SWITCHES, "edit")
            with gr.Accordion("Crop", open=False):
                edit_crop = _widgets(EDIT_CROP_CONTROLS, "edit")
            edit_inputs = [edit_source, *edit_sliders, *edit_switches, *edit_crop]
            edit_button = gr.Button("Apply", elem_id="edit-button")
            edit_button.click(edit_endpoint, inputs=edit_inputs, outputs=[edit_preview], api_name="edit")
            for widget in [*edit_sliders, *edit_switches, *edit_crop]:
                widget.input(edit_endpoint, inputs=edit_inputs, outputs=[edit_preview], api_name=False,
                             trigger_mode="always_last", show_progress="hidden")
            for name, switch in zip(RATIO_CONTROLS, edit_switches):
                slider = edit_sliders[[c.name for c in EDIT_CONTROLS].index(name)]
                slider.input(lambda: True, outputs=[switch], api_name=False, queue=False)
            edit_source.upload(edit_opened, inputs=edit_inputs,
                               outputs=[*(edit_sliders[[c.name for c in EDIT_CONTROLS].index(n)]
                                          for n in RATIO_CONTROLS), edit_preview], api_name=False)
        with gr.Tab("Live", id="live"):
            gr.Markdown("Your webcam drives the portrait in real time over WebRTC (one server sequence per "
                        "browser tab, freed when the stream stops or the tab closes). When the server is slower "
                        "than the camera the newest camera frame wins; skipped frames are counted below.")
            with gr.Row():
                live_source = gr.Image(type="filepath", label="Portrait", sources=["upload", "clipboard"],
                                       elem_id="live-source", scale=1)
                gr.HTML('<div id="live-output"></div>', scale=2)     # camera preview | animated video
            with gr.Row():
                live_start_button = gr.Button("Start", variant="primary", elem_id="live-start")
                live_stop_button = gr.Button("Stop", elem_id="live-stop")
            gr.HTML('<div id="live-message"></div>')
            live_reply = gr.Textbox(visible=False)
            with gr.Accordion("Settings", open=False):
                live_controls = _widgets(LIVE_CONTROLS, "live", LIVE_DEFAULTS)
            live_start_button.click(live_start, inputs=[live_source, *live_controls], outputs=[live_reply],
                                    api_name=False, concurrency_limit=app.limits.live_sessions).success(
                None, inputs=[live_reply], js="(reply) => window.liveportraitLive.start(reply)")
            live_stop_button.click(live_stop, api_name=False, queue=False,
                                   js="() => window.liveportraitLive.stop('stopped')")
        timer = gr.Timer(2.0)
        timer.tick(app.status_line, outputs=[status], api_name=False, show_progress="hidden", queue=False)
        demo.load(app.status_line, outputs=[status], api_name=False, queue=False)
        demo.unload(close_session)
    return demo


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_URL, help=f"Triton gRPC address HOST:PORT (default {DEFAULT_URL})")
    parser.add_argument("--metrics-url",
                        help="Triton metrics endpoint, as `serve` prints it (default: the first that answers of "
                             "http://SERVER_HOST:8002/metrics and the gRPC port + 1)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the page listens on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    parser.add_argument("--max-upload-mb", type=float, default=Limits.upload_mb,
                        help=f"largest accepted upload in MB (default {Limits.upload_mb:g})")
    parser.add_argument("--max-driving-seconds", type=float, default=Limits.driving_seconds,
                        help=f"longest accepted driving video, template or source video "
                             f"(default {Limits.driving_seconds:g} s)")
    parser.add_argument("--max-live-sessions", type=int, default=Limits.live_sessions,
                        help=f"browser sessions streaming their webcam at once (default {Limits.live_sessions})")
    parser.add_argument("--live-fps", type=float, default=10.0,
                        help="camera frames per second the Live tab asks the browser for (default 10)")
    parser.add_argument("--face-models", metavar="DIR", help="official face models folder (see `animate --help`)")


def launch(app: App, host: str, port: int, block: bool = True):
    """Serve the page; with block=False it runs in a background thread and the Blocks is returned (`.close()`)."""
    demo = build(app)
    demo.queue(default_concurrency_limit=4)
    # quiet: Gradio's own banner advises `share=True`, which a command-line user cannot set; we print the address
    demo.launch(server_name=host, server_port=port, max_file_size=f"{app.limits.upload_mb:g}mb",
                prevent_thread_lock=True, show_error=True, quiet=True, head=live_webrtc.PAGE_SCRIPT,
                app_kwargs={"routes": [live_webrtc.offer_route(app.live_stream)]})
    if block:
        print(f"web page on http://{host}:{port}/ (server {app.server}); Ctrl-C to stop", flush=True)
        demo.block_thread()
    return demo


def run(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        print("error: the web interface needs gradio (scripts/install.sh installs it); see README \"Web interface\"")
        return 1
    if args.max_upload_mb <= 0 or args.max_driving_seconds <= 0 or args.max_live_sessions < 1 or args.live_fps <= 0:
        print("error: limits and --live-fps must be positive")
        return 2
    app = App(args.server, args.metrics_url, Limits(args.max_upload_mb, args.max_driving_seconds,
                                                    args.max_live_sessions), args.face_models, args.live_fps)
    try:
        launch(app, args.host, args.port)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
