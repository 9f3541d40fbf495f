"""Every face of the source: one server sequence per face, the same driving motion, one output frame.

`--faces largest` (default) animates the largest face, `--faces all` every detected face, `--faces N` the N
largest. When more faces are found than `--faces` takes, the others stay as they are in the source and the
command says so (`FaceSelection.note`). Each face has its own crop, source features (its own sequence on the
server: the sequences' frames are batched together there), eye/lip ratios and paste-back mask; the faces are
pasted into one frame in turn, the smaller first, so where two masks overlap the larger face is on top and every
pixel outside all masks is the source's.

    faces = SourceFaces.detect(image, analyzer, settings, options, faces="all")
    with faces.stream(client) as stream:                   # one AnimationStream per face, sent in step
        stream.send(DrivingFrame(crop=crop))
        for result in stream.ready():                      # FrameResult with one crop per face
            frame = faces.paste(result.image)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np

from .. import crop as C
from ..wire import DrivingFrame, SourceInput
from .client import LivePortraitClient
from .requests import FrameResult
from .stream import AnimationStream
from .faces import FaceAnalyzer, NoFaceError


def parse_faces(text: str) -> str | int:
    """`--faces` value: 'all', 'largest' or a positive count."""
    if text in ("all", "largest"):
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"--faces {text!r}: use 'all', 'largest' or a number of faces >= 1")
    return count


@dataclasses.dataclass
class FaceSelection:
    wanted: str | int
    found: int
    taken: int

    @property
    def note(self) -> str | None:
        """What the user must be told: faces found but not animated (None when every face is animated)."""
        if self.taken == self.found:
            return None
        return (f"found {self.found} faces in the source, animating the {self.taken} largest (--faces "
                f"{self.wanted}); the other {self.found - self.taken} stay as in the source (--faces all "
                "animates every face)")


def select(count_found: int, wanted: str | int) -> int:
    """How many of the faces (largest first) to animate."""
    if wanted == "all":
        return count_found
    return min(count_found, 1 if wanted == "largest" else int(wanted))


@dataclasses.dataclass
class SourceFace:
    box: C.CropBox
    crop512: np.ndarray
    source: SourceInput


class SourceFaces:
    """The source image and the faces to animate in it (largest first)."""

    def __init__(self, image: np.ndarray, faces: list[SourceFace], selection: FaceSelection):
        if not faces:
            raise NoFaceError("no face to animate")
        self.image, self.faces, self.selection = image, faces, selection
        self._pastes: list[C.PasteBack] | None = None

    @classmethod
    def detect(cls, image: np.ndarray, analyzer: FaceAnalyzer, settings: C.CropSettings, options: dict,
               wanted: str | int = "largest", what: str = "the source image") -> "SourceFaces":
        if wanted == "largest":
            face = analyzer.detect(image)
            found = [face] if face is not None else []
        else:
            found = analyzer.detect_all(image)
        if not found:
            raise NoFaceError(f"no face found in {what}")
        taken = found[:select(len(found), wanted)]
        faces = []
        for face in taken:
            box = face.crop_box(settings)
            crop512 = C.warp_crop(image, box)
            faces.append(SourceFace(box, crop512, SourceInput(crop=C.network_input(crop512), options=options,
                                                              eye_ratio=face.eye_ratio(), lip_ratio=face.lip_ratio())))
        return cls(image, faces, FaceSelection(wanted, len(found), len(taken)))

    def __len__(self) -> int:
        return len(self.faces)

    @property
    def crop512(self) -> np.ndarray:
        """The largest face's 512x512 source crop (what a crop-only output and the comparison video show)."""
        return self.faces[0].crop512

    def paste(self, crops) -> np.ndarray:
        """One animated crop (one face) or one per face -> the full frame, each face through its own mask."""
        if self._pastes is None:
            self._pastes = [C.PasteBack(self.image, f.box) for f in self.faces]
        crops = [crops] if isinstance(crops, np.ndarray) else list(crops)
        if len(crops) != len(self.faces):
            raise ValueError(f"{len(crops)} animated crops for {len(self.faces)} faces")
        out = self.image.copy()
        for paste, crop in reversed(list(zip(self._pastes, crops))):      # the largest face last, on top
            paste.onto(out, crop)
        return out

    def stream(self, client: LivePortraitClient, max_in_flight: int = 4, retry_s: float = 0.0):
        """An AnimationStream for one face, a FaceStreams for several."""
        if len(self.faces) == 1:
            return client.stream(self.faces[0].source, max_in_flight=max_in_flight, retry_s=retry_s)
        return FaceStreams(client, [f.source for f in self.faces], max_in_flight, retry_s)

    def animate_image(self, client: LivePortraitClient, driving: DrivingFrame) -> list[np.ndarray]:
        """Image driving: one request per face, sent concurrently (the server batches them)."""
        with concurrent.futures.ThreadPoolExecutor(len(self.faces)) as pool:
            return list(pool.map(lambda f: client.animate_image(f.source, driving), self.faces))


class FaceStreams:
    """Several sequences driven by the same frames: `send` goes to every face's stream; a result is ready once
    every face's answer for that frame has come (its `image` is the list of crops, largest face first)."""

    def __init__(self, client: LivePortraitClient, sources: list[SourceInput], max_in_flight: int = 4,
                 retry_s: float = 0.0):
        self.streams: list[AnimationStream] = []
        try:
            for source in sources:
                self.streams.append(client.stream(source, max_in_flight=max_in_flight, retry_s=retry_s))
        except BaseException:
            self.close()
            raise
        self._done: list[dict[int, FrameResult]] = [{} for _ in sources]
        self._next_out = 0

    @property
    def reconnects(self) -> int:
        return sum(s.reconnects for s in self.streams)

    @property
    def in_flight(self) -> int:
        return max(s.in_flight for s in self.streams)

    @property
    def dropped(self) -> int:
        return self.streams[0].dropped

    def offer(self, driving: DrivingFrame, last: bool = False) -> int | None:
        """A live frame to every face's stream if all have room, else dropped for all (see AnimationStream.offer)."""
        if not last and not all([s.has_room() for s in self.streams]):
            for s in self.streams:
                s.dropped += 1
            return None
        return self.send(driving, last=last)

    def send(self, driving: DrivingFrame, last: bool = False) -> int:
        numbers = {s.send(driving, last=last) for s in self.streams}
        if len(numbers) != 1:
            raise RuntimeError(f"face streams out of step: frame numbers {sorted(numbers)}")
        return numbers.pop()

    def _collect(self, per_stream: list[list[FrameResult]]) -> list[FrameResult]:
        for done, results in zip(self._done, per_stream):
            for r in results:
                done[r.number] = r
        out = []
        while all(self._next_out in done for done in self._done):
            parts = [done.pop(self._next_out) for done in self._done]
            out.append(FrameResult(self._next_out, [p.image for p in parts], max(p.latency_s for p in parts)))
            self._next_out += 1
        return out

    def ready(self) -> list[FrameResult]:
        return self._collect([s.ready() for s in self.streams])

    def finish(self) -> list[FrameResult]:
        return self._collect([s.finish() for s in self.streams])

    def close(self) -> None:
        for s in self.streams:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
