"""Each `animate` option through the command line on the real server (tiny networks): its effect, not a count.

For every option the command's output is compared with the same animation made through the client library with
the option's meaning spelt out (server option, crop settings, smoothing settings), and with the animation made
without it: the output must match the first and differ from the second, so an option the command drops (or
passes wrongly) fails. What must not move is checked too: outside the paste-back mask the output is the source,
pixel for pixel. Image driving writes a PNG, so those comparisons are exact (within one level for batching);
video outputs are H.264, so there the output must be nearer the right reference than the wrong one by a margin.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import ASSETS, assert_images_close
from liveportrait_triton import crop as C
from liveportrait_triton import keypoints as K
from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client import DrivingFrame, LivePortraitClient
from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
from liveportrait_triton.client.multiface import SourceFaces
from liveportrait_triton.client.smoothing import MotionSmoother, SmoothingSettings
from liveportrait_triton.client.templates import MotionTemplate, load_template, save_npz

pytestmark = pytest.mark.server

SOURCE = ASSETS / "source" / "s0.jpg"
DRIVING_IMAGE = ASSETS / "driving" / "d30.jpg"
EFFECT = 2.0          # H.264 outputs: mean |difference| in uint8 levels between the two references, at least
EFFECT_EXACT = 0.05   # PNG outputs (equal to the reference within IMAGE_MEAN_DIFF = 0.01): the same, at least


@pytest.fixture(scope="module")
def client(tiny_server):
    with LivePortraitClient(tiny_server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def analyzer():
    a = MediapipeFaceAnalyzer()
    yield a
    a.close()


def cli(capsys, server, output, *argv) -> np.ndarray:
    code = main(["animate", "--source", str(SOURCE), "--output", str(output), "--server", server.grpc_url, "--quiet",
                 *map(str, argv)])
    assert code == 0, capsys.readouterr().err
    if output.suffix == ".mp4":
        return np.stack([f.copy() for f in media.VideoReader(output)])
    return media.read_image(output)


def source_faces(analyzer, options: dict, settings: C.CropSettings = C.SOURCE_CROP, max_dim: int = 1280,
                 even: bool = False) -> SourceFaces:
    image = C.limit_size(media.read_image(SOURCE), max_dim)
    if even:
        image = np.ascontiguousarray(C.trim_to_even(image))
    return SourceFaces.detect(image, analyzer, settings, options)


def image_reference(client, analyzer, options=None, source=C.SOURCE_CROP, driving: C.CropSettings | None = None,
                    ratios=False, max_dim=1280, paste=True) -> np.ndarray:
    """What `animate --driving d30.jpg` must write, made by hand: server options, crops, ratios, paste-back."""
    faces = source_faces(analyzer, {**(options or {}), "driving_type": "image"}, source, max_dim)
    picture = media.read_image(DRIVING_IMAGE)
    face = analyzer.detect(picture)
    if driving is not None:
        crop = C.network_input(C.warp_crop(picture, face.crop_box(driving)))
    else:
        crop = cv2.resize(picture, (256, 256), interpolation=cv2.INTER_LINEAR)
    eye, lip = (float(face.eye_ratio()[0]), float(face.lip_ratio()[0])) if ratios else (None, None)
    [animated] = faces.animate_image(client, DrivingFrame(crop=crop, eye_ratio=eye, lip_ratio=lip))
    return faces.paste(animated) if paste else animated


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_option_took_effect(result, wanted, default, what):
    """`result` is `wanted` (within a level), and `wanted` differs from `default` where the face is pasted."""
    if wanted.shape == default.shape:
        source = media.read_image(SOURCE)
        face = np.any(wanted != source, axis=2) | np.any(default != source, axis=2) if wanted.shape == source.shape \
            else np.ones(wanted.shape[:2], bool)
        effect = mean_diff(wanted[face], default[face])
        assert effect > EFFECT_EXACT, f"{what}: the option changes the face by {effect:.3f} levels, too little to test"
    assert_images_close(result, wanted, what)


@pytest.fixture(scope="module")
def default_image(client, analyzer):
    return image_reference(client, analyzer)


# -- motion options (image driving: exact) --------------------------------------------------------------------

ABSOLUTE = {"relative_motion": False}       # an image drives the pose only in absolute mode (relative: its own anchor)


@pytest.mark.parametrize("argv, options, base, ratios", [
    (["--no-relative-motion"], ABSOLUTE, {}, False),
    (["--no-stitching"], {"stitching": False}, {}, False),
    (["--no-relative-motion", "--animation-region", "pose"], {**ABSOLUTE, "animation_region": "pose"}, ABSOLUTE,
     False),
    (["--no-relative-motion", "--animation-region", "exp"], {**ABSOLUTE, "animation_region": "exp"}, ABSOLUTE,
     False),
    (["--driving-multiplier", "1.8"], {"driving_multiplier": 1.8}, {}, False),
    (["--anchor", "source"], {"anchor": "source"}, {}, False),
    (["--eye-retargeting"], {"eye_retargeting": True}, {}, True),
    (["--lip-retargeting"], {"lip_retargeting": True}, {}, True),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_motion_option_reaches_the_server(capsys, tiny_server, client, analyzer, default_image, tmp_path, argv,
                                          options, base, ratios):
    """`base`: the options the effect is measured against (the default, or absolute mode for the pose region)."""
    result = cli(capsys, tiny_server, tmp_path / "out.png", "--driving", DRIVING_IMAGE, *argv)
    wanted = image_reference(client, analyzer, options, ratios=ratios)
    compared = default_image if not base else image_reference(client, analyzer, base)
    assert_option_took_effect(result, wanted, compared, " ".join(argv))
    source = media.read_image(SOURCE)
    outside = C.PasteBack(source, source_faces(analyzer, {}).faces[0].box).full_mask == 0
    assert np.array_equal(result[outside], source[outside]), "outside the face the source is untouched"


# -- crop options ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, settings", [
    (["--source-scale", "2.8"], C.CropSettings(2.8, 0.0, -0.125, rotate=True)),
    (["--source-vx", "0.1"], C.CropSettings(2.3, 0.1, -0.125, rotate=True)),
    (["--source-vy", "0.05"], C.CropSettings(2.3, 0.0, 0.05, rotate=True)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_source_crop_options_move_the_crop_and_its_mask(capsys, tiny_server, client, analyzer, default_image,
                                                       tmp_path, argv, settings):
    result = cli(capsys, tiny_server, tmp_path / "out.png", "--driving", DRIVING_IMAGE, *argv)
    assert_option_took_effect(result, image_reference(client, analyzer, source=settings), default_image,
                              " ".join(argv))
    source = media.read_image(SOURCE)
    box = source_faces(analyzer, {}, settings).faces[0].box
    default_box = source_faces(analyzer, {}).faces[0].box
    assert box != default_box
    outside = C.PasteBack(source, box).full_mask == 0
    assert np.array_equal(result[outside], source[outside]), "only the moved mask's pixels change"


@pytest.mark.parametrize("argv, settings", [
    ([], C.DRIVING_CROP),
    (["--driving-scale", "1.7"], C.CropSettings(1.7, 0.0, -0.1, rotate=False)),
    (["--driving-vx", "0.15"], C.CropSettings(2.2, 0.15, -0.1, rotate=False)),
    (["--driving-vy", "0.15"], C.CropSettings(2.2, 0.0, 0.15, rotate=False)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_driving_crop_options(capsys, tiny_server, client, analyzer, tmp_path, argv, settings):
    """--crop-driving crops the driving face (default box 2.2 / 0 / -0.1); the driving crop options move that box.
    In absolute mode, where the driving picture's pose and position reach the keypoints."""
    result = cli(capsys, tiny_server, tmp_path / "out.png", "--driving", DRIVING_IMAGE, "--no-relative-motion",
                 "--crop-driving", *argv)
    wanted = image_reference(client, analyzer, ABSOLUTE, driving=settings, ratios=True)
    compared = image_reference(client, analyzer, ABSOLUTE) if not argv else \
        image_reference(client, analyzer, ABSOLUTE, driving=C.DRIVING_CROP, ratios=True)
    assert_option_took_effect(result, wanted, compared, "--crop-driving " + " ".join(argv))


def test_source_max_dim_and_paste_back(capsys, tiny_server, client, analyzer, tmp_path):
    source = media.read_image(SOURCE)
    small = cli(capsys, tiny_server, tmp_path / "small.png", "--driving", DRIVING_IMAGE, "--source-max-dim", 352)
    scale = 352 / max(source.shape[:2])
    assert small.shape[:2] == (round(source.shape[0] * scale), round(source.shape[1] * scale)) != source.shape[:2]
    assert_images_close(small, image_reference(client, analyzer, max_dim=352), "--source-max-dim 352")
    crop = cli(capsys, tiny_server, tmp_path / "crop.png", "--driving", DRIVING_IMAGE, "--no-paste-back")
    assert crop.shape == (512, 512, 3)
    assert_images_close(crop, image_reference(client, analyzer, paste=False), "--no-paste-back")


# -- options of video driving (a template: the motion is known exactly; H.264 output) -------------------------

def jittery_template(path, frames=6) -> MotionTemplate:
    rng = np.random.default_rng(11)
    yaw = np.float32(rng.choice([-18.0, 18.0], frames))
    pitch = np.float32(rng.normal(0, 6, frames))
    zeros = np.zeros(frames, np.float32)
    template = MotionTemplate(fps=25, R=K.rotation_matrix(pitch, yaw, zeros),
                              exp=rng.normal(0, 0.02, (frames, 21, 3)).astype(np.float32),
                              t=rng.normal(0, 0.03, (frames, 3)).astype(np.float32),
                              scale=np.float32(rng.uniform(1.3, 1.7, (frames, 1))))
    save_npz(template, path)
    return load_template(path)


def stream_reference(client, analyzer, template, options=None, smoothing: SmoothingSettings | None = None,
                     frames: int | None = None) -> np.ndarray:
    """512x512 crops the server gives for the template's frames (smoothed first when asked), by hand."""
    faces = source_faces(analyzer, options or {}, even=True)
    smoother = MotionSmoother(template.fps, smoothing) if smoothing else None
    with faces.stream(client) as stream:
        count = frames or len(template)
        for i in range(count):
            motion = template.frame(i)
            stream.send(DrivingFrame(motion=smoother.motion(motion) if smoother else motion), last=i == count - 1)
        return np.stack([r.image for r in stream.finish()])


def assert_nearer(result, wanted, other, what):
    """The decoded video is nearer the right reference than the wrong one, frame by frame (H.264 is lossy)."""
    assert result.shape == wanted.shape, (result.shape, wanted.shape)
    for i, (r, w, o) in enumerate(zip(result, wanted, other)):
        if mean_diff(w, o) < EFFECT:
            continue            # e.g. the first frame of a relative motion
        assert mean_diff(r, w) + EFFECT / 2 < mean_diff(r, o), (
            f"{what} frame {i}: {mean_diff(r, w):.2f} from the option's reference, {mean_diff(r, o):.2f} from "
            f"the default's")
    assert max(mean_diff(w, o) for w, o in zip(wanted, other)) > EFFECT, f"{what}: no frame shows the option"


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_options") / "jitter.npz"
    return path, jittery_template(path)


@pytest.mark.parametrize("argv, options, smoothing, base_smoothing", [
    (["--anchor", "source", "--driving-option", "pose-friendly"],
     {"anchor": "source", "driving_option": "pose-friendly"}, None, None),
    (["--smooth"], {}, SmoothingSettings(), None),
    (["--smooth", "--smooth-beta", "0"], {}, SmoothingSettings(beta=0.0), SmoothingSettings()),
    (["--smooth", "--smooth-min-cutoff", "20"], {}, SmoothingSettings(min_cutoff=20.0), SmoothingSettings()),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_video_option(capsys, tiny_server, client, analyzer, template_file, tmp_path, argv, options, smoothing,
                      base_smoothing):
    path, template = template_file
    result = cli(capsys, tiny_server, tmp_path / "out.mp4", "--driving", path, "--no-paste-back", *argv)
    base_options = {"anchor": "source"} if "anchor" in options else {}
    wanted = stream_reference(client, analyzer, template, options, smoothing)
    other = stream_reference(client, analyzer, template, base_options, base_smoothing)
    assert_nearer(result, wanted, other, " ".join(argv))


def test_max_frames(capsys, tiny_server, client, analyzer, template_file, tmp_path):
    path, template = template_file
    result = cli(capsys, tiny_server, tmp_path / "out.mp4", "--driving", path, "--no-paste-back", "--max-frames", 3)
    assert len(result) == 3
    wanted = stream_reference(client, analyzer, template, frames=3)
    for i, frame in enumerate(result):      # the first three frames, in order (H.264: the nearest reference)
        distances = [mean_diff(frame, w) for w in wanted]
        assert int(np.argmin(distances)) == i, distances
