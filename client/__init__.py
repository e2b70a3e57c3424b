"""The Switchboard client library (anyio: Trio or asyncio) and terminal chat client.

    async with client.connect(["127.0.0.1:7100", "127.0.0.1:7101"], user="alice",
                              token=token) as s:
        await s.allow("bob")
        await s.subscribe("bob")
        await s.send("bob", "hello")
        async for event in s.events():
            ...
"""

from .session import (
    AuthFailed,
    Event,
    Message,
    PresenceEvent,
    Reconnected,
    Session,
    SessionEnded,
    SwitchboardError,
    Unreachable,
    connect,
)

__all__ = [
    "AuthFailed",
    "Event",
    "Message",
    "PresenceEvent",
    "Reconnected",
    "Session",
    "SessionEnded",
    "SwitchboardError",
    "Unreachable",
    "connect",
]
