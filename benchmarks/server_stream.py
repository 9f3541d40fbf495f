"""One stream through the served `liveportrait` sequence model over gRPC streaming, timed frame by frame.

It runs on the client library's stream (`LivePortraitClient.stream`, one frame in flight): START registers the
source (not timed), then each driving frame's latency is its round trip (client encode, network, sequence
batcher, BLS calls to the sub-networks, response), the last frame carrying END.
"""
from __future__ import annotations

import numpy as np

from ..client.client import LivePortraitClient
from ..client.stream import AnimationStream
from ..wire import DrivingFrame, SourceInput


def open_stream(url: str, source: np.ndarray, sequence_id: int) -> tuple[LivePortraitClient, AnimationStream]:
    """A checked client and one sequence on it whose source is registered (START answered), one frame in flight
    (each latency is one round trip)."""
    client = LivePortraitClient(url)
    try:
        stream = client.stream(SourceInput(crop=source), max_in_flight=1, sequence_id=sequence_id)
        stream.wait_started()
        return client, stream
    except BaseException:
        client.close()
        raise


def drive(stream: AnimationStream, driving: list[np.ndarray]) -> list:
    """Send every driving frame (the last with END); the FrameResults in order."""
    results = []
    for i, crop in enumerate(driving):
        stream.send(DrivingFrame(crop=crop), last=i == len(driving) - 1)
        results += stream.ready()
    return results + stream.finish()


def stream_frames(url: str, source: np.ndarray, driving: list[np.ndarray],
                  sequence_id: int) -> tuple[list[float], list[np.ndarray]]:
    """Animate `driving` from `source` as one sequence; (seconds per frame, output images) in order."""
    if not driving:
        raise ValueError("stream_frames needs at least one driving frame")
    client, stream = open_stream(url, source, sequence_id)
    try:
        results = drive(stream, driving)
    finally:
        stream.close()
        client.close()
    return [r.latency_s for r in results], [r.image for r in results]
