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
    _started: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        with self._lock:
            g = self.generations[info["generation"]]
            g.count += 1
            g.seconds += took
            g.longest = max(g.longest, took)

    def statistics(self) -> list[Pauses]:
        with self._lock:
            return [Pauses(g.count, g.seconds, g.longest) for g in self.generations]


_meter: PauseMeter | None = None


def pause_meter() -> PauseMeter:
    """This process's meter, installed on first use."""
    global _meter
    if _meter is None:
        _meter = PauseMeter()
        gc.callbacks.append(_meter)
    return _meter
