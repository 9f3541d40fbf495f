"""What the backend answers per request: a served frame or a failure."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FrameResult:
    """A served frame (image None when the request carried no driving input) and its index in the sequence."""
    image: np.ndarray | None
    frame_index: int


@dataclasses.dataclass
class Failure:
    """A request that failed: caller_fault maps to INVALID_ARG, otherwise INTERNAL (the traceback stays in the
    server log as `detail`, never in the response)."""
    message: str
    caller_fault: bool = True
    detail: str = ""
