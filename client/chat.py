"""``switchboard chat``: a terminal client for a person, on the client library.

Type a line to run a command; incoming messages and presence changes are
printed as they arrive, and a failover is reported on screen. Messages are
acknowledged once printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from .session import (
    AuthFailed,
    Message,
    PresenceEvent,
    Reconnected,
    Session,
    SwitchboardError,
    Unreachable,
    connect,
)

HELP = """commands:
  /allow USER           let USER see your presence
  /revoke USER          stop letting USER see it
  /watch USER           follow USER's presence (they must /allow you)
  /unwatch USER
  /online [TEXT]  /away [TEXT]  /busy [TEXT]   set your presence
  /msg USER TEXT        send a message
  /who                  where this session is connected
  /quit                 log out and leave"""


def _stamp(ts: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts if ts is not None else time.time()))


class Chat:
    def __init__(self, session: Session, out: TextIO):
        self.s = session
        self.out = out

    def say(self, text: str) -> None:
        print(f"[{_stamp()}] {text}", file=self.out, flush=True)

    async def show_events(self) -> None:
        async for ev in self.s.events():
            if isinstance(ev, Message):
                body = ev.body if isinstance(ev.body, str) else ev.body.hex()
                print(f"[{_stamp(ev.ts)}] <{ev.sender}> {body}", file=self.out, flush=True)
                await self.s.ack(ev)
            elif isinstance(ev, PresenceEvent):
                text = f" ({ev.text})" if ev.text else ""
                seen = ""
                if ev.status == "offline" and ev.last_seen:
                    seen = f", last seen {_stamp(ev.last_seen)}"
                self.say(f"* {ev.user} is {ev.status}{text}{seen}")
            elif isinstance(ev, Reconnected):
                how = "session resumed" if ev.resumed else "NEW session (the old one expired)"
                self.say(f"! connection lost; reconnected to {ev.node}, {how}")

    async def command(self, line: str) -> bool:
        """Run one input line; False means quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.say("type /msg USER TEXT to send a message, /help for commands")
            return True
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        arg, _, text = rest.partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                return False
            if cmd == "/help":
                print(HELP, file=self.out, flush=True)
            elif cmd in ("/online", "/away", "/busy"):
                await self.s.set_presence(cmd[1:], rest or None)
                self.say(f"you are {cmd[1:]}" + (f" ({rest})" if rest else ""))
            elif cmd in ("/allow", "/revoke", "/watch", "/unwatch") and arg:
                if cmd == "/allow":
                    await self.s.allow(arg)
                    self.say(f"{arg} may now see your presence")
                elif cmd == "/revoke":
                    await self.s.revoke(arg)
                    self.say(f"{arg} may no longer see your presence")
                elif cmd == "/watch":
                    visible = await self.s.subscribe(arg)
                    self.say(f"watching {arg}" + ("" if visible else
                                                    f" (until {arg} allows you, status unknown)"))
                else:
                    await self.s.unsubscribe(arg)
                    self.say(f"no longer watching {arg}")
            elif cmd == "/msg" and arg and text:
                mid = await self.s.send(arg, text)
                self.say(f"-> {arg}: {text} (#{mid})")
            elif cmd == "/who":
                self.say(f"{self.s.user} on node {self.s.node_id} ({self.s.node}), "
                         f"session {self.s.session_id}")
            else:
                self.say(f"unknown or incomplete command {cmd!r}; /help lists them")
        except SwitchboardError as e:
            self.say(f"error: {e.reason} ({e.code})")
        return True


async def run_chat(nodes: Sequence[str], user: str, token: str, ordered: bool = False,
                   tls: Any = False, inp: TextIO | None = None,
                   out: TextIO | None = None) -> int:
    inp = inp or sys.stdin
    out = out or sys.stdout
    try:
        async with connect(nodes, user=user, token=token, ordered=ordered,
                           connection_events=True, tls=tls) as s:
            chat = Chat(s, out)
            chat.say(f"logged in as {user} on node {s.node_id} ({s.node}); /help for commands")
            async with anyio.create_task_group() as tg:
                tg.start_soon(chat.show_events)
                async for line in anyio.wrap_file(inp):
                    if not await chat.command(line):
                        break
                tg.cancel_scope.cancel()
            chat.say("bye")
        return 0
    except AuthFailed as e:
        print(f"switchboard chat: login refused: {e.reason}", file=sys.stderr)
        return 1
    except Unreachable as e:
        print(f"switchboard chat: cannot reach the cluster: {e.reason}", file=sys.stderr)
        return 1
    except SwitchboardError as e:
        print(f"switchboard chat: {e.reason} ({e.code})", file=sys.stderr)
        return 1
