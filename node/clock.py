"""The node's wall clock, with a hook for the chaos harness's clock nemesis.

Wall-clock time stamps messages, last-seen times and tick commands, and checks
token expiry. Timeouts never use it (they use Trio's monotonic clock), so a
wall-clock jump cannot expire sessions: expiry is measured by the leader's
monotonic clock through the log.

If ``SWITCHBOARD_CLOCK_OFFSET_FILE`` names a file, its content (seconds, e.g.
``+90`` or ``-30.5``) is added to the system time — how the chaos harness
makes one node's clock jump (like an NTP step) without touching the
monotonic clock, which never jumps on a real machine.
"""

from __future__ import annotations

import os
import time

_FILE = os.environ.get("SWITCHBOARD_CLOCK_OFFSET_FILE")
_cache = (0.0, -1.0)  # (offset, monotonic time read)


def wall() -> float:
    """Seconds since the epoch, as this node believes."""
    global _cache
    if _FILE is None:
        return time.time()
    now = time.monotonic()
    offset, read_at = _cache
    if now - read_at > 0.2:
        try:
            with open(_FILE) as f:
                offset = float(f.read().strip() or 0)
        except (OSError, ValueError):
            offset = 0.0
        _cache = (offset, now)
    return time.time() + offset
