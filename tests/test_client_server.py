"""End to end against the real bundled Triton server (tiny networks): files in, finished videos and images out."""
from __future__ import annotations

import asyncio
import subprocess

import cv2
import numpy as np
import pytest

from conftest import ASSETS
from liveportrait_triton import crop as C
from liveportrait_triton import spec
from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client import (AnimationStream, AsyncLivePortraitClient, DrivingFrame, LivePortraitClient,
                                               ServerUnavailable, SourceInput, new_sequence_id)
from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
from liveportrait_triton.client.templates import load_template

pytestmark = pytest.mark.server

SOURCE = ASSETS / "source"
DRIVING = ASSETS / "driving"


def read_rgb(path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])


def decoded_frames(path) -> list[np.ndarray]:
    reader = media.VideoReader(path)
    frames = [frame.copy() for frame in reader]
    reader.close()
    return frames


def animate(capsys, server, *argv) -> str:
    code = main(["animate", *map(str, argv), "--server", server.grpc_url, "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def source_paste(path, even: bool) -> C.PasteBack:
    """The paste-back the command builds for a source image (same detector, same crop settings)."""
    image = read_rgb(path)
    if even:
        image = np.ascontiguousarray(C.trim_to_even(image))
    analyzer = MediapipeFaceAnalyzer()
    try:
        face = analyzer.detect(image)
    finally:
        analyzer.close()
    return C.PasteBack(image, face.crop_box(C.SOURCE_CROP))


@pytest.fixture(scope="module")
def client(tiny_server):
    with LivePortraitClient(tiny_server.grpc_url) as c:
        yield c


def test_server_metadata_matches_the_spec(client):
    client.check_server(models=[spec.MOTION])           # raises ServerMismatch on any difference


def test_driving_video_to_finished_video(tmp_path, capsys, tiny_server):
    """s0 driven by all of d0.mp4: same frame count and fps as the driving video, the source's size, no audio."""
    out, side = tmp_path / "s0_d0.mp4", tmp_path / "s0_d0_side.mp4"
    err = animate(capsys, tiny_server, "--source", SOURCE / "s0.jpg", "--driving", DRIVING / "d0.mp4",
                  "--output", out, "--comparison", side, "--profile")
    info = media.probe_video(out)
    assert info == {"frames": 78, "fps": 25.0, "size": (600, 704), "audio_codec": None}
    assert media.probe_video(side)["frames"] == 78 and media.probe_video(side)["size"] == (3 * 512, 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0_d0.mp4", "s0_d0_side.mp4"]
    for stage in ("driving: decode", "paste-back", "encode", "server: liveportrait compute",
                  "server:   warping_module", "wall clock"):
        assert stage in err
    # outside the mask the video shows the source (H.264 is lossy: compare within a few levels)
    paste = source_paste(SOURCE / "s0.jpg", even=True)
    outside = paste.full_mask == 0
    frames = decoded_frames(out)
    for frame in (frames[0], frames[40], frames[-1]):
        diff = np.abs(frame.astype(int) - paste.background)[outside]
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8      # H.264 at quality 7 on the astronaut
    # inside, the animated face differs from the source and moves with the driving video
    inside = paste.full_mask == 1
    assert np.abs(frames[0].astype(int) - paste.background)[inside].mean() > 5
    assert np.abs(frames[0].astype(int) - frames[40])[inside].mean() > 0.5


def test_audio_is_carried_over(tmp_path, capsys, tiny_server):
    """A one-second clip of d3.mp4 (30 frames, 30 fps, AAC): the output keeps frame count, fps and the audio."""
    import imageio_ffmpeg
    clip = tmp_path / "d3_clip.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(DRIVING / "d3.mp4"), "-t", "1",
                    "-c:v", "libx264", "-c:a", "copy", str(clip)], check=True)
    assert media.probe_video(clip)["frames"] == 30
    out = tmp_path / "s5_d3.mp4"
    animate(capsys, tiny_server, "--source", SOURCE / "s5.jpg", "--driving", clip, "--output", out)
    assert media.probe_video(out) == {"frames": 30, "fps": 30.0, "size": (720, 720), "audio_codec": "aac"}


def test_audio_shorter_than_the_video_keeps_every_frame(tmp_path, capsys, tiny_server):
    """40 driving frames at 25 fps with 1 s of audio: 40 animated frames, with the audio (padded to 1.6 s)."""
    import generated_media
    driving = generated_media.write_video(tmp_path / "talk.mp4", generated_media.driving_frames(
        generated_media.Face(), 40), 25.0, audio_seconds=1.0)
    out = tmp_path / "s0_talk.mp4"
    code = main(["animate", "--source", str(SOURCE / "s0.jpg"), "--driving", str(driving), "--output", str(out),
                 "--server", tiny_server.grpc_url])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"wrote {out} (40 frames)" in printed.out
    assert media.probe_video(out) == {"frames": 40, "fps": 25.0, "size": (600, 704), "audio_codec": "aac"}


def test_image_driving_writes_an_image_and_keeps_outside_pixels(tmp_path, capsys, tiny_server):
    out = tmp_path / "s12_d30.png"
    animate(capsys, tiny_server, "--source", SOURCE / "s12.jpg", "--driving", DRIVING / "d30.jpg", "--output", out,
            "--crop-driving")
    result, source = read_rgb(out), read_rgb(SOURCE / "s12.jpg")
    assert result.shape == source.shape == (500, 375, 3)
    paste = source_paste(SOURCE / "s12.jpg", even=False)
    outside = paste.full_mask == 0
    assert outside.sum() > 0.3 * outside.size
    assert np.array_equal(result[outside], source[outside])          # exactly the source outside the mask
    assert not np.array_equal(result[~outside], source[~outside])
    no_paste = tmp_path / "crop.png"
    animate(capsys, tiny_server, "--source", SOURCE / "s12.jpg", "--driving", DRIVING / "d30.jpg", "--output",
            no_paste, "--no-paste-back")
    assert read_rgb(no_paste).shape == (512, 512, 3)


def test_pkl_and_npz_templates_give_identical_frames(tmp_path, capsys, tiny_server, client):
    pkl = ASSETS / "templates" / "wink.pkl"
    npz = tmp_path / "wink.npz"
    assert main(["template", "--driving", str(pkl), "--output", str(npz), "--quiet"]) == 0
    # through the library: the served images are equal, array for array
    crop = cv2.resize(read_rgb(SOURCE / "s0.jpg"), (256, 256))
    results = []
    for path in (pkl, npz):
        template = load_template(path)
        with client.stream(SourceInput(crop)) as stream:
            for i in range(4):
                stream.send(DrivingFrame(motion=template.frame(i)))
            results.append([r.image for r in stream.finish()])
    assert len(results[0]) == 4 and all(np.array_equal(a, b) for a, b in zip(*results))
    assert not np.array_equal(results[0][0], results[0][3])          # the wink moves the face
    # through the command: the same decoded video
    outs = [tmp_path / "from_pkl.mp4", tmp_path / "from_npz.mp4"]
    for template, out in zip((pkl, npz), outs):
        animate(capsys, tiny_server, "--source", SOURCE / "s0.jpg", "--driving", template, "--output", out,
                "--max-frames", 5)
    a, b = decoded_frames(outs[0]), decoded_frames(outs[1])
    assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert media.probe_video(outs[0])["fps"] == 25.0


def test_template_extraction_from_a_video(tmp_path, capsys, tiny_server, client):
    out = tmp_path / "d0.npz"
    code = main(["template", "--driving", str(DRIVING / "d0.mp4"), "--output", str(out), "--server",
                 tiny_server.grpc_url, "--max-frames", "10", "--batch", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    template = load_template(out)
    assert len(template) == 10 and template.fps == 25.0
    assert template.eye_ratio.shape == (10, 2) and template.lip_ratio.shape == (10, 1)
    # the stored motion is the served motion extractor's on the same crops, converted by MotionInfo.from_raw
    reader = media.VideoReader(DRIVING / "d0.mp4")
    crops = np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_LINEAR) for f, _ in zip(reader, range(3))])
    reader.close()
    info = client.extract_motion(crops)
    assert np.allclose(template.R[:3], info.R, atol=1e-6) and np.allclose(template.exp[:3], info.exp, atol=1e-6)
    # it drives the pipeline, eye and lip retargeting included (the template carries the ratios)
    video = tmp_path / "from_template.mp4"
    animate(capsys, tiny_server, "--source", SOURCE / "s1.jpg", "--driving", out, "--output", video,
            "--eye-retargeting", "--lip-retargeting")
    assert media.probe_video(video)["frames"] == 10


def test_live_options_crop_retargeting_smoothing(tmp_path, capsys, tiny_server):
    """Driving crop on, landmarks tracked for eye/lip ratios, One-Euro smoothing through the motion extractor."""
    out, side = tmp_path / "live.mp4", tmp_path / "live_side.mp4"
    animate(capsys, tiny_server, "--source", SOURCE / "s1.jpg", "--driving", DRIVING / "d0.mp4", "--output", out,
            "--comparison", side, "--crop-driving", "--eye-retargeting", "--lip-retargeting", "--smooth",
            "--relative-motion", "--animation-region", "exp", "--driving-multiplier", "1.5", "--max-frames", 4)
    assert media.probe_video(out)["frames"] == 4 and media.probe_video(out)["size"] == (1144, 1144)
    assert media.probe_video(side)["frames"] == 4


def test_stream_unary_and_asyncio_agree(tiny_server, client):
    crop = cv2.resize(read_rgb(SOURCE / "s5.jpg"), (256, 256))
    reader = media.VideoReader(DRIVING / "d0.mp4")
    drivings = [DrivingFrame(crop=cv2.resize(f, (256, 256))) for f, _ in zip(reader, range(3))]
    reader.close()
    with client.stream(SourceInput(crop), max_in_flight=3) as stream:
        for d in drivings:
            stream.send(d)
        streamed = stream.finish()
    assert [r.number for r in streamed] == [0, 1, 2]
    sequence = new_sequence_id()
    assert client.infer({"source": crop}, sequence, start=True) == (None, -1)
    unary = [client.infer(d.tensors(), sequence) for d in drivings]
    client.infer({}, sequence, end=True)
    assert [index for _, index in unary] == [0, 1, 2]
    assert all(np.array_equal(a.image, b) for a, (b, _) in zip(streamed, unary))

    async def run_async():
        async with AsyncLivePortraitClient(tiny_server.grpc_url) as aclient:
            return [r async for r in aclient.animate(SourceInput(crop), drivings)]

    asynced = asyncio.run(run_async())
    assert all(np.array_equal(a.image, b.image) for a, b in zip(streamed, asynced))
    # a single request is a whole image-driven sequence
    image = client.animate_image(SourceInput(crop, {"driving_type": "image"}), drivings[0])
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


class StreamThatCannotReopen(AnimationStream):
    """A stream whose reconnections fail at opening (the first open works) against a healthy server."""

    def _open(self, sequence_id: int | None = None) -> None:
        if getattr(self, "_attempt", -1) >= 0:
            from tritonclient.utils import InferenceServerException
            raise InferenceServerException("stream refused")
        super()._open(sequence_id)


def test_reconnection_gives_up_when_the_server_is_healthy_but_the_stream_cannot_open(tiny_server, client):
    """The reconnect loop is bounded by --retry even when every health check passes (it used to spin forever)."""
    import time
    from tritonclient.utils import InferenceServerException
    stream = StreamThatCannotReopen(client, SourceInput(np.zeros((256, 256, 3), np.uint8)), retry_s=2)
    began = time.monotonic()
    with pytest.raises(ServerUnavailable, match="answers health checks but the stream could not be reopened within 2 s"
                       ) as failed:
        stream._connection_lost(InferenceServerException("Socket closed"))
    assert time.monotonic() - began < 10
    assert isinstance(failed.value.__cause__, InferenceServerException)
    stream.close()


def test_keypoint_overlay_follows_the_driving_motion(client):
    """--draw-keypoints: the source's keypoints fill the middle of the crop (zoomed) as rings, this frame's as dots
    of their region's colour, and a head turn moves the dots away from the rings by many pixels."""
    from liveportrait_triton import keypoints as K
    from liveportrait_triton.client.keypoint_overlay import COLOURS, KeypointOverlay
    from liveportrait_triton.wire import MotionFrame
    crop = cv2.resize(read_rgb(SOURCE / "s0.jpg"), (256, 256))
    overlay = KeypointOverlay(client, crop)
    info = client.extract_motion(crop[None])

    def frame(yaw):
        R = K.rotation_matrix(info.pitch, info.yaw + np.float32(yaw), info.roll)[0]
        return DrivingFrame(motion=MotionFrame(R=R, exp=info.exp[0], t=info.t[0], scale=info.scale[0]))

    straight, turned = overlay.keypoints(frame(0.0)), overlay.keypoints(frame(25.0))
    np.testing.assert_allclose(straight, info.transformed()[0], atol=1e-6)     # no motion: the source's own
    rings = overlay.to_pixels(straight)
    extent = (rings.max(0) - rings.min(0)).max()
    assert 0.5 * 512 < extent < 0.6 * 512, f"the source keypoints span {extent:.0f} of 512 pixels"
    assert np.all((rings > 64) & (rings < 448)), "centred in the crop"
    dots = overlay.to_pixels(turned)
    assert np.linalg.norm(dots - rings, axis=1).max() > 20, "a 25 degree turn moves the drawn keypoints visibly"
    image = np.full((512, 512, 3), 128, np.uint8)
    drawn = overlay.draw(image, turned)
    for i, (x, y) in enumerate(np.round(dots).astype(int)):
        if not (0 <= x < 512 and 0 <= y < 512) or np.linalg.norm(dots[i] - rings, axis=1).min() < 12:
            continue            # off the crop, or under a ring
        region = "eyes" if i in (11, 13, 15, 16, 18) else "lip" if i in (6, 12, 14, 17, 19, 20) else "other"
        covered = [j for j in range(21) if j > i and np.linalg.norm(dots[j] - dots[i]) < 14]
        if not covered:
            assert tuple(drawn[y, x]) == COLOURS[region], f"keypoint {i} at ({x}, {y}): {drawn[y, x]}"
    untouched = np.all(drawn == image, axis=2)
    assert untouched[200:, :].mean() > 0.5 and not untouched.all(), "the drawing covers keypoints, not the picture"


def faceless_clip(path, faceless: list[int], frames: int = 8):
    """The generated talking face, with solid grey frames at the `faceless` indices."""
    import generated_media
    pictures = generated_media.driving_frames(generated_media.Face(), frames)
    for i in faceless:
        pictures[i] = np.full_like(pictures[i], 128)
    return generated_media.write_video(path, pictures, 25.0)


@pytest.mark.parametrize("crop_driving", [False, True])
def test_a_driving_video_without_a_face_fails_and_writes_nothing(tmp_path, capsys, tiny_server, crop_driving):
    clip = faceless_clip(tmp_path / "grey.mp4", list(range(6)), frames=6)
    out = tmp_path / "out.mp4"
    code = main(["animate", "--source", str(SOURCE / "s0.jpg"), "--driving", str(clip), "--output", str(out),
                 "--server", tiny_server.grpc_url, "--quiet", *(["--crop-driving"] if crop_driving else [])])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"error: no face found in any of the 6 driving frames of {clip}" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["grey.mp4"]


def test_driving_frames_without_a_face_are_listed(tmp_path, capsys, tiny_server):
    clip = faceless_clip(tmp_path / "gaps.mp4", [2, 3, 6])
    out = tmp_path / "out.mp4"
    code = main(["animate", "--source", str(SOURCE / "s0.jpg"), "--driving", str(clip), "--output", str(out),
                 "--server", tiny_server.grpc_url, "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: no face found in 3 of 8 driving frames (0-based: 2, 3, 6); they were animated from the "
                     "whole frame as it is"], err
    assert media.probe_video(out)["frames"] == 8


def test_a_driving_image_without_a_face_fails(tmp_path, capsys, tiny_server):
    grey = media.write_image(tmp_path / "grey.png", np.full((300, 300, 3), 128, np.uint8))
    code = main(["animate", "--source", str(SOURCE / "s0.jpg"), "--driving", str(grey), "--output",
                 str(tmp_path / "out.png"), "--server", tiny_server.grpc_url, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and f"error: no face found in the driving image {grey}" in err, err
    assert not (tmp_path / "out.png").exists()


def test_draw_keypoints_puts_the_panel_beside_the_result(tmp_path, capsys, tiny_server):
    """With paste-back the keypoint panel (the animated crop, keypoints drawn) stands beside the frame at its height;
    without, the crop itself carries the drawing."""
    template = tmp_path / "wink.npz"
    assert main(["template", "--driving", str(ASSETS / "templates" / "wink.pkl"), "--output", str(template),
                 "--quiet"]) == 0
    out, plain = tmp_path / "drawn.mp4", tmp_path / "plain.mp4"
    animate(capsys, tiny_server, "--source", SOURCE / "s0.jpg", "--driving", template, "--output", out,
            "--max-frames", 3, "--draw-keypoints")
    animate(capsys, tiny_server, "--source", SOURCE / "s0.jpg", "--driving", template, "--output", plain,
            "--max-frames", 3)
    assert media.probe_video(plain)["size"] == (600, 704)
    assert media.probe_video(out)["size"] == (600 + 704, 704)
    drawn, undrawn = decoded_frames(out), decoded_frames(plain)
    strong = (np.abs(drawn[1][:, :600].astype(int) - undrawn[1]).max(axis=2) > 100).mean()
    assert strong < 1e-4, f"the result itself is not drawn on ({strong:.5f} of its pixels differ by > 100 levels)"
    panel = drawn[1][:, 600:]
    assert (np.abs(panel.astype(int) - [255, 255, 255]).sum(axis=2) < 60).mean() > 0.002, "white rings and lines"
    crop = tmp_path / "crop.mp4"
    animate(capsys, tiny_server, "--source", SOURCE / "s0.jpg", "--driving", template, "--output", crop,
            "--max-frames", 3, "--draw-keypoints", "--no-paste-back")
    assert media.probe_video(crop)["size"] == (512, 512)
