"""What the per-frame options do to the driving keypoints (in process, tiny networks): effects, not counts.

Each test compares the keypoints `Animator.driving_keypoints` hands to W against the source keypoints x_s or
against another option's, so a feature that silently does nothing (or too much) fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from liveportrait_triton import keypoints as K
from liveportrait_triton import spec
from liveportrait_triton.client.smoothing import MotionSmoother
from liveportrait_triton.pipeline import Animator, TorchRunner
from liveportrait_triton.wire import DrivingFrame, MotionFrame

MOVED = 1e-4          # a keypoint coordinate that changed by more than this moved (the keypoints span ~0.5)


@pytest.fixture(scope="module")
def animator(tiny_networks):
    return Animator(TorchRunner(tiny_networks))


def motion(pitch=0.0, yaw=0.0, roll=0.0, exp_seed=None, t=(0.0, 0.0, 0.0), scale=1.5) -> MotionFrame:
    rng = np.random.default_rng(exp_seed)
    exp = np.zeros((21, 3), np.float32) if exp_seed is None else rng.normal(0, 0.03, (21, 3)).astype(np.float32)
    R = K.rotation_matrix(np.float32([pitch]), np.float32([yaw]), np.float32([roll]))[0]
    return MotionFrame(R=R, exp=exp, t=np.float32(t), scale=np.float32([scale]))


def start(animator, source_crops, eye_ratio=(0.3, 0.32), lip_ratio=(0.05,), **options):
    opts = spec.parse_options({"stitching": False, **options})
    return animator.register_sources([source_crops["s0"]], [opts], [np.float32(eye_ratio)],
                                     [np.float32(lip_ratio)])[0]


def keypoints(animator, state, frame: MotionFrame, eye=None, lip=None) -> np.ndarray:
    driving = DrivingFrame(motion=frame, eye_ratio=eye, lip_ratio=lip)
    return animator.driving_keypoints(state, animator.driving_motion([driving])[0], driving)


def moved_keypoints(a: np.ndarray, b: np.ndarray) -> list[int]:
    return np.flatnonzero(np.abs(a - b)[0].max(axis=1) > MOVED).tolist()


ANCHOR, TURNED = motion(exp_seed=1), motion(pitch=8, yaw=-15, roll=5, exp_seed=2, t=(0.05, -0.03, 0), scale=1.6)


@pytest.mark.parametrize("region, named", [("exp", list(range(21))), ("lip", [6, 12, 14, 17, 19, 20]),
                                           ("eyes", [11, 13, 15, 16, 18])])
def test_an_expression_region_moves_only_the_keypoints_it_names(animator, source_crops, region, named):
    state = start(animator, source_crops, animation_region=region)
    first = keypoints(animator, state, ANCHOR)                 # the anchor frame leaves the source as it is
    np.testing.assert_allclose(first, state.x_s, atol=1e-6)
    moved = keypoints(animator, state, TURNED)
    assert moved_keypoints(moved, state.x_s) == named


def test_the_pose_region_turns_the_head_and_keeps_the_expression(animator, source_crops):
    state = start(animator, source_crops, animation_region="pose")
    keypoints(animator, state, ANCHOR)
    turned = keypoints(animator, state, TURNED)
    assert moved_keypoints(turned, state.x_s) == list(range(21))
    # undo the new pose: what is left is the source's own expression, untouched
    src = state.source
    R_new = TURNED.R[None] @ np.swapaxes(ANCHOR.R[None], 1, 2) @ src.R
    scale = src.scale                    # the official pose region keeps the source scale
    t = src.t + TURNED.t[None] - ANCHOR.t[None]
    t[:, 2] = 0
    np.testing.assert_allclose(K.compose_keypoints(src.kp, R_new, src.exp, scale, t), turned, atol=1e-5)


def test_multiplier_zero_returns_the_source_motion(animator, source_crops):
    for options in ({}, {"stitching": True}, {"relative_motion": False}, {"eye_retargeting": True}):
        state = start(animator, source_crops, driving_multiplier=0.0, **options)
        for frame in (ANCHOR, TURNED):
            x = keypoints(animator, state, frame, eye=0.05)
            np.testing.assert_array_equal(x, state.x_s, err_msg=f"multiplier 0 with {options}")
    state = start(animator, source_crops, driving_multiplier=2.0)
    keypoints(animator, state, ANCHOR)
    half, full = start(animator, source_crops), None
    keypoints(animator, half, ANCHOR)
    full = keypoints(animator, half, TURNED)
    np.testing.assert_allclose(keypoints(animator, state, TURNED) - state.x_s, 2 * (full - half.x_s), atol=1e-5)


def test_eye_retargeting_adds_the_eye_mlp_delta_and_follows_only_the_eye_ratio(animator, source_crops, tiny_networks):
    """Relative mode: retargeting replaces the motion (as the official code does) with x_s + the MLP's delta for
    [source eye ratios, driving eye ratio]; the driving pose, expression and lip ratio change nothing."""
    import torch
    state = start(animator, source_crops, eye_retargeting=True)
    open_eyes = keypoints(animator, state, ANCHOR, eye=0.3, lip=0.0)
    assert np.array_equal(keypoints(animator, state, TURNED, eye=0.3, lip=0.4), open_eyes)
    closed = keypoints(animator, state, TURNED, eye=0.0)
    with torch.no_grad():
        ratio = torch.from_numpy(np.float32([[0.3, 0.32, 0.0]]))
        delta = tiny_networks.eye(torch.from_numpy(K.retarget_input(state.x_s, ratio.numpy()))).numpy()
    np.testing.assert_allclose(closed, state.x_s + delta.reshape(1, 21, 3), atol=1e-6)
    assert moved_keypoints(closed, open_eyes)               # the blink moves keypoints


def test_lip_retargeting_follows_only_the_lip_ratio(animator, source_crops):
    state = start(animator, source_crops, lip_retargeting=True)
    shut = keypoints(animator, state, ANCHOR, eye=0.3, lip=0.0)
    assert np.array_equal(keypoints(animator, state, TURNED, eye=0.0, lip=0.0), shut)
    assert moved_keypoints(keypoints(animator, state, TURNED, lip=0.5), shut)


def test_smoothing_reduces_frame_to_frame_keypoint_jitter(animator, source_crops):
    """A slow head turn with jittery pose and expression: smoothed motion gives keypoints that jitter less."""
    rng = np.random.default_rng(7)
    frames = 60
    clean = [motion(yaw=20 * np.sin(np.pi * i / frames), exp_seed=3) for i in range(frames)]
    noisy = [MotionFrame(R=K.rotation_matrix(*(np.float32([a]) for a in (rng.normal(0, 2), 20 * np.sin(
        np.pi * i / frames) + rng.normal(0, 2), rng.normal(0, 2))))[0],
        exp=c.exp + rng.normal(0, 0.01, (21, 3)).astype(np.float32), t=c.t, scale=c.scale)
        for i, c in enumerate(clean)]
    smoother = MotionSmoother(fps=25)
    runs = {}
    for name, sequence in (("clean", clean), ("noisy", noisy), ("smoothed", [smoother.motion(f) for f in noisy])):
        state = start(animator, source_crops)
        runs[name] = np.concatenate([keypoints(animator, state, f) for f in sequence])
    jitter = {name: np.abs(np.diff(x - runs["clean"], axis=0)).mean() for name, x in runs.items()}
    assert jitter["smoothed"] < 0.5 * jitter["noisy"], jitter
    # and it still follows the turn: the smoothed keypoints end near the clean ones
    assert np.abs(runs["smoothed"][-10:] - runs["clean"][-10:]).mean() < np.abs(runs["clean"][-10:] - runs["clean"][0]).mean()


def test_expression_friendly_scales_the_motion_by_the_hull_ratio(animator, source_crops):
    """Official rule, written here: x_d = (x_d,i - x_d,0) * sqrt(V(x_s)) / sqrt(V(x_d,0)) + x_s with V the
    keypoints' convex-hull volume and x_d,i the pose-friendly keypoints (expression-friendly is the default). Anchored to the source, frame 0 is not
    x_s, so the ratio is not 1 (with the first frame as anchor it is 1 and a dropped ratio would go unseen)."""
    from scipy.spatial import ConvexHull
    plain = start(animator, source_crops, anchor="source", driving_option="pose-friendly")
    x0, x1 = keypoints(animator, plain, ANCHOR), keypoints(animator, plain, TURNED)
    ratio = np.sqrt(ConvexHull(plain.x_s[0]).volume) / np.sqrt(ConvexHull(x0[0]).volume)
    assert abs(ratio - 1) > 0.01, ratio
    friendly = start(animator, source_crops, anchor="source", driving_option="expression-friendly")
    np.testing.assert_allclose(keypoints(animator, friendly, ANCHOR), friendly.x_s, atol=1e-6)
    np.testing.assert_allclose(keypoints(animator, friendly, TURNED), (x1 - x0) * ratio + friendly.x_s, atol=1e-5)
