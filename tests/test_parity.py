"""Parity with the official LivePortrait code on seed-0 synthetic weights (shared/reference/public).

Tolerances (max abs, float32, CPU) follow shared/reference/README.md: they sit above the official code's own
thread/layout noise and below every known implementation mistake (BN running stats, affine, eps 1e-3, ...).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from liveportrait_triton import keypoints as K

TOL_KEYPOINTS = 1e-5     # M raw outputs, keypoints, R, motion, S outputs
TOL_DEGREES = 1e-4
TOL_TIGHT_F = 1.5e-5     # feature volume: catches an eps-placement mistake in F
TOL_VOLUME = 1e-4        # W outputs
TOL_IMAGE = 2e-4         # G image


def assert_close(actual, expected, atol, name):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual - expected)))
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:.1g}"


def raw_motion(networks, tensor):
    with torch.no_grad():
        out = networks.motion_extractor(torch.from_numpy(tensor))
    return {k: v.numpy() for k, v in out.items()}


def info(ref, prefix):
    return K.MotionInfo(R=ref[f"R_{prefix}"], t=ref[f"M_{ {'s': 'source', 'd': 'driving', 'd0': 'driving0'}[prefix]}_info_t"],
                        exp=ref[f"M_{ {'s': 'source', 'd': 'driving', 'd0': 'driving0'}[prefix]}_info_exp"],
                        scale=ref[f"M_{ {'s': 'source', 'd': 'driving', 'd0': 'driving0'}[prefix]}_info_scale"],
                        kp=ref[f"M_{ {'s': 'source', 'd': 'driving', 'd0': 'driving0'}[prefix]}_info_kp"])


def test_appearance_feature_extractor(full_networks, reference):
    with torch.no_grad():
        out = full_networks.appearance_feature_extractor(torch.from_numpy(reference["source_tensor"]))
    assert_close(out.numpy(), reference["F_feature_3d"], TOL_TIGHT_F, "F_feature_3d")


@pytest.mark.parametrize("which", ["source", "driving", "driving0"])
def test_motion_extractor_raw_and_info(full_networks, reference, which):
    raw = raw_motion(full_networks, reference[f"{which}_tensor"])
    for key in ("pitch", "yaw", "roll", "t", "exp", "scale", "kp"):
        assert_close(raw[key], reference[f"M_{which}_raw_{key}"], TOL_KEYPOINTS, f"M_{which}_raw_{key}")
    motion = K.MotionInfo.from_raw(raw)
    for key in ("pitch", "yaw", "roll"):
        assert_close(getattr(motion, key)[:, None], reference[f"M_{which}_info_{key}"], TOL_DEGREES, key)
    assert_close(motion.kp, reference[f"M_{which}_info_kp"], TOL_KEYPOINTS, "kp")
    assert_close(motion.exp, reference[f"M_{which}_info_exp"], TOL_KEYPOINTS, "exp")
    suffix = {"source": "s", "driving": "d", "driving0": "d0"}[which]
    assert_close(motion.R, reference[f"R_{suffix}"], TOL_KEYPOINTS, f"R_{suffix}")
    assert_close(motion.transformed(), reference[f"x_{suffix}"], TOL_KEYPOINTS, f"x_{suffix}")


def test_keypoint_maths_from_reference_info(reference):
    """The numpy maths alone, fed the official processed info."""
    for suffix, which in (("s", "source"), ("d", "driving"), ("d0", "driving0")):
        pitch, yaw, roll = (reference[f"M_{which}_info_{k}"][:, 0] for k in ("pitch", "yaw", "roll"))
        R = K.rotation_matrix(pitch, yaw, roll)
        assert_close(R, reference[f"R_{suffix}"], TOL_KEYPOINTS, f"R_{suffix}")
        x = K.transform_keypoints(reference[f"M_{which}_info_kp"], R, reference[f"M_{which}_info_exp"],
                                  reference[f"M_{which}_info_scale"], reference[f"M_{which}_info_t"])
        assert_close(x, reference[f"x_{suffix}"], TOL_KEYPOINTS, f"x_{suffix}")
        degrees = K.headpose_bins_to_degrees(reference[f"M_{which}_raw_pitch"])
        assert_close(degrees[:, None], reference[f"M_{which}_info_pitch"], TOL_DEGREES, "pitch degrees")


@pytest.mark.parametrize("case", ["rel_image", "abs_image", "rel_video"])
def test_motion_transfer(reference, case):
    s, d, d0 = info(reference, "s"), info(reference, "d"), info(reference, "d0")
    anchor = d0 if case == "rel_video" else d
    lip = reference["lip_array"] if case == "rel_image" else None
    R_new, delta, scale, t = K.new_motion(s, d, anchor, "all", relative=case != "abs_image", lip_array=lip)
    for name, value in (("R_new", R_new), ("delta_new", delta), ("scale_new", scale), ("t_new", t)):
        assert_close(value, reference[f"motion_{case}_{name}"], TOL_KEYPOINTS, f"motion_{case}_{name}")
    x = K.compose_keypoints(s.kp, R_new, delta, scale, t)
    assert_close(x, reference[f"motion_{case}_x_d_new"], TOL_KEYPOINTS, f"motion_{case}_x_d_new")


def test_expression_friendly(reference):
    s, d, d0 = info(reference, "s"), info(reference, "d"), info(reference, "d0")
    x_d0_new = K.compose_keypoints(s.kp, *K.new_motion(s, d0, d0, "all", True))
    assert_close(x_d0_new, reference["motion_exprfriendly_x_d0_new"], TOL_KEYPOINTS, "x_d0_new")
    multiplier = K.convex_hull_multiplier(reference["x_s"], x_d0_new)
    assert abs(multiplier - float(np.asarray(reference["motion_exprfriendly_multiplier"]).reshape(-1)[0])) < 1e-5
    x_d_new = (reference["motion_rel_video_x_d_new"] - x_d0_new) * multiplier + reference["x_s"]
    assert_close(x_d_new, reference["motion_exprfriendly_x_d_new"], TOL_KEYPOINTS, "exprfriendly x_d_new")


def test_stitching_and_retargeting(full_networks, reference):
    x_s = reference["x_s"]
    feat = K.stitching_input(x_s, reference["motion_rel_image_x_d_new"])
    assert_close(feat, reference["S_stitch_input"], 0, "S_stitch_input")
    with torch.no_grad():
        delta = full_networks.stitching(torch.from_numpy(feat)).numpy()
        eye = full_networks.eye(torch.from_numpy(K.retarget_input(x_s, reference["S_eye_ratio"]))).numpy()
        lip = full_networks.lip(torch.from_numpy(K.retarget_input(x_s, reference["S_lip_ratio"]))).numpy()
    assert_close(delta, reference["S_stitch_delta"], TOL_KEYPOINTS, "S_stitch_delta")
    stitched = K.apply_stitching(reference["motion_rel_image_x_d_new"], delta)
    assert_close(stitched, reference["S_stitching_out"], TOL_KEYPOINTS, "S_stitching_out")
    final = K.apply_driving_multiplier(x_s, stitched, 1.0)
    assert_close(final, reference["kp_driving_final"], TOL_KEYPOINTS, "kp_driving_final")
    assert_close(eye.reshape(1, 21, 3), reference["S_eye_delta"], TOL_KEYPOINTS, "S_eye_delta")
    assert_close(lip.reshape(1, 21, 3), reference["S_lip_delta"], TOL_KEYPOINTS, "S_lip_delta")


@pytest.mark.parametrize("mode", ["native", "decomposed"])
def test_warping_module(full_networks, reference, mode):
    full_networks.set_grid_sample_mode(mode)
    try:
        with torch.no_grad():
            out = full_networks.warping_module(torch.from_numpy(reference["F_feature_3d"]),
                                               torch.from_numpy(reference["x_s"]),
                                               torch.from_numpy(reference["kp_driving_final"]))
    finally:
        full_networks.set_grid_sample_mode("native")
    assert_close(out["out"].numpy(), reference["W_out"], TOL_VOLUME, "W_out")
    assert_close(out["occlusion_map"].numpy(), reference["W_occlusion_map"], TOL_VOLUME, "W_occlusion_map")
    assert_close(out["deformation"].numpy(), reference["W_deformation"], TOL_VOLUME, "W_deformation")
    assert_close(out["mask"].numpy(), reference["W_dense_motion_mask"], TOL_VOLUME, "W_dense_motion_mask")


def test_spade_generator(full_networks, reference):
    from liveportrait_triton.export.served import parse_output
    with torch.no_grad():
        out = full_networks.spade_generator(torch.from_numpy(reference["W_out"]))
    assert_close(out.numpy(), reference["G_out"], TOL_IMAGE, "G_out")
    u8 = parse_output(out).numpy()    # the served generator's last step
    assert u8.shape == reference["G_out_uint8"].shape
    assert int(np.abs(u8.astype(int) - reference["G_out_uint8"].astype(int)).max()) <= 1
