"""Per-stream animation logic, independent of where the networks run.

A `Runner` executes one served sub-network on a batch (`run(model, {input: array}) -> {output: array}`, names
from `spec`). `TorchRunner` runs our PyTorch modules in-process and `OnnxRunner` the exported ONNX files, both
built by the runtime layer from a runtime plan (`runtimes.py`); the Triton pipeline model wraps BLS calls to the
served sub-networks in the same interface (backend/bls.py `BlsRunner`).
`Animator` holds the logic of the official per-frame block: source registration (F and M once), then for each driving frame M (or a motion
template frame) -> keypoint maths -> stitching / retargeting MLPs -> W -> G, batched across streams. A stream's
`subject` option picks its model set (spec.SUBJECTS): the human set, or the official Animals mode's own F, M, W and
G with its keypoint rule (`animal_keypoints`); streams of each set are batched with their own set only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np

from . import editing
from . import keypoints as K
from . import source_video as SV
from . import runtimes, spec
from .arrays import batch_item, concatenate, nbytes
from .config import NUM_KP
from .lip_array import LIP_ARRAY
from .wire import DrivingFrame


class Runner(Protocol):
    """Runs one sub-network on a batch. A runner may also offer `run_many([(model, inputs), ...])` to send
    independent calls together (the BLS runner does); `run_concurrently` uses it where present."""

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...


def run_concurrently(runner: Runner, calls: list[tuple[str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
    """Independent sub-network calls, sent together where the runner can (`run_many`, e.g. BLS), else in turn."""
    run_many = getattr(runner, "run_many", None)
    if run_many is not None:
        return run_many(calls)
    return [runner.run(model, inputs) for model, inputs in calls]


def to_host(runner: Runner, model: str, name: str, value) -> np.ndarray:
    """A runner's output as a NumPy array on the host, through the runner where it keeps outputs on a device
    (`to_host`, e.g. BLS on a GPU, which counts the copy)."""
    runner_to_host = getattr(runner, "to_host", None)
    return runner_to_host(model, name, value) if runner_to_host is not None else np.asarray(value)


class InputError(ValueError):
    """A request that cannot be served as sent (the caller's fault), raised by its validation
    (backend/requests.py)."""


def crop_to_input(crops: np.ndarray) -> np.ndarray:
    """(B, 256, 256, 3) uint8 RGB -> (B, 3, 256, 256) float32 in [0, 1] (no mean/std, as the official code)."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    return np.ascontiguousarray(np.transpose(crops.astype(np.float32) / np.float32(255.0), (0, 3, 1, 2)))


@dataclasses.dataclass
class Edit:
    """An edit of the sequence's source image: validated control values (`spec.parse_edit`)."""
    controls: dict


@dataclasses.dataclass
class StreamState:
    """What one sequence keeps between frames: the source's features and keypoints, options and anchors."""
    options: dict
    feature_volume: np.ndarray          # (1, C, D, 64, 64), where the runner keeps it (host or device)
    source: K.MotionInfo
    x_s: np.ndarray                     # (1, 21, 3)
    source_eye_ratio: np.ndarray | None = None   # (1, 2)
    source_lip_ratio: np.ndarray | None = None   # (1, 1)
    anchor: K.MotionInfo | None = None
    x_d0_new: np.ndarray | None = None
    motion_multiplier: float = 1.0
    frames_done: int = 0

    @property
    def nbytes(self) -> int:
        return nbytes(self.feature_volume)

    @property
    def subject(self) -> str:
        return self.options.get("subject", spec.HUMAN)


class Animator:
    """The LivePortrait per-frame computation over a Runner. It trusts what it is given: the served pipeline
    validates every request once, before it gets here (backend/requests.py); in-process callers pass well-formed
    crops, motion and the ratios their options need."""

    def __init__(self, runner: Runner):
        self.runner = runner

    # -- source ---------------------------------------------------------------------------------------------
    def register_sources(self, crops: list[np.ndarray], options: list[dict],
                         eye_ratios: list | None = None, lip_ratios: list | None = None) -> list[StreamState]:
        """F and M on a batch of source crops, one batch per model set; one StreamState each."""
        eye_ratios = eye_ratios or [None] * len(crops)
        lip_ratios = lip_ratios or [None] * len(crops)
        states: list[StreamState | None] = [None] * len(crops)
        for subject, items in by_subject([o.get("subject", spec.HUMAN) for o in options]).items():
            registered = self._register_set(subject, [crops[i] for i in items], [options[i] for i in items],
                                            [eye_ratios[i] for i in items], [lip_ratios[i] for i in items])
            for i, state in zip(items, registered):
                states[i] = state
        return states

    def _register_set(self, subject: str, crops: list[np.ndarray], options: list[dict], eye_ratios: list,
                      lip_ratios: list) -> list[StreamState]:
        batch = crop_to_input(np.stack(crops))
        appearance, raw_motion = run_concurrently(self.runner, [
            (spec.served_name(spec.APPEARANCE, subject), {"image": batch}),
            (spec.served_name(spec.MOTION, subject), {"image": batch})])
        volume = appearance["feature_volume"]
        motion = K.MotionInfo.from_raw(raw_motion)
        x_s = motion.transformed()
        states = []
        for i, opts in enumerate(options):
            src = K.MotionInfo(R=motion.R[i:i + 1], t=motion.t[i:i + 1], exp=motion.exp[i:i + 1],
                               scale=motion.scale[i:i + 1], kp=motion.kp[i:i + 1], pitch=motion.pitch[i:i + 1],
                               yaw=motion.yaw[i:i + 1], roll=motion.roll[i:i + 1])
            eye = None if eye_ratios[i] is None else np.asarray(eye_ratios[i], np.float32).reshape(1, 2)
            lip = None if lip_ratios[i] is None else np.asarray(lip_ratios[i], np.float32).reshape(1, 1)
            states.append(StreamState(options=opts, feature_volume=batch_item(volume, i),
                                      source=src, x_s=x_s[i:i + 1], source_eye_ratio=eye, source_lip_ratio=lip,
                                      anchor=src if opts["anchor"] == "source" else None))
        return states

    # -- driving --------------------------------------------------------------------------------------------
    def driving_motion(self, frames: list[DrivingFrame | Edit], subject: str = spec.HUMAN) -> list[K.MotionInfo | None]:
        """M of the `subject` set on the crops of the batch (one call), template motion as given; None for edits.
        (The official Animals mode runs its own M on the driving frames, human faces included.)"""
        crops = [i for i, f in enumerate(frames) if isinstance(f, DrivingFrame) and f.motion is None]
        infos: list[K.MotionInfo | None] = [f.motion.info() if isinstance(f, DrivingFrame) and f.motion is not None
                                            else None for f in frames]
        if crops:
            batch = crop_to_input(np.stack([frames[i].crop for i in crops]))
            m = K.MotionInfo.from_raw(self.runner.run(spec.served_name(spec.MOTION, subject), {"image": batch}))
            for j, i in enumerate(crops):
                infos[i] = K.MotionInfo(R=m.R[j:j + 1], t=m.t[j:j + 1], exp=m.exp[j:j + 1], scale=m.scale[j:j + 1])
        return infos

    def driving_keypoints(self, state: StreamState, driving: K.MotionInfo, frame: DrivingFrame) -> np.ndarray:
        """x_d for one frame of one stream: motion transfer, stitching / retargeting, multiplier (updates state)."""
        if state.subject == spec.ANIMAL:
            return self.animal_keypoints(state, driving, frame)
        o = state.options
        if state.anchor is None:
            state.anchor = driving
        image = o["driving_type"] == "image"
        lip_array = LIP_ARRAY if (image and o["relative_motion"]) else None
        if image:
            anchor = driving if o["anchor"] == "first_frame" else state.anchor
        else:
            anchor = state.anchor
        x = K.compose_keypoints(state.source.kp, *K.new_motion(state.source, driving, anchor, o["animation_region"],
                                                                o["relative_motion"], lip_array))
        if o["relative_motion"] and o["driving_option"] == "expression-friendly" and not image:
            if state.x_d0_new is None:
                state.x_d0_new = x
                state.motion_multiplier = K.convex_hull_multiplier(state.x_s, x)
            x = (x - state.x_d0_new) * np.float32(state.motion_multiplier) + state.x_s
        return self._retarget_and_stitch(state, x, frame)

    def animal_keypoints(self, state: StreamState, driving: K.MotionInfo, frame: DrivingFrame) -> np.ndarray:
        """x_d of the official Animals mode for one frame (updates state): the driving pose and expression on the
        source's canonical keypoints at the source's scale (tz 0), relative to the first frame and scaled by the
        convex-hull multiplier measured on that frame; stitching when asked; the driving multiplier."""
        x = K.animal_driving_keypoints(state.source, driving)
        if state.x_d0_new is None:
            state.x_d0_new = x
            state.motion_multiplier = K.convex_hull_multiplier(state.x_s, x)
        x = K.relative_to_anchor(x, state.x_d0_new, state.x_s, state.motion_multiplier)
        return self._retarget_and_stitch(state, x, frame)

    def source_video_keypoints(self, frame_state: StreamState, frame: DrivingFrame) -> np.ndarray:
        """x_d of a source-video frame: its own source motion with the frame's target R/exp (`source_video`)."""
        o = frame_state.options
        motion = frame.motion
        x = K.compose_keypoints(frame_state.source.kp, *SV.frame_motion(
            frame_state.source, motion.R, motion.exp, motion.t, o["relative_motion"], o["animation_region"]))
        return self._retarget_and_stitch(frame_state, x, frame)

    def _retarget_and_stitch(self, state: StreamState, x: np.ndarray, frame: DrivingFrame) -> np.ndarray:
        """Eye/lip retargeting, stitching and the driving multiplier on a frame's keypoints."""
        o = state.options
        x_s = state.x_s
        if o["eye_retargeting"] or o["lip_retargeting"]:
            base = x_s if o["relative_motion"] else x
            x = base.copy()
            calls = []      # eye and lip deltas are independent: computed together, added eye first
            if o["eye_retargeting"]:
                ratio = np.concatenate([state.source_eye_ratio, np.float32([[frame.eye_ratio]])], axis=1)
                calls.append((spec.RETARGET_EYE, {"kp_source": x_s, "eye_ratio": ratio}))
            if o["lip_retargeting"]:
                ratio = np.concatenate([state.source_lip_ratio, np.float32([[frame.lip_ratio]])], axis=1)
                calls.append((spec.RETARGET_LIP, {"kp_source": x_s, "lip_ratio": ratio}))
            for out in run_concurrently(self.runner, calls):
                x = x + out["delta"].reshape(1, NUM_KP, 3)
        if o["stitching"]:
            delta = self.runner.run(spec.STITCHING, {"kp_source": x_s, "kp_driving": x})["delta"]
            x = K.apply_stitching(x, delta)
        return K.apply_driving_multiplier(x_s, x, o["driving_multiplier"])

    def edit_keypoints(self, state: StreamState, edit: Edit) -> np.ndarray:
        """x_d of an edit of the source: the editing formula, eye/lip MLP deltas for target ratios, stitching.
        Target ratios need the source's ratios in the state (`backend.requests.check_edit`)."""
        c = edit.controls
        x_s = state.x_s
        x = editing.edited_keypoints(state.source, c)
        calls = []
        if c.get("eye_ratio") is not None:
            calls.append((spec.RETARGET_EYE, {"kp_source": x_s,
                                              "eye_ratio": editing.eye_ratio_input(state.source_eye_ratio,
                                                                                   c["eye_ratio"])}))
        if c.get("lip_ratio") is not None:
            calls.append((spec.RETARGET_LIP, {"kp_source": x_s,
                                              "lip_ratio": editing.lip_ratio_input(state.source_lip_ratio,
                                                                                   c["lip_ratio"])}))
        for out in run_concurrently(self.runner, calls):
            x = x + out["delta"].reshape(1, NUM_KP, 3)
        if state.options["stitching"]:
            x = K.apply_stitching(x, self.runner.run(spec.STITCHING, {"kp_source": x_s, "kp_driving": x})["delta"])
        return x

    def render(self, volumes: np.ndarray, x_s: np.ndarray, x_d: np.ndarray, subject: str = spec.HUMAN) -> np.ndarray:
        """W then G of the `subject` set on a batch -> (B, 512, 512, 3) uint8 on the host (the served generator
        ends in the official parse_output). The volumes and W's output stay where the runner keeps them; only the
        uint8 image is brought to the host."""
        warping, generator = spec.served_name(spec.WARPING, subject), spec.served_name(spec.GENERATOR, subject)
        warped = self.runner.run(warping, {"feature_volume": volumes, "kp_source": x_s, "kp_driving": x_d})
        image = self.runner.run(generator, {"warped_feature": warped["warped_feature"]})["image"]
        return to_host(self.runner, generator, "image", image)

    def animate(self, states: list[StreamState], frames: list[DrivingFrame | Edit]) -> list[np.ndarray]:
        """One driving frame or edit for each of several streams (a stream may appear once per call), rendered
        in one W+G batch per model set (a set's networks batch its own streams only). Edits leave the stream's
        frame count and anchor as they are."""
        images: list[np.ndarray | None] = [None] * len(states)
        for subject, items in by_subject([s.subject for s in states]).items():
            rendered = self._animate_set(subject, [states[i] for i in items], [frames[i] for i in items])
            for i, image in zip(items, rendered):
                images[i] = image
        return images

    def _animate_set(self, subject: str, states: list[StreamState],
                     frames: list[DrivingFrame | Edit]) -> list[np.ndarray]:
        drivings = self.driving_motion(frames, subject)
        # source-video frames: F and M on their own source crops, in one batch for the whole round
        video = [i for i, (s, f) in enumerate(zip(states, frames)) if s.options.get("source_video")]
        rendered = list(states)
        if video:
            per_frame = self.register_sources([frames[i].source for i in video], [states[i].options for i in video],
                                              [frames[i].source_eye_ratio for i in video],
                                              [frames[i].source_lip_ratio for i in video])
            for i, frame_state in zip(video, per_frame):
                rendered[i] = frame_state
        x_d = [self.edit_keypoints(s, f) if isinstance(f, Edit)
               else self.source_video_keypoints(r, f) if r is not s else self.driving_keypoints(s, d, f)
               for s, r, d, f in zip(states, rendered, drivings, frames)]
        images = self.render(concatenate([r.feature_volume for r in rendered]),
                             np.concatenate([r.x_s for r in rendered]), np.concatenate(x_d), subject)
        for s, f in zip(states, frames):
            if not isinstance(f, Edit):
                s.frames_done += 1
        return list(images)


def by_subject(subjects: list[str]) -> dict[str, list[int]]:
    """Indices of a batch's items per model set, in order of first appearance (each set is run as its own batch)."""
    groups: dict[str, list[int]] = {}
    for i, subject in enumerate(subjects):
        groups.setdefault(subject, []).append(i)
    return groups


class TorchRunner(runtimes.PlanRunner):
    """Our PyTorch sub-networks in-process (the parity reference for served results): the plan with the runtime
    layer's `torch` kind for every sub-network, on `device` in `precision` (fp32 on the CPU: exact)."""

    def __init__(self, networks, device: str = "cpu", threads: int | None = None, precision: str | None = None):
        """`networks`: the human set's (weights.load_networks), or {subject: networks} for several sets."""
        sets = networks if isinstance(networks, dict) else {spec.HUMAN: networks}
        subjects = tuple(s for s in spec.SUBJECTS if s in sets)
        params = next(iter(sets.values())).params
        super().__init__(runtimes.create_runner(runtimes.uniform_plan("torch", device, precision, subjects), params,
                                                networks=sets, threads=threads, subjects=subjects).runners)


class OnnxRunner(runtimes.PlanRunner):
    """Exported `<repository>/<model>/1/` files in-process on the runtime layer's ONNX kinds (`kind` for all, or
    {model: kind}; default ONNX Runtime)."""

    def __init__(self, repository: str | Path, config: str | dict, kind: str | dict[str, str] = "onnxruntime",
                 threads: int | None = None):
        kinds = {m: kind for m in spec.SUBMODELS} if isinstance(kind, str) else kind
        super().__init__(runtimes.create_runner(runtimes.plan_of(kinds), config, repository=repository,
                                                threads=threads).runners)
