"""The web interface (`liveportrait-triton ui`) on the real bundled Triton server (tiny networks): gradio_client
calls of /animate and /edit, and a real headless Chromium (Debian's `chromium`, driven by Playwright) uploading,
animating, editing and streaming a fake webcam fed from a generated .y4m file over WebRTC.

Set LP_UI_SCREENSHOTS=DIR to save a screenshot of each tab there (how docs/ui-*.png were made).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import server_metric
from liveportrait_triton import spec
from liveportrait_triton.client import media
from liveportrait_triton.serve import free_port

from liveportrait_triton.client import ui  # noqa: E402  (imports gradio only when used)

pytest.importorskip("gradio", reason="the `ui` extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")

pytestmark = pytest.mark.server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVING_FRAMES = 5
SCREENSHOTS = os.environ.get("LP_UI_SCREENSHOTS")


def astronaut() -> np.ndarray:
    from skimage import data
    return data.astronaut()


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    """A generated portrait, a generated driving clip (the portrait's face moving) and a .y4m fake-camera file."""
    folder = tmp_path_factory.mktemp("ui_media")
    image = astronaut()
    portrait = media.write_image(folder / "astronaut.png", image)
    face = cv2.resize(image[0:300, 100:400], (256, 256))
    driving = folder / "driving.mp4"
    with media.VideoWriter(driving, (256, 256), 8.0) as writer:
        for i in range(DRIVING_FRAMES):
            shift = np.float32([[1, 0, 6 * np.sin(i)], [0, 1, 3 * np.cos(i)]])
            writer.write(cv2.warpAffine(face, shift, (256, 256), borderMode=cv2.BORDER_REFLECT))
    with_audio = folder / "driving_audio.mp4"          # the same clip with a tone: the result keeps the audio
    import imageio_ffmpeg
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(driving), "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-shortest", "-c:v", "copy", "-c:a", "aac", str(with_audio)],
                   check=True)
    camera = folder / "camera.y4m"
    width, height = 640, 480
    with open(camera, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        head = cv2.resize(image[0:300, 80:420], (340, 300))
        for i in range(30):
            canvas = np.full((height, width, 3), 40, np.uint8)
            x = 150 + int(20 * np.sin(i / 3))
            canvas[100:400, x:x + 340] = head
            out.write(b"FRAME\n" + cv2.cvtColor(canvas, cv2.COLOR_RGB2YUV_I420).tobytes())
    return {"portrait": portrait, "driving": driving, "driving_audio": with_audio, "camera": camera}


@pytest.fixture(scope="module")
def page_url(tiny_server):
    """The page on loopback, talking to the tiny server."""
    yield from launched_page(tiny_server)


def launched_page(server):
    """(the page's address, its App) on loopback, talking to `server`, while the generator runs."""
    app = ui.App(server.grpc_url, server.metrics_url)
    port = free_port()
    demo = ui.launch(app, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        demo.close()
        app.close()


def live_sequences(server) -> float:
    return server_metric(server, "liveportrait_live_sequences", model=spec.PIPELINE)


def assert_changed(before: np.ndarray, after: np.ndarray, what: str) -> None:
    """The face moved: with paste-back only the face region changes (the tiny synthetic networks move it a little;
    an ignored edit changes nothing at all, the pipeline being deterministic)."""
    diff = np.abs(before.astype(np.int16) - after.astype(np.int16))
    assert diff.max() >= 8 and diff.mean() > 0.05, (
        f"{what} changed the portrait by max {diff.max()} / mean {diff.mean():.3f} levels (bounds 8 / 0.05)")


def read_image_url(url: str) -> np.ndarray:
    data = np.frombuffer(urllib.request.urlopen(url, timeout=30).read(), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


# ---------------------------------------------------------------------------------------------------------------
# gradio_client


def test_gradio_client_animate_and_edit(page_url, media_files):
    url, _ = page_url
    client = gradio_client.Client(url, verbose=False)
    video, comparison, image, download, message = client.predict(
        gradio_client.handle_file(str(media_files["portrait"])),
        gradio_client.handle_file(str(media_files["driving_audio"])), api_name="/animate")
    assert image is None and download is not None and "frames" in message
    assert media.probe_video(video)["frames"] == DRIVING_FRAMES
    assert media.probe_video(video)["size"] == (512, 512)          # pasted back into the 512x512 astronaut
    assert media.probe_video(video)["audio_codec"] == "aac"         # the driving clip's audio
    assert media.probe_video(comparison)["size"] == (3 * 512, 512)
    assert media.probe_video(comparison)["frames"] == DRIVING_FRAMES

    # a source video (v2v): the clip animates itself; no comparison video for source videos
    video, comparison, _, _, _ = client.predict(gradio_client.handle_file(str(media_files["driving"])),
                                                gradio_client.handle_file(str(media_files["driving"])),
                                                api_name="/animate")
    assert comparison is None and media.probe_video(video)["frames"] == DRIVING_FRAMES

    portrait = gradio_client.handle_file(str(media_files["portrait"]))
    # image driving: an image comes back (third output), no video
    video, comparison, image, download, _ = client.predict(portrait, portrait, api_name="/animate")
    assert video is None and comparison is None and download is not None
    assert cv2.imread(image).shape == (512, 512, 3)

    unchanged = cv2.imread(client.predict(portrait, api_name="/edit"))
    turned = cv2.imread(client.predict(portrait, yaw=20.0, smile=0.8, api_name="/edit"))
    assert unchanged.shape == turned.shape == (512, 512, 3)
    assert_changed(unchanged, turned, "the edit")


# -- each Animate control has its effect: the page's result equals the command's with the matching flag --------
# (tests/test_cli_options.py checks each flag's effect against the option's meaning; here the page's controls reach
# the same flags: a control the page drops or wires to another argument gives another picture)

ABSOLUTE_CROP = {"relative_motion": False, "crop_driving": True}   # the driving crop moves the pose (absolute mode)
PAGE_CONTROLS = [       # (control values, the `animate` flags, the control values compared with)
    ({"relative_motion": False}, ["--no-relative-motion"], {}),
    ({"stitching": False}, ["--no-stitching"], {}),
    ({"eye_retargeting": True}, ["--eye-retargeting"], {}),
    ({"lip_retargeting": True}, ["--lip-retargeting"], {}),
    ({"relative_motion": False, "animation_region": "pose"}, ["--no-relative-motion", "--animation-region", "pose"],
     {"relative_motion": False}),
    ({"driving_multiplier": 1.6}, ["--driving-multiplier", "1.6"], {}),
    ({"anchor": "source"}, ["--anchor", "source"], {}),
    ({"source_scale": 2.8}, ["--source-scale", "2.8"], {}),
    ({"source_vx": 0.1}, ["--source-vx", "0.1"], {}),
    ({"source_vy": 0.05}, ["--source-vy", "0.05"], {}),
    (ABSOLUTE_CROP, ["--no-relative-motion", "--crop-driving"], {"relative_motion": False}),
    ({**ABSOLUTE_CROP, "driving_scale": 1.7}, ["--no-relative-motion", "--crop-driving", "--driving-scale", "1.7"],
     ABSOLUTE_CROP),
    ({**ABSOLUTE_CROP, "driving_vx": 0.15}, ["--no-relative-motion", "--crop-driving", "--driving-vx", "0.15"],
     ABSOLUTE_CROP),
    ({**ABSOLUTE_CROP, "driving_vy": 0.15}, ["--no-relative-motion", "--crop-driving", "--driving-vy", "0.15"],
     ABSOLUTE_CROP),
    ({"paste_back": False}, ["--no-paste-back"], {}),
]
VIDEO_CONTROLS = [      # options of a moving driving input (a template here)
    ({"anchor": "source", "driving_option": "pose-friendly"},
     ["--anchor", "source", "--driving-option", "pose-friendly"], {"anchor": "source"}),
    ({"smooth": True}, ["--smooth"], {}),
]


def page_animate(client, source, driving, values: dict):
    video, _, image, _, message = client.predict(gradio_client.handle_file(str(source)),
                                                 gradio_client.handle_file(str(driving)), api_name="/animate",
                                                 **values)
    if image is not None:
        return media.read_image(image)
    return np.stack([f.copy() for f in media.VideoReader(video)])


def command_animate(capsys, server, source, driving, output, flags) -> np.ndarray:
    from liveportrait_triton.cli import main
    code = main(["animate", "--source", str(source), "--driving", str(driving), "--output", str(output),
                 "--server", server.grpc_url, "--quiet", *flags])
    assert code == 0, capsys.readouterr().err
    if output.suffix == ".mp4":
        return np.stack([f.copy() for f in media.VideoReader(output)])
    return media.read_image(output)


@pytest.fixture(scope="module")
def control_inputs(tmp_path_factory):
    from conftest import ASSETS
    from liveportrait_triton import keypoints as K
    from liveportrait_triton.client.templates import MotionTemplate, save_npz
    folder = tmp_path_factory.mktemp("ui_controls")
    driving = media.write_image(folder / "driving.png", media.read_image(ASSETS / "driving" / "d30.jpg"))
    rng = np.random.default_rng(5)
    frames = 5
    yaw, pitch = np.float32(rng.choice([-18.0, 18.0], frames)), np.float32(rng.normal(0, 6, frames))
    template = MotionTemplate(fps=25, R=K.rotation_matrix(pitch, yaw, np.zeros(frames, np.float32)),
                              exp=rng.normal(0, 0.02, (frames, 21, 3)).astype(np.float32),
                              t=rng.normal(0, 0.03, (frames, 3)).astype(np.float32),
                              scale=np.float32(rng.uniform(1.3, 1.7, (frames, 1))))
    return {"source": ASSETS / "source" / "s0.jpg", "driving": driving,
            "template": save_npz(template, folder / "jitter.npz")}


@pytest.mark.parametrize("values, flags, base", PAGE_CONTROLS + VIDEO_CONTROLS,
                         ids=[" ".join(flags) for _, flags, _ in PAGE_CONTROLS + VIDEO_CONTROLS])
def test_each_animate_control_reaches_the_command(page_url, tiny_server, control_inputs, capsys, tmp_path, values,
                                                  flags, base):
    url, _ = page_url
    client = gradio_client.Client(url, verbose=False)
    video = (values, flags, base) in VIDEO_CONTROLS
    driving = control_inputs["template" if video else "driving"]
    page = page_animate(client, control_inputs["source"], driving, values)
    command = command_animate(capsys, tiny_server, control_inputs["source"], driving,
                              tmp_path / ("out.mp4" if video else "out.png"), flags)
    assert page.shape == command.shape, (page.shape, command.shape)
    same = np.abs(page.astype(np.int16) - command.astype(np.int16))
    assert same.max() <= 1 and same.mean() <= 0.01, f"page vs command: max {same.max()}, mean {same.mean():.4f}"
    compared = page_animate(client, control_inputs["source"], driving, base)
    if compared.shape == page.shape:        # (--no-paste-back changes the shape: the size check above is its effect)
        source = media.read_image(control_inputs["source"])
        face = np.ones(page.shape[:-1], bool)
        if page.shape == source.shape:      # pasted back: measure where the face is
            face = np.any(page != source, axis=-1) | np.any(compared != source, axis=-1)
        effect = np.abs(page.astype(np.int16) - compared.astype(np.int16))[face].mean()
        assert effect > 0.05, f"the control changed the face by {effect:.3f} levels only"


def test_faceless_driving_frames_are_named_on_the_page(page_url, media_files, tmp_path):
    """The page says what `animate` says: the faceless frames in the message, and an error when none has a face."""
    frames = [f.copy() for f in media.VideoReader(media_files["driving"])]
    gaps, blank = tmp_path / "gaps.mp4", tmp_path / "blank.mp4"
    for path, faceless in ((gaps, {1, 3}), (blank, set(range(len(frames))))):
        with media.VideoWriter(path, (256, 256), 8.0) as writer:
            for i, frame in enumerate(frames):
                writer.write(np.full_like(frame, 128) if i in faceless else frame)
    url, _ = page_url
    client = gradio_client.Client(url, verbose=False)
    portrait = gradio_client.handle_file(str(media_files["portrait"]))
    *_, message = client.predict(portrait, gradio_client.handle_file(str(gaps)), api_name="/animate")
    assert f"note: no face found in 2 of {DRIVING_FRAMES} driving frames (0-based: 1, 3)" in message, message
    with pytest.raises(Exception, match=f"no face found in any of the {DRIVING_FRAMES} driving frames"):
        client.predict(portrait, gradio_client.handle_file(str(blank)), api_name="/animate")


def test_uploads_only_and_limits(page_url, media_files):
    """Paths outside Gradio's upload folder are refused; driving clips over the duration limit too."""
    _, app = page_url
    settings = {c.name: c.default for c in ui.ANIMATE_CONTROLS}
    with pytest.raises(ValueError, match="must be an uploaded file"):
        app.animate(str(media_files["portrait"]), str(media_files["driving"]), settings)
    uploads = Path(app.upload_folder) / "test_ui_limits"
    uploads.mkdir(parents=True, exist_ok=True)
    portrait = shutil.copy(media_files["portrait"], uploads)
    driving = shutil.copy(media_files["driving"], uploads)
    short = ui.App(app.server, app.metrics_url, ui.Limits(driving_seconds=0.25))
    try:
        with pytest.raises(ValueError, match=r"is 0\.6 s long; this page accepts at most 0\.25 s"):
            short.animate(portrait, driving, settings)
    finally:
        short.close()
        shutil.rmtree(uploads, ignore_errors=True)


def test_live_start_with_the_server_down_says_so(page_url, media_files):
    """Start on a page whose Triton server is gone: the error names the server (the page shows it as a Gradio
    error, as the browser test of a missing portrait sees), and no stream is left open."""
    _, app = page_url
    uploads = Path(app.upload_folder) / "test_ui_server_down"
    uploads.mkdir(parents=True, exist_ok=True)
    portrait = shutil.copy(media_files["portrait"], uploads)
    down = ui.App(f"127.0.0.1:{free_port()}", app.metrics_url)
    try:
        with pytest.raises(ui.USER_ERRORS, match="127.0.0.1"):
            down.live_start("a-browser-session", portrait, {c.name: c.default for c in ui.LIVE_CONTROLS})
        assert len(down.live) == 0
    finally:
        down.close()
        shutil.rmtree(uploads, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# A real browser


@pytest.fixture(scope="module")
def browser(media_files):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={media_files['camera']}",
            # host ICE candidates as addresses (not mDNS names): the page's server has no STUN/TURN to meet on
            "--disable-features=WebRtcHideLocalIpsWithMdns"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, page_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["camera"])
    page = context.new_page()
    page.goto(page_url[0])
    page.wait_for_selector("#animate-source")
    yield page
    context.close()


def shoot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"ui-{name}.png"), full_page=True)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value is not None and value is not False:        # a value, or True
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_browser_animate(page, page_url, media_files, tmp_path):
    page.locator("#animate-source input[type=file]").set_input_files(str(media_files["portrait"]))
    page.locator("#animate-driving input[type=file]").set_input_files(str(media_files["driving"]))
    page.wait_for_selector("#animate-source >> text=astronaut", timeout=30000)
    page.wait_for_selector("#animate-driving >> text=driving", timeout=30000)
    page.locator("#animate-button").click()
    video = page.wait_for_selector("#animate-result video[src]", timeout=180000)
    assert "frames in" in page.inner_text("#animate-message")
    page.wait_for_selector("#animate-comparison video[src]", timeout=30000)
    shoot(page, "animate")
    src = video.get_attribute("src")
    downloaded = tmp_path / "result.mp4"
    downloaded.write_bytes(urllib.request.urlopen(src if src.startswith("http") else page_url[0] + src,
                                                  timeout=30).read())
    assert media.probe_video(downloaded)["frames"] == DRIVING_FRAMES


def test_browser_edit_slider_updates_preview(page, media_files):
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-source input[type=file]").set_input_files(str(media_files["portrait"]))
    first = wait_for(lambda: page.locator("#edit-preview img").get_attribute("src") or None
                     if page.locator("#edit-preview img").count() else None, 120, "the first preview")
    # drag the yaw slider: the range input fires `input` events as a real drag does
    page.locator("#edit-yaw input[type=range]").evaluate(
        "el => { el.value = 20; el.dispatchEvent(new Event('input', {bubbles: true})); }")
    second = wait_for(lambda: (lambda s: s if s and s != first else None)(
        page.locator("#edit-preview img").get_attribute("src")), 120, "the preview to change after the slider moved")
    shoot(page, "edit")
    before, after = read_image_url(first), read_image_url(second)
    assert before.shape == after.shape
    assert_changed(before, after, "the preview")


LIVE_VIDEO_FRAME = """() => {
  const video = document.getElementById('live-video');
  if (!video || video.readyState < 2 || !video.videoWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  canvas.getContext('2d').drawImage(video, 0, 0);
  return canvas.toDataURL('image/png');
}"""


def live_video_frame(page) -> np.ndarray | None:
    """The frame the page's received WebRTC video shows now (RGB), None before it plays."""
    url = page.evaluate(LIVE_VIDEO_FRAME)
    if not url:
        return None
    import base64
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_browser_live_no_portrait_is_an_error_in_the_page(page):
    page.get_by_role("tab", name="Live").click()
    page.locator("#live-start").click()
    page.wait_for_selector("text=no portrait: upload one", timeout=30000)
    assert page.locator("#live-video").count() == 0


def test_browser_live_webrtc_and_sequence_freed(page, tiny_server, media_files):
    from liveportrait_triton.client.live_webrtc import host_addresses
    if not host_addresses():
        pytest.skip("WebRTC needs a network address other than loopback (neither aioice nor Chromium offer "
                    "loopback candidates) and this machine has none")
    # earlier tests' editors end with their sessions (tab closed, or gradio_client gone)
    wait_for(lambda: live_sequences(tiny_server) == 0, 60, "no live sequence before the test")
    page.get_by_role("tab", name="Live").click()
    page.locator("#live-source input[type=file]").set_input_files(str(media_files["portrait"]))
    page.wait_for_selector("#live-source img", timeout=30000)
    page.locator("#live-start").click()
    first = wait_for(lambda: live_video_frame(page), 120, "the animated WebRTC video to play")
    portrait = astronaut()
    # the received track is the animated 512x512 portrait (pasted back), not the 640x480 camera
    assert first.shape == portrait.shape, f"received {first.shape}, the portrait is {portrait.shape}"
    resemblance = np.abs(first.astype(np.int16) - portrait).mean()
    assert resemblance < 25, f"the received frame differs from the portrait by {resemblance:.1f} levels on average"
    assert live_sequences(tiny_server) == 1          # one sequence for this browser session

    def moved():
        frame = live_video_frame(page)
        return frame is not None and np.abs(frame.astype(np.int16) - first).max() >= 8
    wait_for(moved, 120, "the animated face to move with the camera (a frame differing by 8+ levels)")

    def counts():
        found = re.search(r"camera frames (\d+) \| animated (\d+) \| skipped (\d+) \(server busy: the newest "
                          r"frame wins\)", page.inner_text("#live-message"))
        return found if found and int(found[2]) >= 3 else None
    stats = wait_for(counts, 60, "the stream's frame counts in the page (3 or more animated)")
    received, animated, skipped = map(int, stats.groups())
    assert received >= animated + skipped, stats[0]
    wait_for(lambda: "live sequences 1" in page.inner_text("#server-status"), 15, "the status line to show it")
    shoot(page, "live")
    page.locator("#live-stop").click()               # Stop ends the sequence
    wait_for(lambda: live_sequences(tiny_server) == 0, 60, "the live sequence to be freed after Stop")
    page.wait_for_selector("#live-message >> text=stopped", timeout=10000)
    page.locator("#live-start").click()              # a new stream, a new sequence
    wait_for(lambda: live_sequences(tiny_server) == 1, 60, "a new live sequence after Start")
    wait_for(lambda: re.search(r"animated [1-9]", page.inner_text("#live-message")), 60, "animated frames again")
    page.close()                                     # the tab closes: its sequence is ended
    wait_for(lambda: live_sequences(tiny_server) == 0, 60, "the live sequence to be freed after the tab closed")


def test_concurrent_starts_cannot_pass_the_session_limit():
    """Sessions take seconds to create (face detection, the sequence's START): starts that arrive together must
    not all pass the limit check before any of them is registered (the page load run found 5 of limit 4 open)."""
    import concurrent.futures
    import threading

    class Slow:
        def close(self):
            pass

    sessions = ui.Sessions("live", limit=4, idle_s=60)
    barrier = threading.Barrier(5)

    def start(k):
        barrier.wait()
        try:
            sessions.get(f"browser-{k}", "key", lambda: time.sleep(0.3) or Slow())
            return "open"
        except ValueError as exc:
            return str(exc)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(start, range(5)))
    assert outcomes.count("open") == 4 and len(sessions) == 4, outcomes
    assert [o for o in outcomes if o != "open"] == ["4 live sessions are open, the most this page allows; "
                                                     "try again later"]


# ---------------------------------------------------------------------------------------------------------------
# Animals: the Animate tab's Animals section builds the command's AnimateSettings (a server with both model sets)

ANIMAL_BOX = "120,10,260,250"       # chelsea's face (x,y,w,h)


@pytest.fixture(scope="module")
def animal_inputs(tmp_path_factory):
    """scikit-image's chelsea cat and a 4-frame motion template (a head turn with expression changes)."""
    from skimage import data
    from liveportrait_triton import keypoints as K
    from liveportrait_triton.client.templates import MotionTemplate, save_npz
    folder = tmp_path_factory.mktemp("ui_animals")
    frames = 4
    rng = np.random.default_rng(4)
    template = MotionTemplate(fps=10, R=K.rotation_matrix(np.float32([0, -8, 6, 0]), np.float32([0, 15, -15, 8]),
                                                          np.zeros(frames, np.float32)),
                              exp=rng.normal(0, 0.03, (frames, 21, 3)).astype(np.float32),
                              t=rng.normal(0, 0.03, (frames, 3)).astype(np.float32),
                              scale=np.full((frames, 1), 1.5, np.float32))
    return {"source": media.write_image(folder / "chelsea.png", data.chelsea()),
            "template": save_npz(template, folder / "turn.npz")}


@pytest.fixture(scope="module")
def animals_page_url(tiny_both_server):
    """The page on loopback, talking to the server with both model sets."""
    yield from launched_page(tiny_both_server)


@pytest.mark.parametrize("values, flags, size", [
    ({"subject": "animal", "stitching": False}, ["--subject", "animal"], (512, 512)),
    ({"subject": "animal", "stitching": True, "source_box": ANIMAL_BOX},
     ["--subject", "animal", "--stitching", "--source-box", ANIMAL_BOX], (450, 300)),
], ids=["whole image", "box with stitching"])
def test_animals_page_matches_the_command(animals_page_url, tiny_both_server, animal_inputs, capsys, tmp_path,
                                          values, flags, size):
    client = gradio_client.Client(animals_page_url[0], verbose=False)
    page = page_animate(client, animal_inputs["source"], animal_inputs["template"], values)
    command = command_animate(capsys, tiny_both_server, animal_inputs["source"], animal_inputs["template"],
                              tmp_path / "out.mp4", flags)
    assert page.shape == command.shape == (4, size[1], size[0], 3), (page.shape, command.shape)
    same = np.abs(page.astype(np.int16) - command.astype(np.int16))
    assert same.max() <= 1 and same.mean() <= 0.01, f"page vs command: max {same.max()}, mean {same.mean():.4f}"


def test_browser_animals(browser, animals_page_url, tiny_both_server, animal_inputs, capsys, tmp_path):
    """In Chromium: upload the cat and a template, choose the animal subject (stitching turns off), set the box by
    clicking two corners on the picture (its fields follow), tick stitching, animate; the video equals the
    command's with the box the page shows."""
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    try:
        page.goto(animals_page_url[0])
        page.wait_for_selector("#animate-source")
        page.locator("#animate-source input[type=file]").set_input_files(str(animal_inputs["source"]))
        page.locator("#animate-driving input[type=file]").set_input_files(str(animal_inputs["template"]))
        page.wait_for_selector("#animate-source >> text=chelsea", timeout=30000)
        page.wait_for_selector("#animate-driving >> text=turn", timeout=30000)
        wait_for(lambda: "animal set served" in page.inner_text("#server-status"), 30, "the status line's set")
        page.get_by_text("Animals", exact=True).first.click()
        page.locator("#animate-subject input").click()
        page.get_by_role("option", name="animal").click()
        page.get_by_text("Motion", exact=True).first.click()
        wait_for(lambda: not page.locator("#animate-stitching input").is_checked(), 20, "stitching to turn off")
        preview = page.wait_for_selector("#animate-box-preview img[src]", timeout=30000)
        preview.scroll_into_view_if_needed()
        shown = preview.bounding_box()
        natural = preview.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert natural == [451, 300], natural
        for x, y in ((120, 10), (379, 259)):            # the corners of ANIMAL_BOX
            page.mouse.click(shown["x"] + (x + 0.5) * shown["width"] / natural[0],
                             shown["y"] + (y + 0.5) * shown["height"] / natural[1])
            time.sleep(1.0)
        box = wait_for(lambda: page.locator("#animate-source-box textarea, #animate-source-box input").first
                       .input_value() or None, 30, "the clicked box in its text field")
        x, y, w, h = map(int, box.split(","))
        assert abs(x - 120) <= 2 and abs(y - 10) <= 2 and abs(w - 260) <= 3 and abs(h - 250) <= 3, box
        assert page.locator("#animate-box-w input").input_value() == str(w)
        page.locator("#animate-stitching input").check()
        shoot(page, "animals")
        page.locator("#animate-button").click()
        video = page.wait_for_selector("#animate-result video[src]", timeout=180000)
        src = video.get_attribute("src")
        downloaded = tmp_path / "page.mp4"
        downloaded.write_bytes(urllib.request.urlopen(src if src.startswith("http") else animals_page_url[0] + src,
                                                      timeout=30).read())
    finally:
        context.close()
    from_page = np.stack([f.copy() for f in media.VideoReader(downloaded)])
    command = command_animate(capsys, tiny_both_server, animal_inputs["source"], animal_inputs["template"],
                              tmp_path / "command.mp4", ["--subject", "animal", "--stitching", "--source-box", box])
    assert from_page.shape == command.shape == (4, 300, 450, 3), (from_page.shape, command.shape)
    same = np.abs(from_page.astype(np.int16) - command.astype(np.int16))
    assert same.max() <= 1 and same.mean() <= 0.01, f"page vs command: max {same.max()}, mean {same.mean():.4f}"
