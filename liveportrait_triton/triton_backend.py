"""Logic of the Python-backend models, testable without a Triton server.

The `model.py` adapters in the repository only translate between `triton_python_backend_utils` objects and the
plain numpy values used here:

- `OnnxSubnetwork`: one sub-network on ONNX Runtime. Requests of a dynamic batch are concatenated along the batch
  axis, run once and split back, every tensor bound by name.
- `PipelineBackend`: the `liveportrait` sequence model. It parses requests (`parse_request`), groups a batch into
  rounds with at most one request per sequence (`plan_rounds`), registers sources and animates driving frames
  through `pipeline.Animator` batched across sequences, and keeps per-sequence state in a `SequenceStore` that frees
  it on END or after an idle timeout.
- `BlsRunner`: the pipeline's `Runner` over BLS calls to the sub-network models; independent calls go out together
  with `async_exec`.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import dataclasses
import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from . import spec
from .pipeline import Animator, DrivingFrame, InputError, MotionFrame, StreamState

FREED_END = "end"
FREED_IDLE = "idle"


class ConfigError(ValueError):
    """A model configuration (or artefact) that does not match the tensor spec: the model must not load."""


class SubnetworkError(RuntimeError):
    """A sub-network call failed inside the server (not the caller's fault)."""


# ---------------------------------------------------------------------------------------------------------------
# Tensors handed to the Python backend.

_USED_CAPSULE_NAME = b"used_dltensor"       # the DLPack protocol's name of a consumed capsule (kept alive here)
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name.restype = ctypes.c_int


# The bundled stub (Triton 2.51's Python backend) was built against NumPy 1: under NumPy 2 its NumPy bridges read
# the item size at the old C-struct offset, so `pb_utils.Tensor(name, ndarray)` records 0 bytes and
# `Tensor.as_numpy()` repeats the first element. DLPack carries the same memory without those bridges, so every
# tensor crosses the backend boundary through these two functions.

def backend_array(tensor) -> np.ndarray:
    """A NumPy view of a `pb_utils.Tensor` (valid while the request or response that holds it lives)."""
    return np.from_dlpack(tensor)


def backend_tensor(pb_utils, name: str, array: np.ndarray):
    """A `pb_utils.Tensor` over a C-contiguous `array`, passed through DLPack.

    The stub marks the capsule it consumed 'used_dlpack' instead of the protocol's 'used_dltensor'; renaming it
    lets NumPy's capsule destructor see a consumed capsule instead of reporting an error for every tensor.
    """
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _capsule_set_name(capsule, _USED_CAPSULE_NAME)
    return tensor


# ---------------------------------------------------------------------------------------------------------------
# Model configuration checks (run in `initialize`).

def config_parameter(model_config: dict, key: str, default: str | None = None) -> str:
    """A string parameter of a parsed config.pbtxt (Triton's JSON form); ConfigError when missing and no default."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None:
        if default is None:
            raise ConfigError(f"model {model_config.get('name')!r}: config.pbtxt has no parameter {key!r}")
        return default
    return value


def check_model_config(model_config: dict, model_spec: spec.ModelSpec) -> None:
    """The config's inputs and outputs must be the spec's: same names, data types, dims and optional flags."""
    name = model_config.get("name")
    if name != model_spec.name:
        raise ConfigError(f"config.pbtxt names model {name!r}, expected {model_spec.name!r}")
    if int(model_config.get("max_batch_size", 0)) < 1:
        raise ConfigError(f"model {name!r}: max_batch_size must be >= 1 (requests are batched)")
    for kind, tensors in (("input", model_spec.inputs), ("output", model_spec.outputs)):
        got = {t["name"]: t for t in model_config.get(kind, [])}
        want = {t.name: t for t in tensors}
        if set(got) != set(want):
            raise ConfigError(f"model {name!r}: config {kind}s {sorted(got)} differ from the spec's {sorted(want)}")
        for tname, t in want.items():
            entry = got[tname]
            dims = tuple(int(d) for d in entry.get("dims", []))
            if entry.get("data_type") != t.triton_type or dims != t.shape:
                raise ConfigError(f"model {name!r} {kind} {tname!r}: config has {entry.get('data_type')} "
                                  f"{list(dims)}, the spec says {t.triton_type} {list(t.shape)}")
            if kind == "input" and bool(entry.get("optional", False)) != t.optional:
                raise ConfigError(f"model {name!r} input {tname!r}: optional flag differs from the spec")


# ---------------------------------------------------------------------------------------------------------------
# Sub-networks on ONNX Runtime.

class OnnxSubnetwork:
    """One served sub-network: its ONNX file on ONNX Runtime, checked against the spec, batched across requests."""

    def __init__(self, model_spec: spec.ModelSpec, onnx_path: str | Path, intra_op_threads: int = 0):
        import onnxruntime as ort
        path = Path(onnx_path)
        if not path.is_file():
            raise ConfigError(f"model {model_spec.name!r}: {path} not found (run `liveportrait-triton export`)")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.spec = model_spec
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_in = [i.name for i in self.session.get_inputs()]
        graph_out = [o.name for o in self.session.get_outputs()]
        if sorted(graph_in) != sorted(model_spec.input_names) or sorted(graph_out) != sorted(model_spec.output_names):
            raise ConfigError(f"model {model_spec.name!r}: {path.name} has inputs {graph_in} and outputs {graph_out}, "
                              f"the spec says {model_spec.input_names} and {model_spec.output_names}")

    @classmethod
    def from_config(cls, model_config: dict, version_dir: str | Path) -> "OnnxSubnetwork":
        """Validate a sub-network's config.pbtxt (Triton's JSON form) and load its ONNX file from version_dir."""
        name = model_config.get("name")
        network_config = config_parameter(model_config, "network_config")
        specs = spec.submodel_specs(network_config)
        if name not in specs:
            raise ConfigError(f"{name!r} is not a served sub-network; expected one of {list(specs)}")
        check_model_config(model_config, specs[name])
        threads = config_parameter(model_config, "intra_op_threads", "0")
        if not threads.isdigit():
            raise ConfigError(f"model {name!r}: intra_op_threads must be a non-negative integer, got {threads!r}")
        onnx_file = config_parameter(model_config, "onnx_file")
        return cls(specs[name], Path(version_dir) / onnx_file, int(threads))

    def run_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Concatenate the requests' inputs along the batch axis, run once, split the outputs back per request."""
        sizes = [int(r[self.spec.inputs[0].name].shape[0]) for r in requests]
        feeds = {t.name: np.ascontiguousarray(np.concatenate([r[t.name] for r in requests]), dtype=t.numpy_dtype)
                 for t in self.spec.inputs}
        outputs = dict(zip(self.spec.output_names, self.session.run(self.spec.output_names, feeds)))
        bounds = np.cumsum(sizes)[:-1]
        split = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: split[name][i] for name in self.spec.output_names} for i in range(len(requests))]

    def non_finite_inputs(self, request: dict[str, np.ndarray]) -> list[str]:
        """Names of the request's float inputs holding NaN or Inf (the networks would return garbage for them)."""
        return [t.name for t in self.spec.inputs
                if t.numpy_dtype.kind == "f" and not np.isfinite(request[t.name]).all()]

    def serve_requests(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | "Failure"]:
        """One outcome per request: its outputs, or a Failure. Requests with NaN/Inf inputs are refused alone
        (caller fault); the others run together; an ONNX Runtime error fails them with the traceback kept as
        detail for the server log."""
        outcomes: list = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            bad = self.non_finite_inputs(request)
            if bad:
                outcomes[i] = Failure(f"{self.spec.name}: input(s) {bad} contain NaN or Inf")
            else:
                valid.append(i)
        if valid:
            try:
                results = self.run_requests([requests[i] for i in valid])
            except Exception as exc:
                results = [Failure(f"{self.spec.name}: {exc}", False, traceback.format_exc())] * len(valid)
            for i, result in zip(valid, results):
                outcomes[i] = result
        return outcomes


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: requests, rounds, per-sequence state.

@dataclasses.dataclass
class RawRequest:
    """What the adapter reads from one Triton request: controls, the optional inputs present, parameters."""
    corrid: int
    start: bool
    end: bool
    tensors: dict[str, np.ndarray]          # present optional inputs by spec name, with the batch dimension
    parameters: dict[str, Any]


@dataclasses.dataclass
class PipelineRequest:
    """A validated request of the `liveportrait` model."""
    corrid: int
    start: bool
    end: bool
    source: np.ndarray | None = None        # (256, 256, 3) uint8, START only
    options: dict | None = None             # parsed options, START only
    source_eye_ratio: np.ndarray | None = None
    source_lip_ratio: np.ndarray | None = None
    frame: DrivingFrame | None = None       # the driving input, if any


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


START_ONLY = ("source", "source_eye_ratio", "source_lip_ratio")
FRAME_RATIOS = ("driving_eye_ratio", "driving_lip_ratio")


def parse_request(raw: RawRequest) -> PipelineRequest:
    """Check which inputs a request may carry and build the driving frame; InputError/OptionError if it can't."""
    known = set(spec.PIPELINE_SPEC.input_names)
    unknown = sorted(set(raw.tensors) - known)
    if unknown:
        raise InputError(f"unknown input(s) {unknown}")
    arrays = {}
    for name, value in raw.tensors.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != 1:
            raise InputError(f"{name}: each request carries one frame (batch dimension 1), got shape "
                             f"{list(array.shape)}")
        want = spec.PIPELINE_SPEC.input(name)
        if array.dtype != want.numpy_dtype or array.shape[1:] != want.shape:
            raise InputError(f"{name}: expected {want.dtype} {[1, *want.shape]}, got {array.dtype} "
                             f"{list(array.shape)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{name}: contains NaN or Inf")
        arrays[name] = array[0]
    request = PipelineRequest(corrid=raw.corrid, start=raw.start, end=raw.end)
    if raw.start:
        request.options = spec.parse_options(raw.parameters)
        if "source" not in arrays:
            raise InputError(f"sequence {raw.corrid}: the START request must carry `source` (the source crop)")
        request.source = arrays["source"]
        request.source_eye_ratio = arrays.get("source_eye_ratio")
        request.source_lip_ratio = arrays.get("source_lip_ratio")
        if request.options["eye_retargeting"] and request.source_eye_ratio is None:
            raise InputError("option eye_retargeting is on but the START request has no source_eye_ratio")
        if request.options["lip_retargeting"] and request.source_lip_ratio is None:
            raise InputError("option lip_retargeting is on but the START request has no source_lip_ratio")
    else:
        if raw.parameters:
            raise InputError(f"options {sorted(raw.parameters)} may only be sent with the START request "
                             "(they are fixed for the whole sequence)")
        misplaced = [n for n in START_ONLY if n in arrays]
        if misplaced:
            raise InputError(f"{misplaced} may only be sent with the START request; start a new sequence to "
                             "change the source")
    motion = [n for n in spec.MOTION_INPUTS if n in arrays]
    if "driving" in arrays and motion:
        raise InputError("a request carries either `driving` or the motion_* inputs of a template, not both")
    if motion and len(motion) != len(spec.MOTION_INPUTS):
        missing = [n for n in spec.MOTION_INPUTS if n not in arrays]
        raise InputError(f"template motion needs all of {list(spec.MOTION_INPUTS)}; missing {missing}")
    eye = arrays.get("driving_eye_ratio")
    lip = arrays.get("driving_lip_ratio")
    if "driving" in arrays or motion:
        template = None
        if motion:
            template = MotionFrame(R=arrays["motion_R"], exp=arrays["motion_exp"], t=arrays["motion_t"],
                                   scale=arrays["motion_scale"]).validated()
        request.frame = DrivingFrame(crop=arrays.get("driving"), motion=template,
                                     eye_ratio=None if eye is None else float(eye[0]),
                                     lip_ratio=None if lip is None else float(lip[0]))
    elif eye is not None or lip is not None:
        raise InputError(f"{[n for n in FRAME_RATIOS if n in arrays]} need a driving input in the same request")
    elif not raw.start and not raw.end:
        raise InputError("the request carries no driving input: send `driving` (a crop) or the motion_* inputs")
    return request


def check_frame(options: dict, frame: DrivingFrame) -> None:
    """Per-frame inputs the sequence's options require."""
    if options["eye_retargeting"] and frame.eye_ratio is None:
        raise InputError("option eye_retargeting is on but the frame has no driving_eye_ratio")
    if options["lip_retargeting"] and frame.lip_ratio is None:
        raise InputError("option lip_retargeting is on but the frame has no driving_lip_ratio")


def plan_rounds(corrids: list[int]) -> list[list[int]]:
    """Split a batch (request indices in arrival order) into rounds holding at most one request per sequence.

    A sequence's requests keep their order: its k-th request in the batch goes to round k.
    """
    rounds: list[list[int]] = []
    seen: collections.Counter = collections.Counter()
    for index, corrid in enumerate(corrids):
        k = seen[corrid]
        seen[corrid] += 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(index)
    return rounds


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)     # glibc only


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A sequence's state is a few large arrays; once glibc has freed one block of that size it serves later ones from
    its heaps instead of fresh mappings and keeps the pages after they are freed, so without this a burst of streams
    would leave the server's memory at its peak (measured: 200 tiny sequences, ~50 MB of state, mostly retained).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class SequenceListener(Protocol):
    """Receives the store's changes (the model publishes them as Triton custom metrics)."""

    def sequences_changed(self, live: int, state_bytes: int) -> None:
        ...

    def sequence_freed(self, reason: str) -> None:
        ...


class SequenceStore:
    """Per-sequence state keyed by correlation id, with idle eviction. Thread-safe."""

    def __init__(self, idle_timeout_s: float, listener: SequenceListener | None = None,
                 clock: Callable[[], float] = time.monotonic, remembered_evictions: int = 1024):
        if idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        self.idle_timeout_s = idle_timeout_s
        self.listener = listener
        self.clock = clock
        self._states: dict[int, StreamState] = {}
        self._last_used: dict[int, float] = {}
        self._evicted: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._remembered = remembered_evictions
        self._lock = threading.Lock()
        self.freed_total = 0            # sequences freed so far (END or idle)

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def __contains__(self, corrid: int) -> bool:
        with self._lock:
            return corrid in self._states

    @property
    def state_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._states.values())

    def add(self, corrid: int, state: StreamState) -> None:
        with self._lock:
            if corrid in self._states:
                raise KeyError(f"sequence {corrid} is already live")
            self._states[corrid] = state
            self._last_used[corrid] = self.clock()
            self._evicted.pop(corrid, None)
        self._changed()

    def get(self, corrid: int) -> StreamState | None:
        """The live state (marked as used now), or None."""
        with self._lock:
            state = self._states.get(corrid)
            if state is not None:
                self._last_used[corrid] = self.clock()
            return state

    def was_evicted(self, corrid: int) -> bool:
        with self._lock:
            return corrid in self._evicted

    def end(self, corrid: int) -> bool:
        """Free a sequence at its END; False if it was not live."""
        return self._free([corrid], FREED_END) == [corrid]

    def evict_idle(self, keep: set[int] = frozenset()) -> list[int]:
        """Free every sequence unused for idle_timeout_s (except those in keep); returns their ids."""
        now = self.clock()
        with self._lock:
            idle = [c for c, t in self._last_used.items() if now - t >= self.idle_timeout_s and c not in keep]
        return self._free(idle, FREED_IDLE)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._last_used.clear()
        self._changed()

    def _free(self, corrids: list[int], reason: str) -> list[int]:
        freed = []
        with self._lock:
            for corrid in corrids:
                if self._states.pop(corrid, None) is not None:
                    del self._last_used[corrid]
                    freed.append(corrid)
                    self.freed_total += 1
                    if reason == FREED_IDLE:
                        self._evicted[corrid] = None
                        while len(self._evicted) > self._remembered:
                            self._evicted.popitem(last=False)
        if freed and self.listener is not None:
            for _ in freed:
                self.listener.sequence_freed(reason)
        if freed:
            self._changed()
        return freed

    def _changed(self) -> None:
        if self.listener is not None:
            with self._lock:
                live, nbytes = len(self._states), sum(s.nbytes for s in self._states.values())
            self.listener.sequences_changed(live, nbytes)


class PipelineCore:
    """Serves batches of pipeline requests over a Runner (synchronous; one batch at a time)."""

    def __init__(self, runner, store: SequenceStore):
        self.animator = Animator(runner)
        self.store = store
        self.batches = 0                # batches processed so far

    def process(self, raws: list[RawRequest]) -> list[FrameResult | Failure]:
        """One outcome per request, in order. Caller faults fail only their own request."""
        self.batches += 1
        outcomes: list[FrameResult | Failure | None] = [None] * len(raws)
        parsed: list[PipelineRequest | None] = [None] * len(raws)
        for i, raw in enumerate(raws):
            try:
                parsed[i] = parse_request(raw)
            except (InputError, spec.OptionError) as exc:
                outcomes[i] = Failure(str(exc))
        self.store.evict_idle(keep={r.corrid for r in raws})
        for round_ in plan_rounds([r.corrid for r in raws]):
            self._process_round(round_, raws, parsed, outcomes)
        return outcomes

    def _process_round(self, indices, raws, parsed, outcomes) -> None:
        live: dict[int, StreamState] = {}
        starts = []
        for i in indices:
            request = parsed[i]
            if request is None:
                continue
            if request.start:
                if request.corrid in self.store:
                    outcomes[i] = Failure(f"sequence id {request.corrid} is already live: a second START on it is "
                                          "refused (END it first, or use a new sequence id)")
                else:
                    starts.append(i)
                continue
            state = self.store.get(request.corrid)
            if state is None:
                outcomes[i] = Failure(self._unknown_sequence(request.corrid))
            else:
                live[i] = state
        if starts:
            self._register([parsed[i] for i in starts], starts, live, outcomes)
        driving = []
        for i, state in live.items():
            frame = parsed[i].frame
            if frame is None:
                outcomes[i] = FrameResult(image=None, frame_index=-1)
                continue
            try:
                check_frame(state.options, frame)
            except InputError as exc:
                outcomes[i] = Failure(str(exc))
                continue
            driving.append(i)
        if driving:
            try:
                images = self.animator.animate([live[i] for i in driving], [parsed[i].frame for i in driving])
            except InputError as exc:
                images = [Failure(str(exc))] * len(driving)
            except Exception as exc:    # a sub-network failed: the server's fault, reported without a traceback
                images = [Failure(f"animation failed: {exc}", False, traceback.format_exc())] * len(driving)
            for i, image in zip(driving, images):
                outcomes[i] = image if isinstance(image, Failure) else FrameResult(
                    image=image, frame_index=live[i].frames_done - 1)
        for i in indices:
            # END frees the sequence whatever became of its last frame; a START that did not register this
            # sequence (refused, or unparsable) must not free a live one of the same id
            if raws[i].end and (not raws[i].start or i in starts):
                self.store.end(raws[i].corrid)

    def _register(self, requests: list[PipelineRequest], indices: list[int], live: dict, outcomes) -> None:
        try:
            states = self.animator.register_sources(
                [r.source for r in requests], [r.options for r in requests],
                [r.source_eye_ratio for r in requests], [r.source_lip_ratio for r in requests])
        except InputError as exc:
            for i in indices:
                outcomes[i] = Failure(str(exc))
            return
        except Exception as exc:
            for i in indices:
                outcomes[i] = Failure(f"source registration failed: {exc}", False, traceback.format_exc())
            return
        for i, request, state in zip(indices, requests, states):
            self.store.add(request.corrid, state)
            live[i] = state

    def _unknown_sequence(self, corrid: int) -> str:
        if self.store.was_evicted(corrid):
            return (f"sequence {corrid} was freed after {self.store.idle_timeout_s:g} s without requests; "
                    "start a new sequence (START with `source`)")
        return f"sequence {corrid} has no source: its first request must be a START carrying `source`"


class PipelineBackend:
    """The `liveportrait` model's instance: a PipelineCore on a worker thread plus a periodic idle eviction.

    `execute` is a coroutine for the Python backend's `async def execute`: the batch runs on a dedicated thread,
    which leaves the backend's event loop free to carry the BLS `async_exec` calls the runner sends through it.
    """

    def __init__(self, runner, idle_timeout_s: float, listener: SequenceListener | None = None,
                 eviction_interval_s: float | None = None):
        self.store = SequenceStore(idle_timeout_s, listener)
        self.core = PipelineCore(runner, self.store)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="liveportrait-pipeline")
        self._stop = threading.Event()
        interval = eviction_interval_s if eviction_interval_s is not None else min(max(idle_timeout_s / 4, 0.25), 5)
        self._evictor = threading.Thread(target=self._evict_periodically, args=(interval,), daemon=True,
                                         name="liveportrait-eviction")
        self._evictor.start()

    @classmethod
    def from_config(cls, model_config: dict, runner, listener: SequenceListener | None = None) -> "PipelineBackend":
        check_model_config(model_config, spec.PIPELINE_SPEC)
        batching = model_config.get("sequence_batching")
        if not batching or "oldest" not in batching:
            raise ConfigError(f"model {spec.PIPELINE!r} needs sequence_batching with the oldest strategy")
        controls = {c["name"]: c["control"][0]["kind"] for c in batching.get("control_input", [])}
        if controls != spec.SEQUENCE_CONTROLS:
            raise ConfigError(f"model {spec.PIPELINE!r}: sequence control inputs {controls} differ from "
                              f"{spec.SEQUENCE_CONTROLS}")
        timeout = config_parameter(model_config, "sequence_idle_timeout_s")
        try:
            idle = float(timeout)
        except ValueError:
            raise ConfigError(f"sequence_idle_timeout_s must be a number of seconds, got {timeout!r}") from None
        triton_idle = int(batching.get("max_sequence_idle_microseconds", 0)) / 1e6
        if idle <= 0 or abs(triton_idle - idle) > 1e-6:
            raise ConfigError(f"sequence_idle_timeout_s ({timeout}) must be > 0 and equal Triton's "
                              f"max_sequence_idle_microseconds ({triton_idle:g} s)")
        return cls(runner, idle, listener)

    async def execute(self, raws: list[RawRequest]) -> list[FrameResult | Failure]:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.core.process, raws)

    def _evict_periodically(self, interval: float) -> None:
        """Every interval, free idle sequences; then, once no batch ran for a whole interval after some activity
        (batches or freed sequences), hand the freed memory back to the OS. Waiting for a quiet interval lets the
        last responses' arrays, which Triton releases after `execute` returns, be freed first."""
        released_at = (0, 0)            # (batches, sequences freed) at the last release
        batches_seen = -1
        while not self._stop.wait(interval):
            try:
                self.worker.submit(self.store.evict_idle).result()
            except RuntimeError:        # the worker was shut down
                return
            activity = (self.core.batches, self.store.freed_total)
            quiet = self.core.batches == batches_seen
            batches_seen = self.core.batches
            if quiet and activity != released_at:
                released_at = activity
                release_free_memory()

    def close(self) -> None:
        self._stop.set()
        self.worker.shutdown(wait=True)
        self.store.clear()


def parse_parameters(text: str | None) -> dict[str, Any]:
    """A request's parameters (the Python backend hands them over as a JSON object string)."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise InputError(f"request parameters must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# BLS.

class BlsRunner:
    """pipeline.Runner over BLS: one InferenceRequest per sub-network call, inputs and outputs bound by name.

    `pb_utils` is the backend's `triton_python_backend_utils` module (only importable inside the stub). `run_many`
    sends independent calls together with `async_exec` on the backend's event loop (set `loop` before use).
    """

    def __init__(self, pb_utils, network_config: str):
        self.pb_utils = pb_utils
        self.specs = spec.submodel_specs(network_config)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _request(self, model: str, inputs: dict[str, np.ndarray]):
        model_spec = self.specs[model]
        tensors = [backend_tensor(self.pb_utils, t.name, np.asarray(inputs[t.name], dtype=t.numpy_dtype))
                   for t in model_spec.inputs]
        # outputs in CPU memory: the keypoint maths runs in numpy, also where sub-networks run on a GPU (ngc)
        cpu = self.pb_utils.PreferredMemory(self.pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        return self.pb_utils.InferenceRequest(model_name=model, requested_output_names=model_spec.output_names,
                                              inputs=tensors, preferred_memory=cpu)

    def _outputs(self, model: str, response) -> dict[str, np.ndarray]:
        if response.has_error():
            raise SubnetworkError(f"{model}: {response.error().message()}")
        outputs = {}
        for name in self.specs[model].output_names:
            tensor = self.pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise SubnetworkError(f"{model}: response has no output {name!r}")
            outputs[name] = backend_array(tensor).copy()    # the view dies with the response's shared memory
        return outputs

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._outputs(model, self._request(model, inputs).exec())

    def run_many(self, calls: list[tuple[str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
        if self.loop is None or len(calls) < 2:
            return [self.run(model, inputs) for model, inputs in calls]
        requests = [self._request(model, inputs) for model, inputs in calls]

        async def send_together():
            return await asyncio.gather(*(r.async_exec() for r in requests))

        responses = asyncio.run_coroutine_threadsafe(send_together(), self.loop).result()
        return [self._outputs(model, response) for (model, _), response in zip(calls, responses)]
