"""Animal sources (`animate --subject animal`): the crop without X-Pose, and the official paste-back rule.

The official Animals mode crops the animal's face around X-Pose's keypoints, a CUDA-only detector with a
non-commercial licence; without it the official code resizes the whole image to 256x256. Here the source is the
whole image, or a box the user gives (`--source-box x,y,w,h`, pixels of the source image as read), resized the
same way (`crop.PixelBox`), or, with `--source-box auto`, the crop around a frontal cat face that OpenCV's LBP
cat-face cascade finds (`detect_cat_face`). The official pipeline pastes the animated crop back only when it
cropped and stitching is on; the box stands in for its crop, so the result is pasted into the box only with a box,
stitching on and `--paste-back` (else the 512x512 animated crop is the output).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import crop as C
from .. import spec
from ..wire import SourceInput
from . import media
from .multiface import FaceSelection, SourceFace, SourceFaces


def pastes_back(box: C.PixelBox | str | None, options: dict, paste_back: bool) -> bool:
    """Whether an animal result is pasted into the source: a box, stitching on (the sequence's parsed options,
    where an animal's stitching defaults to off) and paste-back asked for."""
    return box is not None and paste_back and bool(spec.parse_options(options)["stitching"])


def paste_note(box: C.PixelBox | str | None, options: dict, paste_back: bool) -> str | None:
    """Why a requested paste-back does not happen (None when it does or was not asked for)."""
    if not paste_back or pastes_back(box, options, paste_back):
        return None
    if box is None:
        return ("no paste-back without --source-box: the whole source image was animated, and the result is the "
                "512x512 animated image (the official Animals rule without a crop)")
    return ("no paste-back without stitching (the official Animals rule; an animal's stitching is off unless "
            "--stitching is given): the result is the 512x512 animated box")


# `--source-box auto`: a frontal cat-face detector that runs offline: OpenCV's LBP cascade (Debian package
# opencv-data; the pinned opencv-python-headless 5 has no cascade classifier and ships no cascades) evaluated by
# scikit-image's `feature.Cascade`. Cats seen from the front only: dogs and other animals need a box.
AUTO = "auto"
CAT_FACE_CASCADE = Path("/usr/share/opencv4/lbpcascades/lbpcascade_frontalcatface.xml")
DETECT_MAX_DIM = 640                        # the detector looks at the image shrunk to this longer side
# (scale factor, smallest face in pixels) of the searches tried in turn until one finds a face: the cascade's hits
# depend on where its scale ladder starts; these found scikit-image's chelsea at 1x, 0.5x and 0.35x (not mirrored)
DETECT_SEARCHES = ((1.2, 40), (1.1, 32), (1.3, 32), (1.1, 24))


def parse_box(text: str | None) -> C.PixelBox | str | None:
    """A `--source-box` value: 'x,y,w,h' (a PixelBox), AUTO, or empty/None (the whole image)."""
    text = (text or "").strip()
    if text in ("", AUTO):
        return text or None
    return C.PixelBox.parse(text)


class NoAnimalFaceError(ValueError):
    """`--source-box auto` found no cat face (or its detector is missing)."""


def detect_cat_face(image: np.ndarray) -> C.PixelBox | None:
    """The largest frontal cat face in an RGB image as a box of its pixels (None if none is found)."""
    if not CAT_FACE_CASCADE.is_file():
        raise NoAnimalFaceError(f"--source-box auto needs OpenCV's cat-face cascade {CAT_FACE_CASCADE} (Debian "
                                "package opencv-data, which scripts/install.sh installs); give the box as x,y,w,h")
    from skimage.feature import Cascade
    small = C.limit_size(image, DETECT_MAX_DIM)
    k = image.shape[1] / small.shape[1]
    detector = Cascade(str(CAT_FACE_CASCADE))
    side = min(small.shape[:2])
    for factor, smallest in DETECT_SEARCHES:
        found = detector.detect_multi_scale(img=small, scale_factor=factor, step_ratio=1,
                                            min_size=(smallest, smallest), max_size=(side, side))
        if found:
            face = max(found, key=lambda f: f["width"] * f["height"])
            return C.PixelBox(int(face["c"] * k), int(face["r"] * k), max(1, int(face["width"] * k)),
                              max(1, int(face["height"] * k)))
    return None


def source_box(image: np.ndarray, box: C.PixelBox | str | None, read_shape: tuple[int, ...], shrink: float,
               what: str = "the source image") -> C.PixelBox | None:
    """The box to animate in `image` (the picture as read, shrunk by `shrink` to the size limit and trimmed to even
    sides): the user's box, given in pixels of the picture as read (`read_shape`) and checked against it; with AUTO
    the crop around the cat face the detector finds (NoAnimalFaceError if none)."""
    if box is None:
        return None
    if box == AUTO:
        face = detect_cat_face(image)
        if face is None:
            raise NoAnimalFaceError(f"no cat face found in {what} (--source-box auto finds frontal cat faces "
                                    "only); give the box as --source-box x,y,w,h")
        return C.animal_crop_box(face, image.shape[1], image.shape[0])
    box.check_inside(read_shape[1], read_shape[0], "the source image")
    return box.scaled(shrink, image.shape[1], image.shape[0])


def animal_source(path: str, box: C.PixelBox | str | None, max_dim: int, even: bool, options: dict) -> SourceFaces:
    """The animal source as one 'face' of a SourceFaces: its 256x256 network input (the box or the whole image,
    resized), its 512x512 view, and the box paste-back maps into (the whole image without a box)."""
    read = media.read_image(path, "source image")
    image = C.limit_size(read, max_dim)
    shrink = image.shape[1] / read.shape[1]
    if even:
        image = np.ascontiguousarray(C.trim_to_even(image))
    placed = source_box(image, box, read.shape, shrink, f"the source image {path}") or C.PixelBox.whole(image)
    source = SourceInput(crop=placed.cut(image, spec.SOURCE_SIZE), options=options)
    face = SourceFace(placed, placed.cut(image, C.CROP_SIZE), source)
    return SourceFaces(image, [face], FaceSelection("largest", 1, 1))
