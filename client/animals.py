"""Animal sources (`animate --subject animal`): the crop without X-Pose, and the official paste-back rule.

The official Animals mode crops the animal's face around X-Pose's keypoints, a CUDA-only detector with a
non-commercial licence; without it the official code resizes the whole image to 256x256. Here the source is the
whole image, or a box the user gives (`--source-box x,y,w,h`, pixels of the source image as read), resized the
same way (`crop.PixelBox`). The official pipeline pastes the animated crop back only when it cropped and
stitching is on; the box stands in for its crop, so the result is pasted into the box only with a box, stitching
on and `--paste-back` (else the 512x512 animated crop is the output).
"""
from __future__ import annotations

import numpy as np

from .. import crop as C
from .. import spec
from ..wire import SourceInput
from . import media
from .multiface import FaceSelection, SourceFace, SourceFaces


def pastes_back(box: C.PixelBox | None, options: dict, paste_back: bool) -> bool:
    """Whether an animal result is pasted into the source: a box, stitching on (the sequence's parsed options,
    where an animal's stitching defaults to off) and paste-back asked for."""
    return box is not None and paste_back and bool(spec.parse_options(options)["stitching"])


def paste_note(box: C.PixelBox | None, options: dict, paste_back: bool) -> str | None:
    """Why a requested paste-back does not happen (None when it does or was not asked for)."""
    if not paste_back or pastes_back(box, options, paste_back):
        return None
    if box is None:
        return ("no paste-back without --source-box: the whole source image was animated, and the result is the "
                "512x512 animated image (the official Animals rule without a crop)")
    return ("no paste-back without stitching (the official Animals rule; an animal's stitching is off unless "
            "--stitching is given): the result is the 512x512 animated box")


def source_box(image: np.ndarray, box: C.PixelBox | None, read_shape: tuple[int, ...]) -> C.PixelBox | None:
    """The user's box, given in pixels of the image as read (`read_shape`), checked against it and carried over
    to `image` (that picture after shrinking to the size limit and trimming to even sides)."""
    if box is None:
        return None
    box.check_inside(read_shape[1], read_shape[0], "the source image")
    return box.scaled(image.shape[1] / read_shape[1], image.shape[1], image.shape[0])


def animal_source(path: str, box: C.PixelBox | None, max_dim: int, even: bool, options: dict) -> SourceFaces:
    """The animal source as one 'face' of a SourceFaces: its 256x256 network input (the box or the whole image,
    resized), its 512x512 view, and the box paste-back maps into (the whole image without a box)."""
    read = media.read_image(path, "source image")
    image = C.limit_size(read, max_dim)
    if even:
        image = np.ascontiguousarray(C.trim_to_even(image))
    placed = source_box(image, box, read.shape) or C.PixelBox.whole(image)
    source = SourceInput(crop=placed.cut(image, spec.SOURCE_SIZE), options=options)
    face = SourceFace(placed, placed.cut(image, C.CROP_SIZE), source)
    return SourceFaces(image, [face], FaceSelection("largest", 1, 1))
