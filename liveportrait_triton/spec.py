"""The one tensor spec: names, dtypes and per-item shapes of every served model, and the pipeline's options.

Export (ONNX names and dynamic batch axes), config.pbtxt rendering, the server's request validation, the client
and the benchmarks all read this module; nothing else spells a tensor name. Shapes exclude the batch dimension,
which is dynamic everywhere.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .config import NUM_BINS, NUM_KP, feature_volume_shape, model_params, warped_feature_channels
from .keypoints import REGIONS

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8, "INT64": np.int64, "INT32": np.int32,
          "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # Triton dtype name: FP32, UINT8, INT64, ...
    shape: tuple[int, ...]     # per item, without the batch dimension
    optional: bool = False

    @property
    def numpy_dtype(self):
        return np.dtype(_NUMPY[self.dtype])

    @property
    def triton_type(self) -> str:
        """The config.pbtxt data type (TYPE_FP32, ...)."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.numpy_dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name, "output")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _by_name(tensors, name, model, kind) -> TensorSpec:
    for t in tensors:
        if t.name == name:
            return t
    raise KeyError(f"model {model!r} has no {kind} {name!r} (it has {[t.name for t in tensors]})")


# Served sub-network names (the public contract).
APPEARANCE = "appearance_feature_extractor"
MOTION = "motion_extractor"
WARPING = "warping_module"
GENERATOR = "spade_generator"
STITCHING = "stitching"
RETARGET_EYE = "retarget_eye"
RETARGET_LIP = "retarget_lip"
PIPELINE = "liveportrait"
SUBMODELS = (APPEARANCE, MOTION, WARPING, GENERATOR, STITCHING, RETARGET_EYE, RETARGET_LIP)

# Model sets. The official Animals mode has the humans' architecture with its own checkpoints of F, M, W and G;
# it shares the humans' stitching MLP and has no eye/lip retargeting. Each animal sub-network is a served model of
# its own, named with ANIMAL_PREFIX, so both sets live in one repository and batch apart.
HUMAN = "human"
ANIMAL = "animal"
SUBJECTS = (HUMAN, ANIMAL)
ANIMAL_PREFIX = "animal_"
ANIMAL_ROLES = (APPEARANCE, MOTION, WARPING, GENERATOR)        # the sub-networks the animal set has its own of
ANIMAL_SUBMODELS = tuple(ANIMAL_PREFIX + role for role in ANIMAL_ROLES)
ALL_SUBMODELS = SUBMODELS + ANIMAL_SUBMODELS
# the served models each subject's sequences use
SUBJECT_MODELS = {HUMAN: SUBMODELS, ANIMAL: (*ANIMAL_SUBMODELS, STITCHING)}


def served_name(role: str, subject: str = HUMAN) -> str:
    """The served model that runs sub-network `role` (a name of SUBMODELS) for `subject`'s sequences."""
    if subject == ANIMAL and role in ANIMAL_ROLES:
        return ANIMAL_PREFIX + role
    if role not in SUBJECT_MODELS.get(subject, ()):
        raise KeyError(f"the {subject} model set has no sub-network {role!r}")
    return role


def role_of(model: str) -> str:
    """The sub-network a served model runs (its name in SUBMODELS): `animal_warping_module` -> `warping_module`."""
    return model[len(ANIMAL_PREFIX):] if model in ANIMAL_SUBMODELS else model


def parse_subjects(text: str | None) -> tuple[str, ...]:
    """The pipeline config's `subjects` parameter ('human,animal'; absent: human) as model sets in SUBJECTS
    order; ValueError naming an unknown one."""
    named = [s.strip() for s in (text or HUMAN).split(",") if s.strip()]
    unknown = sorted(set(named) - set(SUBJECTS))
    if unknown or not named:
        raise ValueError(f"subjects {text!r}: expected a comma-separated list of {list(SUBJECTS)}")
    return tuple(s for s in SUBJECTS if s in named)


def subject_models(subjects=(HUMAN,)) -> tuple[str, ...]:
    """The served models a repository of these model sets holds, in ALL_SUBMODELS order."""
    unknown = sorted(set(subjects) - set(SUBJECTS))
    if unknown:
        raise ValueError(f"unknown model set(s) {unknown}; choose from {list(SUBJECTS)}")
    wanted = {m for s in subjects for m in SUBJECT_MODELS[s]}
    return tuple(m for m in ALL_SUBMODELS if m in wanted)

SOURCE_SIZE = 256      # network input crop, H = W
OUTPUT_SIZE = 512      # generator output, H = W
MAX_BATCH_SIZE = 16    # largest batch any served sub-network accepts (TensorRT profiles cover 1..16)
# Where the pipeline model keeps tensors between sub-networks (its `bls_tensors` parameter, backend/bls.py):
# NumPy on the host, torch tensors in CPU memory, or device-resident torch tensors on the GPU.
BLS_TENSOR_PATHS = ("numpy", "torch-cpu", "torch-gpu")


def submodel_specs(config: str | dict = "full", subjects=(HUMAN,)) -> dict[str, ModelSpec]:
    """Spec of every served sub-network of these model sets for a network configuration ('full', 'tiny' or a
    params dict). An animal model's spec is its role's, under its own name."""
    roles = _role_specs(config)
    return {m: dataclasses.replace(roles[role_of(m)], name=m) for m in subject_models(subjects)}


def _role_specs(config: str | dict) -> dict[str, ModelSpec]:
    params = model_params(config) if isinstance(config, str) else config
    volume = feature_volume_shape(params)
    warped = warped_feature_channels(params)
    kp = TensorSpec("kp_source", "FP32", (NUM_KP, 3))
    kp_d = TensorSpec("kp_driving", "FP32", (NUM_KP, 3))
    image = TensorSpec("image", "FP32", (3, SOURCE_SIZE, SOURCE_SIZE))
    specs = [
        ModelSpec(APPEARANCE, (image,), (TensorSpec("feature_volume", "FP32", volume),)),
        ModelSpec(MOTION, (image,), (
            TensorSpec("pitch", "FP32", (NUM_BINS,)), TensorSpec("yaw", "FP32", (NUM_BINS,)),
            TensorSpec("roll", "FP32", (NUM_BINS,)), TensorSpec("t", "FP32", (3,)),
            TensorSpec("exp", "FP32", (3 * NUM_KP,)), TensorSpec("scale", "FP32", (1,)),
            TensorSpec("kp", "FP32", (3 * NUM_KP,)))),
        ModelSpec(WARPING, (TensorSpec("feature_volume", "FP32", volume), kp, kp_d), (
            TensorSpec("warped_feature", "FP32", (warped, 64, 64)),
            TensorSpec("occlusion_map", "FP32", (1, 64, 64)))),
        # the generator ends in the official parse_output: RGB, HWC, uint8 (clip to [0, 1], x255, truncated)
        ModelSpec(GENERATOR, (TensorSpec("warped_feature", "FP32", (warped, 64, 64)),),
                  (TensorSpec("image", "UINT8", (OUTPUT_SIZE, OUTPUT_SIZE, 3)),)),
        ModelSpec(STITCHING, (kp, kp_d), (TensorSpec("delta", "FP32", (3 * NUM_KP + 2,)),)),
        ModelSpec(RETARGET_EYE, (kp, TensorSpec("eye_ratio", "FP32", (3,))),
                  (TensorSpec("delta", "FP32", (3 * NUM_KP,)),)),
        ModelSpec(RETARGET_LIP, (kp, TensorSpec("lip_ratio", "FP32", (2,))),
                  (TensorSpec("delta", "FP32", (3 * NUM_KP,)),)),
    ]
    return {s.name: s for s in specs}


# ---------------------------------------------------------------------------------------------------------------
# The `liveportrait` pipeline model: a sequence model (one sequence = one stream = one source).

SEQUENCE_CONTROLS = {"START": "CONTROL_SEQUENCE_START", "END": "CONTROL_SEQUENCE_END",
                     "CORRID": "CONTROL_SEQUENCE_CORRID"}
# Request header (gRPC metadata) naming a request's session, set by the client to the sequence id on every request
# of a sequence and on every gRPC stream: proxies in front of several replicas hash it to keep a sequence on the
# replica that holds its state (liveportrait_triton/cluster.py, deploy/k8s/router.yaml).
SESSION_HEADER = "x-liveportrait-session"
# First words of the error that refuses a START beyond a pipeline instance's capacity of live streams (Triton
# status UNAVAILABLE): clients recognise a full server by it and may retry elsewhere (backend.pipeline_model).
CAPACITY_REFUSAL = "server at capacity"

PIPELINE_SPEC = ModelSpec(PIPELINE, inputs=(
    TensorSpec("source", "UINT8", (SOURCE_SIZE, SOURCE_SIZE, 3), optional=True),     # RGB crop, START only
    TensorSpec("driving", "UINT8", (SOURCE_SIZE, SOURCE_SIZE, 3), optional=True),    # RGB crop, one frame
    # one frame of a motion template instead of a driving crop (the motion extractor is skipped)
    TensorSpec("motion_R", "FP32", (3, 3), optional=True),
    TensorSpec("motion_exp", "FP32", (NUM_KP, 3), optional=True),
    TensorSpec("motion_t", "FP32", (3,), optional=True),
    TensorSpec("motion_scale", "FP32", (1,), optional=True),
    # eye/lip retargeting ratios: the source's with START, the driving frame's with each frame
    TensorSpec("source_eye_ratio", "FP32", (2,), optional=True),
    TensorSpec("source_lip_ratio", "FP32", (1,), optional=True),
    TensorSpec("driving_eye_ratio", "FP32", (1,), optional=True),
    TensorSpec("driving_lip_ratio", "FP32", (1,), optional=True),
), outputs=(
    TensorSpec("image", "UINT8", (OUTPUT_SIZE, OUTPUT_SIZE, 3)),   # animated RGB crop
    TensorSpec("frame_index", "INT64", (1,)),                      # 0-based driving-frame count of the sequence
))
MOTION_INPUTS = ("motion_R", "motion_exp", "motion_t", "motion_scale")


@dataclasses.dataclass(frozen=True)
class Option:
    kind: type
    default: Any
    help: str
    choices: tuple = ()
    bounds: tuple[float, float] | None = None


# Per-sequence options, sent as request parameters with the START request (names as the official CLI's flags).
PIPELINE_OPTIONS: dict[str, Option] = {
    "subject": Option(str, HUMAN, "the model set animating the sequence: human faces, or the official Animals "
                      "mode's networks (whose options are fixed as ANIMAL_OPTIONS says)", choices=SUBJECTS),
    "relative_motion": Option(bool, True, "transfer motion relative to the anchor frame (else absolute pose/exp)"),
    "stitching": Option(bool, True, "apply the stitching MLP"),
    "eye_retargeting": Option(bool, False, "eye retargeting (needs source_eye_ratio and driving_eye_ratio)"),
    "lip_retargeting": Option(bool, False, "lip retargeting (needs source_lip_ratio and driving_lip_ratio)"),
    "animation_region": Option(str, "all", "which part moves", choices=REGIONS),
    "driving_multiplier": Option(float, 1.0, "scale of the motion applied", bounds=(0.0, 10.0)),
    "driving_option": Option(str, "expression-friendly", "official driving option (video, relative only)",
                             choices=("expression-friendly", "pose-friendly")),
    "driving_type": Option(str, "video", "'image' uses the official single-image rule (exp relative to lip_array)",
                           choices=("video", "image")),
    "source_video": Option(bool, False, "a source video: each frame carries its own `source` crop and the target "
                           "motion (motion_*) computed over the whole video (see README, Source videos)"),
    "anchor": Option(str, "first_frame", "relative-motion anchor: the first driving frame, or the source itself",
                     choices=("first_frame", "source")),
}


# The official Animals mode (live_portrait_pipeline_animal.py) has one way to move: relative to the first driving
# frame, whole face, expression-friendly motion, from a source image; no eye/lip retargeting. An animal sequence
# takes these values (sent or not); any other value of them is refused. Its stitching is off unless asked for
# (the official animal example runs without it).
ANIMAL_OPTIONS = {"relative_motion": True, "eye_retargeting": False, "lip_retargeting": False,
                  "animation_region": "all", "driving_option": "expression-friendly", "driving_type": "video",
                  "anchor": "first_frame", "source_video": False}
ANIMAL_DEFAULTS = {"stitching": False}


class OptionError(ValueError):
    """An unknown option or an out-of-range value."""


def parse_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate request parameters against PIPELINE_OPTIONS; returns the full option dict with defaults (an
    animal sequence's defaults and fixed values as ANIMAL_DEFAULTS and ANIMAL_OPTIONS say)."""
    unknown = sorted(set(raw) - set(PIPELINE_OPTIONS))
    if unknown:
        raise OptionError(f"unknown option(s) {unknown}; known options: {sorted(PIPELINE_OPTIONS)}")
    options = {name: _checked(name, opt, raw.get(name, opt.default)) for name, opt in PIPELINE_OPTIONS.items()}
    if options["subject"] == ANIMAL:
        refused = {name: options[name] for name, value in ANIMAL_OPTIONS.items() if options[name] != value}
        if refused:
            named = ", ".join(f"{name}={value!r}" for name, value in refused.items())
            raise OptionError(f"option(s) {named} are not available with subject='animal': the official Animals "
                              "mode moves the whole face relative to the first driving frame, from a source image, "
                              "without eye/lip retargeting (leave these options out)")
        options.update({name: value for name, value in ANIMAL_DEFAULTS.items() if name not in raw})
    return options


def _checked(name: str, opt: Option, value: Any, kind: str = "option") -> Any:
    """One value converted to its option's kind and checked against its bounds or choices (kind names it)."""
    if opt.kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            value = value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise OptionError(f"{kind} {name!r} must be a boolean, got {value!r}")
    elif opt.kind is float:
        if isinstance(value, bool):
            raise OptionError(f"{kind} {name!r} must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{kind} {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(value) or (opt.bounds and not opt.bounds[0] <= value <= opt.bounds[1]):
            raise OptionError(f"{kind} {name!r}={value!r} is outside {list(opt.bounds)}")
    elif opt.kind is str:
        if not isinstance(value, str) or (opt.choices and value not in opt.choices):
            raise OptionError(f"{kind} {name!r}={value!r} is not one of {list(opt.choices)}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Portrait editing: request parameters of an edit request (see README "Portrait editing"). Names, ranges and
# defaults are the official image-retargeting controls (the official Gradio app's sliders); None: control unused.

EDIT_FLAG = "edit"      # a request whose parameters set this to true is an edit of the sequence's source
EDIT_CONTROLS: dict[str, Option] = {
    "eye_ratio": Option(float, None, "target eyes-open ratio (eye retargeting MLP; unset: eyes as they are)",
                        bounds=(0.0, 0.8)),
    "lip_ratio": Option(float, None, "target lip-open ratio (lip retargeting MLP; unset: lips as they are)",
                        bounds=(0.0, 0.8)),
    "pitch": Option(float, 0.0, "head pitch offset, degrees", bounds=(-15.0, 15.0)),
    "yaw": Option(float, 0.0, "head yaw offset, degrees", bounds=(-25.0, 25.0)),
    "roll": Option(float, 0.0, "head roll offset, degrees", bounds=(-15.0, 15.0)),
    "mov_x": Option(float, 0.0, "x-axis movement", bounds=(-0.19, 0.19)),
    "mov_y": Option(float, 0.0, "y-axis movement", bounds=(-0.19, 0.19)),
    "mov_z": Option(float, 1.0, "z-axis movement (a scale factor)", bounds=(0.9, 1.2)),
    "lip_variation_zero": Option(float, 0.0, "pouting", bounds=(-0.09, 0.09)),
    "lip_variation_one": Option(float, 0.0, "pursing", bounds=(-20.0, 15.0)),
    "lip_variation_two": Option(float, 0.0, "grin", bounds=(0.0, 15.0)),
    "lip_variation_three": Option(float, 0.0, "lip close <-> open", bounds=(-90.0, 120.0)),
    "smile": Option(float, 0.0, "smile", bounds=(-0.3, 1.3)),
    "wink": Option(float, 0.0, "wink", bounds=(0.0, 39.0)),
    "eyebrow": Option(float, 0.0, "eyebrow", bounds=(-30.0, 30.0)),
    "eyeball_direction_x": Option(float, 0.0, "eye gaze, horizontal", bounds=(-30.0, 30.0)),
    "eyeball_direction_y": Option(float, 0.0, "eye gaze, vertical", bounds=(-63.0, 63.0)),
}


def is_edit(raw: dict[str, Any]) -> bool:
    """Whether request parameters ask for an edit (`edit` true; a string "true"/"1" as HTTP may send it)."""
    value = raw.get(EDIT_FLAG, False)
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))


def parse_edit(raw: dict[str, Any]) -> dict[str, float | None]:
    """Validate an edit's control values (every key of raw must be a control); all controls, unset ones default."""
    unknown = sorted(set(raw) - set(EDIT_CONTROLS))
    if unknown:
        raise OptionError(f"unknown edit control(s) {unknown}; known controls: {sorted(EDIT_CONTROLS)}")
    out = {}
    for name, control in EDIT_CONTROLS.items():
        value = raw.get(name)
        out[name] = control.default if value is None else _checked(name, control, value, "edit control")
    return out
