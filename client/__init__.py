"""The thin client (installed as liveportrait_triton.client): face crop, streaming to the served pipeline,
paste-back and video I/O. `LivePortraitClient` is the library entry point; `animate` and `template_cli` are the
`liveportrait-triton animate` / `template` commands.

Modules: `client` the sync client, `stream` its reconnecting stream, `async_client` the asyncio client,
`requests` the request builder and metadata check, `errors` what they raise; the wire types they send
(`DrivingFrame`, `MotionFrame`, `SourceInput`) are shared with the server (liveportrait_triton/wire.py)."""
from ..wire import DrivingFrame, MotionFrame, SourceInput
from .async_client import AsyncLivePortraitClient
from .client import DEFAULT_URL, LivePortraitClient
from .editing import EditSession, PortraitEditor
from .errors import RequestFailed, ServerAtCapacity, ServerMismatch, ServerUnavailable
from .multiface import FaceStreams, SourceFaces
from .requests import FrameResult, build_request, new_sequence_id, session_headers
from .stream import AnimationStream
from .templates import MotionTemplate, TemplateError, load_template, save_npz

__all__ = ["DEFAULT_URL", "AnimationStream", "AsyncLivePortraitClient", "DrivingFrame", "EditSession", "FaceStreams",
           "FrameResult", "LivePortraitClient", "MotionFrame", "MotionTemplate", "PortraitEditor", "RequestFailed",
           "ServerAtCapacity", "ServerMismatch", "ServerUnavailable", "SourceFaces", "SourceInput", "TemplateError",
           "build_request", "load_template", "new_sequence_id", "save_npz", "session_headers"]
