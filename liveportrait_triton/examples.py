"""`liveportrait-triton examples --out DIR`: example media for a first session, made here (no download, no server).

Writes a portrait (scikit-image's astronaut), a driving clip (the same face turning and nodding: the picture
rotated and shifted frame by frame, so a face detector finds it in every frame), a motion template (a head turn
with a blink, for relative motion with `--eye-retargeting`) and a face-free clip (to see what `animate` says when
the driving video shows no face). Every command of the README's typical session runs on these files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FILES = {"portrait": "portrait.png", "driving": "driving.mp4", "template": "head_turn.npz", "faceless": "no_face.mp4"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("artifacts") / "examples",
                        help="folder to write into (default artifacts/examples, which git ignores)")
    parser.add_argument("--frames", type=int, default=24, help="frames of the clip and the template (default 24)")
    parser.add_argument("--fps", type=float, default=12.0, help="their frame rate (default 12)")


def driving_frames(frames: int) -> list[np.ndarray]:
    """The astronaut's face (a 384x384 square around it) turned in the picture plane and nodded: one sweep."""
    import cv2
    from skimage import data
    face = data.astronaut()[0:384, 64:448]
    phase = np.linspace(0.0, 2 * np.pi, frames, endpoint=False)
    out = []
    for angle, nod in zip(12 * np.sin(phase), 10 * np.sin(2 * phase)):
        matrix = cv2.getRotationMatrix2D((192, 192), float(angle), 1.0)
        matrix[1, 2] += float(nod)
        out.append(cv2.warpAffine(face, matrix, (384, 384), borderMode=cv2.BORDER_REFLECT))
    return out


def head_turn_template(frames: int, fps: float):
    """Yaw -20..20 degrees and back, one blink at the middle; expression and translation still. For relative
    motion only the change from the first frame matters, so no source is needed to make it."""
    from . import keypoints as K
    from .client.templates import MotionTemplate
    from .demo import head_turn_and_blink
    yaw, openness = head_turn_and_blink(frames, 20.0)
    zeros = np.zeros(frames, np.float32)
    eyes = np.stack([0.35 * openness, 0.35 * openness], axis=1).astype(np.float32)
    return MotionTemplate(fps=fps, R=K.rotation_matrix(zeros, yaw, zeros), exp=np.zeros((frames, 21, 3), np.float32),
                          t=np.zeros((frames, 3), np.float32), scale=np.ones((frames, 1), np.float32),
                          eye_ratio=eyes, lip_ratio=np.zeros((frames, 1), np.float32))


def write_examples(out: Path, frames: int = 24, fps: float = 12.0) -> dict[str, Path]:
    from skimage import data
    from .client import media
    from .client.templates import save_npz
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / file for name, file in FILES.items()}
    media.write_image(paths["portrait"], data.astronaut())
    with media.VideoWriter(paths["driving"], (384, 384), fps) as writer:
        for frame in driving_frames(frames):
            writer.write(frame)
    with media.VideoWriter(paths["faceless"], (384, 384), fps) as writer:
        for i in range(max(frames // 3, 2)):
            writer.write(np.full((384, 384, 3), (90 + 4 * i, 120, 90), np.uint8))
    save_npz(head_turn_template(frames, fps), paths["template"])
    return paths


def run(args) -> int:
    if args.frames < 2 or args.fps <= 0:
        print("error: --frames must be at least 2 and --fps positive")
        return 2
    for name, path in write_examples(args.out, args.frames, args.fps).items():
        print(f"{name:9s} {path}")
    return 0
