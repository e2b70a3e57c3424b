"""Pick free ports for local clusters (below the ephemeral range, 32768+)."""

from __future__ import annotations

import random
import socket

LOW, HIGH = 10_000, 32_000


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_base_port(nodes: int, host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A base port P such that P+k, P+100+k, P+200+k, P+300+k (k < nodes) are all free
    (the layout of ``cluster.launcher.layout``)."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(LOW, HIGH - 400, 10)
        ports = [base + off + k for off in (0, 100, 200, 300) for k in range(nodes)]
        if all(_bindable(host, p) for p in ports):
            return base
    raise RuntimeError("no free port range found")
