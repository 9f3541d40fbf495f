"""Reading and validating requests of the `liveportrait` model, each rule once.

A request is validated in two steps, each once: `parse_request` checks what the request alone says (every tensor
against the spec: name, dtype, shape, NaN/Inf; which inputs go together; options and edits), and
`check_in_sequence` what depends on its sequence (the ratios the sequence's options need, source-video frames,
edits of the source). What passes is a `PipelineRequest` the Animator takes as it is.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import numpy as np

from .. import spec
from ..pipeline import Edit, InputError, StreamState
from ..wire import DrivingFrame, MotionFrame


@dataclasses.dataclass
class RawRequest:
    """What the adapter reads from one Triton request: controls, the optional inputs present, parameters."""
    corrid: int
    start: bool
    end: bool
    tensors: dict[str, np.ndarray]          # present optional inputs by spec name, with the batch dimension
    parameters: dict[str, Any]


@dataclasses.dataclass
class PipelineRequest:
    """A validated request of the `liveportrait` model."""
    corrid: int
    start: bool
    end: bool
    source: np.ndarray | None = None        # (256, 256, 3) uint8: START, and each frame of a source video
    options: dict | None = None             # parsed options, START only
    source_eye_ratio: np.ndarray | None = None
    source_lip_ratio: np.ndarray | None = None
    frame: DrivingFrame | None = None       # the driving input, if any
    edit: Edit | None = None                # an edit of the source (parameters with edit=true)


START_ONLY = ("source", "source_eye_ratio", "source_lip_ratio")
FRAME_RATIOS = ("driving_eye_ratio", "driving_lip_ratio")


def parse_request(raw: RawRequest) -> PipelineRequest:
    """Check which inputs a request may carry and build the driving frame; InputError/OptionError if it can't."""
    known = set(spec.PIPELINE_SPEC.input_names)
    unknown = sorted(set(raw.tensors) - known)
    if unknown:
        raise InputError(f"unknown input(s) {unknown}")
    arrays = {}
    for name, value in raw.tensors.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != 1:
            raise InputError(f"{name}: each request carries one frame (batch dimension 1), got shape "
                             f"{list(array.shape)}")
        want = spec.PIPELINE_SPEC.input(name)
        if array.dtype != want.numpy_dtype or array.shape[1:] != want.shape:
            raise InputError(f"{name}: expected {want.dtype} {[1, *want.shape]}, got {array.dtype} "
                             f"{list(array.shape)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{name}: contains NaN or Inf")
        arrays[name] = array[0]
    request = PipelineRequest(corrid=raw.corrid, start=raw.start, end=raw.end)
    parameters, request.edit = split_edit(raw.parameters)
    if request.edit is not None:
        present = [n for n in spec.PIPELINE_SPEC.input_names if n in arrays and n not in START_ONLY]
        if present:
            raise InputError(f"an edit request carries no driving input, got {present}")
    if raw.start:
        request.options = spec.parse_options(parameters)
        if "source" not in arrays:
            raise InputError(f"sequence {raw.corrid}: the START request must carry `source` (the source crop)")
        request.source = arrays["source"]
        request.source_eye_ratio = arrays.get("source_eye_ratio")
        request.source_lip_ratio = arrays.get("source_lip_ratio")
        require_ratios(request.options, "the START request", "source", request.source_eye_ratio,
                       request.source_lip_ratio)
    else:
        if parameters:
            spec.parse_options(parameters)      # an unknown name is named as such first
            raise InputError(f"options {sorted(parameters)} may only be sent with the START request "
                             "(they are fixed for the whole sequence)")
        request.source = arrays.get("source")       # a source-video frame's own source (`check_source_frame`)
        request.source_eye_ratio = arrays.get("source_eye_ratio")
        request.source_lip_ratio = arrays.get("source_lip_ratio")
    motion = [n for n in spec.MOTION_INPUTS if n in arrays]
    if "driving" in arrays and motion:
        raise InputError("a request carries either `driving` or the motion_* inputs of a template, not both")
    if motion and len(motion) != len(spec.MOTION_INPUTS):
        missing = [n for n in spec.MOTION_INPUTS if n not in arrays]
        raise InputError(f"template motion needs all of {list(spec.MOTION_INPUTS)}; missing {missing}")
    eye = arrays.get("driving_eye_ratio")
    lip = arrays.get("driving_lip_ratio")
    if "driving" in arrays or motion:
        template = None
        if motion:      # each checked against the spec above
            template = MotionFrame(R=arrays["motion_R"], exp=arrays["motion_exp"], t=arrays["motion_t"],
                                   scale=arrays["motion_scale"])
        request.frame = DrivingFrame(crop=arrays.get("driving"), motion=template,
                                     eye_ratio=None if eye is None else float(eye[0]),
                                     lip_ratio=None if lip is None else float(lip[0]))
    elif eye is not None or lip is not None:
        raise InputError(f"{[n for n in FRAME_RATIOS if n in arrays]} need a driving input in the same request")
    elif not raw.start and not raw.end and request.edit is None:
        raise InputError("the request carries no driving input: send `driving` (a crop) or the motion_* inputs")
    return request


def split_edit(parameters: dict[str, Any]) -> tuple[dict[str, Any], Edit | None]:
    """A request's parameters -> (the sequence options among them, the edit they ask for or None)."""
    edit_keys = {k for k in parameters if k == spec.EDIT_FLAG or k in spec.EDIT_CONTROLS}
    if not spec.is_edit(parameters):
        if edit_keys:
            raise InputError(f"edit control(s) {sorted(edit_keys)} need the parameter {spec.EDIT_FLAG}=true")
        return parameters, None
    controls = {k: v for k, v in parameters.items() if k in spec.EDIT_CONTROLS}
    options = {k: v for k, v in parameters.items() if k not in edit_keys}
    return options, Edit(spec.parse_edit(controls))


def require_ratios(options: dict, where: str, side: str, eye, lip) -> None:
    """The eye/lip ratios (`side` source or driving) that the sequence's retargeting options need."""
    for name, value in (("eye", eye), ("lip", lip)):
        if options[f"{name}_retargeting"] and value is None:
            raise InputError(f"option {name}_retargeting is on but {where} has no {side}_{name}_ratio")


def check_in_sequence(state: StreamState, request: PipelineRequest) -> None:
    """What a request of a live sequence must carry given the sequence (its options and source state); a
    source-video frame gets its own source attached. InputError names the fault."""
    options = state.options
    check_source_frame(options, request)
    if request.edit is not None:
        check_edit(state, request.edit)
    elif request.frame is not None:
        require_ratios(options, "the frame", "driving", request.frame.eye_ratio, request.frame.lip_ratio)


def check_source_frame(options: dict, request: PipelineRequest) -> None:
    """What a request may carry given its sequence's `source_video` option; a source-video frame gets its source.

    A source-image sequence takes `source` and its ratios with START only. Each driving frame of a source-video
    sequence carries its own `source` crop (START's for a frame sent with START), the ratios its retargeting
    options need, and the target motion as motion_* (the client smooths it over the whole video), never a
    `driving` crop; such sequences take no edits.
    """
    sent = [n for n in START_ONLY if getattr(request, n) is not None]
    if not options["source_video"]:
        if sent and not request.start:
            raise InputError(f"{sent} may only be sent with the START request; start a new sequence to "
                             "change the source (or set the option source_video for a source video)")
        return
    if request.edit is not None:
        raise InputError("edits apply to a source image; this sequence is a source video (option source_video)")
    frame = request.frame
    if frame is None:
        return
    if request.source is None:
        raise InputError("each frame of a source-video sequence carries its own `source` crop")
    if frame.motion is None:
        raise InputError("a source-video frame carries the target motion as motion_* (the smoothed rotation and "
                         "expression for this source frame), not a `driving` crop")
    require_ratios(options, "the source-video frame", "source", request.source_eye_ratio, request.source_lip_ratio)
    frame.source = request.source
    frame.source_eye_ratio = request.source_eye_ratio
    frame.source_lip_ratio = request.source_lip_ratio


def check_subject(options: dict, served: tuple[str, ...]) -> None:
    """A START may ask only for a model set the server holds (its pipeline config's `subjects`)."""
    if options["subject"] not in served:
        raise InputError(f"this server has no {options['subject']} model set (it serves {', '.join(served)}): "
                         f"export the repository with the {options['subject']} weights "
                         f"(`liveportrait-triton export ... --animal-weights DIR`), or send subject="
                         f"{served[0]}")


def check_edit(state: StreamState, edit: Edit) -> None:
    """Target eye/lip ratios need the source's own ratios, sent with the START request; the animal set has no
    editing (the official Animals mode has no retargeting controls)."""
    if state.subject == spec.ANIMAL:
        raise InputError("edits apply to human sequences: the animal model set has no retargeting controls "
                         "(the official Animals mode has none)")
    for name in ("eye", "lip"):
        if edit.controls.get(f"{name}_ratio") is not None and getattr(state, f"source_{name}_ratio") is None:
            raise InputError(f"edit control {name}_ratio needs the source's {name} ratio: send source_{name}_ratio "
                             "with the START request")


def plan_rounds(corrids: list[int]) -> list[list[int]]:
    """Split a batch (request indices in arrival order) into rounds holding at most one request per sequence.

    A sequence's requests keep their order: its k-th request in the batch goes to round k.
    """
    rounds: list[list[int]] = []
    seen: collections.Counter = collections.Counter()
    for index, corrid in enumerate(corrids):
        k = seen[corrid]
        seen[corrid] += 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(index)
    return rounds


def parse_parameters(text: str | None) -> dict[str, Any]:
    """A request's parameters (the Python backend hands them over as a JSON object string)."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise InputError(f"request parameters must be a JSON object, got {type(value).__name__}")
    return value
