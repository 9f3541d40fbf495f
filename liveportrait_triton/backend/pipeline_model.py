"""The `liveportrait` sequence model's logic: batches of requests over a Runner, per-sequence state, eviction."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import traceback

from .. import spec
from ..pipeline import Animator, InputError, StreamState
from .model_config import ConfigError, check_model_config, config_parameter
from .outcomes import Failure, ServedFrame
from .requests import PipelineRequest, RawRequest, check_in_sequence, check_subject, parse_request, plan_rounds
from .sequences import SequenceListener, SequenceStore, release_free_memory


class PipelineCore:
    """Serves batches of pipeline requests over a Runner (synchronous; one batch at a time)."""

    def __init__(self, runner, store: SequenceStore, subjects: tuple[str, ...] = (spec.HUMAN,)):
        self.animator = Animator(runner)
        self.store = store
        self.subjects = subjects        # the model sets the server holds (a START asks for one of them)
        self.batches = 0                # batches processed so far

    def process(self, raws: list[RawRequest]) -> list[ServedFrame | Failure]:
        """One outcome per request, in order. Caller faults fail only their own request."""
        self.batches += 1
        outcomes: list[ServedFrame | Failure | None] = [None] * len(raws)
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
                    continue
                try:
                    check_subject(request.options, self.subjects)
                except InputError as exc:
                    outcomes[i] = Failure(str(exc))
                    continue
                if len(starts) >= self.store.room():
                    outcomes[i] = self._at_capacity(request.corrid)
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
        driving = []        # requests rendered in this round: driving frames and edits
        for i, state in live.items():
            try:
                check_in_sequence(state, parsed[i])
            except InputError as exc:
                outcomes[i] = Failure(str(exc))
                continue
            if parsed[i].edit is None and parsed[i].frame is None:
                outcomes[i] = ServedFrame(image=None, frame_index=-1)
                continue
            driving.append(i)
        if driving:     # validated requests only: the Animator takes them as they are
            try:
                images = self.animator.animate([live[i] for i in driving],
                                               [parsed[i].edit or parsed[i].frame for i in driving])
            except Exception as exc:    # a sub-network failed: the server's fault, reported without a traceback
                images = [Failure(f"animation failed: {exc}", False, traceback.format_exc())] * len(driving)
            for i, image in zip(driving, images):
                index = -1 if parsed[i].edit is not None else live[i].frames_done - 1
                outcomes[i] = image if isinstance(image, Failure) else ServedFrame(image=image, frame_index=index)
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
        except Exception as exc:
            for i in indices:
                outcomes[i] = Failure(f"source registration failed: {exc}", False, traceback.format_exc())
            return
        for i, request, state in zip(indices, requests, states):
            self.store.add(request.corrid, state)
            live[i] = state

    def _at_capacity(self, corrid: int) -> Failure:
        """The refusal of a START beyond the capacity: at once, rather than leaving it to wait for a free slot."""
        return Failure(f"{spec.CAPACITY_REFUSAL}: {self.store.capacity} live streams, the most this server admits "
                       f"(sequence {corrid} was not started); try again later or another replica", unavailable=True)

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
                 eviction_interval_s: float | None = None, capacity: int | None = None,
                 subjects: tuple[str, ...] = (spec.HUMAN,)):
        self.store = SequenceStore(idle_timeout_s, listener, capacity=capacity)
        self.core = PipelineCore(runner, self.store, subjects)
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
        capacity = config_parameter(model_config, "max_live_sequences")
        candidates = int(batching["oldest"].get("max_candidate_sequences", 0))
        if not capacity.isdigit() or not 1 <= int(capacity) < candidates:
            raise ConfigError(f"max_live_sequences ({capacity}) must be a whole number >= 1 and below Triton's "
                              f"max_candidate_sequences ({candidates}), which also holds refused STARTs until "
                              "their END")
        try:
            subjects = spec.parse_subjects(config_parameter(model_config, "subjects", spec.HUMAN))
        except ValueError as exc:
            raise ConfigError(f"model {spec.PIPELINE!r}: {exc}") from None
        return cls(runner, idle, listener, capacity=int(capacity), subjects=subjects)

    async def execute(self, raws: list[RawRequest]) -> list[ServedFrame | Failure]:
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
