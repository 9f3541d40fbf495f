"""What the client raises, and how it tells the transport's failures apart (refused, full, disconnected)."""
from __future__ import annotations

from tritonclient.utils import InferenceServerException

from .. import spec


class ServerUnavailable(ConnectionError):
    """No server answered, or the model is not loaded."""


class ServerMismatch(RuntimeError):
    """The served model's tensors differ from the spec this client was built with."""


class RequestFailed(RuntimeError):
    """The server refused or failed a request (its message is kept)."""


class ServerAtCapacity(RequestFailed):
    """The server refused a new sequence: it holds as many live streams as it admits (try later or elsewhere)."""


TRANSPORT_ERRORS = (InferenceServerException, OSError)
"""What tritonclient raises when the server refuses a request or cannot be reached (gRPC wraps everything in
InferenceServerException; HTTP lets the socket's OSError through). Anything else is a bug here and propagates."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def refused_at_capacity(exc: BaseException) -> bool:
    return spec.CAPACITY_REFUSAL in str(exc)


def failure(what: str, exc: BaseException) -> RequestFailed:
    """`what: <the server's first line>`, as ServerAtCapacity when the server was full, else RequestFailed."""
    kind = ServerAtCapacity if refused_at_capacity(exc) else RequestFailed
    return kind(f"{what}: {first_line(exc)}")


def is_connection_error(exc) -> bool:
    status = getattr(exc, "status", lambda: None)()
    return str(status) in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED") \
        or "Socket closed" in str(exc) or "failed to connect" in str(exc).lower()
