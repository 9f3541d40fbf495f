"""Per-sequence source state with END and idle eviction, and handing freed memory back to the OS."""
from __future__ import annotations

import collections
import ctypes
import gc
import threading
import time
from typing import Callable, Protocol

from ..pipeline import StreamState

FREED_END = "end"
FREED_IDLE = "idle"


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)     # glibc only


def release_free_memory() -> None:
    """Collect cyclic garbage, then return the C heap's free pages to the OS (glibc `malloc_trim`; skipped elsewhere).

    A sequence's state is a few large arrays; once glibc has freed one block of that size it serves later ones from
    its heaps instead of fresh mappings and keeps the pages after they are freed, so without this a burst of streams
    would leave the server's memory at its peak (measured: 200 tiny sequences, ~50 MB of state, mostly retained).
    Arrays held by reference cycles (futures, exceptions) are only freed by the cyclic collector, which does not
    run while the server is idle.
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class SequenceListener(Protocol):
    """Receives the store's changes (the model publishes them as Triton custom metrics)."""

    def sequences_changed(self, live: int, state_bytes: int) -> None:
        ...

    def sequence_freed(self, reason: str) -> None:
        ...


class SequenceStore:
    """Per-sequence state keyed by correlation id, with idle eviction and a capacity (None: unbounded) that the
    pipeline admits new sequences against. Thread-safe."""

    def __init__(self, idle_timeout_s: float, listener: SequenceListener | None = None,
                 clock: Callable[[], float] = time.monotonic, remembered_evictions: int = 1024,
                 capacity: int | None = None):
        if idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.idle_timeout_s = idle_timeout_s
        self.capacity = capacity
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

    def room(self) -> int | float:
        """How many more sequences may be added before the capacity is reached (inf when unbounded)."""
        if self.capacity is None:
            return float("inf")
        with self._lock:
            return max(self.capacity - len(self._states), 0)

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
