"""Portrait editing: the official image-retargeting controls as keypoint maths (numpy).

One source image, no driving input: the edited keypoints are

    x_d = mov_z * scale_s * (kp_s @ R_edit + exp_edit) + t_s

where R_edit is the source's rotation with pitch/yaw/roll offsets added to its angles, exp_edit is the source
expression with each control's fixed per-keypoint offsets added (`EXPRESSION_TERMS`), and t_s is the source
translation **including tz** (the official editing formula adds all of t, unlike `transform_keypoints`). Then the
eye and lip retargeting MLPs' deltas are added for target eye/lip ratios, and the stitching MLP runs (the MLP
parts are `pipeline.Animator.edit_keypoints`). Control names, ranges and defaults are `spec.EDIT_CONTROLS`.
"""
from __future__ import annotations

import numpy as np

from . import keypoints as K

# control -> ((keypoint, axis, coefficient), ...) offsets added to the expression per unit of the control's value.
# A control with two entries uses the first for values > 0 and the second otherwise (the official code
# branches on the sign there). The vertical gaze includes the official blink term (-value / 2 times its own
# coefficients), folded into one coefficient per entry.
Term = tuple[int, int, float]
EXPRESSION_TERMS: dict[str, tuple[tuple[Term, ...], ...]] = {
    "eyeball_direction_x": (((11, 0, 0.0007), (15, 0, 0.001)),
                            ((11, 0, 0.001), (15, 0, 0.0007))),
    "eyeball_direction_y": (((11, 1, -0.001 + 0.0005), (15, 1, -0.001 + 0.0005),
                             (13, 1, -0.00015), (16, 1, -0.00015)),),
    "smile": (((20, 1, -0.01), (14, 1, -0.02), (17, 1, 0.0065), (17, 2, 0.003), (13, 1, -0.00275),
               (16, 1, -0.00275), (3, 1, -0.0035), (7, 1, -0.0035)),),
    "wink": (((11, 1, 0.001), (13, 1, -0.0003), (17, 0, 0.0003), (17, 1, 0.0003), (3, 1, -0.0003)),),
    "eyebrow": (((1, 1, 0.001), (2, 1, -0.001)),
                ((1, 0, -0.001), (2, 0, 0.001), (1, 1, 0.0003), (2, 1, -0.0003))),
    "lip_variation_zero": (((19, 0, 1.0),),),
    "lip_variation_one": (((14, 1, 0.001), (3, 1, -0.0005), (7, 1, -0.0005), (17, 2, -0.0005)),),
    "lip_variation_two": (((20, 2, -0.001), (20, 1, -0.001), (14, 1, -0.001)),),
    "lip_variation_three": (((19, 1, 0.001), (19, 2, 0.0001), (17, 1, -0.0001)),),
    "mov_x": (((5, 0, -1.0),),),       # the official code negates mov_x before adding it
    "mov_y": (((5, 1, 1.0),),),
}


def expression_terms(control: str, value: float) -> tuple[Term, ...]:
    """The (keypoint, axis, coefficient) offsets that `control` applies at `value` (empty at 0)."""
    if value == 0:
        return ()
    variants = EXPRESSION_TERMS[control]
    return variants[0] if value > 0 or len(variants) == 1 else variants[1]


def edited_expression(exp: np.ndarray, controls: dict) -> np.ndarray:
    """(1, 21, 3) source expression -> the expression with every control's offsets added."""
    out = np.array(exp, dtype=np.float32)
    for control in EXPRESSION_TERMS:
        value = float(controls.get(control) or 0.0)
        for keypoint, axis, coefficient in expression_terms(control, value):
            out[:, keypoint, axis] += np.float32(value * coefficient)
    return out


def edited_rotation(source: K.MotionInfo, controls: dict) -> np.ndarray:
    """The source rotation with the pitch/yaw/roll offsets (degrees) added to its angles, (1, 3, 3)."""
    if source.pitch is None:
        raise ValueError("editing needs the source's pitch/yaw/roll angles")
    return K.rotation_matrix(source.pitch + np.float32(controls.get("pitch") or 0.0),
                             source.yaw + np.float32(controls.get("yaw") or 0.0),
                             source.roll + np.float32(controls.get("roll") or 0.0))


def edited_keypoints(source: K.MotionInfo, controls: dict) -> np.ndarray:
    """x_d = mov_z * scale * (kp @ R_edit + exp_edit) + t (t with its z), before the MLP deltas; (1, 21, 3)."""
    mov_z = np.float32(1.0 if controls.get("mov_z") is None else controls["mov_z"])
    moved = source.kp @ edited_rotation(source, controls) + edited_expression(source.exp, controls)
    return (mov_z * source.scale.reshape(-1, 1, 1) * moved + source.t.reshape(-1, 1, 3)).astype(np.float32)


def eye_ratio_input(source_eye_ratio: np.ndarray, target: float) -> np.ndarray:
    """(1, 3) eye-MLP ratio input: the source's left/right eye ratios and the target ratio."""
    return np.concatenate([np.asarray(source_eye_ratio, np.float32).reshape(1, 2), np.float32([[target]])], axis=1)


def lip_ratio_input(source_lip_ratio: np.ndarray, target: float) -> np.ndarray:
    """(1, 2) lip-MLP ratio input: the source's lip ratio and the target ratio."""
    return np.concatenate([np.asarray(source_lip_ratio, np.float32).reshape(1, 1), np.float32([[target]])], axis=1)


def slider_start_values(eye_ratio: np.ndarray, lip_ratio: np.ndarray) -> tuple[float, float]:
    """Where the official app puts the eye/lip sliders for a source: the mean eye ratio and the lip ratio,
    rounded to 2 decimals. A slider left there means "no retargeting" (the official rule)."""
    return round(float(np.mean(eye_ratio)), 2), round(float(np.asarray(lip_ratio).reshape(-1)[0]), 2)
