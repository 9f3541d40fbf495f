"""One stream through the served `liveportrait` sequence model over gRPC streaming, timed frame by frame.

The START request carries the source crop and the first driving frame, every later request one driving frame,
the last one END. One request is in flight at a time, so each latency is one frame's round trip: client encode,
network, sequence batcher, BLS calls to the sub-networks, response.
"""
from __future__ import annotations

import queue
import time

import numpy as np

from .. import spec


class StreamError(RuntimeError):
    """The server answered a frame with an error, or not in time."""


def pipeline_input(grpcclient, name: str, array: np.ndarray):
    """One input of a `liveportrait` request (one item: the batch dimension added), typed by the spec."""
    t = spec.PIPELINE_SPEC.input(name)
    array = np.ascontiguousarray(array, dtype=t.numpy_dtype)[None]
    tensor = grpcclient.InferInput(name, list(array.shape), t.dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def stream_frames(url: str, source: np.ndarray, driving: list[np.ndarray], sequence_id: int,
                  timeout_s: float = 600.0) -> tuple[list[float], list[np.ndarray]]:
    """Animate `driving` from `source` as one sequence; (seconds per frame, output images) in order."""
    import tritonclient.grpc as grpcclient
    if not driving:
        raise ValueError("stream_frames needs at least one driving frame")
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    outputs = [grpcclient.InferRequestedOutput(t.name) for t in spec.PIPELINE_SPEC.outputs]
    seconds, images = [], []
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, crop in enumerate(driving):
            inputs = [pipeline_input(grpcclient, "driving", crop)]
            if i == 0:
                inputs.insert(0, pipeline_input(grpcclient, "source", source))
            start = time.perf_counter()
            client.async_stream_infer(spec.PIPELINE, inputs, outputs=outputs, request_id=str(i),
                                      sequence_id=sequence_id, sequence_start=i == 0,
                                      sequence_end=i == len(driving) - 1)
            try:
                result, error = answers.get(timeout=timeout_s)
            except queue.Empty:
                raise StreamError(f"frame {i} of sequence {sequence_id}: no answer within {timeout_s:.0f} s") from None
            seconds.append(time.perf_counter() - start)
            if error is not None:
                raise StreamError(f"frame {i} of sequence {sequence_id}: {error}")
            images.append(result.as_numpy("image")[0])
    finally:
        client.stop_stream()
        client.close()
    return seconds, images
