"""Client parts that need no server: command-line errors, smoothing, video I/O, metadata checks."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import ASSETS
from liveportrait_triton import spec
from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client import LivePortraitClient, RequestFailed, ServerMismatch, build_request
from liveportrait_triton.client.requests import compare_tensors
from liveportrait_triton.client.smoothing import MotionSmoother, OneEuroFilter
from liveportrait_triton.keypoints import rotation_matrix
from liveportrait_triton.wire import MotionFrame

S0 = str(ASSETS / "source" / "s0.jpg")
D0 = str(ASSETS / "driving" / "d0.mp4")
D3 = ASSETS / "driving" / "d3.mp4"
UNREACHABLE = "127.0.0.1:9"      # discard port: nothing listens there


def animate(capsys, *argv) -> tuple[int, str]:
    code = main(["animate", *argv, "--quiet"])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Command-line errors: clear message, non-zero exit, nothing written


def test_source_without_a_face(tmp_path, capsys):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((320, 240, 3), 200, np.uint8))
    out = tmp_path / "out" / "result.mp4"
    out.parent.mkdir()
    code, err = animate(capsys, "--source", str(blank), "--driving", D0, "--output", str(out),
                        "--server", UNREACHABLE)
    assert code == 1 and f"no face found in the source image {blank}" in err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("what", ["missing source", "unreadable source", "missing driving", "broken driving",
                                  "missing template", "output folder", "output kind", "bad camera",
                                  "no camera"])
def test_unreadable_or_missing_files(tmp_path, capsys, what):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = {"--source": S0, "--driving": D0, "--output": str(out_dir / "r.mp4")}
    expected = {
        "missing source": ("--source", str(tmp_path / "absent.jpg"), "source image .*absent.jpg not found"),
        "unreadable source": ("--source", str(text), "is not an image OpenCV can decode"),
        "missing driving": ("--driving", str(tmp_path / "absent.mp4"), "driving video .*absent.mp4 not found"),
        "broken driving": ("--driving", str(broken), "is not a video ffmpeg can decode"),
        "missing template": ("--driving", str(tmp_path / "absent.pkl"), "template .*absent.pkl not found"),
        "output folder": ("--output", str(tmp_path / "nowhere" / "r.mp4"), "does not exist"),
        "output kind": ("--output", str(out_dir / "r.avi"), "must end in .mp4"),
        "bad camera": ("--driving", "webcam:first", "bad camera 'webcam:first': use webcam:N"),
        "no camera": ("--driving", "webcam:97", "camera 97 cannot be opened"),
    }[what]
    args[expected[0]] = expected[1]
    code, err = animate(capsys, *[x for kv in args.items() for x in kv], "--server", UNREACHABLE)
    assert code == 1
    assert __import__("re").search(expected[2], err), err
    assert list(out_dir.iterdir()) == []


def test_missing_official_face_models(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    code, err = animate(capsys, "--source", S0, "--driving", D0, "--output", str(tmp_path / "r.mp4"),
                        "--face-models", str(tmp_path / "models"), "--server", UNREACHABLE)
    assert code == 1 and "missing det_10g.onnx, 2d106det.onnx, landmark.onnx" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_unknown_option_exits_non_zero(tmp_path):
    out = tmp_path / "r.mp4"
    done = subprocess.run([sys.executable, "-m", "liveportrait_triton", "animate", "--source", S0, "--driving", D0,
                           "--output", str(out), "--no-such-option"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-option" in done.stderr
    bad_choice = subprocess.run([sys.executable, "-m", "liveportrait_triton", "animate", "--source", S0,
                                 "--driving", D0, "--output", str(out), "--animation-region", "nose"],
                                capture_output=True, text=True)
    assert bad_choice.returncode == 2 and "invalid choice: 'nose'" in bad_choice.stderr
    assert not out.exists()


def test_server_unreachable(tmp_path, capsys):
    out = tmp_path / "r.mp4"
    code, err = animate(capsys, "--source", S0, "--driving", D0, "--output", str(out), "--server", UNREACHABLE)
    assert code == 1
    assert f"no Triton server answered at grpc://{UNREACHABLE}" in err
    assert "liveportrait-triton serve --repository" in err
    assert list(tmp_path.iterdir()) == []


def test_option_values_are_checked_before_sending(tmp_path, capsys):
    code, err = animate(capsys, "--source", S0, "--driving", D0, "--output", str(tmp_path / "r.mp4"),
                        "--driving-multiplier", "50", "--server", UNREACHABLE)
    assert code == 1 and "driving_multiplier" in err and "outside" in err


# ---------------------------------------------------------------------------------------------------------------
# Smoothing


def test_one_euro_is_causal_and_reduces_jitter():
    rng = np.random.default_rng(0)
    t = np.arange(300) / 30.0
    clean = np.sin(2 * np.pi * 0.3 * t)
    noisy = clean + rng.normal(scale=0.05, size=t.shape)
    smooth = OneEuroFilter(min_cutoff=1.0, beta=0.5)
    out = np.array([float(smooth(x, 1 / 30)) for x in noisy])
    jitter = lambda x: np.sqrt(np.mean((np.diff(x) - np.diff(clean)) ** 2))    # noqa: E731 (frame-to-frame noise)
    assert jitter(out) < 0.35 * jitter(noisy)
    assert np.abs(out - clean)[30:].max() < 0.2               # and it still follows the motion
    # causal: the output up to frame k depends only on the input up to frame k
    changed = noisy.copy()
    changed[200:] += 5.0
    again = OneEuroFilter(min_cutoff=1.0, beta=0.5)
    out2 = np.array([float(again(x, 1 / 30)) for x in changed])
    assert np.array_equal(out[:200], out2[:200]) and not np.allclose(out[200:], out2[200:])
    # a constant stays exactly constant; a step is followed (no lag at the end)
    const = OneEuroFilter()
    assert all(float(const(2.5, 0.04)) == 2.5 for _ in range(10))
    step = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    values = [float(step(0.0 if i < 5 else 1.0, 0.04)) for i in range(200)]
    assert 0 < values[5] < 1 and values[-1] == pytest.approx(1.0, abs=1e-3)


def test_motion_smoother_keeps_rotations_valid():
    rng = np.random.default_rng(1)
    smoother = MotionSmoother(fps=25)
    for i in range(20):
        angles = rng.normal(scale=10, size=(3, 1)).astype(np.float32)
        frame = MotionFrame(R=rotation_matrix(*angles)[0], exp=rng.normal(size=(21, 3)).astype(np.float32),
                            t=rng.normal(size=3).astype(np.float32), scale=np.float32([1.0]))
        out = smoother.motion(frame)
        assert out.R.dtype == np.float32 and out.exp.shape == (21, 3)
        assert np.allclose(out.R @ out.R.T, np.eye(3), atol=1e-5) and np.linalg.det(out.R) == pytest.approx(1, abs=1e-5)
    assert smoother.ratio("eye", None) is None


# ---------------------------------------------------------------------------------------------------------------
# Video I/O


def test_video_reader_streams_frames():
    reader = media.VideoReader(D0)
    assert reader.info.fps == 25.0 and reader.info.size == (512, 512) and reader.info.frame_count == 78
    assert reader.info.audio_codec is None
    count = sum(1 for frame in reader if frame.shape == (512, 512, 3))
    reader.close()
    assert count == 78
    assert media.VideoReader(D3).info.audio_codec == "aac"


def test_video_writer_is_atomic_and_muxes_audio(tmp_path):
    out = tmp_path / "clip.mp4"
    frames = [np.full((64, 96, 3), 10 * i, np.uint8) for i in range(15)]
    with media.VideoWriter(out, (96, 64), 30.0, audio_from=D3) as writer:
        for f in frames:
            writer.write(f)
        assert not out.exists()                      # only a temporary file exists while writing
    info = media.probe_video(out)
    assert info["frames"] == 15 and info["fps"] == 30.0 and info["size"] == (96, 64)
    assert info["audio_codec"] == "aac"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    broken = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with media.VideoWriter(broken, (96, 64), 30.0) as writer:
            writer.write(frames[0])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    with pytest.raises(media.MediaError, match="even"):
        media.VideoWriter(tmp_path / "odd.mp4", (95, 64), 30.0)


def audio_seconds(path) -> float:
    """Duration of a file's audio stream, from ffmpeg decoding it."""
    import re
    import imageio_ffmpeg
    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path), "-map", "0:a:0", "-f", "null", "-"],
                          capture_output=True, text=True)
    return float(sum(x * float(t) for x, t in zip((3600, 60, 1), re.findall(r"time=(\d+):(\d+):([\d.]+)",
                                                                             done.stderr)[-1])))


@pytest.mark.parametrize("audio_s", [1.0, 2.5])
def test_every_frame_is_kept_whatever_the_audio_length(tmp_path, audio_s):
    """40 frames at 25 fps (1.6 s) with audio of 1 s or 2.5 s: 40 frames out, audio cut or padded to 1.6 s."""
    import generated_media
    driving = generated_media.write_video(tmp_path / "driving.mp4", [np.full((64, 96, 3), 5 * i, np.uint8)
                                                                      for i in range(40)], 25.0, audio_seconds=audio_s)
    out = tmp_path / "out.mp4"
    with media.VideoWriter(out, (96, 64), 25.0, audio_from=driving) as writer:
        for i in range(40):
            writer.write(np.full((64, 96, 3), 6 * i, np.uint8))
    assert media.probe_video(out) == {"frames": 40, "fps": 25.0, "size": (96, 64), "audio_codec": "aac"}
    assert audio_seconds(out) == pytest.approx(1.6, abs=0.05)       # one AAC frame is 23 ms
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driving.mp4", "out.mp4"]


def test_outputs_follow_the_umask(tmp_path):
    """Written files get 0o666 less the umask (the temporary files they start as are 0600)."""
    previous = os.umask(0o027)
    try:
        image = media.write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
        with media.VideoWriter(tmp_path / "v.mp4", (16, 16), 10.0) as writer:
            writer.write(np.zeros((16, 16, 3), np.uint8))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(image).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "v.mp4").st_mode) == 0o640


def test_prefetcher_runs_ahead_and_reports_errors():
    seen = []

    def prepare(i, item):
        seen.append(threading.current_thread().name)
        if item == 3:
            raise ValueError("bad frame 3")
        return item * 10

    prefetch = media.Prefetcher(range(10), prepare, depth=2, name="test-prefetch")
    got = []
    with pytest.raises(ValueError, match="bad frame 3"):
        for value in prefetch:
            got.append(value)
    prefetch.close()
    assert got == [0, 10, 20] and set(seen) == {"test-prefetch"}
    # memory stays bounded: the thread runs at most `depth` (+1 in hand) items ahead of a slow consumer
    produced = []
    endless = media.Prefetcher(iter(int, 1), lambda i, x: produced.append(i) or i, depth=2)
    items = iter(endless)
    assert next(items) == 0
    time.sleep(0.5)
    assert len(produced) <= 1 + 2 + 1
    endless.close()                         # stopping early does not hang on the full queue


def test_image_write_is_atomic(tmp_path):
    path = media.write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with pytest.raises(media.MediaError, match="cannot encode"):
        media.write_image(tmp_path / "a.nosuchformat", np.zeros((8, 8, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# ---------------------------------------------------------------------------------------------------------------
# Metadata check against the spec


def served_metadata(model_spec, batched=True):
    tensor = lambda t: {"name": t.name, "datatype": t.dtype, "shape": [str(d) for d in ((-1,) if batched else ()) + t.shape]}  # noqa: E731,E501
    return [tensor(t) for t in model_spec.inputs], [tensor(t) for t in model_spec.outputs]


def test_metadata_comparison():
    inputs, outputs = served_metadata(spec.PIPELINE_SPEC)
    compare_tensors("input", inputs, spec.PIPELINE_SPEC.inputs, True, "liveportrait")
    compare_tensors("output", outputs, spec.PIPELINE_SPEC.outputs, True, "liveportrait")
    wrong_shape = [dict(t, shape=["-1", "512", "512", "3"]) if t["name"] == "source" else t for t in inputs]
    with pytest.raises(ServerMismatch, match="input 'source' is UINT8 \\[-1, 512, 512, 3\\]"):
        compare_tensors("input", wrong_shape, spec.PIPELINE_SPEC.inputs, True, "liveportrait")
    with pytest.raises(ServerMismatch, match="has outputs \\['image'\\]"):
        compare_tensors("output", outputs[:1], spec.PIPELINE_SPEC.outputs, True, "liveportrait")
    wrong_type = [dict(t, datatype="FP16") if t["name"] == "image" else t for t in outputs]
    with pytest.raises(ServerMismatch, match="FP16"):
        compare_tensors("output", wrong_type, spec.PIPELINE_SPEC.outputs, True, "liveportrait")


# ---------------------------------------------------------------------------------------------------------------
# Requests: one builder for every protocol; local mistakes are not disguised as server failures


def test_one_request_builder_for_every_protocol():
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    import tritonclient.http as httpclient
    tensors = {"source": np.zeros((256, 256, 3), np.uint8), "source_eye_ratio": [0.3, 0.31]}
    for module in (grpcclient, httpclient, aioclient):
        request = build_request(module, spec.PIPELINE, tensors, request_id="0:start", sequence_id=7, start=True,
                                options={"stitching": False})
        shapes = {i.name(): (i.shape(), i.datatype()) for i in request["inputs"]}
        assert shapes == {"source": ([1, 256, 256, 3], "UINT8"), "source_eye_ratio": ([1, 2], "FP32")}
        assert [o.name() for o in request["outputs"]] == list(spec.PIPELINE_SPEC.output_names)
        assert (request["sequence_id"], request["sequence_start"], request["sequence_end"]) == (7, True, False)
        assert request["parameters"] == {"stitching": False} and request["request_id"] == "0:start"
    motion = spec.submodel_specs()[spec.MOTION]
    batch = build_request(grpcclient, spec.MOTION, {"image": np.zeros((3, 3, 256, 256), np.float32)},
                          model_spec=motion, batched=True)
    assert batch["inputs"][0].shape() == [3, 3, 256, 256] and "sequence_id" not in batch


def test_a_wrong_input_is_a_local_error_and_a_refusal_keeps_its_cause():
    from tritonclient.utils import InferenceServerException
    client = LivePortraitClient(UNREACHABLE, check=False)
    with pytest.raises(ValueError, match="input 'source': expected shape \\[256, 256, 3\\], got \\[10, 10, 3\\]"):
        client.infer({"source": np.zeros((10, 10, 3), np.uint8)}, 1, start=True)
    with pytest.raises(RequestFailed) as failed:
        client.infer({"source": np.zeros((256, 256, 3), np.uint8)}, 1, start=True)
    assert isinstance(failed.value.__cause__, InferenceServerException)
    client.close()


def test_animate_settings_are_one_object_for_the_command_the_page_and_the_library():
    """The command's flags and the page's controls build the same AnimateSettings; every page control names a
    setting; the limits the page shows are the ones the settings enforce (crop.py)."""
    import argparse
    from liveportrait_triton import crop as C
    from liveportrait_triton.client import animate as A
    from liveportrait_triton.client import ui
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    flags = parser.parse_args(["--source", "s.png", "--driving", "d.mp4", "--output", "o.mp4", "--no-relative-motion",
                               "--source-scale", "2.8", "--faces", "2", "--in-flight", "3"])
    from_flags = A.AnimateSettings.from_args(flags)
    from_page = A.AnimateSettings.from_values(source="s.png", driving="d.mp4", output="o.mp4", relative_motion=False,
                                              source_scale=2.8, faces="2", in_flight=3)
    assert from_flags == from_page and from_page.options == {"relative_motion": False} and from_page.faces == 2
    assert from_page.pipeline_options("image") == {"relative_motion": False, "driving_type": "image"}
    animal_flags = parser.parse_args(["--source", "s.png", "--driving", "d.npz", "--output", "o.mp4", "--subject",
                                      "animal", "--source-box", "1,2,30,40", "--stitching"])
    animal_page = A.AnimateSettings.from_values(source="s.png", driving="d.npz", output="o.mp4", subject="animal",
                                                source_box="1,2,30,40", stitching=True)
    assert A.AnimateSettings.from_args(animal_flags) == animal_page
    assert animal_page.source_box == C.PixelBox(1, 2, 30, 40)
    defaults = {c.name: c.default for c in ui.ANIMATE_CONTROLS}
    A.AnimateSettings.from_values(source="s", driving="d", output="o", **defaults)     # every control is a setting
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bogus'\]"):
        A.AnimateSettings.from_values(source="s", driving="d", output="o", bogus=1)
    scale = next(c for c in ui.ANIMATE_CONTROLS if c.name == "source_scale")
    assert scale.bounds == C.SCALE_BOUNDS
    with pytest.raises(ValueError, match=r"crop scale must lie in \[1, 4\]"):
        A.AnimateSettings.from_values(source="s", driving="d", output="o", source_scale=C.SCALE_BOUNDS[1] + 0.5)
    edit_scale = next(c for c in ui.EDIT_CROP_CONTROLS if c.name == "source_scale")
    assert edit_scale.bounds == C.RETARGETING_SCALE_BOUNDS and edit_scale.default == C.RETARGETING_SCALE
