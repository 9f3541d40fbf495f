"""Portrait editing from the client: the official image-retargeting controls, one server request per edit.

    with PortraitEditor(client, image) as editor:          # detect + crop once; the server caches F and M
        start = editor.slider_start                         # {'eye_ratio': 0.31, 'lip_ratio': 0.0}
        edited = editor.edit(yaw=10, smile=0.6)             # the full image with the edited face pasted back

`EditSession` is the same on a ready 256x256 crop (returns the 512x512 edited crop). Each `edit()` is one request
on the sequence whose START carried the source: the server runs only the keypoint maths, the MLPs and W+G.
Control names, ranges and defaults: `spec.EDIT_CONTROLS` (validated here before sending, by the server's rule).
"""
from __future__ import annotations

import numpy as np

from .. import crop as C
from .. import editing, spec
from ..wire import SourceInput
from .client import LivePortraitClient
from .errors import RequestFailed
from .faces import FaceAnalyzer, NoFaceError, make_analyzer
from .requests import new_sequence_id


class EditSession:
    """One source crop registered on the server (one sequence); `edit(**controls)` -> the 512x512 edited crop."""

    def __init__(self, client: LivePortraitClient, source: SourceInput):
        self.client, self.source = client, source
        self.sequence_id = new_sequence_id()
        self._open = False
        client.infer(source.tensors(), self.sequence_id, start=True, options=source.options)
        self._open = True

    def edit(self, **controls) -> np.ndarray:
        """One edit; controls left out (or None) take their defaults (no change)."""
        if not self._open:
            raise RuntimeError("the edit session is closed")
        given = {k: v for k, v in controls.items() if v is not None}
        spec.parse_edit(given)          # the server's rule, before anything is sent
        image, _ = self.client.infer({}, self.sequence_id, options={spec.EDIT_FLAG: True, **given})
        if image is None:
            raise RequestFailed("the server answered an edit without an image")
        return image

    def close(self) -> None:
        """End the sequence (the server frees the cached source)."""
        if self._open:
            self._open = False
            try:
                self.client.infer({}, self.sequence_id, end=True)
            except RequestFailed:       # the server frees it on its idle timeout instead
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class PortraitEditor:
    """A full portrait image: the face is detected and cropped once, then each `edit()` returns the whole image
    with the edited face pasted back (or the 512x512 crop with paste_back=False).

    Eye and lip ratios follow the official rule: a ratio equal to its slider start value (`slider_start`: the
    source's own ratio rounded to 2 decimals) means no retargeting.
    """

    def __init__(self, client: LivePortraitClient, image: np.ndarray, source_scale: float = C.RETARGETING_SCALE,
                 vx: float = C.SOURCE_CROP.vx, vy: float = C.SOURCE_CROP.vy, stitching: bool = True,
                 paste_back: bool = True, analyzer: FaceAnalyzer | None = None, face_models: str | None = None):
        settings = C.CropSettings(C.check_in("source scale (the official retargeting range)", source_scale,
                                             C.RETARGETING_SCALE_BOUNDS), vx, vy, rotate=True)
        image = np.ascontiguousarray(C.trim_to_even(C.limit_size(np.asarray(image), C.SOURCE_MAX_DIM)))
        own = analyzer is None
        analyzer = make_analyzer(face_models) if own else analyzer
        try:
            face = analyzer.detect(image)
        finally:
            if own:
                analyzer.close()
        if face is None:
            raise NoFaceError("no face found in the source image")
        self.image, self.box = image, face.crop_box(settings)
        self.crop512 = C.warp_crop(image, self.box)
        eye, lip = face.eye_ratio(), face.lip_ratio()
        start_eye, start_lip = editing.slider_start_values(eye, lip)
        self.slider_start = {"eye_ratio": start_eye, "lip_ratio": start_lip}
        self._paste = C.PasteBack(image, self.box) if paste_back else None
        self.session = EditSession(client, SourceInput(crop=C.network_input(self.crop512),
                                                       options={"stitching": stitching}, eye_ratio=eye,
                                                       lip_ratio=lip))

    def edit(self, draw=None, **controls) -> np.ndarray:
        """The edited portrait for these control values (see `spec.EDIT_CONTROLS`); `draw(crop512, controls)`, when
        given, draws on the edited crop before it is pasted back (e.g. the keypoint overlay)."""
        for name, start in self.slider_start.items():
            if controls.get(name) is not None and float(controls[name]) == start:
                controls[name] = None
        crop = self.session.edit(**controls)
        if draw is not None:
            crop = draw(crop, {k: v for k, v in controls.items() if v is not None})
        return self._paste(crop) if self._paste is not None else crop

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
