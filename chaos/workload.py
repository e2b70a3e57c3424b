"""The chaos workload: real clients (the client library) doing real things.

One client process per user (``c<k>`` is user ``u<k>``): it logs in, allows and
subscribes to every other user, then, until told to stop, sends messages to
random users and changes its presence, recording every operation as invoke
then ok/fail/info, and every message, presence event and reconnect it observes.
Every delivered message is acknowledged. Bodies are unique (``c3-17``), so the
checker can match an indeterminate send to its delivery.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import trio

import client
from client import Message, PresenceEvent, Reconnected, SwitchboardError

from .history import History

DEFINITE_FAILURES = {"invalid", "too-large", "too-large-body", "bad-field", "auth-failed"}


@dataclass(frozen=True)
class WorkloadConfig:
    users: int
    rate: float = 8.0  # ops per second per client
    send_ratio: float = 0.85
    op_timeout: float = 10.0
    client_heartbeat_hint: float = 2.0


class WorkloadClient:
    def __init__(self, k: int, cfg: WorkloadConfig, nodes: list[str], token: str,
                 history: History, seed: int):
        self.k = k
        self.process = f"c{k}"
        self.user = f"u{k}"
        self.cfg = cfg
        self.nodes = nodes
        self.token = token
        self.h = history
        self.rng = random.Random(seed)
        self.sent = 0
        self.session: client.Session | None = None
        self.ready = trio.Event()

    def _record(self, type_: str, f: str, value: dict[str, Any]) -> None:
        self.h.record(self.process, type_, f, value)

    async def _op(self, f: str, value: dict[str, Any], call: Any) -> Any:
        """Run one operation, recording invoke and its completion."""
        self._record("invoke", f, value)
        try:
            with trio.fail_after(self.cfg.op_timeout + 2):
                result = await call()
        except SwitchboardError as e:
            kind = "fail" if e.code in DEFINITE_FAILURES else "info"
            self._record(kind, f, {**value, "error": f"{e.code}: {e.reason}"})
            return None
        except trio.TooSlowError:
            self._record("info", f, {**value, "error": "timeout"})
            return None
        self._record("ok", f, value if result is None else {**value, **result})
        return result

    async def run(self, stop: trio.Event) -> None:
        """Log in and work until ``stop`` is set; then leave the session as it is."""
        self._record("invoke", "login", {"user": self.user})
        while True:
            try:
                async with client.connect(self.nodes, user=self.user, token=self.token,
                                          connection_events=True,
                                          request_timeout=self.cfg.op_timeout,
                                          give_up_after=120, logout=False) as s:
                    self.session = s
                    self._record("ok", "login", {"user": self.user, "session": s.session_id,
                                                 "node": s.node_id})
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._observe, s)
                        await self._setup(s)
                        self.ready.set()
                        await self._work(s, stop)
                        # Keep observing (and acking) until the run ends: a message
                        # sent just before the stop may be delivered after it.
                        await trio.sleep_forever()
                    # connect(logout=False): leaving does not log out, since a logout
                    # would make contacts see the user go offline after the run.
                    raise _Stop
            except _Stop:
                return
            except SwitchboardError as e:
                await self._lost(e)
            except BaseExceptionGroup as group:
                if group.subgroup(_Stop) is not None:
                    return
                errors, rest = group.split(SwitchboardError)
                if errors is None or rest is not None:
                    raise
                await self._lost(_first_leaf(errors))

    async def _lost(self, e: BaseException) -> None:
        """The session could not be recovered (the sessions checker counts it as a
        violation): record why, then log in again and carry on."""
        sid = self.session.session_id if self.session is not None else None
        self._record("info", "session-lost", {"user": self.user, "session": sid,
                                              "error": str(e)})
        self._record("info", "login", {"user": self.user, "error": str(e)})
        await trio.sleep(0.5)
        self._record("invoke", "login", {"user": self.user})

    async def _setup(self, s: client.Session) -> None:
        for j in range(self.cfg.users):
            if j == self.k:
                continue
            other = f"u{j}"
            await self._op("allow", {"user": other}, lambda o=other: _none(s.allow(o)))
            await self._op("subscribe", {"user": other},
                           lambda o=other: _none(s.subscribe(o)))

    async def _work(self, s: client.Session, stop: trio.Event) -> None:
        statuses = ["online", "away", "busy"]
        while not stop.is_set():
            await trio.sleep(self.rng.expovariate(self.cfg.rate))
            if stop.is_set():
                break
            if self.rng.random() < self.cfg.send_ratio:
                to = f"u{self.rng.choice([j for j in range(self.cfg.users) if j != self.k])}"
                body = f"{self.process}-{self.sent}"
                self.sent += 1

                async def send(to: str = to, body: str = body) -> dict[str, Any]:
                    return {"id": await s.send(to, body)}

                await self._op("send", {"to": to, "body": body}, send)
            else:
                status = self.rng.choice(statuses)
                text = f"{status} {self.rng.randrange(1000)}"
                await self._op("presence", {"status": status, "text": text},
                               lambda st=status, tx=text: _none(s.set_presence(st, tx)))

    async def _observe(self, s: client.Session) -> None:
        async for ev in s.events():
            if isinstance(ev, Message):
                self._record("ok", "deliver", {
                    "id": ev.id, "from": ev.sender, "to": self.user, "body": ev.body,
                    "seq": ev.seq, "node": ev.node, "epoch": ev.epoch})
                try:
                    await s.ack(ev)
                except SwitchboardError:
                    pass  # it stays in the mailbox; a redelivery is dropped by the library
            elif isinstance(ev, PresenceEvent):
                self._record("ok", "presence-event", {
                    "viewer": self.user, "user": ev.user, "status": ev.status,
                    "text": ev.text})
            elif isinstance(ev, Reconnected):
                self._record("ok", "reconnect", {
                    "user": self.user, "session": ev.session_id, "node": ev.node_id,
                    "resumed": ev.resumed, "epoch": ev.epoch})


class _Stop(Exception):
    pass


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def _none(awaitable: Any) -> None:
    await awaitable
    return None
