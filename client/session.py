"""The Switchboard client library, on anyio: works under Trio and asyncio.

``connect(nodes, user=..., token=...)`` logs in to one node of the cluster and
yields a ``Session``. If the connection is lost (the node died, was fenced or
shut down, or stopped answering pings), the session reconnects, to a different
node first, with randomized capped backoff, and *resumes*: the same session
id, no presence change for contacts, and every message not yet acknowledged
redelivered. Requests not yet answered are re-sent in their original order;
sends carry a client message id, so the cluster drops a re-sent duplicate.
``events()`` yields each message once (duplicates are recognised by message id
and per-recipient sequence number) and keeps going across a resume.

See docs/client.md.
"""

from __future__ import annotations

import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from node.protocol import (
    DEFAULT_MAX_FRAME,
    SERVER_FRAMES,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    encode,
)

# --- public types -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """``user``'s presence changed: online, away, busy, offline, or unknown
    (``user`` does not let you see it)."""

    user: str
    status: str
    text: str | None
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class Message:
    """A message for you. ``ack`` it once handled; until then it is redelivered
    after every reconnect (but ``events()`` never yields it twice)."""

    id: int
    seq: int
    sender: str
    body: str | bytes
    ts: float
    node: str = ""  # the node that delivered it
    epoch: int = 0  # the session's epoch on that node (it grows with every resume)


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The session moved to another connection (only with ``connection_events=True``).

    ``resumed`` is False when the old session had expired and a new one was
    opened (contacts then saw you go offline)."""

    node: str
    session_id: str
    resumed: bool
    node_id: str = ""
    epoch: int = 0


Event = PresenceEvent | Message | Reconnected


class SwitchboardError(Exception):
    """An error the cluster reported: ``code`` is the wire error code."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class AuthFailed(SwitchboardError):
    """The login token was refused."""


class SessionEnded(SwitchboardError):
    """The session is over (logged out, taken over, or could not be recovered)."""


class Unreachable(SwitchboardError):
    """No node of the list could be reached (or none would serve)."""


# --- internals ------------------------------------------------------------------------


RETRYABLE = {"unavailable", "overloaded", "internal"}
"""Request errors the library retries itself (the request is idempotent)."""
MOVE_ON = {"fenced", "shutdown", "reconnect"}
"""Request errors that mean: this node cannot serve; resume on another one."""
FATAL_LOGIN = {"invalid", "bad-field", "unknown-type", "bad-frame", "too-large", "limit"}
"""Login errors that no other node would answer differently."""
SEND_WINDOW = 256  # sends in flight; the cluster remembers the last 512 per session
SEEN_IDS = 8192


@dataclass(slots=True)
class _Request:
    rid: int
    frame: dict[str, Any]
    done: anyio.Event
    result: dict[str, Any] | None = None
    error: SwitchboardError | None = None
    sent_on: int = -1  # connection number it was last written to


class _Conn:
    def __init__(self, number: int, node: str, stream: anyio.abc.ByteStream):
        self.number = number
        self.node = node
        self.stream = stream
        self.decoder = FrameDecoder(SERVER_FRAMES, DEFAULT_MAX_FRAME)
        self.frames: deque[dict[str, Any]] = deque()
        self.last_rx = anyio.current_time()
        self.last_tx = self.last_rx

    async def send(self, data: bytes) -> None:
        self.last_tx = anyio.current_time()
        await self.stream.send(data)

    async def next_frame(self) -> dict[str, Any] | None:
        while not self.frames:
            try:
                data = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    OSError):
                return None
            self.last_rx = anyio.current_time()
            self.decoder.feed(data)
            self.frames.extend(self.decoder.frames())
        return self.frames.popleft()


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Session:
    """A logged-in session; create it with ``connect``."""

    def __init__(self, nodes: Sequence[str], user: str, token: str, *, ordered: bool,
                 status: str, text: str | None, connect_timeout: float,
                 max_backoff: float, request_timeout: float, connection_events: bool,
                 give_up_after: float, tls: bool | ssl.SSLContext = False):
        if not nodes:
            raise ValueError("connect() needs at least one node address")
        self.nodes = list(nodes)
        self.user = user
        self._token = token
        self._ordered = ordered
        self._status = status
        self._text = text
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._request_timeout = request_timeout
        self._connection_events = connection_events
        self._give_up_after = give_up_after
        self._ssl: ssl.SSLContext | None = None
        if isinstance(tls, ssl.SSLContext):
            self._ssl = tls
        elif tls:
            self._ssl = ssl.create_default_context()
        self.session_id: str | None = None
        self.node: str | None = None  # host:port of the current connection
        self.node_id: str | None = None  # the id of the node serving this session
        self.epoch = 0
        self.reconnects = 0
        self._resume_token: str | None = None
        self._resume_attempts = 0
        self._heartbeat = 10.0
        self._conn: _Conn | None = None
        self._conn_number = 0
        self._connected = anyio.Event()
        self._write_lock = anyio.Lock()
        self._requests: dict[int, _Request] = {}
        self._next_rid = 1
        # cmids must be unique among the user's recent sends over all its sessions
        # and clients: a random 30-bit instance id above a per-instance counter.
        self._next_cmid = (random.getrandbits(30) << 24) + 1
        self._send_window = anyio.Semaphore(SEND_WINDOW)
        self._events: deque[Event] = deque()
        self._events_ready = anyio.Event()
        self._max_seq = 0
        self._seen_ids: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._closed = False
        self._closing = False
        self._stopped = anyio.Event()
        self._failure: BaseException | None = None
        self._last_connect_error = ""
        self._tg: anyio.abc.TaskGroup | None = None

    # --- the application's API ---------------------------------------------------------

    async def set_presence(self, status: str, text: str | None = None) -> None:
        """Set this session's presence: ``online``, ``away`` or ``busy``."""
        await self._request({"type": "presence", "status": status, "text": text})
        # A fresh login after the session expired starts from this presence.
        self._status, self._text = status, text

    async def allow(self, user: str) -> None:
        """Let ``user`` see my presence."""
        await self._request({"type": "allow", "user": user})

    async def revoke(self, user: str) -> None:
        """Stop letting ``user`` see my presence (they are told ``unknown`` at once)."""
        await self._request({"type": "revoke", "user": user})

    async def subscribe(self, user: str) -> bool:
        """Receive ``user``'s presence events; True if ``user`` lets me see them."""
        result = await self._request({"type": "subscribe", "user": user})
        return bool(result.get("visible"))

    async def unsubscribe(self, user: str) -> None:
        await self._request({"type": "unsubscribe", "user": user})

    async def send(self, to: str, body: str | bytes) -> int:
        """Send a message; returns its id once it is committed to the cluster's log."""
        async with self._send_window:
            cmid = self._next_cmid
            self._next_cmid += 1
            result = await self._request({"type": "send", "cmid": cmid, "to": to,
                                          "body": body})
        mid = result.get("id")
        return int(mid) if mid is not None else -1

    async def ack(self, message: Message | Sequence[Message]) -> None:
        """Acknowledge one or several messages: they leave the mailbox for good."""
        msgs = [message] if isinstance(message, Message) else list(message)
        if msgs:
            await self._request({"type": "ack", "seqs": [m.seq for m in msgs]})

    async def events(self) -> AsyncIterator[Event]:
        """Presence events and messages as they arrive, across reconnects."""
        while True:
            while self._events:
                yield self._events.popleft()
            if self._failure is not None:
                raise self._failure
            if self._closed:
                return
            self._events_ready = anyio.Event()
            await self._events_ready.wait()

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event (raises ``TimeoutError`` after ``timeout`` seconds)."""
        with anyio.fail_after(timeout):
            async for event in self.events():
                return event
        raise SessionEnded("closed", "the session is closed")

    # --- requests ----------------------------------------------------------------------------

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self._failure is not None:
            raise self._failure
        try:
            encode(frame)
        except LocalProtocolError as e:
            raise SwitchboardError(e.code, e.reason) from None
        if self._closed:
            raise SessionEnded("closed", "the session is closed")
        rid = self._next_rid
        self._next_rid += 1
        frame["rid"] = rid
        req = _Request(rid, frame, anyio.Event())
        self._requests[rid] = req
        try:
            with anyio.fail_after(self._request_timeout):
                await self._write_request(req)
                await req.done.wait()
        except TimeoutError:
            raise SwitchboardError("unavailable",
                                   f"no answer within {self._request_timeout:g} s") from None
        finally:
            self._requests.pop(rid, None)
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    async def _write_request(self, req: _Request) -> None:
        async with self._write_lock:
            conn = self._conn
            if conn is None or req.sent_on == conn.number:
                return  # written (again) when the next connection is set up
            req.sent_on = conn.number
            try:
                await conn.send(encode(req.frame))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the reader notices; the request is re-sent after reconnecting

    async def _write(self, conn: _Conn, frame: dict[str, Any]) -> None:
        async with self._write_lock:
            try:
                await conn.send(encode(frame))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    # --- incoming frames -------------------------------------------------------------------

    def _push_event(self, event: Event) -> None:
        self._events.append(event)
        self._events_ready.set()

    def _on_deliver(self, f: dict[str, Any]) -> None:
        seq, mid = f["seq"], f["id"]
        if seq <= self._max_seq or mid in self._seen_ids:
            return  # a redelivery of a message already handed over
        self._max_seq = seq
        self._seen_ids.add(mid)
        self._seen_order.append(mid)
        if len(self._seen_order) > SEEN_IDS:
            self._seen_ids.discard(self._seen_order.popleft())
        self._push_event(Message(mid, seq, f["from"], f["body"], float(f["ts"]),
                                 self.node_id or "", self.epoch))

    def _on_reply(self, f: dict[str, Any]) -> str | None:
        """Handle ok/error; returns a connection-level error code if the connection is done."""
        rid = f.get("rid")
        req = self._requests.get(rid) if rid is not None else None
        if f["type"] == "ok":
            if req is not None and not req.done.is_set():
                req.result = f
                req.done.set()
            return None
        code, reason = f["code"], f["reason"]
        if rid is None:
            return code  # an error about the connection itself
        if req is None:
            return None  # the answer to a request we stopped waiting for
        if code in MOVE_ON:
            req.sent_on = -1  # re-sent on the next connection
            return code
        if code in RETRYABLE:
            req.sent_on = -1  # re-send it on the next write opportunity
            if self._tg is not None:
                self._tg.start_soon(self._retry_later, req)
            return None
        if code in ("moved", "no-session"):
            return code
        req.error = SwitchboardError(code, reason)
        req.done.set()
        return None

    async def _retry_later(self, req: _Request) -> None:
        await anyio.sleep(0.05 + random.random() * 0.1)
        if req.rid in self._requests and not req.done.is_set():
            await self._write_request(req)

    # --- connection management ---------------------------------------------------------------

    def _candidates(self, avoid: str | None) -> list[str]:
        nodes = list(self.nodes)
        if not self._ordered:
            random.shuffle(nodes)
        if avoid is not None and avoid in nodes and len(nodes) > 1:
            nodes.remove(avoid)
            nodes.append(avoid)
        return nodes

    async def _open(self, addr: str) -> _Conn | None:
        host, port = _split(addr)
        try:
            with anyio.fail_after(self._connect_timeout):
                if self._ssl is not None:
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        host, port, ssl_context=self._ssl, tls_hostname=host,
                        tls_standard_compatible=False)
                else:
                    stream = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError, anyio.BrokenResourceError, ssl.SSLError) as e:
            self._last_connect_error = f"{addr}: {e}"
            return None
        self._conn_number += 1
        return _Conn(self._conn_number, addr, stream)

    async def _handshake(self, conn: _Conn) -> dict[str, Any]:
        """Log in or resume on ``conn``; returns login-ok, raises SwitchboardError."""
        if self.session_id is not None and self._resume_token is not None:
            # Numbered: if an earlier attempt's commit was only delayed, the cluster
            # refuses it once this later one is applied (it must not take the
            # session back from this connection).
            self._resume_attempts += 1
            frame: dict[str, Any] = {"type": "resume", "session": self.session_id,
                                     "token": self._resume_token, "last_seq": self._max_seq,
                                     "attempt": self._resume_attempts}
        else:
            frame = {"type": "login", "user": self.user, "token": self._token,
                     "status": self._status}
            if self._text is not None:
                frame["text"] = self._text
        await self._write(conn, frame)
        with anyio.fail_after(self._connect_timeout + 2):
            reply = await conn.next_frame()
        if reply is None:
            raise SwitchboardError("unavailable", f"{conn.node} closed the connection")
        if reply["type"] == "login-ok":
            return reply
        if reply["type"] in ("error", "bye"):
            code = reply["code"]
            if code == "auth-failed":
                raise AuthFailed(code, reply["reason"])
            raise SwitchboardError(code, reply["reason"])
        raise SwitchboardError("bad-frame", f"unexpected {reply['type']} before login-ok")

    async def _establish(self, avoid: str | None) -> _Conn:
        """Connect to some node and log in or resume, retrying with backoff."""
        attempt = 0
        started = anyio.current_time()
        last_error = "no node reachable"
        while True:
            for addr in self._candidates(avoid):
                conn = await self._open(addr)
                if conn is None:
                    last_error = self._last_connect_error or f"{addr} unreachable"
                    continue
                try:
                    ok = await self._handshake(conn)
                except AuthFailed:
                    await conn.stream.aclose()
                    raise
                except (SwitchboardError, TimeoutError, RemoteProtocolError) as e:
                    await conn.stream.aclose()
                    if isinstance(e, SwitchboardError) and e.code in FATAL_LOGIN:
                        raise
                    if isinstance(e, SwitchboardError) and e.code in ("no-session", "bad-token"):
                        # The session expired (or never existed here): open a new one.
                        self.session_id = None
                        self._resume_token = None
                        conn2 = await self._open(addr)
                        if conn2 is None:
                            continue
                        try:
                            ok = await self._handshake(conn2)
                        except AuthFailed:
                            await conn2.stream.aclose()
                            raise
                        except (SwitchboardError, TimeoutError, RemoteProtocolError):
                            await conn2.stream.aclose()
                            continue
                        conn = conn2
                    else:
                        last_error = f"{addr}: {e}"
                        continue
                resumed = bool(ok.get("resumed"))
                first = self.reconnects == 0
                self.session_id = ok["session"]
                self._resume_token = ok["resume"]
                self.node_id = ok["node"]
                self.epoch = ok["epoch"]
                self._heartbeat = float(ok["heartbeat"])
                self.node = addr
                if self._connection_events and not first:
                    self._push_event(Reconnected(addr, ok["session"], resumed, ok["node"],
                                                 ok["epoch"]))
                return conn
            attempt += 1
            if anyio.current_time() - started > self._give_up_after:
                raise Unreachable("unreachable", last_error)
            cap = min(self._max_backoff, 0.05 * (2 ** min(attempt, 8)))
            await anyio.sleep(cap / 2 + random.random() * cap / 2)

    def _start(self, tg: anyio.abc.TaskGroup, conn: _Conn) -> None:
        self._tg = tg
        self._conn = conn
        self._connected.set()
        tg.start_soon(self._run, conn)

    async def _run(self, conn: _Conn) -> None:
        """Serve connections one after another until the session is closed or fails."""
        try:
            while True:
                code = await self._serve(conn)
                if self._closed or self._closing:
                    return
                if code in ("moved", "logout"):
                    raise SessionEnded(code, "the session was ended or taken over")
                if code == "auth-failed":
                    raise AuthFailed(code, "token refused")
                if code == "no-session":
                    self.session_id = None
                    self._resume_token = None
                self._conn = None
                self.reconnects += 1
                conn = await self._establish(avoid=conn.node)
                await self._switch_to(conn)
        except BaseException as e:
            if not self._closed and not isinstance(e, anyio.get_cancelled_exc_class()):
                self._failure = e if isinstance(e, SwitchboardError) else SessionEnded(
                    "failed", f"{type(e).__name__}: {e}")
                for req in list(self._requests.values()):
                    req.error = self._failure if isinstance(self._failure, SwitchboardError) \
                        else SessionEnded("failed", str(self._failure))
                    req.done.set()
                self._events_ready.set()
            if isinstance(e, anyio.get_cancelled_exc_class()):
                raise
        finally:
            self._stopped.set()

    async def _switch_to(self, conn: _Conn) -> None:
        """Make ``conn`` current and re-send unanswered requests in their original
        order, before any newer request can be written."""
        async with self._write_lock:
            self._conn = conn
            for rid in sorted(self._requests):
                req = self._requests[rid]
                if req.done.is_set() or req.sent_on == conn.number:
                    continue
                req.sent_on = conn.number
                try:
                    await conn.send(encode(req.frame))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break

    async def _serve(self, conn: _Conn) -> str | None:
        """Read frames until the connection ends; returns the closing code, if any."""
        code: str | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pinger, conn, tg.cancel_scope)
            try:
                code = await self._read(conn)
            except RemoteProtocolError:
                code = "bad-frame"  # the node sent garbage: try another one
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await conn.stream.aclose()
        return code

    async def _read(self, conn: _Conn) -> str | None:
        while True:
            f = await conn.next_frame()
            if f is None:
                return None
            t = f["type"]
            if t == "deliver":
                self._on_deliver(f)
            elif t == "presence-event":
                self._push_event(PresenceEvent(f["user"], f["status"], f.get("text"),
                                               f.get("last_seen")))
            elif t in ("ok", "error"):
                code = self._on_reply(f)
                if code is not None:
                    return code
            elif t == "bye":
                return str(f["code"])
            # pong and anything else: last_rx already updated

    async def _pinger(self, conn: _Conn, scope: anyio.CancelScope) -> None:
        interval = max(0.2, self._heartbeat / 2)
        dead_after = self._heartbeat * 1.5 + 1.0
        while True:
            await anyio.sleep(interval)
            idle = anyio.current_time() - conn.last_rx
            if idle > dead_after:
                scope.cancel()  # the node stopped answering: reconnect elsewhere
                return
            if idle >= interval or anyio.current_time() - conn.last_tx >= interval:
                await self._write(conn, {"type": "ping"})

    async def _close(self, logout: bool = True) -> None:
        """Log out (best effort) and stop."""
        if self._closed or self._closing:
            return
        self._closing = True
        conn = self._conn
        if logout and conn is not None and self._failure is None:
            with anyio.move_on_after(2.0, shield=True):
                await self._write(conn, {"type": "bye"})
                await self._stopped.wait()  # the reader returns on the node's bye
        self._closed = True
        self._events_ready.set()


@asynccontextmanager
async def connect(
    nodes: Sequence[str] | str,
    *,
    user: str,
    token: str,
    ordered: bool = False,
    status: str = "online",
    text: str | None = None,
    connect_timeout: float = 3.0,
    max_backoff: float = 1.0,
    request_timeout: float = 30.0,
    connection_events: bool = False,
    give_up_after: float = 60.0,
    logout: bool = True,
    tls: bool | ssl.SSLContext = False,
) -> AsyncIterator[Session]:
    """Log in to one of ``nodes`` (``host:port`` strings, or one comma-separated string).

    By default a random node is tried first, so that clients spread over the
    cluster; ``ordered=True`` tries them in the order given. Leaving the
    context logs out (contacts see you go offline if it was your last session);
    with ``logout=False`` it just disconnects, and the session waits for the
    grace window like after a crash. ``tls=True`` connects with TLS and verifies
    the nodes' certificates against the system's CAs; pass an ``ssl.SSLContext``
    to choose (e.g. ``ssl.create_default_context(cafile=...)``).
    """
    if isinstance(nodes, str):
        nodes = [n.strip() for n in nodes.split(",") if n.strip()]
    session = Session(nodes, user, token, ordered=ordered, status=status, text=text,
                      connect_timeout=connect_timeout, max_backoff=max_backoff,
                      request_timeout=request_timeout, connection_events=connection_events,
                      give_up_after=give_up_after, tls=tls)
    first = await session._establish(None)  # errors here reach the caller as they are
    try:
        async with anyio.create_task_group() as tg:
            session._start(tg, first)
            try:
                yield session
            finally:
                await session._close(logout)
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Raise the application's own exception, not a group from our task group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


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
