"""Portrait editing: each control against the official formulas, keypoint by keypoint; validation; the server core."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_images_close
from liveportrait_triton import editing, spec
from liveportrait_triton import keypoints as K
from liveportrait_triton.backend.outcomes import Failure, ServedFrame
from liveportrait_triton.backend.pipeline_model import PipelineCore
from liveportrait_triton.backend.requests import RawRequest, parse_request
from liveportrait_triton.backend.sequences import SequenceStore
from liveportrait_triton.pipeline import Animator, DrivingFrame, Edit, InputError, TorchRunner

RNG = np.random.default_rng(14)

# The official `update_delta_new_*` formulas written out as (keypoint, axis) -> coefficient per unit of the
# control's value, for value > 0 and value < 0, independently of editing.EXPRESSION_TERMS. The vertical gaze is
# its own term plus the blink term (blink = -value / 2).
Y_GAZE = {(11, 1): -0.001, (15, 1): -0.001}
BLINK = {(11, 1): -0.001, (13, 1): 0.0003, (15, 1): -0.001, (16, 1): 0.0003}
OFFICIAL = {
    "eyeball_direction_x": ({(11, 0): 0.0007, (15, 0): 0.001}, {(11, 0): 0.001, (15, 0): 0.0007}),
    "eyeball_direction_y": (2 * ({k: Y_GAZE.get(k, 0) - BLINK[k] / 2 for k in BLINK},)),
    "smile": 2 * ({(20, 1): -0.01, (14, 1): -0.02, (17, 1): 0.0065, (17, 2): 0.003, (13, 1): -0.00275,
                   (16, 1): -0.00275, (3, 1): -0.0035, (7, 1): -0.0035},),
    "wink": 2 * ({(11, 1): 0.001, (13, 1): -0.0003, (17, 0): 0.0003, (17, 1): 0.0003, (3, 1): -0.0003},),
    "eyebrow": ({(1, 1): 0.001, (2, 1): -0.001},
                {(1, 0): -0.001, (2, 0): 0.001, (1, 1): 0.0003, (2, 1): -0.0003}),
    "lip_variation_zero": 2 * ({(19, 0): 1.0},),
    "lip_variation_one": 2 * ({(14, 1): 0.001, (3, 1): -0.0005, (7, 1): -0.0005, (17, 2): -0.0005},),
    "lip_variation_two": 2 * ({(20, 2): -0.001, (20, 1): -0.001, (14, 1): -0.001},),
    "lip_variation_three": 2 * ({(19, 1): 0.001, (19, 2): 0.0001, (17, 1): -0.0001},),
    "mov_x": 2 * ({(5, 0): -1.0},),
    "mov_y": 2 * ({(5, 1): 1.0},),
}


def source_motion() -> K.MotionInfo:
    pitch, yaw, roll = np.float32([4.0]), np.float32([-9.0]), np.float32([2.5])
    return K.MotionInfo(R=K.rotation_matrix(pitch, yaw, roll), t=np.float32([[0.02, -0.03, 0.4]]),
                        exp=RNG.normal(0, 0.02, (1, 21, 3)).astype(np.float32), scale=np.float32([[1.3]]),
                        kp=RNG.normal(0, 0.3, (1, 21, 3)).astype(np.float32), pitch=pitch, yaw=yaw, roll=roll)


def test_the_table_covers_every_expression_control_and_nothing_else():
    assert set(OFFICIAL) == set(editing.EXPRESSION_TERMS)
    assert set(editing.EXPRESSION_TERMS) | {"eye_ratio", "lip_ratio", "pitch", "yaw", "roll", "mov_z"} \
        == set(spec.EDIT_CONTROLS)


@pytest.mark.parametrize("control", sorted(OFFICIAL))
@pytest.mark.parametrize("end", [0, 1])
def test_each_expression_control_moves_only_its_keypoints_by_the_official_coefficients(control, end):
    low, high = spec.EDIT_CONTROLS[control].bounds
    value = (low, high)[end] * 0.7
    if value == 0:
        pytest.skip(f"{control} has no values on that side of 0")
    source = source_motion()
    moved = editing.edited_expression(source.exp, {control: value}) - source.exp
    coefficients = OFFICIAL[control][0 if value > 0 else 1]
    expected = np.zeros((1, 21, 3), np.float32)
    for (keypoint, axis), coefficient in coefficients.items():
        expected[0, keypoint, axis] = value * coefficient
    np.testing.assert_allclose(moved, expected, rtol=1e-4, atol=1e-7)
    assert set(zip(*np.nonzero(moved[0]))) == set(coefficients), f"{control} touched other entries"
    # the keypoints move in the final formula by scale * offset (mov_z 1, no rotation change)
    x = editing.edited_keypoints(source, {control: value})
    base = editing.edited_keypoints(source, {})
    np.testing.assert_allclose(x - base, 1.3 * expected, rtol=1e-3, atol=2e-6)


def test_no_edit_is_the_source_pose_with_its_full_translation():
    source = source_motion()
    x = editing.edited_keypoints(source, spec.parse_edit({}))
    want = source.scale[:, :, None] * (source.kp @ source.R + source.exp) + source.t[:, None, :]
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)
    # the official editing formula adds tz too, which the source keypoints x_s do not carry
    np.testing.assert_allclose(x - source.transformed(), np.broadcast_to([0, 0, 0.4], (1, 21, 3)), atol=1e-5)


def rotation(pitch, yaw, roll) -> np.ndarray:
    """R = (Rz Ry Rx)^T from degrees, written out directly."""
    p, y, r = np.radians([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return (rz @ ry @ rx).T


@pytest.mark.parametrize("offsets", [(12, 0, 0), (0, -20, 0), (0, 0, 15), (-7, 11, -3)])
def test_pose_offsets_add_to_the_source_angles(offsets):
    source = source_motion()
    controls = dict(zip(("pitch", "yaw", "roll"), offsets))
    x = editing.edited_keypoints(source, controls)
    R = rotation(4.0 + offsets[0], -9.0 + offsets[1], 2.5 + offsets[2])
    want = 1.3 * (source.kp[0] @ R + source.exp[0]) + source.t[0]
    np.testing.assert_allclose(x[0], want, rtol=1e-4, atol=1e-5)


def test_mov_z_scales_the_keypoints_about_the_translation():
    source = source_motion()
    base, scaled = editing.edited_keypoints(source, {}), editing.edited_keypoints(source, {"mov_z": 1.15})
    np.testing.assert_allclose(scaled - source.t[:, None], 1.15 * (base - source.t[:, None]), rtol=1e-5, atol=1e-6)


def test_ratio_inputs_and_slider_start_values():
    np.testing.assert_allclose(editing.eye_ratio_input(np.float32([0.3, 0.32]), 0.5), [[0.3, 0.32, 0.5]])
    np.testing.assert_allclose(editing.lip_ratio_input(np.float32([0.05]), 0.4), [[0.05, 0.4]])
    assert editing.slider_start_values(np.float32([0.301, 0.322]), np.float32([0.0449])) == (0.31, 0.04)


@pytest.mark.parametrize("control", sorted(spec.EDIT_CONTROLS))
def test_out_of_range_values_name_the_control_and_its_range(control):
    low, high = spec.EDIT_CONTROLS[control].bounds
    for bad in (low - 0.5, high + 0.5):
        with pytest.raises(spec.OptionError, match=rf"edit control '{control}'=.* is outside \[{low}, {high}\]"):
            spec.parse_edit({control: bad})
    assert spec.parse_edit({control: high})[control] == high


# -- requests ------------------------------------------------------------------------------------------------

def crop(value: int = 0) -> np.ndarray:
    return np.full((1, 256, 256, 3), value, np.uint8)


def raw(corrid=1, start=False, end=False, parameters=None, **tensors) -> RawRequest:
    return RawRequest(corrid=corrid, start=start, end=end, tensors=tensors, parameters=parameters or {})


def test_edit_requests_parse():
    request = parse_request(raw(parameters={"edit": True, "smile": 0.5, "yaw": "10"}))
    assert request.frame is None and request.edit.controls["smile"] == 0.5 and request.edit.controls["yaw"] == 10
    start = parse_request(raw(start=True, source=crop(), parameters={"edit": "true", "stitching": False,
                                                                     "wink": 3}))
    assert start.options["stitching"] is False and start.edit.controls["wink"] == 3
    assert parse_request(raw(start=True, source=crop())).edit is None


@pytest.mark.parametrize("request_, message", [
    (raw(parameters={"smile": 0.5}), r"edit control\(s\) \['smile'\] need the parameter edit=true"),
    (raw(parameters={"edit": True, "smile": 5}), r"edit control 'smile'=5.0 is outside \[-0.3, 1.3\]"),
    (raw(parameters={"edit": True, "smile": True}), "'smile' must be a number"),
    (raw(parameters={"edit": True, "grin": 1}), r"unknown option\(s\) \['grin'\]"),
    (raw(parameters={"edit": True, "stitching": False}), r"options \['stitching'\] may only be sent with the START"),
    (raw(driving=crop(), parameters={"edit": True}), r"an edit request carries no driving input, got \['driving'\]"),
])
def test_bad_edit_requests_are_refused_with_the_reason(request_, message):
    with pytest.raises((InputError, spec.OptionError), match=message):
        parse_request(request_)


# -- the core on real (tiny) networks -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(tiny_networks):
    return TorchRunner(tiny_networks)


@pytest.fixture(scope="module")
def astronaut_crop() -> np.ndarray:
    import cv2
    from skimage import data
    return cv2.resize(data.astronaut()[0:300, 110:410], (256, 256), interpolation=cv2.INTER_AREA)


def expected_edit(runner, source, controls, eye=None, lip=None, stitching=True) -> np.ndarray:
    """The edit computed from the pieces: M's source motion, the formula, the MLPs, stitching, W+G."""
    animator = Animator(runner)
    [state] = animator.register_sources([source], [spec.parse_options({})])
    x_s = state.x_s
    x = editing.edited_keypoints(state.source, controls)
    if controls.get("eye_ratio") is not None:
        x = x + runner.run(spec.RETARGET_EYE, {"kp_source": x_s, "eye_ratio": editing.eye_ratio_input(
            eye, controls["eye_ratio"])})["delta"].reshape(1, 21, 3)
    if controls.get("lip_ratio") is not None:
        x = x + runner.run(spec.RETARGET_LIP, {"kp_source": x_s, "lip_ratio": editing.lip_ratio_input(
            lip, controls["lip_ratio"])})["delta"].reshape(1, 21, 3)
    if stitching:
        x = K.apply_stitching(x, runner.run(spec.STITCHING, {"kp_source": x_s, "kp_driving": x})["delta"])
    return animator.render(state.feature_volume, x_s, x)[0]


def test_core_serves_edits_batched_with_frames_from_the_cached_source(runner, astronaut_crop):
    other = np.ascontiguousarray(astronaut_crop[:, ::-1])
    core = PipelineCore(runner, SequenceStore(60))
    eye, lip = np.float32([[0.3, 0.28]]), np.float32([[0.05]])
    [started] = core.process([raw(1, start=True, source=astronaut_crop[None], source_eye_ratio=eye,
                                  source_lip_ratio=lip)])
    assert started.frame_index == -1 and started.image is None
    controls = spec.parse_edit({"smile": 0.8, "yaw": 12, "eye_ratio": 0.6, "lip_ratio": 0.3})
    outcomes = core.process([
        raw(1, parameters={"edit": True, "smile": 0.8, "yaw": 12, "eye_ratio": 0.6, "lip_ratio": 0.3}),
        raw(2, start=True, source=other[None], driving=astronaut_crop[None]),
    ])
    assert [type(o) for o in outcomes] == [ServedFrame, ServedFrame]
    assert outcomes[0].frame_index == -1 and outcomes[1].frame_index == 0
    want = expected_edit(runner, astronaut_crop, controls, eye, lip)
    assert_images_close(outcomes[0].image, want, "edited image")
    unedited = expected_edit(runner, astronaut_crop, spec.parse_edit({}))
    assert np.abs(want.astype(int) - unedited).mean() > 0.5, "the edit changes the picture"
    # an edit leaves the sequence's driving state: its first driving frame is still frame 0
    [frame] = core.process([raw(1, driving=other[None], driving_eye_ratio=np.float32([[0.3]]))])
    assert frame.frame_index == 0


def test_edit_without_the_source_ratios_is_refused_alone(runner, astronaut_crop):
    core = PipelineCore(runner, SequenceStore(60))
    outcomes = core.process([raw(3, start=True, source=astronaut_crop[None]),
                             raw(4, start=True, source=astronaut_crop[None], parameters={"edit": True,
                                                                                         "pitch": -10})])
    assert isinstance(outcomes[0], ServedFrame) and isinstance(outcomes[1], ServedFrame)
    assert outcomes[1].image is not None
    outcomes = core.process([raw(3, parameters={"edit": True, "eye_ratio": 0.5}),
                             raw(4, parameters={"edit": True, "wink": 20})])
    assert isinstance(outcomes[0], Failure) and outcomes[0].caller_fault
    assert "eye_ratio needs the source's eye ratio: send source_eye_ratio" in outcomes[0].message
    assert isinstance(outcomes[1], ServedFrame)
    assert_images_close(outcomes[1].image, expected_edit(runner, astronaut_crop, spec.parse_edit({"wink": 20})),
                        "the other sequence's edit")


def test_animator_edit_matches_driving_free_identity(runner, astronaut_crop):
    """An edit is rendered like any frame: the batch of an edit and a driving frame equals each alone."""
    animator = Animator(runner)
    s1, s2 = animator.register_sources([astronaut_crop, astronaut_crop], [spec.parse_options({})] * 2)
    edit = Edit(spec.parse_edit({"eyebrow": -20}))
    together = animator.animate([s1, s2], [edit, DrivingFrame(crop=astronaut_crop)])
    [alone] = Animator(runner).animate([s1], [edit])
    assert_images_close(together[0], alone, "edit in a mixed batch")
    assert s1.frames_done == 0 and s2.frames_done == 1
