"""The garbage collector policy of a node's processes (the core and its gateway
workers): larger young generations, and long-lived objects frozen in bursts.

Both processes keep many long-lived objects (sessions in the core's table,
connections in a worker) and allocate several short-lived ones per request.
With Python's default young-generation threshold (700) the core spent about a
sixth of its apply time collecting; and a full collection walks every tracked
object (0.19 s at 15,000 worker connections), holding the GIL, so the Raft
thread, for longer than an election timeout at 200,000 sessions. Frozen
objects are never walked again. The objects frozen here (sessions, users,
messages, connections) form no reference cycles, so they are still freed by
reference counting when they go.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

CORE_THRESHOLDS = (20_000, 50, 100)
WORKER_THRESHOLDS = (20_000, 20, 20)


def tune(thresholds: tuple[int, int, int]) -> None:
    """Set this process's collection thresholds (once, at start-up)."""
    gc.set_threshold(*thresholds)


def freeze_long_lived() -> None:
    """Move every object alive now out of the collector's generations; collect
    the young generations first, so that little cyclic garbage is frozen too."""
    gc.collect(1)
    gc.freeze()


@dataclass
class Pauses:
    """Collections of one generation: how many, their total and longest time."""

    count: int = 0
    seconds: float = 0.0
    longest: float = 0.0


@dataclass
class PauseMeter:
    """Times every collection of this process (``gc.callbacks``): a collection
    holds the GIL, so the Raft thread and the Trio thread both wait it out."""

    generations: list[Pauses] = field(default_factory=lambda: [Pauses() for _ in range(3)])
    long: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=256))
    """The latest collections of ``LONG`` seconds or more: (time.monotonic() at the
    start, generation, seconds), to set beside latency spikes."""
    _started: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    LONG = 0.005

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.monotonic()
            return
        took = time.monotonic() - self._started
        with self._lock:
            g = self.generations[info["generation"]]
            g.count += 1
            g.seconds += took
            g.longest = max(g.longest, took)
            if took >= self.LONG:
                self.long.append((self._started, info["generation"], took))

    def statistics(self) -> list[Pauses]:
        with self._lock:
            return [Pauses(g.count, g.seconds, g.longest) for g in self.generations]

    def long_pauses(self) -> list[tuple[float, int, float]]:
        with self._lock:
            return list(self.long)


_meter: PauseMeter | None = None


def pause_meter() -> PauseMeter:
    """This process's meter, installed on first use."""
    global _meter
    if _meter is None:
        _meter = PauseMeter()
        gc.callbacks.append(_meter)
    return _meter
