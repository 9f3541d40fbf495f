"""`liveportrait-triton template`: extract a motion template (.npz) from a driving video, or convert an official .pkl.

Each frame is cropped like `animate` crops driving frames, the served `motion_extractor` runs on batches of crops
and `keypoints.MotionInfo.from_raw` turns its raw outputs into R, exp, t and scale. Eye and lip ratios come from the
tracked landmarks, so the template can drive eye/lip retargeting. No pickle is written.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

from .. import crop as C
from .. import spec
from . import media
from .client import DEFAULT_URL, LivePortraitClient
from .errors import RequestFailed, ServerMismatch, ServerUnavailable
from .driving import DrivingCropper
from .faces import NoFaceError
from .templates import MotionTemplate, TemplateError, is_template, load_template, save_npz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driving", required=True,
                        help="driving video to extract from, or an official .pkl / project .npz to convert")
    parser.add_argument("--output", required=True, help="template to write (.npz)")
    parser.add_argument("--server", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    parser.add_argument("--crop-driving", action=argparse.BooleanOptionalAction, default=False,
                        help="crop the face out of each frame (default off: frames are face crops already)")
    parser.add_argument("--driving-scale", type=float, default=C.DRIVING_CROP.scale)
    parser.add_argument("--driving-vx", type=float, default=C.DRIVING_CROP.vx)
    parser.add_argument("--driving-vy", type=float, default=C.DRIVING_CROP.vy)
    parser.add_argument("--face-models", metavar="DIR", help="official InsightFace/LivePortrait face models")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--batch", type=int, default=8, help=f"frames per motion-extractor request "
                                                             f"(1..{spec.MAX_BATCH_SIZE}, default 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        template = make_template(args)
        save_npz(template, args.output)
    except (media.MediaError, NoFaceError, TemplateError, ServerUnavailable, ServerMismatch, RequestFailed,
            FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        ratios = " with eye/lip ratios" if template.eye_ratio is not None else ""
        print(f"wrote {args.output} ({len(template)} frames at {template.fps:g} fps{ratios})")
    return 0


def make_template(args) -> MotionTemplate:
    if not str(args.output).lower().endswith(".npz"):
        raise ValueError(f"--output {args.output}: templates are written as .npz")
    if not 1 <= args.batch <= spec.MAX_BATCH_SIZE:
        raise ValueError(f"--batch must lie in 1..{spec.MAX_BATCH_SIZE}")
    if is_template(args.driving):
        template = load_template(args.driving)
        if args.max_frames:
            n = args.max_frames
            template = MotionTemplate(template.fps, template.R[:n], template.exp[:n], template.t[:n],
                                      template.scale[:n], None if template.eye_ratio is None else template.eye_ratio[:n],
                                      None if template.lip_ratio is None else template.lip_ratio[:n])
        return template
    reader = media.VideoReader(args.driving)
    settings = C.CropSettings(args.driving_scale, args.driving_vx, args.driving_vy, rotate=False)
    cropper = DrivingCropper(args.crop_driving, settings, args.face_models, track=True)
    try:
        with LivePortraitClient(args.server, check=False) as client:
            client.check_server(models=[spec.MOTION])
            return extract(reader, cropper, client, args.batch, args.max_frames, args.quiet)
    finally:
        cropper.close()
        reader.close()


def extract(reader: media.VideoReader, cropper: DrivingCropper, client: LivePortraitClient, batch: int,
            max_frames: int | None, quiet: bool) -> MotionTemplate:
    from tqdm import tqdm
    motion = {"R": [], "exp": [], "t": [], "scale": []}
    eyes: list = []
    lips: list = []
    pending: list[np.ndarray] = []

    def flush():
        if pending:
            info = client.extract_motion(np.stack(pending))
            for key in motion:
                motion[key].append(getattr(info, key))
            pending.clear()

    frames = itertools.islice(reader, max_frames) if max_frames else reader
    total = min(filter(None, (reader.info.frame_count, max_frames)), default=None)
    for frame in tqdm(frames, total=total, unit="frame", desc="template", disable=quiet):
        cropped = cropper(frame)
        if cropped.crop is None:
            raise NoFaceError(f"no face found in the first driving frames of {reader.path} (cropping needs one); "
                              "crop it yourself or use --no-crop-driving")
        pending.append(cropped.crop)
        face = cropped.face
        eyes.append(None if face is None else face.eye_ratio())
        lips.append(None if face is None else face.lip_ratio())
        if len(pending) == batch:
            flush()
    flush()
    if not motion["R"]:
        raise media.MediaError(f"driving video {reader.path} has no frames")
    eye_ratio, lip_ratio = _fill_ratios(eyes), _fill_ratios(lips)
    if eye_ratio is None:
        print("warning: no face found in the driving video: the template has no eye/lip ratios", file=sys.stderr)
    return MotionTemplate(reader.info.fps, *(np.concatenate(motion[k]) for k in ("R", "exp", "t", "scale")),
                          eye_ratio=eye_ratio, lip_ratio=lip_ratio)


def _fill_ratios(values: list) -> np.ndarray | None:
    """Per-frame ratios; frames before the first face take the first face's values. None if no face at all."""
    first = next((v for v in values if v is not None), None)
    if first is None:
        return None
    out, last = [], first
    for v in values:
        last = v if v is not None else last
        out.append(last)
    return np.stack(out).astype(np.float32)
