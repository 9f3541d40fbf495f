"""`liveportrait-triton edit`: edit a portrait's pose and expression (the official image-retargeting controls)."""
from __future__ import annotations

import argparse
import sys

from .. import crop as C
from .. import spec
from . import media
from .client import DEFAULT_URL, LivePortraitClient
from .errors import RequestFailed, ServerMismatch, ServerUnavailable
from .editing import PortraitEditor
from .faces import NoFaceError
from .keypoint_overlay import KeypointOverlay


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--source", required=True, help="source portrait image")
    io.add_argument("--output", required=True, help=f"edited image ({', '.join(media.IMAGE_SUFFIXES)})")
    io.add_argument("--server", default=DEFAULT_URL, help=f"Triton gRPC address HOST:PORT (default {DEFAULT_URL})")
    controls = parser.add_argument_group("edit controls (official ranges; unset: no change)")
    for name, control in spec.EDIT_CONTROLS.items():
        low, high = control.bounds
        default = "" if control.default is None else f", default {control.default:g}"
        controls.add_argument(_flag(name), dest=name, type=float, default=None, metavar="V",
                              help=f"{control.help} [{low:g}, {high:g}{default}]")
    crop = parser.add_argument_group("crop and paste-back")
    low, high = C.RETARGETING_SCALE_BOUNDS
    crop.add_argument("--source-scale", type=float, default=C.RETARGETING_SCALE,
                      help=f"crop box size / face size, [{low:g}, {high:g}] (default {C.RETARGETING_SCALE}, "
                           "the official retargeting default)")
    crop.add_argument("--source-vx", type=float, default=C.SOURCE_CROP.vx, help="crop shift along the face's x axis")
    crop.add_argument("--source-vy", type=float, default=C.SOURCE_CROP.vy, help="crop shift along the face's y axis")
    crop.add_argument("--stitching", action=argparse.BooleanOptionalAction, default=True,
                      help="apply the stitching MLP (default on)")
    crop.add_argument("--paste-back", action=argparse.BooleanOptionalAction, default=True,
                      help="paste the edited face into the full image (default on; off: the 512x512 crop)")
    crop.add_argument("--face-models", metavar="DIR", help="official face models instead of MediaPipe (see animate)")
    crop.add_argument("--draw-keypoints", action="store_true",
                      help="draw the source's implicit keypoints (rings) and the edited ones (dots; the editing "
                           "formula before the eye/lip MLPs and stitching), zoomed, on a panel beside the edited "
                           "portrait: with synthetic weights the face is noise and this is what shows the edit")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args) -> int:
    controls = {name: getattr(args, name) for name in spec.EDIT_CONTROLS if getattr(args, name) is not None}
    try:
        spec.parse_edit(controls)
        if not media.is_image(args.output):
            raise ValueError(f"--output {args.output}: use one of {media.IMAGE_SUFFIXES}")
        image = media.read_image(args.source, "source image")
        with LivePortraitClient(args.server) as client:
            with PortraitEditor(client, image, args.source_scale, args.source_vx, args.source_vy, args.stitching,
                                args.paste_back, face_models=args.face_models) as editor:
                panels = []

                def draw(crop, used):
                    panels.append(overlay.draw(crop, overlay.edited_keypoints(used)))
                    return crop if args.paste_back else panels[-1]
                if args.draw_keypoints:
                    overlay = KeypointOverlay(client, C.network_input(editor.crop512))
                edited = editor.edit(draw=draw if args.draw_keypoints else None, **controls)
                if panels and args.paste_back:
                    edited = overlay.beside(edited, panels[-1])
        media.write_image(args.output, edited)
    except (media.MediaError, NoFaceError, ServerUnavailable, ServerMismatch, RequestFailed, FileNotFoundError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0
