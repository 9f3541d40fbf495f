"""Every face of the source: selection, paste-back of several faces, and batched sequences on the real server."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from liveportrait_triton import crop as C
from liveportrait_triton import keypoints as K
from liveportrait_triton import spec
from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client import DrivingFrame, LivePortraitClient
from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
from liveportrait_triton.client.multiface import FaceSelection, SourceFace, SourceFaces, parse_faces, select
from liveportrait_triton.client.profiling import server_statistics, statistics_delta
from liveportrait_triton.client.templates import MotionTemplate, load_template, save_npz


def three_faces() -> np.ndarray:
    """scikit-image's astronaut three times (as is, mirrored, smaller) on a flat background."""
    from skimage import data
    face = data.astronaut()[20:300, 120:380]
    canvas = np.zeros((360, 900, 3), np.uint8)
    canvas[...] = (90, 120, 90)
    canvas[30:310, 20:280] = face
    canvas[40:320, 320:580] = face[:, ::-1]
    canvas[60:284, 650:858] = cv2.resize(face, (208, 224), interpolation=cv2.INTER_AREA)
    return canvas


def test_faces_argument_and_selection():
    assert parse_faces("all") == "all" and parse_faces("largest") == "largest" and parse_faces("3") == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="use 'all', 'largest' or a number of faces >= 1"):
            parse_faces(bad)
    assert select(3, "all") == 3 and select(3, "largest") == 1 and select(3, 2) == 2 and select(2, 5) == 2
    assert FaceSelection("all", 3, 3).note is None
    note = FaceSelection(2, 5, 2).note
    assert "found 5 faces" in note and "animating the 2 largest" in note and "other 3 stay as in the source" in note


def face_at(center, size) -> SourceFace:
    box = C.CropBox(center=center, size=size)
    return SourceFace(box, np.zeros((512, 512, 3), np.uint8), None)


def test_paste_keeps_each_face_to_its_mask_and_puts_the_larger_on_top():
    background = np.full((300, 500, 3), 7, np.uint8)
    big, small = face_at((150, 150), 240), face_at((330, 150), 160)    # their boxes overlap around x = 250
    faces = SourceFaces(background, [big, small], FaceSelection("all", 2, 2))
    red, blue = np.zeros((512, 512, 3), np.uint8), np.zeros((512, 512, 3), np.uint8)
    red[..., 0], blue[..., 2] = 200, 200
    out = faces.paste([red, blue])
    mask_big = C.PasteBack(background, big.box).full_mask
    mask_small = C.PasteBack(background, small.box).full_mask
    outside = (mask_big == 0) & (mask_small == 0)
    assert (out[outside] == 7).all(), "pixels outside every mask are the background's"
    assert (out[mask_big == 1][:, 0] == 200).all(), "the larger face is drawn last, whole where its mask is 1"
    only_small = (mask_small == 1) & (mask_big == 0)
    assert only_small.any() and (out[only_small][:, 2] == 200).all() and (out[only_small][:, 0] == 0).all()
    with pytest.raises(ValueError, match="1 animated crops for 2 faces"):
        faces.paste([red])


def test_detect_all_finds_the_three_composed_faces():
    analyzer = MediapipeFaceAnalyzer()
    try:
        faces = analyzer.detect_all(three_faces())
    finally:
        analyzer.close()
    centers = sorted((f.box[0] + f.box[2]) / 2 for f in faces)
    assert len(faces) == 3, [f.box for f in faces]
    assert centers[0] < 300 < centers[1] < 600 < centers[2]
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True), "largest first"


# -- real server ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multiface")
    source = work / "three.png"
    media.write_image(source, three_faces())
    frames = 4
    yaw = np.linspace(0, 20, frames, dtype=np.float32)
    zeros = np.zeros(frames, np.float32)
    rng = np.random.default_rng(3)
    template = MotionTemplate(fps=10, R=K.rotation_matrix(zeros, yaw, zeros),
                              exp=rng.normal(0, 0.01, (frames, 21, 3)).astype(np.float32),
                              t=np.zeros((frames, 3), np.float32), scale=np.ones((frames, 1), np.float32))
    driving_image = work / "driving.png"
    media.write_image(driving_image, three_faces()[30:310, 20:280])
    return {"source": source, "template": save_npz(template, work / "turn.npz"), "frames": frames,
            "driving_image": driving_image}


def paste_by_hand(image: np.ndarray, boxes, crops) -> np.ndarray:
    """Each crop pasted through its own face's mask, the smaller faces first (written here, not SourceFaces.paste)."""
    out = image.copy()
    for k in sorted(range(len(boxes)), key=lambda k: boxes[k].size):
        C.PasteBack(image, boxes[k]).onto(out, crops[k])
    return out


def masks(image: np.ndarray) -> list[np.ndarray]:
    """The paste-back masks `animate` uses for each face (same detector, same crop settings), largest first."""
    analyzer = MediapipeFaceAnalyzer()
    try:
        faces = SourceFaces.detect(image, analyzer, C.SOURCE_CROP, {}, "all")
    finally:
        analyzer.close()
    return [C.PasteBack(image, f.box).full_mask for f in faces.faces]


@pytest.mark.server
def test_all_faces_are_animated_in_batched_sequences(capsys, batching_server, inputs, tmp_path):
    tiny_server = batching_server           # a batching window that a loaded machine cannot miss
    out = tmp_path / "three.mp4"
    models = [spec.PIPELINE, spec.WARPING]
    with LivePortraitClient(tiny_server.grpc_url) as client:
        before = server_statistics(client._client, models)
        code = main(["animate", "--source", str(inputs["source"]), "--driving", str(inputs["template"]),
                     "--output", str(out), "--server", tiny_server.grpc_url, "--faces", "all", "--quiet"])
        assert code == 0, capsys.readouterr().err
        delta = statistics_delta(before, server_statistics(client._client, models))
    frames = inputs["frames"]
    pipeline = delta[spec.PIPELINE]
    assert pipeline["count"] == 3 * (1 + frames), "three sequences: a START and every frame each"
    assert pipeline["executions"] < pipeline["count"], f"the sequences ran batched: {pipeline}"
    # W requests (each one batch) fewer than the 3 x frames faces rendered: faces shared W+G calls
    assert delta[spec.WARPING]["count"] < 3 * frames, delta[spec.WARPING]
    source = media.read_image(inputs["source"])
    decoded = [f.copy() for f in media.VideoReader(out)]
    assert len(decoded) == frames and decoded[0].shape == source.shape
    face_masks = masks(source)
    outside = np.all([m == 0 for m in face_masks], axis=0)
    for number, frame in enumerate(decoded):
        diff = np.abs(frame.astype(int) - source).mean(axis=2)
        for k, mask in enumerate(face_masks):
            assert diff[mask > 0.5].mean() > 10, f"frame {number}: face {k} was animated"
        # H.264 moves flat background pixels by a few levels at most
        assert diff[outside].mean() < 2.0, f"frame {number}: the background outside the masks changed"
    # which face went where: nearer each face's own animation than the two largest faces' swapped
    analyzer = MediapipeFaceAnalyzer()
    try:
        faces = SourceFaces.detect(source, analyzer, C.SOURCE_CROP, {}, "all")
    finally:
        analyzer.close()
    template = load_template(inputs["template"])
    with LivePortraitClient(tiny_server.grpc_url) as client, faces.stream(client) as streams:
        for i in range(frames):
            streams.send(DrivingFrame(motion=template.frame(i)), last=i == frames - 1)
        crops = [r.image for r in streams.finish()]
    boxes = [f.box for f in faces.faces]
    for number, frame in enumerate(decoded):
        own = paste_by_hand(source, boxes, crops[number])
        swapped = paste_by_hand(source, boxes, [crops[number][1], crops[number][0], crops[number][2]])
        for k in (0, 1):
            inside = face_masks[k] > 0.5
            near, far = (np.abs(frame.astype(int) - x)[inside].mean() for x in (own, swapped))
            assert near + 2 < far, f"frame {number}: face {k}'s place shows {near:.1f} / {far:.1f} levels from " \
                                   "its own / the other face's animation"


@pytest.mark.server
def test_more_faces_than_asked_are_reported_and_left_as_they_are(capsys, tiny_server, inputs, tmp_path):
    out = tmp_path / "two.png"
    code = main(["animate", "--source", str(inputs["source"]), "--driving", str(inputs["driving_image"]),
                 "--output", str(out), "--server", tiny_server.grpc_url, "--faces", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "found 3 faces in the source, animating the 2 largest (--faces 2)" in err
    source, result = media.read_image(inputs["source"]), media.read_image(out)
    face_masks = masks(source)
    # which face went where: each face's own animation in its own place (exact: image driving writes a PNG)
    analyzer = MediapipeFaceAnalyzer()
    try:
        faces = SourceFaces.detect(source, analyzer, C.SOURCE_CROP, {"driving_type": "image"}, 2)
    finally:
        analyzer.close()
    picture = media.read_image(inputs["driving_image"])
    crop = cv2.resize(picture, (256, 256), interpolation=cv2.INTER_LINEAR)
    with LivePortraitClient(tiny_server.grpc_url) as client:
        animated = [client.animate_image(f.source, DrivingFrame(crop=crop)) for f in faces.faces]
    boxes = [f.box for f in faces.faces]
    expected = paste_by_hand(source, boxes, animated)
    swapped = paste_by_hand(source, boxes, animated[::-1])
    assert np.abs(expected.astype(int) - swapped)[face_masks[1] > 0.5].mean() > 5, "the two faces' animations differ"
    diff = np.abs(result.astype(int) - expected)
    assert diff.max() <= 1, f"a face's animation is not in its own place (max |diff| {diff.max()})"
    changed = np.abs(result.astype(int) - source).max(axis=2) > 0
    assert changed[face_masks[0] > 0.5].mean() > 0.5 and changed[face_masks[1] > 0.5].mean() > 0.5
    untouched = (face_masks[0] == 0) & (face_masks[1] == 0)
    assert not changed[untouched].any(), "the third face and the background are exactly the source's"
