"""Source videos (v2v): the official rules as maths, and source-video sequences in the server core."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_images_close
from liveportrait_triton import keypoints as K
from liveportrait_triton import source_video as SV
from liveportrait_triton import spec
from liveportrait_triton.backend.outcomes import Failure, ServedFrame
from liveportrait_triton.backend.pipeline_model import PipelineCore
from liveportrait_triton.backend.requests import RawRequest
from liveportrait_triton.backend.sequences import SequenceStore
from liveportrait_triton.lip_array import LIP_ARRAY
from liveportrait_triton.pipeline import Animator, TorchRunner

RNG = np.random.default_rng(7)


def smoothed_by_least_squares(z: np.ndarray, r: float, q: float) -> np.ndarray:
    """The smoother's means solved directly: they minimise (x0 - z0)^2 / 1 + sum (z_t - x_t)^2 / r +
    sum (x_t+1 - x_t)^2 / q (a linear-Gaussian random walk with prior N(z0, 1)), one column at a time."""
    T = len(z)
    A = np.diag(np.full(T, 1 / r))
    A[0, 0] += 1.0
    for t in range(T - 1):
        A[t, t] += 1 / q
        A[t + 1, t + 1] += 1 / q
        A[t, t + 1] -= 1 / q
        A[t + 1, t] -= 1 / q
    b = z / r
    b[0] += z[0]
    return np.linalg.solve(A, b)


def test_kalman_smoother_is_the_official_random_walk_smoother():
    z = np.cumsum(RNG.normal(0, 0.01, (15, 4)), axis=0)
    out = SV.kalman_smooth(z, 3e-4, 1e-5)
    want = np.stack([smoothed_by_least_squares(z[:, j], 3e-4, 1e-5) for j in range(4)], axis=1)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-6)
    assert np.abs(out - z).max() > 1e-3, "smoothing moved the values"
    np.testing.assert_allclose(SV.kalman_smooth(np.ones((6, 2, 3))), np.ones((6, 2, 3)), atol=1e-6)


def test_frame_count_and_audio_follow_the_official_rules():
    assert SV.frame_count(40, 25, driving_is_video=True) == 25
    assert SV.frame_count(20, 25, driving_is_video=True) == 20
    assert SV.frame_count(20, 1, driving_is_video=False) == 20
    assert SV.audio_source(True, True) == "driving" and SV.audio_source(False, True) == "source"
    assert SV.audio_source(False, False) is None


def motions(T: int) -> K.MotionInfo:
    angles = [RNG.uniform(-20, 20, T).astype(np.float32) for _ in range(3)]
    return K.MotionInfo(R=K.rotation_matrix(*angles), t=RNG.normal(0, 0.05, (T, 3)).astype(np.float32),
                        exp=RNG.normal(0, 0.02, (T, 21, 3)).astype(np.float32),
                        scale=RNG.uniform(1, 1.5, (T, 1)).astype(np.float32),
                        kp=RNG.normal(0, 0.3, (T, 21, 3)).astype(np.float32), pitch=angles[0], yaw=angles[1],
                        roll=angles[2])


def test_motion_targets_relative_absolute_and_image_driving():
    source, driving = motions(5), motions(8)
    R, exp = SV.motion_targets(source, driving, relative=True, driving_is_video=True, lip_array=LIP_ARRAY,
                               smooth=False)
    for i in range(5):
        np.testing.assert_allclose(R[i], driving.R[i] @ driving.R[0].T @ source.R[i], atol=1e-5)
        np.testing.assert_allclose(exp[i], source.exp[i] + driving.exp[i] - driving.exp[0], atol=1e-6)
    R_s, exp_s = SV.motion_targets(source, driving, True, True, LIP_ARRAY)
    np.testing.assert_allclose(R_s, SV.kalman_smooth(R), atol=1e-6)
    np.testing.assert_allclose(exp_s, SV.kalman_smooth(exp), atol=1e-6)
    R, exp = SV.motion_targets(source, driving, relative=False, driving_is_video=True, lip_array=LIP_ARRAY,
                               smooth=False)
    np.testing.assert_allclose(R, driving.R[:5])
    np.testing.assert_allclose(exp, driving.exp[:5])
    R, exp = SV.motion_targets(source, driving, relative=True, driving_is_video=False, lip_array=LIP_ARRAY)
    np.testing.assert_allclose(R, source.R)
    np.testing.assert_allclose(exp, source.exp + driving.exp[:1] - LIP_ARRAY, atol=1e-6)


def test_frame_motion_takes_only_the_official_entries_and_keeps_the_source_scale():
    source = motions(1)
    R_target, exp_target = motions(1).R, RNG.normal(0, 0.05, (1, 21, 3)).astype(np.float32)
    t_driving = np.float32([[0.3, 0.2, 0.9]])
    R_new, delta, scale, t_new = SV.frame_motion(source, R_target, exp_target, t_driving, relative=True)
    taken = np.zeros((21, 3), bool)
    taken[[1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]] = True
    taken[3:5, 1] = taken[5, 2] = taken[8, 2] = True
    taken[9, 1:] = True
    np.testing.assert_array_equal(delta[0][taken], exp_target[0][taken])
    np.testing.assert_array_equal(delta[0][~taken], source.exp[0][~taken])
    np.testing.assert_array_equal(R_new, R_target)
    np.testing.assert_array_equal(scale, source.scale)
    np.testing.assert_allclose(t_new, [[source.t[0, 0], source.t[0, 1], 0]])
    _, _, _, t_abs = SV.frame_motion(source, R_target, exp_target, t_driving, relative=False)
    np.testing.assert_allclose(t_abs, [[0.3, 0.2, 0]])
    R_lip, delta_lip, _, _ = SV.frame_motion(source, R_target, exp_target, t_driving, True, "lip")
    np.testing.assert_array_equal(R_lip, source.R)
    changed = np.nonzero(np.any(delta_lip[0] != source.exp[0], axis=1))[0]
    assert set(changed) <= {6, 12, 14, 17, 19, 20}          # the official lip keypoints


# -- the core ------------------------------------------------------------------------------------------------

class CountingRunner:
    """A runner that counts the batches of each model it runs."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def run(self, model, inputs):
        self.calls.append((model, len(next(iter(inputs.values())))))
        return self.runner.run(model, inputs)


@pytest.fixture(scope="module")
def frames():
    import cv2
    from skimage import data
    face = data.astronaut()[0:300, 110:410]
    return [cv2.resize(np.roll(face, 6 * k, axis=1), (256, 256), interpolation=cv2.INTER_AREA) for k in range(3)]


def motion_inputs(R, exp, t=np.zeros(3, np.float32)) -> dict:
    return {"motion_R": np.float32(R)[None], "motion_exp": np.float32(exp)[None], "motion_t": np.float32(t)[None],
            "motion_scale": np.ones((1, 1), np.float32)}


def raw(corrid=1, start=False, end=False, parameters=None, **tensors) -> RawRequest:
    return RawRequest(corrid=corrid, start=start, end=end, tensors=tensors, parameters=parameters or {})


def expected_frame(runner, crop, R, exp) -> np.ndarray:
    animator = Animator(runner)
    [state] = animator.register_sources([crop], [spec.parse_options({"source_video": True})])
    x = K.compose_keypoints(state.source.kp, *SV.frame_motion(state.source, R, exp, np.zeros(3), True))
    x = K.apply_stitching(x, runner.run(spec.STITCHING, {"kp_source": state.x_s, "kp_driving": x})["delta"])
    return animator.render(state.feature_volume, state.x_s, x)[0]


def test_source_video_frames_use_their_own_source_batched_across_sequences(tiny_networks, frames):
    runner = CountingRunner(TorchRunner(tiny_networks))
    core = PipelineCore(runner, SequenceStore(60))
    targets = [(K.rotation_matrix([5.0 * k], [0.0], [0.0])[0], RNG.normal(0, 0.01, (21, 3))) for k in range(3)]
    options = {"source_video": True}
    first = core.process([
        raw(1, start=True, source=frames[0][None], parameters=options, **motion_inputs(*targets[0])),
        raw(2, start=True, source=frames[2][None], parameters=options)])
    assert [o.frame_index for o in first] == [0, -1]
    runner.calls.clear()
    second = core.process([raw(1, source=frames[1][None], **motion_inputs(*targets[1])),
                           raw(2, source=frames[2][None], end=True, **motion_inputs(*targets[2]))])
    assert [type(o) for o in second] == [ServedFrame, ServedFrame] and [o.frame_index for o in second] == [1, 0]
    assert (spec.APPEARANCE, 2) in runner.calls and [c for c in runner.calls if c[0] == spec.APPEARANCE] == [
        (spec.APPEARANCE, 2)], "both sequences' source frames went through F in one batch"
    assert [c for c in runner.calls if c[0] == spec.GENERATOR] == [(spec.GENERATOR, 2)]
    plain = TorchRunner(tiny_networks)
    assert_images_close(first[0].image, expected_frame(plain, frames[0], *targets[0]), "sequence 1 frame 0")
    assert_images_close(second[0].image, expected_frame(plain, frames[1], *targets[1]), "sequence 1 frame 1")
    assert_images_close(second[1].image, expected_frame(plain, frames[2], *targets[2]), "sequence 2 frame 0")


def test_source_video_requests_are_checked(tiny_networks, frames):
    core = PipelineCore(TorchRunner(tiny_networks), SequenceStore(60))
    core.process([raw(5, start=True, source=frames[0][None], parameters={"source_video": True}),
                  raw(6, start=True, source=frames[0][None])])
    outcomes = core.process([
        raw(5, **motion_inputs(np.eye(3), np.zeros((21, 3)))),
        raw(6, source=frames[1][None], driving=frames[1][None]),
    ])
    assert isinstance(outcomes[0], Failure) and "carries its own `source` crop" in outcomes[0].message
    assert isinstance(outcomes[1], Failure) and "['source'] may only be sent with the START request" \
        in outcomes[1].message
    outcomes = core.process([raw(5, source=frames[1][None], driving=frames[1][None]),
                             raw(5, parameters={"edit": True, "smile": 0.5}),
                             raw(6, driving=frames[1][None])])
    assert "not a `driving` crop" in outcomes[0].message and "edits apply to a source image" in outcomes[1].message
    assert isinstance(outcomes[2], ServedFrame), "the other sequence is served"


# -- animate --source VIDEO on the real server ----------------------------------------------------------------

def write_video(path, frames, fps, with_audio: bool):
    """An H.264 mp4 of RGB frames; with_audio adds a sine tone (AAC) generated by ffmpeg."""
    import subprocess

    import imageio_ffmpeg
    from liveportrait_triton.client import media
    silent = path.with_name(path.stem + "_silent.mp4")
    writer = media.VideoWriter(silent if with_audio else path, frames[0].shape[1::-1], fps)
    for frame in frames:
        writer.write(frame)
    writer.close()
    if with_audio:
        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
        subprocess.run([ffmpeg, "-v", "error", "-y", "-i", str(silent), "-f", "lavfi", "-i",
                        "sine=frequency=440:duration=5", "-c:v", "copy", "-c:a", "aac", "-shortest", str(path)],
                       check=True)
    return path


@pytest.fixture(scope="module")
def v2v_media(tmp_path_factory):
    from skimage import data
    work = tmp_path_factory.mktemp("v2v")
    portrait = np.ascontiguousarray(data.astronaut()[:, 40:472])        # 512 x 432, even sides
    source = [np.roll(portrait, 3 * k, axis=1) for k in range(6)]
    blank = np.full_like(portrait, 100)
    with_gap = source[:2] + [blank, blank] + source[4:]
    driving = [np.roll(portrait, -4 * k, axis=0) for k in range(8)]
    return {"source": write_video(work / "source.mp4", source, 10, with_audio=False),
            "source_with_audio": write_video(work / "source_audio.mp4", source, 10, with_audio=True),
            "gap": write_video(work / "gap.mp4", with_gap, 10, with_audio=False),
            "driving": write_video(work / "driving.mp4", driving, 10, with_audio=True),
            "portrait": portrait}


def run_animate(capsys, server, *argv):
    from liveportrait_triton.cli import main
    code = main(["animate", *map(str, argv), "--server", server.grpc_url, "--quiet"])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.server
def test_v2v_frame_count_fps_and_driving_audio(capsys, tiny_server, v2v_media, tmp_path):
    from liveportrait_triton.client import media
    out = tmp_path / "v2v.mp4"
    code, err = run_animate(capsys, tiny_server, "--source", v2v_media["source"], "--driving", v2v_media["driving"],
                            "--output", out)
    assert code == 0, err
    # min(6 source, 8 driving) frames, at the source's frame rate, with the driving video's audio
    assert media.probe_video(out) == {"frames": 6, "fps": 10.0, "size": (432, 512), "audio_codec": "aac"}
    frames = [f.copy() for f in media.VideoReader(out)]
    source = [f.copy() for f in media.VideoReader(v2v_media["source"])]
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, source)), "every frame animated"


@pytest.mark.server
def test_v2v_with_a_template_keeps_the_source_audio(capsys, tiny_server, v2v_media, tmp_path):
    from liveportrait_triton.client import media
    from liveportrait_triton.client.templates import MotionTemplate, save_npz
    n = 4
    template = MotionTemplate(fps=25, R=K.rotation_matrix(np.zeros(n), np.linspace(0, 15, n), np.zeros(n)),
                              exp=np.zeros((n, 21, 3), np.float32), t=np.zeros((n, 3), np.float32),
                              scale=np.ones((n, 1), np.float32))
    path = save_npz(template, tmp_path / "t.npz")
    out = tmp_path / "v2v_t.mp4"
    code, err = run_animate(capsys, tiny_server, "--source", v2v_media["source_with_audio"], "--driving", path,
                            "--output", out)
    assert code == 0, err
    assert media.probe_video(out) == {"frames": 4, "fps": 10.0, "size": (432, 512), "audio_codec": "aac"}


@pytest.mark.server
def test_v2v_source_frames_without_a_face_are_reported_and_kept(capsys, tiny_server, v2v_media, tmp_path):
    from liveportrait_triton.client import media
    out = tmp_path / "gap.mp4"
    from liveportrait_triton.cli import main
    code = main(["animate", "--source", str(v2v_media["gap"]), "--driving", str(v2v_media["driving"]),
                 "--output", str(out), "--server", tiny_server.grpc_url])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "note: 2 source frame(s) have no face and are written unchanged: [2, 3]" in err
    frames = [f.copy() for f in media.VideoReader(out)]
    source = [f.copy() for f in media.VideoReader(v2v_media["gap"])]
    assert len(frames) == 6
    assert np.abs(frames[2].astype(int) - source[2]).mean() < 2, "a face-less frame is the source frame"
    assert np.abs(frames[4].astype(int) - source[4]).mean() > 1, "frames with a face are animated"
