"""The client half of the Animals mode: `animate --subject animal` with the whole image, a box (`--source-box`) or
the cat-face detector (`--source-box auto`), the official paste-back rule, the refusals, and runs on a real server
holding both model sets (tiny networks, synthetic animal weights) with scikit-image's chelsea cat as the source."""
from __future__ import annotations

import numpy as np
import pytest

from liveportrait_triton import crop as C
from liveportrait_triton import keypoints as K
from liveportrait_triton import spec
from liveportrait_triton.cli import main
from liveportrait_triton.client import animals, media
from liveportrait_triton.client.animate import AnimateSettings
from liveportrait_triton.client.templates import MotionTemplate, save_npz
from liveportrait_triton.serve import free_port

BOX = C.PixelBox(120, 10, 260, 250)         # chelsea's face, as x, y, w, h (not square: the crop is stretched)
TEMPLATE_FRAMES = 4


def chelsea() -> np.ndarray:
    from skimage import data
    return data.chelsea()           # 300x451 RGB, shipped inside the scikit-image wheel


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """chelsea.png, a motion template (a head turn with expression changes), a driving clip of a moving human
    face (scikit-image's astronaut) and a short source video."""
    from skimage import data
    import cv2
    folder = tmp_path_factory.mktemp("animals")
    source = media.write_image(folder / "chelsea.png", chelsea())
    yaw = np.float32([0, 15, -15, 8])
    pitch = np.float32([0, -8, 6, 0])
    rng = np.random.default_rng(3)
    template = MotionTemplate(fps=10, R=K.rotation_matrix(pitch, yaw, np.zeros(TEMPLATE_FRAMES, np.float32)),
                              exp=rng.normal(0, 0.03, (TEMPLATE_FRAMES, 21, 3)).astype(np.float32),
                              t=rng.normal(0, 0.03, (TEMPLATE_FRAMES, 3)).astype(np.float32),
                              scale=np.full((TEMPLATE_FRAMES, 1), 1.5, np.float32))
    face = cv2.resize(data.astronaut()[0:300, 100:400], (256, 256))
    driving = folder / "driving.mp4"
    with media.VideoWriter(driving, (256, 256), 8.0) as writer:
        for i in range(4):
            shift = np.float32([[1, 0, 8 * np.sin(i)], [0, 1, 4 * np.cos(i)]])
            writer.write(cv2.warpAffine(face, shift, (256, 256), borderMode=cv2.BORDER_REFLECT))
    return {"source": source, "template": save_npz(template, folder / "turn.npz"), "driving": driving}


def run_animate(capsys, *flags) -> tuple[int, str]:
    code = main(["animate", "--quiet", *map(str, flags)])
    return code, capsys.readouterr().err


def frames_of(path) -> np.ndarray:
    return np.stack([f.copy() for f in media.VideoReader(path)])


def assert_frames_move(frames: np.ndarray) -> None:
    """Each frame differs from the first: the template's motion reached the animal networks."""
    for i in range(1, len(frames)):
        diff = np.abs(frames[i].astype(np.int16) - frames[0].astype(np.int16))
        assert diff.mean() > 0.5, f"frame {i} equals frame 0 (mean |diff| {diff.mean():.3f})"


# ---------------------------------------------------------------------------------------------------------------
# The box (crop.py) and the animal source, without a server


def test_pixel_box_parse_and_limits():
    assert C.PixelBox.parse(" 40, 20,200,180") == C.PixelBox(40, 20, 200, 180)
    for text in ("40,20,200", "40,20,200,1.5", "a,b,c,d", ""):
        with pytest.raises(ValueError, match="x,y,w,h as four whole numbers"):
            C.PixelBox.parse(text)
    for text in ("-1,0,10,10", "0,0,0,10", "0,0,10,-3"):
        with pytest.raises(ValueError, match="x and y must be >= 0, width and height >= 1"):
            C.PixelBox.parse(text)
    C.PixelBox(0, 0, 451, 300).check_inside(451, 300)
    with pytest.raises(ValueError, match=r"box 400,10,60,50 \(x,y,w,h\) reaches past the image, which is 451x300"):
        C.PixelBox(400, 10, 60, 50).check_inside(451, 300)
    assert C.PixelBox(100, 50, 200, 100).scaled(0.5, 225, 150) == C.PixelBox(50, 25, 100, 50)
    assert C.PixelBox.square_around((10, 290), 120, 451, 300) == C.PixelBox(0, 180, 120, 120)    # moved inside
    assert C.PixelBox.square_around((200, 150), 1000, 451, 300) == C.PixelBox(50, 0, 300, 300)    # shrunk


def test_box_cut_and_paste_back_map_the_box_both_ways():
    """`cut` resizes the box as cv2.resize does (the whole image: the official no-crop rule), `image_to_crop` is
    that same map (a marked pixel lands where it says), and paste-back of the cut puts the box's pixels back and
    leaves every pixel outside the box exactly as it was."""
    import cv2
    image = chelsea()
    whole = C.PixelBox.whole(image)
    assert np.array_equal(whole.cut(image, 256), cv2.resize(image, (256, 256)))
    marked = np.zeros((300, 451), np.float32)
    marked[100, 200] = 1.0
    crop = BOX.cut(marked, 512)
    expected = C.transform_points(np.array([[200.0, 100.0]]), BOX.image_to_crop(512))[0]
    peak = np.unravel_index(np.argmax(crop), crop.shape)[::-1]
    assert np.abs(np.array(peak) - expected).max() <= 1.0, (peak, expected)
    pasted = C.PasteBack(image, BOX)(np.full((512, 512, 3), 255, np.uint8))
    inside = np.zeros((300, 451), bool)
    inside[BOX.y:BOX.y + BOX.h, BOX.x:BOX.x + BOX.w] = True
    assert np.array_equal(pasted[~inside], image[~inside]), "pixels outside the box changed"
    assert (pasted[BOX.y + 20:BOX.y + BOX.h - 20, BOX.x + 20:BOX.x + BOX.w - 20] == 255).all()


def test_animal_source_crop_and_paste_rule(tmp_path):
    path = media.write_image(tmp_path / "cat.png", chelsea())
    options = {"subject": spec.ANIMAL}
    whole = animals.animal_source(str(path), None, C.SOURCE_MAX_DIM, even=True, options=options)
    import cv2
    assert whole.faces[0].source.crop.shape == (256, 256, 3)
    assert np.array_equal(whole.faces[0].source.crop, cv2.resize(chelsea()[:, :450], (256, 256)))
    boxed = animals.animal_source(str(path), BOX, C.SOURCE_MAX_DIM, even=True, options=options)
    assert np.array_equal(boxed.faces[0].source.crop, BOX.cut(chelsea(), 256))
    # a source larger than the size limit: the box follows the shrink
    shrunk = animals.animal_source(str(path), BOX, 226, even=False, options=options)
    assert shrunk.image.shape[:2] == (150, 226) and shrunk.faces[0].box == C.PixelBox(60, 5, 130, 125)
    # the official rule: paste-back only with a crop (here the box) and stitching on (off by default for animals)
    assert not animals.pastes_back(None, {**options, "stitching": True}, True)
    assert not animals.pastes_back(BOX, options, True)
    assert animals.pastes_back(BOX, {**options, "stitching": True}, True)
    assert not animals.pastes_back(BOX, {**options, "stitching": True}, False)


def test_animal_settings_refusals():
    """The animal option rules are the server's (spec.parse_options), applied before anything is sent."""
    base = dict(source="cat.png", driving="turn.npz", output="out.mp4", subject=spec.ANIMAL)
    for option in ("eye_retargeting", "lip_retargeting"):
        with pytest.raises(ValueError, match=f"{option}=True are not available with subject='animal'"):
            AnimateSettings.from_values(**base, **{option: True})
    with pytest.raises(ValueError, match="--faces: for human faces only"):
        AnimateSettings.from_values(**base, faces="all")
    with pytest.raises(ValueError, match="--source-box is for --subject animal"):
        AnimateSettings.from_values(**{**base, "subject": spec.HUMAN}, source_box="1,2,30,40")
    settings = AnimateSettings.from_values(**base, source_box="1,2,30,40")
    assert settings.source_box == C.PixelBox(1, 2, 30, 40) and settings.animal
    with pytest.raises(ValueError, match="source_video=True are not available with subject='animal'.*is a video"):
        settings.pipeline_options("template", source_video=True)
    assert settings.pipeline_options("template") == {"subject": spec.ANIMAL}
    assert spec.parse_options(settings.pipeline_options("template"))["stitching"] is False


def test_animate_animal_refusals_name_the_problem(capsys, inputs, tmp_path):
    """Refused before any server is reached (the server address here answers nothing)."""
    nowhere = f"127.0.0.1:{free_port()}"
    common = ["--driving", inputs["template"], "--output", tmp_path / "out.mp4", "--server", nowhere,
              "--subject", "animal"]
    code, err = run_animate(capsys, "--source", inputs["driving"], *common)
    assert code == 1 and "source_video=True are not available with subject='animal'" in err, err
    assert "is a video" in err
    code, err = run_animate(capsys, "--source", inputs["source"], *common, "--eye-retargeting")
    assert code == 1 and "eye_retargeting=True are not available with subject='animal'" in err, err
    code, err = run_animate(capsys, "--source", inputs["source"], *common, "--source-box", "400,10,60,50")
    assert code == 1 and "box 400,10,60,50 (x,y,w,h) reaches past the source image, which is 451x300" in err, err
    code, err = run_animate(capsys, "--source", inputs["source"], *common, "--source-box", "10,10,0,50")
    assert code == 1 and "width and height >= 1" in err, err


def test_cat_face_detector(capsys, inputs, tmp_path):
    """`--source-box auto`: OpenCV's LBP cat-face cascade (Debian opencv-data) run by scikit-image finds chelsea's
    face and nothing in the astronaut portrait."""
    if not animals.CAT_FACE_CASCADE.is_file():
        pytest.skip(f"{animals.CAT_FACE_CASCADE} is missing (Debian package opencv-data)")
    from skimage import data
    face = animals.detect_cat_face(chelsea())
    assert face is not None
    center = (face.x + face.w / 2, face.y + face.h / 2)
    # chelsea's eyes are near (170, 115) and (320, 135), her nose near (265, 240): the face box holds them
    assert 200 <= center[0] <= 330 and 60 <= center[1] <= 200 and 120 <= face.w <= 300, face
    crop = C.animal_crop_box(face, 451, 300)
    crop.check_inside(451, 300)
    assert crop.x <= 170 and crop.x + crop.w >= 320 and crop.y + crop.h >= 240, crop
    assert animals.detect_cat_face(data.astronaut()) is None
    portrait = media.write_image(tmp_path / "astronaut.png", data.astronaut())
    code, err = run_animate(capsys, "--source", portrait, "--driving", inputs["template"], "--output",
                            tmp_path / "out.mp4", "--server", f"127.0.0.1:{free_port()}", "--subject", "animal",
                            "--source-box", "auto")
    assert code == 1 and "no cat face found in the source image" in err, err


# ---------------------------------------------------------------------------------------------------------------
# On a server with both model sets


@pytest.mark.server
def test_animate_animal_whole_image_is_the_512_crop(capsys, tiny_both_server, inputs, tmp_path):
    """No box: the whole image resized to 256 (the official no-crop rule), no paste-back, 512x512 frames; the
    profile shows the animal set's models at work and none of the humans' own."""
    out = tmp_path / "whole.mp4"
    code, err = run_animate(capsys, "--source", inputs["source"], "--driving", inputs["template"], "--output", out,
                            "--server", tiny_both_server.grpc_url, "--subject", "animal", "--profile")
    assert code == 0, err
    assert "no paste-back without --source-box" in err
    assert f"server:   {spec.ANIMAL_PREFIX}{spec.WARPING}" in err and f"server:   {spec.WARPING}" not in err, err
    frames = frames_of(out)
    assert frames.shape == (TEMPLATE_FRAMES, 512, 512, 3)
    assert_frames_move(frames)


@pytest.mark.server
def test_animate_animal_box_with_stitching_pastes_into_the_box(capsys, tiny_both_server, inputs, tmp_path):
    """A box and --stitching: the result is the source with the box animated; outside it the source (within
    H.264's loss), inside it the animation."""
    out = tmp_path / "boxed.mp4"
    code, err = run_animate(capsys, "--source", inputs["source"], "--driving", inputs["template"], "--output", out,
                            "--server", tiny_both_server.grpc_url, "--subject", "animal", "--stitching",
                            "--source-box", BOX.text)
    assert code == 0, err
    assert "paste-back" not in err
    frames = frames_of(out)
    source = chelsea()[:, :450]         # trimmed to even sides for H.264
    assert frames.shape == (TEMPLATE_FRAMES, *source.shape)
    inside = np.zeros(source.shape[:2], bool)
    inside[BOX.y:BOX.y + BOX.h, BOX.x:BOX.x + BOX.w] = True
    near = np.zeros_like(inside)        # H.264 blocks straddling the box edge
    near[max(BOX.y - 16, 0):BOX.y + BOX.h + 16, max(BOX.x - 16, 0):BOX.x + BOX.w + 16] = True
    for i, frame in enumerate(frames):
        diff = np.abs(frame.astype(np.int16) - source.astype(np.int16)).mean(axis=-1)
        assert diff[~near].mean() < 2.0, f"frame {i}: outside the box the source changed by {diff[~near].mean():.2f}"
        assert diff[inside].mean() > 10.0, f"frame {i}: the box shows the source (diff {diff[inside].mean():.2f})"
    assert_frames_move(frames[:, inside])


@pytest.mark.server
def test_animate_animal_box_without_stitching_is_the_crop(capsys, tiny_both_server, inputs, tmp_path):
    """The official rule: no stitching (an animal's default), no paste-back, even with a box."""
    out = tmp_path / "crop.mp4"
    code, err = run_animate(capsys, "--source", inputs["source"], "--driving", inputs["template"], "--output", out,
                            "--server", tiny_both_server.grpc_url, "--subject", "animal", "--source-box", BOX.text)
    assert code == 0, err
    assert "no paste-back without stitching" in err
    frames = frames_of(out)
    assert frames.shape == (TEMPLATE_FRAMES, 512, 512, 3)
    assert_frames_move(frames)


@pytest.mark.server
def test_animate_animal_driven_by_a_human_video(capsys, tiny_both_server, inputs, tmp_path):
    """A human driving video (the human face path crops it) drives the animal; with --comparison beside it."""
    out, side = tmp_path / "video.mp4", tmp_path / "side.mp4"
    code, err = run_animate(capsys, "--source", inputs["source"], "--driving", inputs["driving"], "--output", out,
                            "--comparison", side, "--server", tiny_both_server.grpc_url, "--subject", "animal",
                            "--crop-driving")
    assert code == 0, err
    frames = frames_of(out)
    assert frames.shape == (4, 512, 512, 3)
    assert_frames_move(frames)
    assert frames_of(side).shape == (4, 512, 3 * 512, 3)


@pytest.mark.server
def test_live_animation_of_an_animal_pastes_into_the_box_exactly(tiny_both_server, inputs):
    """The library's per-frame API (the live tab's) on an animal source: each camera frame (a human face) comes
    back as the whole source picture with only the box animated; every pixel outside the box is the source's."""
    import cv2
    from skimage import data
    from liveportrait_triton.client.animate import LiveAnimation
    settings = AnimateSettings(source=str(inputs["source"]), driving=media.WEBCAM_PREFIX + "0", output="live.mp4",
                               server=tiny_both_server.grpc_url, options={"subject": spec.ANIMAL, "stitching": True},
                               source_box=BOX.text)
    live = LiveAnimation(settings, fps=10)
    face = cv2.resize(data.astronaut()[0:300, 100:400], (256, 256))
    try:
        frames = [live.animate(np.roll(face, 6 * i, axis=1)) for i in range(3)]
    finally:
        live.close()
    source = chelsea()
    inside = np.zeros(source.shape[:2], bool)
    inside[BOX.y:BOX.y + BOX.h, BOX.x:BOX.x + BOX.w] = True
    for i, frame in enumerate(frames):
        assert frame.shape == source.shape, frame.shape
        assert np.array_equal(frame[~inside], source[~inside]), f"frame {i}: a pixel outside the box changed"
        assert np.abs(frame[inside].astype(np.int16) - source[inside]).mean() > 10.0, f"frame {i}: box not animated"
    assert np.abs(frames[2].astype(np.int16) - frames[0]).mean() > 0.05, "the camera's motion did not reach the box"
