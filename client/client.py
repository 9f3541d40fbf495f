"""The synchronous client (gRPC or HTTP) of the served `liveportrait` pipeline and its sub-networks.

    client = LivePortraitClient("127.0.0.1:8001")             # checks the server and the model's tensors
    image = client.animate_image(source, DrivingFrame(crop=driving_crop))   # one unary request (START+frame+END)
    with client.stream(source, max_in_flight=4) as stream:     # gRPC stream, several frames in flight (stream.py)
        ...
    async with AsyncLivePortraitClient(url) as c: ...          # asyncio: async_client.py

Every tensor name and shape comes from `spec`; before sending anything the client compares the server's model
metadata with `spec.PIPELINE_SPEC` and refuses a mismatch with a message naming the difference.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .. import spec
from ..keypoints import MotionInfo
from ..wire import DrivingFrame, SourceInput
from .errors import TRANSPORT_ERRORS, RequestFailed, ServerUnavailable, failure, first_line
from .requests import build_request, compare_tensors, new_sequence_id
from .stream import AnimationStream

DEFAULT_URL = "127.0.0.1:8001"
START_HINT = "start one with `liveportrait-triton serve --repository DIR` (or pass --server HOST:PORT)"


class LivePortraitClient:
    """Synchronous client (gRPC or HTTP) of the `liveportrait` model; `stream()` needs gRPC."""

    def __init__(self, url: str = DEFAULT_URL, protocol: str = "grpc", model: str = spec.PIPELINE,
                 timeout_s: float = 30.0, check: bool = True):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, timeout_s
        self._client = self._connect()
        if check:
            self.check_server()

    def _connect(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        if self.protocol == "http":
            return module.InferenceServerClient(self.url, network_timeout=self.timeout_s)
        return module.InferenceServerClient(self.url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- checks ---------------------------------------------------------------------------------------------
    def where(self) -> str:
        return f"{self.protocol}://{self.url}"

    def check_server(self, models: Iterable[str] | None = None) -> None:
        """The server is live, the models are ready and their tensors match the spec (else a clear error)."""
        try:
            live = self._client.is_server_live(client_timeout=self.timeout_s) if self.protocol == "grpc" \
                else self._client.is_server_live()
        except TRANSPORT_ERRORS as exc:        # grpc/http raise different types for a refused connection
            raise ServerUnavailable(f"no Triton server answered at {self.where()} ({first_line(exc)}); "
                                    f"{START_HINT}") from exc
        if not live:
            raise ServerUnavailable(f"the Triton server at {self.where()} is not live yet; {START_HINT}")
        for model in (self.model, *(models or ())):
            self.check_model(model)

    def model_ready(self, model: str) -> bool:
        return bool(self._client.is_model_ready(model))

    def check_model(self, model: str) -> None:
        if not self.model_ready(model):
            raise ServerUnavailable(f"the server at {self.where()} has no ready model {model!r} (is the repository "
                                    f"complete? see the server log)")
        wanted = spec.PIPELINE_SPEC if model == self.model else spec.submodel_specs(subjects=spec.SUBJECTS)[model]
        metadata = self._json(self._client.get_model_metadata(model, **self._as_json()))
        config = self._json(self._client.get_model_config(model, **self._as_json()))
        config = config.get("config", config)
        batched = int(config.get("max_batch_size", 0)) > 0
        compare_tensors("input", metadata.get("inputs", []), wanted.inputs, batched, model)
        compare_tensors("output", metadata.get("outputs", []), wanted.outputs, batched, model)

    def _as_json(self) -> dict:
        return {"as_json": True} if self.protocol == "grpc" else {}

    @staticmethod
    def _json(value) -> dict:
        return value if isinstance(value, dict) else {}

    # -- unary requests -------------------------------------------------------------------------------------
    def request(self, tensors: dict[str, np.ndarray], **kwargs) -> dict:
        """`build_request` for this client's protocol and pipeline model (see there for the keywords)."""
        return build_request(self._module, self.model, tensors, **kwargs)

    def infer(self, tensors: dict[str, np.ndarray], sequence_id: int, start: bool = False, end: bool = False,
              options: dict | None = None) -> tuple[np.ndarray | None, int]:
        """One request of a sequence -> (image or None, frame_index); an edit's image comes with index -1."""
        request = self.request(tensors, sequence_id=sequence_id, start=start, end=end, options=options)
        try:
            result = self._client.infer(**request)
        except TRANSPORT_ERRORS as exc:
            raise failure(f"{self.model} request failed", exc) from exc
        index = int(result.as_numpy("frame_index").reshape(-1)[0])
        image = result.as_numpy("image")
        return (None if image is None else image.reshape(image.shape[-3:])), index

    def animate_image(self, source: SourceInput, driving: DrivingFrame) -> np.ndarray:
        """A whole sequence in one request (START + one frame + END): image-driven animation."""
        image, _ = self.infer({**source.tensors(), **driving.tensors()}, new_sequence_id(), start=True, end=True,
                              options=source.options)
        if image is None:
            raise RequestFailed("the server answered without an image")
        return image

    def extract_motion(self, crops: np.ndarray) -> MotionInfo:
        """Run the served motion extractor on (B, 256, 256, 3) uint8 RGB crops."""
        from ..pipeline import crop_to_input
        model_spec = spec.submodel_specs()[spec.MOTION]
        request = build_request(self._module, spec.MOTION, {"image": crop_to_input(crops)}, model_spec=model_spec,
                                batched=True)
        try:
            result = self._client.infer(**request)
        except TRANSPORT_ERRORS as exc:
            raise RequestFailed(f"{spec.MOTION} request failed: {first_line(exc)}") from exc
        return MotionInfo.from_raw({n: result.as_numpy(n) for n in model_spec.output_names})

    # -- streaming ------------------------------------------------------------------------------------------
    def stream(self, source: SourceInput, max_in_flight: int = 4, retry_s: float = 0.0,
               sequence_id: int | None = None) -> AnimationStream:
        """A streamed sequence (see AnimationStream); `sequence_id` defaults to a random one."""
        if self.protocol != "grpc":
            raise ValueError("streaming needs the gRPC protocol")
        return AnimationStream(self, source, max_in_flight=max_in_flight, retry_s=retry_s, sequence_id=sequence_id)

