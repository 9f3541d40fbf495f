"""`liveportrait-triton demo`: the whole system end to end on a portrait that ships in a registry package.

Steps: weights (the official ones when `pretrained_weights/liveportrait` holds them, else synthetic, said loudly),
ONNX export + Triton repository (cached in the work folder), the bundled Triton server on loopback, the source
(scikit-image's astronaut), a generated motion template (a head turn with a blink), `animate`, and a summary of
the written video. The template uses the official absolute mode with eye retargeting: each frame carries the
source's own pose turned by a yaw offset and the source's expression, and the blink is an eye-opening ratio
that dips to zero, which the official eye-retargeting MLP turns into closed eyes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .config import CONFIGS

OFFICIAL_WEIGHTS = Path("pretrained_weights") / "liveportrait"
SYNTHETIC_BANNER = """
########################################################################################################
#  No official weights found in {where}.
#  Using SYNTHETIC (untrained, random) weights: the video shows that the pipeline runs end to end,
#  NOT a face. Put the official checkpoints there (see README, "Official weights") for a real result.
########################################################################################################
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=OFFICIAL_WEIGHTS,
                        help=f"official checkpoint folder (default {OFFICIAL_WEIGHTS}; synthetic weights if absent)")
    parser.add_argument("--output", type=Path,
                        help="video to write (default WORK_DIR/demo.mp4, i.e. artifacts/demo/demo.mp4, which git "
                             "ignores)")
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts") / "demo",
                        help="where weights, the repository, the source and the template are kept between runs")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full",
                        help="network configuration (tiny: a fast smoke run, synthetic weights only)")
    parser.add_argument("--frames", type=int, default=36, help="frames of the generated motion (default 36)")
    parser.add_argument("--fps", type=float, default=12.0, help="frame rate of the generated motion (default 12)")
    parser.add_argument("--yaw", type=float, default=20.0, help="head-turn amplitude in degrees (default 20)")
    parser.add_argument("--draw-keypoints", action=argparse.BooleanOptionalAction, default=None,
                        help="draw every frame's implicit keypoints on a panel beside the result (default: on with "
                             "synthetic weights, whose generated face is noise, so the video still shows the head "
                             "turn being transferred)")


def head_turn_and_blink(frames: int, yaw_amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame yaw offsets (a full left-right turn) and eye-openness factors (1 open, 0 closed; one blink)."""
    phase = np.linspace(0.0, 1.0, frames, endpoint=False)
    yaw = yaw_amplitude * np.sin(2 * np.pi * phase)
    openness = np.ones(frames)
    blink_at, half_width = 0.5, max(2.0 / frames, 0.06)
    near = np.abs(phase - blink_at) < half_width
    openness[near] = np.abs(phase[near] - blink_at) / half_width
    return yaw.astype(np.float32), openness.astype(np.float32)


def make_template(client, crop256: np.ndarray, eye_ratio: np.ndarray, frames: int, fps: float, yaw_amplitude: float):
    """The head-turn-and-blink template around the source's own motion (from the served motion extractor)."""
    from . import keypoints as K
    from .client.templates import MotionTemplate
    motion = client.extract_motion(crop256[None])
    yaw_offsets, openness = head_turn_and_blink(frames, yaw_amplitude)
    R = K.rotation_matrix(np.repeat(motion.pitch, frames), motion.yaw + yaw_offsets, np.repeat(motion.roll, frames))
    source_open = float(np.mean(eye_ratio))
    eyes = np.stack([source_open * openness, source_open * openness], axis=1)
    return MotionTemplate(fps=fps, R=R, exp=np.repeat(motion.exp, frames, 0), t=np.repeat(motion.t, frames, 0),
                          scale=np.repeat(motion.scale, frames, 0), eye_ratio=eyes)


def prepare_weights(weights: Path, work: Path, config: str) -> tuple[Path, str]:
    if (weights / "base_models").is_dir():
        if config != "full":
            raise ValueError("official weights need --config full")
        return weights, f"official weights from {weights}"
    print(SYNTHETIC_BANNER.format(where=weights), flush=True)
    from .weights import write_synthetic_weights
    target = work / f"weights-synthetic0-{config}"
    if not (target / "retargeting_models" / "stitching_retargeting_module.pth").is_file():
        write_synthetic_weights(target, seed=0, config=config)
    return target, "SYNTHETIC weights (seed 0): the video shows the pipeline, not a face"


def prepare_repository(weights: Path, work: Path, config: str) -> Path:
    """Export once per weights folder and configuration; later runs reuse the repository."""
    from . import runtimes
    from .cli import main as cli_main
    repository = work / f"repository-{config}"
    stamp = repository / "demo-source.json"
    wanted = {"weights": str(weights.resolve()), "config": config,
              "mtime": max(p.stat().st_mtime for p in weights.rglob("*.pth"))}
    complete = all(entry.path(repository).is_file()
                   and runtimes.RuntimePlanEntry.of(m, "onnxruntime").path(repository).is_file()
                   for policy in ("exact", "reduced")
                   for m, entry in runtimes.runtime_plan("local", policy=policy).items())
    if complete and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"[demo] reusing the exported repository {repository}")
        return repository
    print(f"[demo] exporting ONNX and rendering the Triton repository into {repository} (minutes at full size)")
    code = cli_main(["export", "--weights", str(weights), "--config", config, "--repository", str(repository),
                     "--validate-batches", "1"])
    if code != 0:
        raise RuntimeError(f"export failed (status {code})")
    stamp.write_text(json.dumps(wanted))
    return repository


def run(args) -> int:
    import cv2
    from skimage import data

    from .client import animate as animate_cli
    from .client import LivePortraitClient
    from .client.faces import make_analyzer
    from .client.templates import save_npz
    from .crop import CropSettings, network_input, warp_crop
    from .serve import TritonServer

    if args.frames < 2:
        raise SystemExit("--frames must be at least 2")
    started = time.perf_counter()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.output is None:
        args.output = work / "demo.mp4"
    weights, weights_note = prepare_weights(args.weights, work, args.config)
    repository = prepare_repository(weights, work, args.config)

    source_path = work / "astronaut.png"
    cv2.imwrite(str(source_path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    analyzer = make_analyzer()
    try:
        face = analyzer.detect(data.astronaut())
    finally:
        analyzer.close()
    if face is None:
        raise SystemExit("no face found in the demo portrait")
    crop256 = network_input(warp_crop(data.astronaut(), face.crop_box(CropSettings(2.3, 0.0, -0.125, rotate=True))))

    print("[demo] starting the bundled Triton server on 127.0.0.1 (free ports)", flush=True)
    with TritonServer(repository) as server:
        print(f"[demo] server ready: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
        with LivePortraitClient(server.grpc_url) as client:
            template = make_template(client, crop256, face.eye_ratio(), args.frames, args.fps, args.yaw)
        template_path = save_npz(template, work / "head_turn_and_blink.npz")
        print(f"[demo] generated motion template {template_path} ({args.frames} frames at {args.fps:g} fps)")
        draw = args.draw_keypoints if args.draw_keypoints is not None else weights_note.startswith("SYNTHETIC")
        settings = animate_cli.AnimateSettings(
            source=str(source_path), driving=str(template_path), output=str(args.output), server=server.grpc_url,
            options={"relative_motion": False, "eye_retargeting": True}, draw_keypoints=draw)
        if draw:
            print("[demo] drawing each frame's implicit keypoints on a panel beside the result (rings: the source's, "
                  "dots: this frame's; eyes cyan, lips magenta)")
        code = animate_cli.run_settings(settings)
    if code != 0:
        return code
    print(f"[demo] {weights_note}")
    print(f"[demo] wrote {args.output}: {describe_video(args.output)}; total {time.perf_counter() - started:.0f} s")
    return 0


def describe_video(path: Path) -> str:
    """Frame count, fps and size as read back from the file."""
    import cv2
    capture = cv2.VideoCapture(str(path))
    try:
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS)
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    return f"{frames} frames, {fps:g} fps, {width}x{height}"
