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
