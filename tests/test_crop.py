"""Crop geometry, the blending mask and paste-back, and the face crop on the real source portraits."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from liveportrait_triton import crop as C
from conftest import ASSETS


def rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def test_box_recovers_rotation_center_and_size():
    # an upright "face": eyes at y=0, mouth at y=1, extent 2 x 3 around (0, 0.5)
    pts = np.array([[-1, -1], [1, -1], [1, 2], [-1, 2], [0, 0.5]], dtype=np.float64)
    eye, mouth = np.array([0.0, 0.0]), np.array([0.0, 1.0])
    settings = C.CropSettings(scale=2.0, vx=0.0, vy=0.0)
    box = C.box_from_landmarks(pts, eye, mouth, settings)
    assert box.angle == pytest.approx(0.0)
    assert box.size == pytest.approx(6.0)                   # max(2, 3) * 2
    assert box.center == pytest.approx((0.0, 0.5))
    # the same face rotated by 30 degrees and moved: the box follows it exactly
    theta, shift = math.radians(30), np.array([100.0, 50.0])
    turn = lambda p: p @ rotation(theta).T + shift           # noqa: E731
    moved = C.box_from_landmarks(turn(pts), turn(eye), turn(mouth), settings)
    assert moved.angle == pytest.approx(theta)
    assert moved.size == pytest.approx(6.0)
    assert np.allclose(moved.center, turn(np.array([0.0, 0.5])))
    # vy shifts along the face's own y axis (negative: towards the forehead)
    up = C.box_from_landmarks(turn(pts), turn(eye), turn(mouth), C.CropSettings(scale=2.0, vx=0.0, vy=-0.1))
    expected = turn(np.array([0.0, 0.5 - 0.1 * 6.0]))
    assert np.allclose(up.center, expected)
    # the driving crop keeps image axes, but sizes and centres the box in the face's frame
    flat = C.box_from_landmarks(turn(pts), turn(eye), turn(mouth), C.CropSettings(2.0, 0.0, 0.0, rotate=False))
    assert flat.angle == 0.0 and flat.size == pytest.approx(6.0) and np.allclose(flat.center, moved.center)


def test_transforms_map_box_corners_to_crop_corners():
    box = C.CropBox(center=(40.0, 70.0), size=30.0, angle=0.4)
    to_crop = box.image_to_crop(512)
    crop_corners = C.transform_points(box.corners(), to_crop)
    assert np.allclose(crop_corners, [[0, 0], [512, 0], [512, 512], [0, 512]], atol=1e-9)
    assert np.allclose(box.crop_to_image(512) @ to_crop, np.eye(3), atol=1e-12)
    inside = box.corners().mean(0)
    assert box.contains(np.array([inside, [0.0, 0.0]])).tolist() == [True, False]


def test_warp_crop_puts_a_marked_point_where_the_transform_says():
    image = np.zeros((300, 400, 3), np.uint8)
    point = (250, 120)
    cv2.circle(image, point, 3, (255, 255, 255), -1)
    box = C.CropBox(center=(230.0, 140.0), size=120.0, angle=-0.3)
    crop = C.warp_crop(image, box, 512)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    found = np.array([xs.mean(), ys.mean()])
    expected = C.transform_points(np.array([point], np.float64), box.image_to_crop(512))[0]
    assert np.linalg.norm(found - expected) < 1.0


def test_feather_mask_shape_and_ramp():
    mask = C.feather_mask(512)
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert np.all(mask[:5] == 0) and np.all(mask[:, -5:] == 0)          # 1 % margin stays zero
    assert np.all(mask[64:-64, 64:-64] == 1.0)
    row = mask[256, :256]
    assert np.all(np.diff(row) >= 0)                                     # rises monotonically towards the centre
    assert np.allclose(mask, mask[::-1]) and np.allclose(mask, mask.T)  # symmetric
    assert mask[20, 20] < mask[20, 256]                                  # rounded corners


def test_paste_back_keeps_outside_pixels_exactly():
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, size=(300, 280, 3), dtype=np.uint8)
    animated = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    for box in (C.CropBox((140.0, 150.0), 120.0, 0.2),
                C.CropBox((20.0, 10.0), 150.0, -0.5)):                  # partly outside the image
        paste = C.PasteBack(background, box)
        out = paste(animated)
        mask = paste.full_mask
        assert out.shape == background.shape and out.dtype == np.uint8
        assert np.array_equal(out[mask == 0], background[mask == 0])
        assert (mask == 0).sum() > 0 and (mask > 0).sum() > 0
        # where the mask is 1 the pixel is the crop resampled into the image (OpenCV's fixed-point bilinear
        # weights depend on the target offset: +-1)
        full = cv2.warpAffine(animated, box.crop_to_image(512)[:2], (280, 300), flags=cv2.INTER_LINEAR)
        inside = mask == 1.0
        assert np.abs(out[inside].astype(int) - full[inside]).max() <= 1
    assert np.array_equal(paste.background, background)                 # the background is not modified


def test_paste_back_refuses_a_box_off_the_image():
    with pytest.raises(ValueError, match="does not overlap"):
        C.PasteBack(np.zeros((50, 50, 3), np.uint8), C.CropBox((500.0, 500.0), 20.0))


def test_settings_and_size_helpers():
    with pytest.raises(ValueError, match=r"crop scale must lie in \[1, 4\], got 0"):
        C.CropSettings(scale=0)
    with pytest.raises(ValueError, match="crop scale"):
        C.CropSettings(scale=4.5)       # the limit the CLI and the web page read (C.SCALE_BOUNDS)
    with pytest.raises(ValueError, match="vy"):
        C.CropSettings(vy=3)
    assert C.trim_to_even(np.zeros((375, 501, 3))).shape == (374, 500, 3)
    assert C.limit_size(np.zeros((2000, 1000, 3), np.uint8), 1280).shape == (1280, 640, 3)
    assert C.limit_size(np.zeros((100, 80, 3), np.uint8), 1280).shape == (100, 80, 3)


# ---------------------------------------------------------------------------------------------------------------
# On real portraits (MediaPipe face models from the installed wheel)

SOURCES = ["s0", "s1", "s5", "s12"]
EYES_MOUTH = (33, 133, 159, 145, 362, 263, 386, 374, 61, 291, 13, 14, 0, 17)


@pytest.fixture(scope="module")
def analyzer():
    from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
    fa = MediapipeFaceAnalyzer()
    yield fa
    fa.close()


def read_rgb(path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])


@pytest.mark.parametrize("name", SOURCES)
def test_source_crop_lies_on_the_face(analyzer, name):
    image = read_rgb(ASSETS / "source" / f"{name}.jpg")
    face = analyzer.detect(image)
    assert face is not None, f"no face found in {name}"
    box = face.crop_box(C.SOURCE_CROP)
    points = face.crop_points.points
    # every eye and mouth landmark inside the crop quad, with a margin of 15 % of the box
    local = (points[list(EYES_MOUTH)] - np.asarray(box.center)) @ box.axes.T
    assert np.all(np.abs(local) <= 0.35 * box.size), f"{name}: eye/mouth landmarks near or outside the crop edge"
    # the crop centre is near the face centre (the box is shifted up by vy = -0.125 box sides, for the forehead)
    face_center = (face.crop_points.eye_center() + face.crop_points.mouth_center()) / 2
    offset = (face_center - np.asarray(box.center)) @ box.axes.T / box.size
    assert abs(offset[0]) < 0.05 and 0.0 < offset[1] < 0.25, f"{name}: face centre at {offset} of the crop"
    # the face fills a sensible part of the crop: eye-to-mouth distance between 10 % and 30 % of its side
    eye_mouth = np.linalg.norm(face.crop_points.mouth_center() - face.crop_points.eye_center()) / box.size
    assert 0.1 < eye_mouth < 0.3
    # in the 512 crop the face is upright: eyes level, above the mouth
    crop_lm = face.crop_points.transformed(box.image_to_crop(512))
    left, right = crop_lm.points[[33, 263]]
    assert abs(left[1] - right[1]) < 0.03 * 512
    assert crop_lm.eye_center()[1] < crop_lm.mouth_center()[1]


def test_crop_cancels_the_roll_of_a_rotated_portrait(analyzer):
    image = read_rgb(ASSETS / "source" / "s5.jpg")
    h, w = image.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 25, 1.0)             # 25 degrees counter-clockwise
    rotated = cv2.warpAffine(image, turn, (w, h), borderMode=cv2.BORDER_REFLECT)
    upright, tilted = analyzer.detect(image), analyzer.detect(rotated)
    box_u, box_t = upright.crop_box(C.SOURCE_CROP), tilted.crop_box(C.SOURCE_CROP)
    assert math.degrees(box_t.angle - box_u.angle) == pytest.approx(-25, abs=2.5)
    assert box_t.size == pytest.approx(box_u.size, rel=0.05)
    # the two crops show the face at the same place: landmarks in crop coordinates agree within 2 % of the side
    in_u = upright.crop_points.transformed(box_u.image_to_crop(512)).points[list(EYES_MOUTH)]
    in_t = tilted.crop_points.transformed(box_t.image_to_crop(512)).points[list(EYES_MOUTH)]
    assert np.abs(in_u - in_t).max() < 0.02 * 512


def test_eye_and_lip_ratios_from_the_mesh(analyzer):
    from liveportrait_triton.client import media
    for name in SOURCES:
        face = analyzer.detect(read_rgb(ASSETS / "source" / f"{name}.jpg"))
        eyes, lip = face.eye_ratio(), face.lip_ratio()
        assert eyes.shape == (2,) and lip.shape == (1,)
        assert np.all((eyes > 0.15) & (eyes < 0.6)), f"{name}: open eyes gave {eyes}"
        assert lip[0] < 0.1, f"{name}: closed mouth gave {lip}"
    # a talking driving video: the lip ratio moves from closed to clearly open, tracked frame to frame
    reader = media.VideoReader(ASSETS / "driving" / "d0.mp4")
    face, lips = None, []
    for frame in reader:
        face = analyzer.track(frame, face)
        assert face is not None
        lips.append(float(face.lip_ratio()[0]))
    reader.close()
    assert len(lips) == 78 and min(lips) < 0.05 and max(lips) > 0.15


def test_ratio_layout_matches_the_official_203_formulas():
    from liveportrait_triton import keypoints as K
    from liveportrait_triton.client.faces import LIVEPORTRAIT_203, Face, Landmarks
    points = np.random.default_rng(1).uniform(0, 100, size=(203, 2))
    lm = Landmarks(points, LIVEPORTRAIT_203)
    face = Face(box=(0, 0, 1, 1), score=1.0, crop_points=lm, ratio_points=lm)
    assert np.allclose(face.eye_ratio(), K.eye_close_ratio(points[None])[0])
    assert np.allclose(face.lip_ratio(), K.lip_close_ratio(points[None])[0])


def test_blank_image_has_no_face(analyzer):
    assert analyzer.detect(np.full((300, 300, 3), 127, np.uint8)) is None


def test_official_face_models_missing_files_are_named(tmp_path):
    from liveportrait_triton.client.faces import OfficialFaceAnalyzer
    with pytest.raises(FileNotFoundError, match="not a directory"):
        OfficialFaceAnalyzer(tmp_path / "absent")
    (tmp_path / "det_10g.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing 2d106det\.onnx, landmark\.onnx"):
        OfficialFaceAnalyzer(tmp_path)
