"""The thin client (installed as liveportrait_triton.client): face crop, streaming to the served pipeline,
paste-back and video I/O. `LivePortraitClient` is the library entry point; `animate` and `template_cli` are the
`liveportrait-triton animate` / `template` commands."""
from .client import (AsyncLivePortraitClient, DrivingInput, FrameResult, LivePortraitClient, RequestFailed,
                     ServerAtCapacity, ServerMismatch, ServerUnavailable, SourceInput)
from .editing import EditSession, PortraitEditor
from .multiface import FaceStreams, SourceFaces
from .templates import MotionTemplate, TemplateError, load_template, save_npz

__all__ = ["AsyncLivePortraitClient", "DrivingInput", "EditSession", "FaceStreams", "FrameResult", "LivePortraitClient",
           "MotionTemplate", "PortraitEditor", "RequestFailed", "ServerAtCapacity", "ServerMismatch", "ServerUnavailable", "SourceFaces",
           "SourceInput", "TemplateError", "load_template", "save_npz"]
