"""Portrait editing against the real bundled Triton server (tiny networks): library, command and bad values."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import assert_images_close
from liveportrait_triton import crop as C
from liveportrait_triton import editing, spec
from liveportrait_triton import keypoints as K
from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client import LivePortraitClient, RequestFailed, new_sequence_id
from liveportrait_triton.client.editing import PortraitEditor
from liveportrait_triton.client.profiling import server_statistics, statistics_delta
from liveportrait_triton.pipeline import Animator, TorchRunner

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    from skimage import data
    path = tmp_path_factory.mktemp("edit") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def client(tiny_server):
    with LivePortraitClient(tiny_server.grpc_url) as c:
        yield c


def expected_crop(tiny_networks, crop256, controls, eye, lip) -> np.ndarray:
    """The edit computed in-process with PyTorch from the same crop and ratios."""
    runner = TorchRunner(tiny_networks)
    animator = Animator(runner)
    [state] = animator.register_sources([crop256], [spec.parse_options({})])
    x = editing.edited_keypoints(state.source, controls)
    if controls.get("eye_ratio") is not None:
        x = x + runner.run(spec.RETARGET_EYE, {"kp_source": state.x_s, "eye_ratio": editing.eye_ratio_input(
            eye, controls["eye_ratio"])})["delta"].reshape(1, 21, 3)
    x = K.apply_stitching(x, runner.run(spec.STITCHING, {"kp_source": state.x_s, "kp_driving": x})["delta"])
    return animator.render(state.feature_volume, state.x_s, x)[0]


def test_editor_edits_from_the_cached_source_with_one_warp_and_generate_per_edit(client, portrait, tiny_networks):
    image = media.read_image(portrait)
    models = [spec.PIPELINE, *spec.SUBMODELS]
    with PortraitEditor(client, image, paste_back=False) as editor:
        before = server_statistics(client._client, models)
        first = editor.edit(yaw=12, smile=0.9, eye_ratio=0.7)
        second = editor.edit(pitch=-8, wink=25)
        delta = statistics_delta(before, server_statistics(client._client, models))
        crop256 = C.network_input(editor.crop512)
        eye = editor.session.source.eye_ratio
    assert delta[spec.PIPELINE]["count"] == 2
    assert delta[spec.WARPING]["count"] == 2 and delta[spec.GENERATOR]["count"] == 2
    assert delta[spec.APPEARANCE]["count"] == 0 and delta[spec.MOTION]["count"] == 0, "the source was cached"
    assert delta[spec.RETARGET_EYE]["count"] == 1
    want_first = expected_crop(tiny_networks, crop256, spec.parse_edit({"yaw": 12, "smile": 0.9, "eye_ratio": 0.7}),
                               eye, None)
    assert_images_close(first, want_first, "served edit vs PyTorch")
    assert_images_close(second, expected_crop(tiny_networks, crop256, spec.parse_edit({"pitch": -8, "wink": 25}),
                                              eye, None), "second edit")
    assert np.abs(first.astype(int) - second).mean() > 0.5


def test_edit_command_pastes_back_and_keeps_the_background(capsys, tiny_server, portrait, tmp_path):
    out = tmp_path / "edited.png"
    code = main(["edit", "--source", str(portrait), "--output", str(out), "--server", tiny_server.grpc_url,
                 "--yaw", "15", "--smile", "1.0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    edited, source = media.read_image(out), media.read_image(portrait)
    assert edited.shape == source.shape
    from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
    analyzer = MediapipeFaceAnalyzer()
    try:
        box = analyzer.detect(source).crop_box(C.CropSettings(2.5, C.SOURCE_CROP.vx, C.SOURCE_CROP.vy))
    finally:
        analyzer.close()
    mask = C.PasteBack(source, box).full_mask
    changed = np.abs(edited.astype(int) - source).max(axis=2) > 0
    assert changed[mask > 0].mean() > 0.3, "the face region changed"
    assert not changed[mask == 0].any(), "pixels outside the paste-back mask are the source's"


def test_out_of_range_edits_are_refused_by_client_and_server(capsys, client, tiny_server, portrait, tmp_path):
    code = main(["edit", "--source", str(portrait), "--output", str(tmp_path / "x.png"), "--server",
                 tiny_server.grpc_url, "--yaw", "40"])
    assert code == 1 and "edit control 'yaw'=40.0 is outside [-25.0, 25.0]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    crop = np.zeros((256, 256, 3), np.uint8)
    sequence = new_sequence_id()
    client.infer({"source": crop}, sequence, start=True)
    with pytest.raises(RequestFailed, match=r"edit control 'eyebrow'=31.0 is outside \[-30.0, 30.0\]"):
        client.infer({}, sequence, options={"edit": True, "eyebrow": 31})
    image, index = client.infer({}, sequence, end=True, options={"edit": True, "eyebrow": 30})
    assert image.shape == (512, 512, 3) and index == -1, "the sequence survived the refused edit"


def test_edit_draw_keypoints_shows_the_edit_on_a_panel(capsys, tiny_server, portrait, tmp_path):
    """edit --draw-keypoints: [the edited portrait, unchanged | the keypoint panel]; a yaw edit moves the dots off
    the rings (the panel of a no-op edit has every dot on its ring)."""
    def edit(name, *controls):
        out = tmp_path / name
        code = main(["edit", "--source", str(portrait), "--output", str(out), "--server", tiny_server.grpc_url,
                     "--quiet", *controls])
        assert code == 0, capsys.readouterr().err
        return media.read_image(out)
    plain, drawn = edit("plain.png", "--yaw", "20"), edit("drawn.png", "--yaw", "20", "--draw-keypoints")
    height, width = plain.shape[:2]
    assert drawn.shape == (height, width + height, 3)
    assert np.array_equal(drawn[:, :width], plain), "the edited portrait itself is not drawn on"
    still = edit("still.png", "--draw-keypoints")
    yellow = np.all(np.abs(drawn[:, width:].astype(int) - [255, 255, 0]) < 40, axis=2)
    yellow_still = np.all(np.abs(still[:, width:].astype(int) - [255, 255, 0]) < 40, axis=2)
    assert yellow.sum() > 20 and yellow_still.sum() > 20
    assert (yellow & ~yellow_still).sum() > 0.5 * yellow.sum(), "the yaw edit moved the keypoint dots"
