"""Keypoint maths on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from liveportrait_triton import keypoints as K

# The official index sets (LivePortrait's live_portrait_pipeline.py), written here, not taken from the module tested
OFFICIAL_LIP = (6, 12, 14, 17, 19, 20)
OFFICIAL_EYES = (11, 13, 15, 16, 18)
OFFICIAL_ABSOLUTE_EXP = (1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)


def random_info(rng, with_kp=True):
    pitch, yaw, roll = rng.uniform(-30, 30, size=(3, 1)).astype(np.float32)
    return K.MotionInfo(R=K.rotation_matrix(pitch, yaw, roll), t=rng.normal(size=(1, 3)).astype(np.float32) * 0.1,
                        exp=rng.normal(size=(1, 21, 3)).astype(np.float32) * 0.02,
                        scale=rng.uniform(0.8, 1.2, size=(1, 1)).astype(np.float32),
                        kp=rng.normal(size=(1, 21, 3)).astype(np.float32) * 0.3 if with_kp else None)


def test_rotation_is_orthonormal_and_matches_axes():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-90, 90, size=(3, 8)).astype(np.float32)
    R = K.rotation_matrix(*angles)
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), R.shape)
    np.testing.assert_allclose(R @ np.transpose(R, (0, 2, 1)), eye, atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)
    # yaw of +90 degrees alone: the row vector x=(1,0,0) times Ry^T is the first row of Ry^T, (0, 0, -1)
    R_yaw = K.rotation_matrix(np.float32([0]), np.float32([90]), np.float32([0]))[0]
    np.testing.assert_allclose(np.float32([1, 0, 0]) @ R_yaw, [0, 0, -1], atol=1e-6)
    np.testing.assert_allclose(K.rotation_matrix(*np.zeros((3, 1), np.float32))[0], np.eye(3), atol=0)


def test_degrees_from_one_hot_bins():
    logits = np.full((2, 66), -1e4, np.float32)
    logits[0, 0] = 0
    logits[1, 40] = 0
    np.testing.assert_allclose(K.headpose_bins_to_degrees(logits), [-97.5, 40 * 3 - 97.5], atol=1e-4)


def test_transform_drops_tz():
    info = random_info(np.random.default_rng(1))
    x = info.transformed()
    t = info.t.copy()
    t[:, 2] += 5.0
    x2 = K.transform_keypoints(info.kp, info.R, info.exp, info.scale, t)
    np.testing.assert_array_equal(x, x2)


@pytest.mark.parametrize("region", K.REGIONS)
def test_zero_motion_is_identity(region):
    """Driving equal to its anchor leaves the source keypoints unchanged (relative mode, every region)."""
    rng = np.random.default_rng(2)
    src, drv = random_info(rng), random_info(rng)
    x = K.compose_keypoints(src.kp, *K.new_motion(src, drv, drv, region, relative=True))
    np.testing.assert_allclose(x, src.transformed(), atol=2e-6)


def test_regions_change_only_what_they_name():
    rng = np.random.default_rng(3)
    src, anchor, drv = random_info(rng), random_info(rng), random_info(rng)
    base = dict(zip(("R", "delta", "scale", "t"), K.new_motion(src, anchor, anchor, "all", True)))
    for region in ("exp", "pose", "lip", "eyes"):
        out = dict(zip(("R", "delta", "scale", "t"), K.new_motion(src, drv, anchor, region, True)))
        pose_moves = region == "pose"
        assert np.allclose(out["R"], base["R"], atol=1e-6) != pose_moves
        assert np.allclose(out["t"], base["t"], atol=1e-7) != pose_moves
        np.testing.assert_array_equal(out["scale"], src.scale)
        changed = np.flatnonzero(np.any(np.abs(out["delta"] - src.exp)[0] > 0, axis=1))
        expected = {"exp": np.arange(21), "pose": np.array([], int), "lip": np.array(OFFICIAL_LIP),
                    "eyes": np.array(OFFICIAL_EYES)}[region]
        np.testing.assert_array_equal(changed, expected)
    out = dict(zip(("R", "delta", "scale", "t"), K.new_motion(src, drv, anchor, "all", True)))
    np.testing.assert_allclose(out["scale"], src.scale * drv.scale / anchor.scale)


def test_absolute_motion_takes_pose_and_named_expression_entries():
    rng = np.random.default_rng(4)
    src, drv = random_info(rng), random_info(rng)
    R, delta, scale, t = K.new_motion(src, drv, drv, "all", relative=False)
    np.testing.assert_array_equal(R, drv.R)
    np.testing.assert_array_equal(scale, src.scale)
    np.testing.assert_array_equal(t[:, :2], drv.t[:, :2])
    assert t[0, 2] == 0
    from_driving = np.zeros((21, 3), bool)
    from_driving[list(OFFICIAL_ABSOLUTE_EXP)] = True
    from_driving[3:5, 1] = from_driving[5, 2] = from_driving[8, 2] = True
    from_driving[9, 1:] = True
    np.testing.assert_array_equal(delta[0][from_driving], drv.exp[0][from_driving])
    np.testing.assert_array_equal(delta[0][~from_driving], src.exp[0][~from_driving])


def test_stitching_application_and_multiplier():
    x = np.zeros((1, 21, 3), np.float32)
    delta = np.arange(65, dtype=np.float32)[None]
    out = K.apply_stitching(x, delta)
    np.testing.assert_array_equal(out[0, :, 2], delta[0, 2:63:3])
    np.testing.assert_array_equal(out[0, :, 0], delta[0, 0:63:3] + 63)
    np.testing.assert_array_equal(out[0, :, 1], delta[0, 1:63:3] + 64)
    x_s = np.ones((1, 21, 3), np.float32)
    np.testing.assert_array_equal(K.apply_driving_multiplier(x_s, out, 0.0), x_s)
    np.testing.assert_allclose(K.apply_driving_multiplier(x_s, out, 2.0), x_s + 2 * (out - x_s))


def test_convex_hull_multiplier_is_scale_invariant_ratio():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 21, 3))
    assert K.convex_hull_multiplier(x, x) == pytest.approx(1.0)
    assert K.convex_hull_multiplier(x, 2 * x) == pytest.approx(2 ** -1.5)
    flat = x.copy()
    flat[..., 2] = 0                      # coplanar: no 3-D hull, motion left unscaled
    assert K.convex_hull_multiplier(flat, x) == 1.0


def test_eye_and_lip_ratios_on_hand_made_landmarks():
    lmk = np.zeros((1, 203, 2))
    lmk[0, 6], lmk[0, 18], lmk[0, 0], lmk[0, 12] = (5, 2), (5, 4), (0, 3), (10, 3)      # left eye: 2 / 10
    lmk[0, 30], lmk[0, 42], lmk[0, 24], lmk[0, 36] = (5, 2), (5, 3), (0, 3), (10, 3)    # right eye: 1 / 10
    lmk[0, 90], lmk[0, 102], lmk[0, 48], lmk[0, 66] = (0, 0), (0, 6), (0, 0), (8, 0)    # lip: 6 / 8
    np.testing.assert_allclose(K.eye_close_ratio(lmk), [[0.2, 0.1]], atol=1e-6)
    np.testing.assert_allclose(K.lip_close_ratio(lmk), [[0.75]], atol=1e-6)
    assert K.retarget_input(np.zeros((1, 21, 3)), [[0.1, 0.2, 0.3]]).shape == (1, 66)


def test_unknown_region_is_refused():
    rng = np.random.default_rng(6)
    s = random_info(rng)
    with pytest.raises(ValueError, match="unknown animation region 'mouth'"):
        K.new_motion(s, s, s, "mouth")
