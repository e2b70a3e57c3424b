"""The two seams of a node, as typing Protocols.

``CoreLike`` is everything the client gateway uses from the core. ``node.core.Core``
implements it in-process (``--workers 0``); ``node.worker.CoreClient`` implements
it in a gateway worker process, over the IPC channel to the node's core process.

``GatewayLike`` is everything admin, metrics and ``run_node`` use from the client
side: ``node.gateway.Gateway`` (in-process) or ``node.workers.WorkerPool`` (the
core process's view of its gateway workers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from replication.commands import Command
from replication.table import Effect, Result

if TYPE_CHECKING:
    from .gateway import GatewayStats


class CoreLike(Protocol):
    """What the gateway needs from the core.

    Callbacks and sinks run on the gateway's Trio thread. For each command,
    ``on_done(result)`` is called before the effects of that command reach
    ``effect_sink`` (a login's ``login-ok`` is queued before the messages it
    delivers).
    """

    node_id: str
    inc: int
    fenced: bool
    effect_sink: Callable[[list[Effect]], None]
    restore_sink: Callable[[list[tuple[str, int]]], None]
    fence_sink: Callable[[bool], None]
    batch_sink: Callable[[bool], None]
    """``batch_sink(True)`` before a run of results and effects handed over together,
    ``batch_sink(False)`` after it: the gateway may hold its writes until then."""

    @property
    def member(self) -> bool: ...

    def serving(self) -> bool: ...

    def submit(self, cmd: Command, on_done: Callable[[Result], None],
               timeout: float | None = None, keep: bool = True,
               source: str | None = None) -> None:
        """``source``: the client's address, for a login or resume (the core may
        refuse it if that address is blocked for failed logins)."""
        ...

    def login_blocked(self, ip: str) -> bool:
        """Too many failed logins from ``ip`` (node-wide) in the last minute."""
        ...

    def login_failed(self, ip: str) -> None: ...

    def reserve_connection(self) -> bool:
        """Count one more client connection node-wide, if the node has room for it
        (``max_connections`` over all of its gateway processes)."""
        ...

    def release_connection(self) -> None:
        """A connection that ``reserve_connection`` counted is closed."""
        ...


class GatewayLike(Protocol):
    """What admin, metrics and run_node need from the client side of a node."""

    @property
    def drained(self) -> bool: ...

    def listening(self) -> bool:
        """Some client listener accepts connections."""
        ...

    def statistics(self) -> GatewayStats: ...

    async def refresh(self) -> None:
        """Bring ``statistics()`` up to date (workers report every 0.5 s otherwise)."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """One entry per gateway worker process (empty for the in-process gateway)."""
        ...

    async def drain(self, timeout: float = 10.0) -> int: ...

    def undrain(self) -> None: ...

    async def shutdown(self) -> None: ...
