"""A message stream across a fault, shared by the failover tests: bob sends alice
numbered messages and the fault strikes part-way; what each side saw is returned
for the test's own assertions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

import client
from client import Message, PresenceEvent, Reconnected


@dataclass
class Stream:
    sent: list[int] = field(default_factory=list)  # ids of bob's committed sends
    received: list[Message] = field(default_factory=list)  # what alice's app got
    reconnects: list[Reconnected] = field(default_factory=list)
    bob_saw: list[PresenceEvent] = field(default_factory=list)  # alice's presence


async def stream_through(alice: client.Session, bob: client.Session, count: int,
                         kill_after: int, fault: Callable[[], Awaitable[None]]) -> Stream:
    """bob sends ``m0`` … ``m<count-1>`` to alice, calling ``fault`` after
    ``kill_after`` of them; alice acknowledges each; waits for all, then 0.5 s
    more for a (wrong) duplicate to show up."""
    s = Stream()
    done = trio.Event()

    async def alice_reads() -> None:
        async for ev in alice.events():
            if isinstance(ev, Message):
                s.received.append(ev)
                await alice.ack(ev)
                if len(s.received) == count:
                    done.set()
            elif isinstance(ev, Reconnected):
                s.reconnects.append(ev)

    async def bob_watches() -> None:
        async for ev in bob.events():
            if isinstance(ev, PresenceEvent) and ev.user == "alice":
                s.bob_saw.append(ev)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(alice_reads)
        nursery.start_soon(bob_watches)
        for i in range(count):
            s.sent.append(await bob.send("alice", f"m{i}"))
            if i + 1 == kill_after:
                await fault()
        await done.wait()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return s
