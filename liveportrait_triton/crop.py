"""Face crop geometry and paste-back, shared by the client, the demo and the benchmarks.

The crop follows the rule of the official release: two points (the eye centre and the mouth centre) fix the
face's up direction, the landmarks' extents in that rotated frame fix a square box, the box is scaled (2.3 for a
source, 2.2 for a driving video) and shifted along the face's own axes (vx, vy times the box size), and a
similarity transform maps the box onto a `dsize` x `dsize` crop. The inverse transform pastes the animated crop
back into the full image through a feathered mask generated here.

Coordinates are image pixels (x right, y down); transforms are 3x3 matrices acting on column vectors (x, y, 1).
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

CROP_SIZE = 512        # the crop the official cropper makes; the network input is its 256x256 resize


SCALE_BOUNDS = (1.0, 4.0)       # crop scale (box side / landmark extent) every tool and page accepts
SHIFT_BOUNDS = (-1.0, 1.0)      # vx, vy in box sides
SOURCE_MAX_DIM = 1280          # a source picture's longer side is shrunk to this first (official default)
# An animal face box found by a detector (client/animals.py) grows to the crop: side x ANIMAL_FACE_SCALE, moved up by
# ANIMAL_FACE_VY of the crop side (the official crop is 2.3 x the extent of X-Pose's 9 face points, moved up by
# 0.125; a detector's box is already wider than those points).
ANIMAL_FACE_SCALE = 1.8
ANIMAL_FACE_VY = -0.1
RETARGETING_SCALE = 2.5                 # the official retargeting (editing) tab's default crop scale
RETARGETING_SCALE_BOUNDS = (1.8, 3.2)   # and its narrower range


def check_in(name: str, value: float, bounds: tuple[float, float]) -> float:
    """`value` as a float if it is finite and inside `bounds`, else ValueError naming `name` and the range."""
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class CropSettings:
    """How large the box is around the landmarks and where it sits (official crop options)."""
    scale: float = 2.3      # box side = scale * landmark extent (larger: more context, smaller face)
    vx: float = 0.0         # shift along the face's x axis, in box sides
    vy: float = -0.125      # shift along the face's y axis (negative: up, more forehead), in box sides
    rotate: bool = True     # align the box with the face's roll (the official source crop does)

    def __post_init__(self):
        check_in("crop scale", self.scale, SCALE_BOUNDS)
        for name in ("vx", "vy"):
            check_in(f"crop offset {name} (box sides)", getattr(self, name), SHIFT_BOUNDS)


SOURCE_CROP = CropSettings(scale=2.3, vx=0.0, vy=-0.125, rotate=True)
# The official driving-video crop is axis-aligned: rotating it would cancel the driving head's roll.
DRIVING_CROP = CropSettings(scale=2.2, vx=0.0, vy=-0.1, rotate=False)


@dataclasses.dataclass(frozen=True)
class CropBox:
    """A square in the image: centre, side length and the angle of its x axis (radians, image frame)."""
    center: tuple[float, float]
    size: float
    angle: float = 0.0

    @property
    def axes(self) -> np.ndarray:
        """Rows: the box's unit x axis and y axis in image coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([[c, s], [-s, c]], dtype=np.float64)

    def image_to_crop(self, dsize: int = CROP_SIZE) -> np.ndarray:
        """3x3 similarity taking image pixels to crop pixels (the box onto [0, dsize]^2)."""
        k = dsize / self.size
        rot = self.axes * k
        m = np.eye(3)
        m[:2, :2] = rot
        m[:2, 2] = dsize / 2 - rot @ np.asarray(self.center, dtype=np.float64)
        return m

    def crop_to_image(self, dsize: int = CROP_SIZE) -> np.ndarray:
        return np.linalg.inv(self.image_to_crop(dsize))

    def corners(self) -> np.ndarray:
        """(4, 2) corners in the image: top-left, top-right, bottom-right, bottom-left of the crop."""
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * self.size
        return np.asarray(self.center) + unit @ self.axes

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which image points fall inside the box."""
        local = (np.asarray(points, dtype=np.float64) - np.asarray(self.center)) @ self.axes.T
        return np.all(np.abs(local) <= self.size / 2, axis=-1)


@dataclasses.dataclass(frozen=True)
class PixelBox:
    """An axis-aligned box of an image in whole pixels (top-left x, y, width, height): the crop of an animal
    source, which has no landmarks here (the official Animals mode finds them with X-Pose, a CUDA-only detector).

    `cut` resizes the box's pixels to a square as the official no-crop rule resizes the whole image
    (`cv2.resize(img, (256, 256))`, bilinear); a box that is not square is stretched, and paste-back
    (`image_to_crop`, used by `PasteBack`) maps the square output back into the box the same way, pixel centres
    on pixel centres.
    """
    x: int
    y: int
    w: int
    h: int

    def __post_init__(self):
        values = (self.x, self.y, self.w, self.h)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"box {values}: x, y, w, h must be whole pixels")
        if self.x < 0 or self.y < 0 or self.w < 1 or self.h < 1:
            raise ValueError(f"box {self.text}: x and y must be >= 0, width and height >= 1")

    @classmethod
    def parse(cls, text: str) -> "PixelBox":
        """'x,y,w,h' in pixels (the `--source-box` value)."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"box {text!r}: expected x,y,w,h as four whole numbers of pixels (e.g. 40,20,200,180)")
        return cls(*values)

    @classmethod
    def whole(cls, image: np.ndarray) -> "PixelBox":
        """The whole image (the official no-crop rule)."""
        return cls(0, 0, int(image.shape[1]), int(image.shape[0]))

    @property
    def text(self) -> str:
        return f"{self.x},{self.y},{self.w},{self.h}"

    def check_inside(self, width: int, height: int, what: str = "the image") -> "PixelBox":
        """Self if it lies inside a width x height image, else ValueError naming both."""
        if self.x + self.w > width or self.y + self.h > height:
            raise ValueError(f"box {self.text} (x,y,w,h) reaches past {what}, which is {width}x{height} pixels: "
                             f"x + w must be <= {width} and y + h <= {height}")
        return self

    @classmethod
    def from_corners(cls, first: tuple[float, float], second: tuple[float, float]) -> "PixelBox":
        """The box spanned by two opposite corner pixels (both included), in either order."""
        (x0, x1), (y0, y1) = sorted((int(first[0]), int(second[0]))), sorted((int(first[1]), int(second[1])))
        return cls(x0, y0, x1 - x0 + 1, y1 - y0 + 1)

    @classmethod
    def square_around(cls, center: tuple[float, float], side: float, width: int, height: int) -> "PixelBox":
        """The square of `side` pixels centred on `center`, shrunk to fit a width x height image and moved inside
        it where it would stick out."""
        side = max(1, min(int(round(side)), width, height))
        x = min(max(int(round(center[0] - side / 2)), 0), width - side)
        y = min(max(int(round(center[1] - side / 2)), 0), height - side)
        return cls(x, y, side, side)

    def scaled(self, k: float, width: int, height: int) -> "PixelBox":
        """The same box in the image resized by `k` to width x height (a shrunk source), kept inside it."""
        x, y = min(int(round(self.x * k)), width - 1), min(int(round(self.y * k)), height - 1)
        return PixelBox(x, y, max(1, min(int(round(self.w * k)), width - x)),
                        max(1, min(int(round(self.h * k)), height - y)))

    def cut(self, image: np.ndarray, dsize: int) -> np.ndarray:
        """The box's pixels resized to dsize x dsize (bilinear, as the official no-crop rule)."""
        region = image[self.y:self.y + self.h, self.x:self.x + self.w]
        return cv2.resize(region, (dsize, dsize), interpolation=cv2.INTER_LINEAR)

    def image_to_crop(self, dsize: int = CROP_SIZE) -> np.ndarray:
        """3x3 affine taking image pixels to `cut`'s pixels (pixel centres to pixel centres, as cv2.resize)."""
        kx, ky = dsize / self.w, dsize / self.h
        return np.array([[kx, 0, (0.5 - self.x) * kx - 0.5], [0, ky, (0.5 - self.y) * ky - 0.5], [0, 0, 1]])

    def crop_to_image(self, dsize: int = CROP_SIZE) -> np.ndarray:
        return np.linalg.inv(self.image_to_crop(dsize))

    def corners(self) -> np.ndarray:
        """(4, 2) corners in the image: top-left, top-right, bottom-right, bottom-left."""
        x0, y0, x1, y1 = self.x, self.y, self.x + self.w, self.y + self.h
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def animal_crop_box(face: PixelBox, width: int, height: int) -> PixelBox:
    """The crop of a detected animal face box in a width x height image (ANIMAL_FACE_SCALE, ANIMAL_FACE_VY)."""
    side = max(face.w, face.h) * ANIMAL_FACE_SCALE
    center = (face.x + face.w / 2, face.y + face.h / 2 + ANIMAL_FACE_VY * side)
    return PixelBox.square_around(center, side, width, height)


def box_from_landmarks(points: np.ndarray, eye_center, mouth_center, settings: CropSettings) -> CropBox:
    """The crop box around landmarks (N, 2), oriented by the eye-centre -> mouth-centre direction.

    With `settings.rotate` off the box keeps the image axes (angle 0) but is still sized and centred in the
    face's frame, as the official driving crop does.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"landmarks must be an (N>=3, 2) array, got shape {points.shape}")
    down = np.asarray(mouth_center, np.float64) - np.asarray(eye_center, np.float64)
    length = float(np.linalg.norm(down))
    down = down / length if length > 1e-3 else np.array([0.0, 1.0])
    right = np.array([down[1], -down[0]])               # face x axis: perpendicular, pointing to image right
    frame = np.stack([right, down])
    local = points @ frame.T
    low, high = local.min(axis=0), local.max(axis=0)
    side = float((high - low).max()) * settings.scale
    center = ((low + high) / 2) @ frame
    center = center + right * (settings.vx * side) + down * (settings.vy * side)
    angle = math.atan2(right[1], right[0]) if settings.rotate else 0.0
    return CropBox(center=(float(center[0]), float(center[1])), size=side, angle=angle)


def warp_crop(image: np.ndarray, box: CropBox, dsize: int = CROP_SIZE) -> np.ndarray:
    """The box's content as a dsize x dsize image (bilinear; outside the image is black)."""
    m = box.image_to_crop(dsize)
    return cv2.warpAffine(image, m[:2], (dsize, dsize), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def network_input(crop: np.ndarray, size: int = 256) -> np.ndarray:
    """The 512 crop shrunk to the network's 256x256 input (area filter, as the official cropper)."""
    if crop.shape[:2] == (size, size):
        return np.ascontiguousarray(crop)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def feather_mask(size: int = CROP_SIZE, margin: float = 0.01, feather: float = 0.06) -> np.ndarray:
    """(size, size) float32 blending mask: 1 inside, a smooth ramp to 0 near the border, rounded corners.

    `margin` (fraction of the side) stays exactly 0 at the edge, so the crop's resampled border never bleeds into
    the image; the ramp is `feather` wide (fraction of the side) and follows the distance to an inset rounded
    square, so it is C1-smooth everywhere.
    """
    if not 0 <= margin < 0.5 or not 0 < feather < 0.5 - margin:
        raise ValueError(f"mask margin {margin} and feather {feather} must satisfy 0 <= margin, "
                         f"0 < feather, margin + feather < 0.5")
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size        # pixel centres in (0, 1)
    inset = margin + feather
    dx = np.maximum(np.maximum(inset - coords, coords - (1 - inset)), 0.0)
    dist = np.hypot(dx[None, :], dx[:, None])                        # distance outside the inner square
    ramp = np.clip(1.0 - dist / feather, 0.0, 1.0)
    mask = ramp * ramp * (3.0 - 2.0 * ramp)                          # smoothstep
    return mask.astype(np.float32)


class PasteBack:
    """Pastes animated crops into one full-size image through the inverse crop transform.

    The mask is warped once; each frame only touches the mask's bounding box, and every pixel where the
    warped mask is 0 keeps the background value exactly.
    """

    def __init__(self, background: np.ndarray, box: CropBox, crop_size: int = CROP_SIZE,
                 mask: np.ndarray | None = None):
        self.background = np.ascontiguousarray(background)
        h, w = self.background.shape[:2]
        mask = feather_mask(crop_size) if mask is None else np.asarray(mask, np.float32)
        if mask.shape != (crop_size, crop_size):
            raise ValueError(f"paste-back mask must be {crop_size}x{crop_size}, got {mask.shape}")
        self.crop_size = crop_size
        to_image = box.crop_to_image(crop_size)
        full = cv2.warpAffine(mask, to_image[:2], (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        ys, xs = np.nonzero(full > 0)
        if len(ys) == 0:
            raise ValueError("the crop box does not overlap the image: nothing to paste back")
        self.region = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        y0, y1, x0, x1 = self.region
        self.mask = full[y0:y1, x0:x1, None]
        self.inside = self.mask[..., 0] > 0
        shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], dtype=np.float64)
        self._to_region = (shift @ to_image)[:2]

    @property
    def full_mask(self) -> np.ndarray:
        """The warped mask over the whole image (float32, 0 where the background is kept)."""
        h, w = self.background.shape[:2]
        out = np.zeros((h, w), np.float32)
        y0, y1, x0, x1 = self.region
        out[y0:y1, x0:x1] = self.mask[..., 0]
        return out

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        return self.onto(self.background.copy(), crop)

    def onto(self, out: np.ndarray, crop: np.ndarray) -> np.ndarray:
        """Blend the crop into `out` (an image of the background's size, changed in place) through the mask;
        several faces' pastes applied in turn to one frame each touch only their own mask."""
        crop = np.asarray(crop)
        if crop.shape[:2] != (self.crop_size, self.crop_size):
            raise ValueError(f"animated crop must be {self.crop_size}x{self.crop_size}, got {crop.shape[:2]}")
        y0, y1, x0, x1 = self.region
        warped = cv2.warpAffine(crop, self._to_region, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        under = out[y0:y1, x0:x1].astype(np.float32)
        blended = np.rint(under + self.mask * (warped.astype(np.float32) - under))
        region = out[y0:y1, x0:x1]
        region[self.inside] = np.clip(blended, 0, 255).astype(np.uint8)[self.inside]
        return out


def trim_to_even(image: np.ndarray) -> np.ndarray:
    """Drop a last row/column so both sides are even (H.264 4:2:0 needs it; the official loader does this)."""
    h, w = image.shape[:2]
    return image[: h - h % 2, : w - w % 2]


def limit_size(image: np.ndarray, max_dim: int) -> np.ndarray:
    """Shrink an image so its longer side is at most max_dim (0: no limit), keeping the aspect ratio."""
    h, w = image.shape[:2]
    if max_dim <= 0 or max(h, w) <= max_dim:
        return image
    k = max_dim / max(h, w)
    return cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
