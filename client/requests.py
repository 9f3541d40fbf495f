"""Requests on the wire: one builder of every inference request the clients send (tensors shaped and typed by
`spec`, sequence flags, session header), and the check of a served model's tensors against the spec."""
from __future__ import annotations

import dataclasses
import secrets

import numpy as np

from .. import spec
from .errors import ServerMismatch


@dataclasses.dataclass
class FrameResult:
    """One animated frame as the client hands it to its caller. Not the server's `backend.outcomes.ServedFrame`
    (image, frame_index in the sequence): `number` counts what the caller sent, which differs from the server's
    frame_index after a reconnection replays the anchor frame, and the latency is measured here."""
    number: int                 # 0-based position of the driving frame in what the caller sent
    image: np.ndarray           # (512, 512, 3) uint8 RGB
    latency_s: float            # send -> response


def new_sequence_id() -> int:
    """A random correlation id (fits the INT64 request parameter; the model's CORRID is UINT64)."""
    return secrets.randbits(62) + 1


def _batch_of(name: str, value, model_spec: spec.ModelSpec, batched: bool) -> np.ndarray:
    """A request's value of an input as the spec's dtype, with a batch dimension (of 1 unless `batched`)."""
    t = model_spec.input(name)
    array = np.ascontiguousarray(value, dtype=t.numpy_dtype)
    if batched:
        if tuple(array.shape[1:]) != tuple(t.shape):
            raise ValueError(f"input {name!r}: expected shape [B, {', '.join(map(str, t.shape))}], "
                             f"got {list(array.shape)}")
        return array
    if array.size != int(np.prod(t.shape)):
        raise ValueError(f"input {name!r}: expected shape {list(t.shape)}, got {list(array.shape)}")
    return array.reshape((1,) + t.shape)


def session_headers(sequence_id: int) -> dict[str, str]:
    """The header naming a sequence's session (`spec.SESSION_HEADER`): a proxy in front of several replicas
    hashes it to send every request of the sequence to the replica holding its state (liveportrait_triton.cluster).
    gRPC sends it as metadata: per request for unary calls, once per stream for a stream."""
    return {spec.SESSION_HEADER: str(sequence_id)}


def build_request(module, model: str, tensors: dict[str, np.ndarray], *, model_spec: spec.ModelSpec = spec.PIPELINE_SPEC,
                  batched: bool = False, request_id: str = "", sequence_id: int = 0, start: bool = False,
                  end: bool = False, options: dict | None = None, streamed: bool = False) -> dict:
    """The keyword arguments of one inference request, the same for every call this client makes.

    `module` is tritonclient.grpc, tritonclient.http or tritonclient.grpc.aio (each has its own InferInput);
    the result is passed as `**request` to `infer`, `async_stream_infer` or yielded to aio `stream_infer`.
    Pipeline tensors are one item each (a batch dimension of 1 is added); `batched` sub-model tensors already
    carry theirs. Shapes and dtypes come from `model_spec`; a wrong shape raises ValueError before anything is sent.
    A request of a sequence carries the session header (`session_headers`), unless it is `streamed`: a stream's
    requests share the metadata the stream was opened with (`start_stream` / `stream_infer(headers=...)`).
    """
    inputs = []
    for name, value in tensors.items():
        array = _batch_of(name, value, model_spec, batched)
        item = module.InferInput(name, list(array.shape), model_spec.input(name).dtype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    request = {"model_name": model, "inputs": inputs,
               "outputs": [module.InferRequestedOutput(n) for n in model_spec.output_names]}
    if request_id:
        request["request_id"] = request_id
    if sequence_id:
        request.update(sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        if not streamed:
            request["headers"] = session_headers(sequence_id)
    if options:
        request["parameters"] = options
    return request

def compare_tensors(kind: str, served: list[dict], wanted: tuple[spec.TensorSpec, ...], batched: bool,
                    model: str) -> None:
    """A served model's inputs or outputs (`kind`) against the spec, else ServerMismatch naming the difference."""
    got = {t["name"]: t for t in served}
    want = {t.name: t for t in wanted}
    if set(got) != set(want):
        raise ServerMismatch(f"served model {model!r} has {kind}s {sorted(got)}, this client expects "
                             f"{sorted(want)} (client and server versions differ?)")
    for name, t in want.items():
        shape = [int(d) for d in got[name].get("shape", [])]
        expected = ([-1] if batched else []) + list(t.shape)
        if got[name].get("datatype") != t.dtype or shape != expected:
            raise ServerMismatch(f"served model {model!r} {kind} {name!r} is {got[name].get('datatype')} {shape}, "
                                 f"this client expects {t.dtype} {expected}")

