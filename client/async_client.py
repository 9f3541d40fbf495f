"""The asyncio client over tritonclient.grpc.aio: the same checks, single requests and streamed animation."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterable, AsyncIterator, Iterable

import numpy as np

from .. import spec
from ..wire import DrivingFrame, SourceInput
from .client import DEFAULT_URL, LivePortraitClient
from .errors import TRANSPORT_ERRORS, failure
from .requests import FrameResult, build_request, new_sequence_id, session_headers


class AsyncLivePortraitClient:
    """asyncio client over tritonclient.grpc.aio: checks, single requests and streamed animation."""

    def __init__(self, url: str = DEFAULT_URL, model: str = spec.PIPELINE):
        import tritonclient.grpc.aio as aio
        self._aio = aio
        self.url, self.model = url, model
        self._client = aio.InferenceServerClient(url)

    async def __aenter__(self):
        await self.check_server()
        return self

    async def __aexit__(self, *exc):
        await self.close()
        return False

    async def close(self) -> None:
        await self._client.close()

    async def check_server(self) -> None:
        """The sync client's check (one rule: live, ready, tensors as the spec), off the event loop."""
        def check():
            LivePortraitClient(self.url, model=self.model, check=True).close()
        await asyncio.to_thread(check)

    def _request(self, tensors: dict, sequence_id: int, request_id: str, start=False, end=False,
                 options: dict | None = None, streamed: bool = False) -> dict:
        return build_request(self._aio, self.model, tensors, request_id=request_id, sequence_id=sequence_id,
                             start=start, end=end, options=options, streamed=streamed)

    async def animate_image(self, source: SourceInput, driving: DrivingFrame) -> np.ndarray:
        request = self._request({**source.tensors(), **driving.tensors()}, new_sequence_id(), "image", True, True,
                                source.options)
        try:
            result = await self._client.infer(**request)
        except TRANSPORT_ERRORS as exc:
            raise failure(f"{self.model} request failed", exc) from exc
        image = result.as_numpy("image")
        return image.reshape(image.shape[-3:])

    async def animate(self, source: SourceInput, drivings: AsyncIterable[DrivingFrame] | Iterable[DrivingFrame],
                      sequence_id: int | None = None) -> AsyncIterator[FrameResult]:
        """Stream a whole sequence (`sequence_id`, else a random one) on one gRPC stream carrying its session
        header; yields results in frame order as they arrive."""
        sequence_id = sequence_id or new_sequence_id()
        sent: dict[int, float] = {}

        async def requests():
            yield self._request(source.tensors(), sequence_id, "start", start=True, options=source.options,
                                streamed=True)
            number = 0
            if hasattr(drivings, "__aiter__"):
                async for driving in drivings:
                    sent[number] = time.perf_counter()
                    yield self._request(driving.tensors(), sequence_id, str(number), streamed=True)
                    number += 1
            else:
                for driving in drivings:
                    sent[number] = time.perf_counter()
                    yield self._request(driving.tensors(), sequence_id, str(number), streamed=True)
                    number += 1
                    await asyncio.sleep(0)
            yield self._request({}, sequence_id, "end", end=True, streamed=True)

        done: dict[int, FrameResult] = {}
        next_out = 0
        async for result, error in self._client.stream_infer(requests(), headers=session_headers(sequence_id)):
            if error is not None:
                raise failure(f"the server failed a frame of sequence {sequence_id}", error) from error
            tag = result.get_response().id
            if tag == "end":
                break
            if tag == "start":
                continue
            number = int(tag)
            image = result.as_numpy("image")
            done[number] = FrameResult(number, image.reshape(image.shape[-3:]), time.perf_counter() - sent[number])
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
