"""Parity with the official LivePortrait code on seed-0 synthetic weights.

`reference` is the compact copy of shared/reference/public/ref_seed0_s0_d30.npz committed in tests/data (small
arrays whole; the feature volume, W's outputs and G's image as fixed-seed samples plus per-channel mean and std),
so these tests run on a clone alone: F, M, the keypoint maths, S, and the F -> W -> G chain. With the full vectors
(shared/ beside the repository) W and G are also checked alone, on the official inputs.

Tolerances (max abs, float32, CPU) follow shared/reference/README.md: they sit above the official code's own
thread/layout noise and below every known implementation mistake (BN running stats, affine, eps 1e-3, ...).
test_planted_mistakes_fail_on_the_compact_vectors shows that each mistake the README lists still fails here.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from liveportrait_triton import keypoints as K

TOL_KEYPOINTS = 1e-5     # M raw outputs, keypoints, R, motion, S outputs
TOL_TIGHT_M = 2e-6       # M raw outputs: catches the LayerNorm eps mistake (README: "optional tight bounds")
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


def assert_matches(reference, name, actual, atol):
    """`actual` within atol of the official `name`: whole, or at the samples and in per-channel mean and std."""
    worst = reference.differences(name, actual)
    assert max(worst.values()) <= atol, f"{name}: {', '.join(f'{k} {v:.3g}' for k, v in worst.items())} > {atol:.1g}"


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
    assert_matches(reference, "F_feature_3d", out.numpy(), TOL_TIGHT_F)


@pytest.mark.parametrize("which", ["source", "driving", "driving0"])
def test_motion_extractor_raw_and_info(full_networks, reference, which):
    raw = raw_motion(full_networks, reference[f"{which}_tensor"])
    for key in ("pitch", "yaw", "roll", "t", "exp", "scale", "kp"):
        assert_close(raw[key], reference[f"M_{which}_raw_{key}"], TOL_TIGHT_M, f"M_{which}_raw_{key}")
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
    """The pipeline's own code path (Animator.driving_keypoints, stitching off) on the official motion: frame 0
    (d0) fixes the convex-hull multiplier and gives back x_s, frame 1 (d) the official expression-friendly x_d_new."""
    from liveportrait_triton import spec
    from liveportrait_triton.pipeline import Animator, DrivingFrame, StreamState
    s, d, d0 = info(reference, "s"), info(reference, "d"), info(reference, "d0")
    x_d0_new = K.compose_keypoints(s.kp, *K.new_motion(s, d0, d0, "all", True))
    assert_close(x_d0_new, reference["motion_exprfriendly_x_d0_new"], TOL_KEYPOINTS, "x_d0_new")
    options = spec.parse_options({"driving_option": "expression-friendly", "stitching": False})
    state = StreamState(options=options, feature_volume=None, source=s, x_s=reference["x_s"])
    animator = Animator(runner=None)            # stitching and retargeting off: no network runs
    frame = DrivingFrame(motion=None)
    first = animator.driving_keypoints(state, d0, frame)
    assert_close(first, reference["x_s"], TOL_KEYPOINTS, "expression-friendly frame 0")
    official = float(np.asarray(reference["motion_exprfriendly_multiplier"]).reshape(-1)[0])
    assert abs(state.motion_multiplier - official) < 1e-5, (state.motion_multiplier, official)
    x_d_new = animator.driving_keypoints(state, d, frame)
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


def warp(networks, feature_volume, kp_source, kp_driving, mode="native") -> dict[str, np.ndarray]:
    networks.set_grid_sample_mode(mode)
    try:
        with torch.no_grad():
            out = networks.warping_module(torch.as_tensor(feature_volume), torch.from_numpy(kp_source),
                                          torch.from_numpy(kp_driving))
    finally:
        networks.set_grid_sample_mode("native")
    return {k: v.numpy() for k, v in out.items()}


W_OUTPUTS = {"out": "W_out", "occlusion_map": "W_occlusion_map", "deformation": "W_deformation",
             "mask": "W_dense_motion_mask"}


@pytest.fixture(scope="module")
def chain(full_networks, reference):
    """F -> W -> G on the official source tensor and keypoints, as the served pipeline runs them."""
    with torch.no_grad():
        volume = full_networks.appearance_feature_extractor(torch.from_numpy(reference["source_tensor"]))
    warped = warp(full_networks, volume, reference["x_s"], reference["kp_driving_final"])
    with torch.no_grad():
        image = full_networks.spade_generator(torch.from_numpy(warped["out"])).numpy()
    return warped, image


@pytest.mark.slow
def test_warping_and_generator_chain(chain, reference):
    from liveportrait_triton.networks.served import parse_output
    warped, image = chain
    for key, name in W_OUTPUTS.items():
        assert_matches(reference, name, warped[key], TOL_VOLUME)
    assert_matches(reference, "G_out", image, TOL_IMAGE)
    assert_matches(reference, "G_out_uint8", parse_output(torch.from_numpy(image)).numpy(), 1)


@pytest.mark.parametrize("mode", ["native", "decomposed"])
def test_warping_module(full_networks, full_reference, mode):
    """W alone on the official feature volume (full vectors only: the compact set samples the volume)."""
    out = warp(full_networks, full_reference["F_feature_3d"], full_reference["x_s"],
               full_reference["kp_driving_final"], mode)
    for key, name in W_OUTPUTS.items():
        assert_close(out[key], full_reference[name], TOL_VOLUME, name)


def test_spade_generator(full_networks, full_reference):
    """G alone on the official W output (full vectors only), then the served generator's last step."""
    from liveportrait_triton.networks.served import parse_output
    with torch.no_grad():
        out = full_networks.spade_generator(torch.from_numpy(full_reference["W_out"]))
    assert_close(out.numpy(), full_reference["G_out"], TOL_IMAGE, "G_out")
    u8 = parse_output(out).numpy()
    assert u8.shape == full_reference["G_out_uint8"].shape
    assert int(np.abs(u8.astype(int) - full_reference["G_out_uint8"].astype(int)).max()) <= 1


# ---------------------------------------------------------------------------------------------------------------
# Planted mistakes (shared/reference/README.md, "What the vectors catch"): each one fails on the compact vectors


def plant_batchnorm(module: torch.nn.Module, mistake: str) -> torch.nn.Module:
    """A copy of `module` with one BatchNorm mistake applied to every BatchNorm (as the README's table)."""
    module = copy.deepcopy(module)
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        with torch.no_grad():
            if mistake == "ignores running stats":
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
            elif mistake == "batch statistics":
                bn.train()
            elif mistake == "drops affine":
                bn.weight.fill_(1.0)
                bn.bias.zero_()
            elif mistake == "eps 1e-3":
                bn.eps = 1e-3
            elif mistake == "eps outside the sqrt":      # (x - m) / (sqrt(v) + eps) == (x - m) / sqrt(v' + eps)
                bn.running_var.copy_((bn.running_var.sqrt() + bn.eps) ** 2 - bn.eps)
            elif mistake == "eps omitted":
                bn.running_var.sub_(bn.eps)
            else:
                raise ValueError(mistake)
    return module


def plant_layernorm(module: torch.nn.Module, mistake: str) -> torch.nn.Module:
    from liveportrait_triton.networks.blocks import ChannelsFirstLayerNorm
    module = copy.deepcopy(module)
    for ln in (m for m in module.modules() if isinstance(m, (torch.nn.LayerNorm, ChannelsFirstLayerNorm))):
        with torch.no_grad():
            if mistake == "drops affine":
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            elif mistake == "drops bias":
                ln.bias.zero_()
            elif mistake == "eps 1e-5":
                ln.eps = 1e-5
            else:
                raise ValueError(mistake)
    return module


BN_MISTAKES = ("ignores running stats", "batch statistics", "drops affine", "eps 1e-3", "eps outside the sqrt",
               "eps omitted")
# W alone only shows eps-placement mistakes at 2-3x its noise floor (README): those are F's to catch
W_MISTAKES = BN_MISTAKES[:4]


def fails(reference, name, actual, atol) -> bool:
    return max(reference.differences(name, actual).values()) > atol


@pytest.mark.slow
def test_planted_mistakes_fail_on_the_compact_vectors(full_networks, reference):
    source = torch.from_numpy(reference["source_tensor"])
    with torch.no_grad():
        volume = full_networks.appearance_feature_extractor(source)
        for mistake in BN_MISTAKES:
            wrong = plant_batchnorm(full_networks.appearance_feature_extractor, mistake)(source).numpy()
            assert fails(reference, "F_feature_3d", wrong, TOL_TIGHT_F), f"F with BatchNorm mistake {mistake!r} passed"
        for mistake in ("drops affine", "drops bias", "eps 1e-5"):
            raw = plant_layernorm(full_networks.motion_extractor, mistake)(source)
            assert any(fails(reference, f"M_source_raw_{k}", v.numpy(), TOL_TIGHT_M) for k, v in raw.items()), \
                f"M with LayerNorm mistake {mistake!r} passed"
        kp_s, kp_d = torch.from_numpy(reference["x_s"]), torch.from_numpy(reference["kp_driving_final"])
        for mistake in W_MISTAKES:
            out = plant_batchnorm(full_networks.warping_module, mistake)(volume, kp_s, kp_d)["out"].numpy()
            assert fails(reference, "W_out", out, TOL_VOLUME), f"W with BatchNorm mistake {mistake!r} passed"
