"""What the backend answers per request: a served frame or a failure."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ServedFrame:
    """A served frame (image None when the request carried no driving input) and its index in the sequence: the
    response's `image` and `frame_index` tensors. The client's `FrameResult` (client/requests.py) is what a stream
    hands its caller: numbered by what the caller sent (a reconnection replays the anchor frame under new
    frame_index values) and with the latency measured at the client."""
    image: np.ndarray | None
    frame_index: int


@dataclasses.dataclass
class Failure:
    """A request that failed: caller_fault maps to INVALID_ARG, otherwise INTERNAL (the traceback stays in the
    server log as `detail`, never in the response); `unavailable` (the server is full) maps to UNAVAILABLE."""
    message: str
    caller_fault: bool = True
    detail: str = ""
    unavailable: bool = False


def error_response(pb_utils, failure: Failure):
    """The Triton response of a failed request (`pb_utils`: the stub's module); the detail goes to the server log."""
    if failure.detail:
        pb_utils.Logger.log_error(f"{failure.message}\n{failure.detail}")
    code = (pb_utils.TritonError.UNAVAILABLE if failure.unavailable
            else pb_utils.TritonError.INVALID_ARG if failure.caller_fault else pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(failure.message, code))
