"""`animate --source VIDEO`: animate a source video (v2v) with the official rules (`liveportrait_triton.source_video`).

Two passes, because the official smoothing runs over the whole video: (1) decode the source video, track and
crop its face frame by frame, run the served motion extractor on the source crops and the driving frames (or
read the template) and compute each source frame's smoothed target rotation and expression; (2) decode the source
again and stream one request per frame carrying that frame's crop and targets (a sequence with the option
source_video: the server computes each frame's features and keypoints, batched with other streams' work), then
paste each result into its own source frame. Source frames without a face are written unchanged and reported;
they take no part in the smoothing. Memory holds the 256x256 crops and the motion, not the decoded frames.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys

import numpy as np

from .. import crop as C
from .. import keypoints as K
from .. import source_video as SV
from ..lip_array import LIP_ARRAY
from ..wire import MotionFrame
from . import media
from ..wire import DrivingFrame, SourceInput
from .client import LivePortraitClient
from .errors import RequestFailed
from .faces import FaceAnalyzer, NoFaceError

MOTION_BATCH = 16       # crops per motion-extractor request (the served models accept batches up to 16)


@dataclasses.dataclass
class SourceTrack:
    """The source video's faces: per frame a crop box (None: no face) and, for frames with a face, the crops."""
    fps: float
    size: tuple[int, int]
    audio_codec: str | None
    boxes: list[C.CropBox | None]
    crops: list[np.ndarray]             # 256x256 crops of the frames with a face, in order
    eye_ratios: list[np.ndarray]
    lip_ratios: list[np.ndarray]

    @property
    def without_face(self) -> list[int]:
        return [i for i, box in enumerate(self.boxes) if box is None]


def source_frames(path, max_dim: int):
    """The source video's frames as the official loader prepares them (limited size, even sides)."""
    reader = media.VideoReader(path)
    try:
        for frame in reader:
            yield reader.info, np.ascontiguousarray(C.trim_to_even(C.limit_size(frame, max_dim)))
    finally:
        reader.close()


def track_source(path, analyzer: FaceAnalyzer, settings: C.CropSettings, max_dim: int, limit: int | None,
                 quiet: bool) -> SourceTrack:
    from tqdm import tqdm
    boxes, crops, eyes, lips, face, info, size = [], [], [], [], None, None, None
    with tqdm(desc="source video: faces", unit="frame", disable=quiet, dynamic_ncols=True) as progress, \
            contextlib.closing(source_frames(path, max_dim)) as frames:
        for info, frame in frames:
            if limit is not None and len(boxes) >= limit:
                break
            size = frame.shape[1::-1]
            face = analyzer.track(frame, face)
            if face is None:
                boxes.append(None)
            else:
                box = face.crop_box(settings)
                boxes.append(box)
                crops.append(C.network_input(C.warp_crop(frame, box)))
                eyes.append(face.eye_ratio())
                lips.append(face.lip_ratio())
            progress.update(1)
    if info is None:
        raise media.MediaError(f"the source video {path} has no frames")
    if not crops:
        raise NoFaceError(f"no face found in any frame of the source video {path}")
    return SourceTrack(info.fps, size, info.audio_codec, boxes, crops, eyes, lips)


def extract_motion(client: LivePortraitClient, crops: list[np.ndarray]) -> K.MotionInfo:
    parts = [client.extract_motion(np.stack(crops[i:i + MOTION_BATCH])) for i in range(0, len(crops), MOTION_BATCH)]
    return K.MotionInfo(**{f: np.concatenate([getattr(p, f) for p in parts])
                           for f in ("R", "t", "exp", "scale", "kp", "pitch", "yaw", "roll")})


def animate_source_video(settings, client: LivePortraitClient, analyzer: FaceAnalyzer, options: dict, kind: str,
                         template, driving_frames, driving_audio: str | None, output, progress_factory) -> int:
    """The whole v2v run; returns the number of frames written. `driving_frames` yields Prepared driving inputs
    (crops with ratios) for video/image driving; `template` is a MotionTemplate for template driving;
    `driving_audio` is the driving video's audio codec (None: no audio)."""
    track = track_source(settings.source, analyzer, settings.source_crop, settings.source_max_dim,
                         settings.max_frames, settings.quiet)
    # driving motion (all of it: the smoothing needs the whole sequence) and ratios
    if template is not None:
        motion = K.MotionInfo(R=template.R, t=template.t, exp=template.exp, scale=template.scale)
        ratios = [template.ratios(i) for i in range(len(template))]
        driving_is_video = len(template) > 1
    else:
        prepared = []
        for item in driving_frames:
            if item.driving is None:
                raise NoFaceError(f"driving frame {item.number} has no face to take the motion from")
            prepared.append(item.driving)
            if kind == "image" or (len(prepared) >= len(track.crops)):
                break
        if not prepared:
            raise media.MediaError(f"the driving input {settings.driving} has no frames")
        motion = extract_motion(client, [p.crop for p in prepared])
        ratios = [(p.eye_ratio, p.lip_ratio) for p in prepared]
        driving_is_video = kind != "image"
    with_face = len(track.crops)
    count = SV.frame_count(with_face, len(motion.R), driving_is_video)
    source = extract_motion(client, track.crops[:count])
    R, exp = SV.motion_targets(source, motion, options.get("relative_motion", True), driving_is_video, LIP_ARRAY)
    missing = track.without_face
    if missing:
        print(f"note: {len(missing)} source frame(s) have no face and are written unchanged: "
              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)
    # frames written: the source frames up to the count-th frame with a face
    face_frames = [i for i, box in enumerate(track.boxes) if box is not None][:count]
    last = face_frames[-1] + 1
    choice = SV.audio_source(driving_audio is not None, track.audio_codec is not None)
    audio = {"driving": settings.driving, "source": settings.source, None: None}[choice]
    first = SourceInput(crop=track.crops[0], options={**options, "source_video": True},
                        eye_ratio=track.eye_ratios[0], lip_ratio=track.lip_ratios[0])
    size = track.size if settings.paste_back else (C.CROP_SIZE, C.CROP_SIZE)
    writer = media.VideoWriter(output, size, track.fps, audio_from=audio)
    progress = progress_factory(last, settings.quiet)
    written = 0
    try:
        with client.stream(first, max_in_flight=settings.in_flight, retry_s=settings.retry) as stream:
            k = 0
            sent: dict[int, int] = {}                   # frame index -> send number
            for i in range(last):
                if track.boxes[i] is None:
                    continue
                d = 0 if not driving_is_video else k
                eye, lip = ratios[d] if d < len(ratios) else (None, None)
                frame_motion = MotionFrame(R=R[k], exp=exp[k], t=motion.t[d], scale=motion.scale[d])
                sent[i] = stream.send(DrivingFrame(motion=frame_motion, eye_ratio=eye, lip_ratio=lip,
                                                   source=track.crops[k],
                                                   source_eye_ratio=track.eye_ratios[k],
                                                   source_lip_ratio=track.lip_ratios[k]),
                                      last=k == count - 1)
                k += 1
            results = {r.number: r.image for r in stream.finish()}
        with contextlib.closing(source_frames(settings.source, settings.source_max_dim)) as frames:
            for i, (_, frame) in zip(range(last), frames):
                if i in sent:
                    if sent[i] not in results:
                        raise RequestFailed(f"source frame {i} got no answer")
                    frame = C.PasteBack(frame, track.boxes[i])(results.pop(sent[i])) if settings.paste_back \
                        else results.pop(sent[i])
                elif not settings.paste_back:
                    frame = np.zeros((C.CROP_SIZE, C.CROP_SIZE, 3), np.uint8)
                writer.write(frame)
                written += 1
                progress.update(1)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    return written
