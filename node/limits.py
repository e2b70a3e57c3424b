"""Node-wide limits that are not replicated: failed logins per source address."""

from __future__ import annotations

import time
from collections import deque

WINDOW = 60.0


class FailedLogins:
    """Failed logins (and resumes with a bad token) per source address in the last
    minute; an address with ``limit`` of them is refused until they age out."""

    def __init__(self, limit: int):
        self.limit = limit
        self._failures: dict[str, deque[float]] = {}

    def _of(self, ip: str, now: float) -> deque[float]:
        q = self._failures.get(ip)
        if q is None:
            if len(self._failures) > 100_000:  # forget the idle ones
                for key in [k for k, v in self._failures.items()
                            if not v or v[-1] < now - WINDOW]:
                    del self._failures[key]
            q = self._failures[ip] = deque()
        while q and q[0] < now - WINDOW:
            q.popleft()
        return q

    def blocked(self, ip: str) -> bool:
        return len(self._of(ip, time.monotonic())) >= self.limit

    def failed(self, ip: str) -> float | None:
        """Record a failure; if ``ip`` is now blocked, return until when (monotonic)."""
        now = time.monotonic()
        q = self._of(ip, now)
        q.append(now)
        if len(q) < self.limit:
            return None
        # Blocked until enough failures age out to leave fewer than ``limit``.
        return q[len(q) - self.limit] + WINDOW
