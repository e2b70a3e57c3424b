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

    @property
    def member(self) -> bool: ...

    def serving(self) -> bool: ...

    def submit(self, cmd: Command, on_done: Callable[[Result], None],
               timeout: float | None = None, keep: bool = True) -> None: ...

    def login_blocked(self, ip: str) -> bool:
        """Too many failed logins from ``ip`` (node-wide) in the last minute."""
        ...

    def login_failed(self, ip: str) -> None: ...

    def connections_elsewhere(self) -> int:
        """Client connections held by the node's other gateway processes."""
        ...

    def connections_changed(self, count: int) -> None:
        """This gateway now holds ``count`` connections."""
        ...


class GatewayLike(Protocol):
    """What admin, metrics and run_node need from the client side of a node."""

    @property
    def drained(self) -> bool: ...

    def listening(self) -> bool:
        """Some client listener accepts connections."""
        ...

    def statistics(self) -> GatewayStats: ...

    def workers(self) -> list[dict[str, Any]]:
        """One entry per gateway worker process (empty for the in-process gateway)."""
        ...

    async def drain(self, timeout: float = 10.0) -> int: ...

    def undrain(self) -> None: ...

    async def shutdown(self) -> None: ...
