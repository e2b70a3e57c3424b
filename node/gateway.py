"""The connection side of a node: the client listener, one task per client, and
the carrying-out of the core's effects on local connections.

A gateway runs in the node's process (``--workers 0``) or in each of the node's
gateway worker processes (``node.worker``), which share the client port with
SO_REUSEPORT; either way it talks to the core through ``node.interfaces.CoreLike``.

Connections are plain non-blocking sockets (no Trio stream objects), each with
one task: its reader, which decodes frames (``node.protocol``) and dispatches
them without waiting for commits (requests are pipelined: a reply is queued
when the core calls back). Output needs no task: ``push`` writes the bytes at
once with a non-blocking ``send``; only when the kernel's send buffer is full
does it queue the rest and start a writer task that flushes the queue and ends
when it is empty. Bytes always leave in push order, and a fan-out writes to each
recipient without a scheduler round trip. A TLS connection keeps a writer task
for its whole life (an ``SSLStream`` cannot be written synchronously). Login
deadlines and idle connections are checked by one sweeper for all connections,
so an idle logged-in connection costs one parked task and a few small objects
(about 4 KB). A connection whose queue grows past ``outbox_limit`` is dropped
(its session waits for a resume, and nothing acknowledged is lost: the mailbox
keeps every message until the recipient acks it).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from replication.commands import (
    Ack,
    Allow,
    Command,
    Detach,
    Login,
    Logout,
    Resume,
    Revoke,
    Send,
    SetPresence,
    Subscribe,
    Unsubscribe,
)
from replication.table import Deliver, Effect, PresenceNotice, Result, SessionClosed

from .auth import (
    AuthError,
    Keys,
    hash_resume_token,
    new_resume_token,
    new_session_id,
    verify_token,
)
from .clock import wall
from .config import NodeConfig, format_addr
from .interfaces import CoreLike
from .protocol import CLIENT_FRAMES, FrameDecoder, RemoteProtocolError, encode

log = structlog.get_logger("switchboard.gateway")

TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
CLOSE_CODES = {"moved": "moved", "expired": "no-session", "logout": "logout"}


@dataclass(slots=True)
class GatewayStats:
    connections: int = 0
    connections_total: int = 0
    logins: int = 0
    resumes: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    rejected_fenced: int = 0
    rejected_full: int = 0
    rejected_rate: int = 0
    dropped_slow: int = 0
    frames_in: int = 0
    messages_sent: int = 0
    messages_delivered: int = 0
    acks: int = 0
    presence_updates: int = 0
    presence_events: int = 0
    outbox_bytes: int = 0
    sessions_local: int = 0


PROCESS_MAX_CONNECTIONS = 19_000
"""Client connections one process may hold, whatever --max-connections says: the
hard limit on open files is 20,000 per process here (see the notes on machines)."""
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_IGNORED_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
FINAL_FLUSH_TIMEOUT = 10.0  # a closing connection's last frames, to a client that reads
SWEEP_PERIOD = 1.0  # login deadlines and idle connections are checked this often


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The client listener: a non-blocking socket (backlog 4096). With ``reuse_port``
    (gateway workers) SO_REUSEPORT is set, every worker of a node binds one, and the
    kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Gateway:
    """Client connections of one process; see the module docstring."""

    def __init__(self, config: NodeConfig, core: CoreLike, keys: Keys):
        self.config = config
        self.core = core
        self.keys = keys
        self.sessions: dict[str, ClientConnection] = {}
        self.connections: set[ClientConnection] = set()
        self.stats = GatewayStats()
        self.closing = False
        self._drained = False  # an operator moved this node's clients away
        self.address: str | None = None
        self._listening = False
        self._accepting: trio.CancelScope | None = None
        self._handlers: trio.Nursery | None = None
        self.max_here = min(config.max_connections, PROCESS_MAX_CONNECTIONS)
        self.accepted_burst = 0  # connections accepted since the last look (worker GC)
        self.burst = float(config.frame_burst)
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
            self.ssl_context = ctx
        self._corked = False
        self._dirty: list[ClientConnection] = []
        core.effect_sink = self.handle_effects
        core.restore_sink = self.handle_restore
        core.fence_sink = self.handle_fence
        core.batch_sink = self.cork

    @property
    def drained(self) -> bool:
        return self._drained

    async def serve(self, *, reuse_port: bool = False,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.config.listen
        lsock = listen_socket(host, port, reuse_port)
        self.address = format_addr(host, lsock.getsockname()[1])
        try:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                handlers.start_soon(self._sweep)
                async with trio.open_nursery() as acceptors:
                    self._accepting = acceptors.cancel_scope
                    acceptors.start_soon(self._accept_loop, lsock, handlers)
                    self._listening = True
                    task_status.started(self.address)
                # Shutting down: the listener is closed; connections finish on their own.
                self._listening = False
        finally:
            self._listening = False
            trio.lowlevel.notify_closing(lsock)
            lsock.close()

    def listening(self) -> bool:
        return self._listening and not self.closing

    async def _accept_loop(self, lsock: socket.socket, handlers: trio.Nursery) -> None:
        """Accept, and decide admission at once (before the next accept). The
        connections are plain sockets: no Trio stream objects per connection."""
        while True:
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as exc:
                if exc.errno in ACCEPT_IGNORED_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed; retrying", error=os.strerror(exc.errno or 0))
                await trio.sleep(0.1)
                continue
            self._admit(sock, addr, handlers)
            await trio.lowlevel.checkpoint()

    def _admit(self, sock: socket.socket, addr: Any, handlers: trio.Nursery) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.stats.connections_total += 1
        conn = ClientConnection(self, sock, addr)
        if self.closing:
            handlers.start_soon(conn.refuse, "shutdown", "the node is shutting down")
            return
        if len(self.connections) >= self.max_here or not self.core.reserve_connection():
            self.stats.rejected_full += 1
            handlers.start_soon(conn.refuse, "overloaded",
                                "this node is full; connect to another node")
            return
        self.connections.add(conn)
        self.accepted_burst += 1
        handlers.start_soon(conn.run)

    def _finished(self, conn: ClientConnection) -> None:
        """``conn`` is closed (called once, from its task)."""
        self.connections.discard(conn)
        self.core.release_connection()
        if conn.session is not None and self.sessions.get(conn.session) is conn:
            del self.sessions[conn.session]

    async def _sweep(self) -> None:
        """Login deadlines and idle connections, for all connections at once: no
        timer per connection."""
        cfg = self.config
        idle = cfg.client_heartbeat * 2.5
        while True:
            await trio.sleep(SWEEP_PERIOD)
            now = time.monotonic()
            for c in list(self.connections):
                if c.closing:
                    continue
                if c.phase == WAITING_LOGIN:
                    if now - c.last_rx > cfg.login_deadline:
                        c.close("error", "timeout", f"no login within {cfg.login_deadline:g} s")
                elif c.phase == LOGGED_IN and now - c.last_rx > idle:
                    c.close("error", "timeout", f"no frame for {idle:g} s")

    def cork(self, start: bool) -> None:
        """While corked, connections queue what they are given; uncorking writes each
        connection's queue with one send (a reply and the messages of one commit
        reach a client together)."""
        if start:
            self._corked = True
            return
        self._corked = False
        dirty, self._dirty = self._dirty, []
        for c in dirty:
            c.send_queued()

    # --- sessions on this node ----------------------------------------------------

    def register(self, conn: ClientConnection) -> None:
        assert conn.session is not None
        old = self.sessions.get(conn.session)
        if old is not None and old is not conn:
            old.close("bye", "moved", "the session was resumed on another connection",
                      detach=False)
        self.sessions[conn.session] = conn

    def handle_effects(self, effects: list[Effect]) -> None:
        for e in effects:
            try:
                self._carry_out(e)
            except Exception:  # one bad effect must not drop the others
                log.exception("carrying out an effect failed", effect=type(e).__name__)

    def _carry_out(self, e: Effect) -> None:
        sessions = self.sessions
        if type(e) is Deliver:
            m = e.message
            data = encode({"type": "deliver", "seq": m.seq, "id": m.id, "from": m.sender,
                           "body": m.body, "ts": m.ts})
            for sid in e.sessions:
                c = sessions.get(sid)
                if c is not None and m.seq > c.delivered_seq:
                    c.delivered_seq = m.seq
                    c.push(data)
                    self.stats.messages_delivered += 1
        elif type(e) is PresenceNotice:
            data = encode({"type": "presence-event", "user": e.user, "status": e.status,
                           "text": e.text, "last_seen": e.last_seen})
            for sid in e.sessions:
                c = sessions.get(sid)
                if c is not None:
                    c.push(data)
                    self.stats.presence_events += 1
        elif type(e) is SessionClosed:
            c = sessions.get(e.session)
            if c is not None and c.epoch == e.epoch and not c.closing:
                code = CLOSE_CODES.get(e.reason, e.reason)
                c.close("bye", code, f"session {e.reason}", detach=False)

    def handle_restore(self, local: list[tuple[str, int]]) -> None:
        """A snapshot replaced the table: drop connections whose session is gone."""
        keep = set(local)
        for sid, c in list(self.sessions.items()):
            if (sid, c.epoch) not in keep:
                c.close("bye", "reconnect", "this node lost track of the session; resume it",
                        detach=False)

    def handle_fence(self, fenced: bool) -> None:
        if not fenced:
            return
        for c in list(self.connections):
            c.close("bye", "fenced", "this node cannot reach a majority; reconnect elsewhere",
                    detach=False)

    async def drain(self, timeout: float = 10.0) -> int:
        """Move every client to other nodes (``bye shutdown``: they resume elsewhere)
        and refuse new ones until ``undrain``; returns the connections left."""
        self._drained = True
        for c in list(self.connections):
            c.close("bye", "shutdown", "this node is being drained; reconnect elsewhere",
                    detach=False)
        with trio.move_on_after(timeout):
            while self.connections:
                await trio.sleep(0.02)
        return len(self.connections)

    def undrain(self) -> None:
        self._drained = False

    async def shutdown(self) -> None:
        """Stop accepting, tell every client to move, wait briefly for outboxes to drain."""
        self.closing = True
        if self._accepting is not None:
            self._accepting.cancel()
        for c in list(self.connections):
            c.close("bye", "shutdown", "the node is shutting down; reconnect elsewhere",
                    detach=False)
        with trio.move_on_after(1.0):
            while self.connections:
                await trio.sleep(0.02)

    def statistics(self) -> GatewayStats:
        st = self.stats
        st.connections = len(self.connections)
        st.sessions_local = len(self.sessions)
        st.outbox_bytes = sum(c.out_bytes for c in self.connections)
        return st

    async def refresh(self) -> None:
        pass

    def workers(self) -> list[dict[str, Any]]:
        return []


WAITING_LOGIN, AUTHENTICATING, LOGGED_IN = 0, 1, 2


class ClientConnection:
    """One client: one task, which reads; output is written from ``push`` itself.
    See the module docstring."""

    __slots__ = (
        "_aborted", "_capacity", "_detach", "_direct", "_flushed", "_inflight",
        "_login_wait", "_out", "_refilled", "_tokens", "_wake", "_writing", "closing",
        "decoder", "delivered_seq", "epoch", "gw", "ip", "last_rx", "out_bytes", "phase",
        "port", "session", "sock", "stream", "user",
    )

    def __init__(self, gateway: Gateway, sock: socket.socket, addr: Any):
        self.gw = gateway
        self.sock = sock  # non-blocking
        self.stream: trio.SSLStream[trio.SocketStream] | None = None
        self._direct = gateway.ssl_context is None  # push() writes on the socket itself
        if not self._direct:
            assert gateway.ssl_context is not None
            self.stream = trio.SSLStream(
                trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                gateway.ssl_context, server_side=True, https_compatible=False)
        self.decoder = FrameDecoder(CLIENT_FRAMES, gateway.config.max_frame)
        self.session: str | None = None
        self.epoch = 0
        # The highest message sequence number pushed on this connection: a session's
        # messages reach one connection in increasing order, so a lower or equal
        # one is a copy (a mailbox re-sent after a snapshot install) and is skipped.
        self.delivered_seq = 0
        self.user: str | None = None
        self.phase = WAITING_LOGIN
        self.last_rx = time.monotonic()  # accepted, then the last bytes received
        self._out: list[bytes] = []
        self.out_bytes = 0
        self._writing = False  # a writer task owns the socket's sending side
        self._flushed: trio.Event | None = None
        self._wake: trio.Event | None = None  # the TLS writer's
        self.closing = False
        self._aborted = False
        self._detach = True
        self._inflight = 0
        self._capacity: trio.Event | None = None
        self._login_wait: trio.Event | None = None
        try:
            self.ip = sys.intern(str(addr[0]))
            self.port = int(addr[1])
        except (TypeError, IndexError, ValueError):
            self.ip, self.port = "?", 0
        self._tokens = gateway.burst
        self._refilled = self.last_rx

    @property
    def peer(self) -> str:
        return f"{self.ip}:{self.port}"

    # --- output ---------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        if self.closing:
            return
        if self._direct and not self._writing:
            gw = self.gw
            if gw._corked:  # written when the gateway uncorks, with whatever follows
                if not self._out:
                    gw._dirty.append(self)
                self._out.append(data)
                self.out_bytes += len(data)
                return
            # Nothing queued: straight into the kernel's send buffer, no task switch.
            self._send_now(data)
            return
        self._out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > self.gw.config.outbox_limit:
            self.gw.stats.dropped_slow += 1
            log.warning("dropping slow client", peer=self.peer, session=self.session,
                        queued=self.out_bytes)
            self.abort()
            return
        if self._wake is not None:
            self._wake.set()

    def _send_now(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, or closed: the reader sees it too
            self.abort()
            return
        if sent == len(data):
            return
        self._out.append(data[sent:])
        self.out_bytes += len(data) - sent
        self._start_flush()

    def send_queued(self) -> None:
        """Write what was queued while the gateway was corked (closing or not)."""
        if not self._direct or self._aborted or self._writing or not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        self.out_bytes = 0
        self._send_now(data)

    def _start_flush(self) -> None:
        """The kernel's buffer is full: a writer task sends the rest, in order."""
        self._writing = True
        assert self.gw._handlers is not None
        self.gw._handlers.start_soon(self._flush)

    async def _flush(self) -> None:
        sock = self.sock
        try:
            while self._out:
                data = memoryview(b"".join(self._out))
                self._out = []
                while data:
                    try:
                        sent = sock.send(data)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    data = data[sent:]
                    self.out_bytes -= sent
        except (OSError, trio.ClosedResourceError):
            self.abort()
        finally:
            self.out_bytes = 0 if not self._out else self.out_bytes
            self._writing = False
            if self._flushed is not None:
                self._flushed.set()

    async def _tls_writer(self) -> None:
        assert self.stream is not None
        self._writing = True
        try:
            while True:
                self._wake = trio.Event()
                while self._out:
                    data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                    self._out = []
                    self.out_bytes = 0
                    await self.stream.send_all(data)
                if self.closing:
                    return
                await self._wake.wait()
        except TRANSPORT_ERRORS:
            self.abort()
        finally:
            self._writing = False

    def close(self, kind: str, code: str, reason: str, detach: bool = True,
              rid: int | None = None) -> None:
        """Queue a final ``bye`` or ``error`` frame, then close once it is written."""
        if self.closing:
            return
        frame: dict[str, Any] = {"type": kind, "code": code, "reason": reason}
        if rid is not None and kind == "error":
            frame["rid"] = rid
        self.push(encode(frame))
        self.closing = True
        self._detach = detach
        self._stop_reading(socket.SHUT_RD)

    def abort(self) -> None:
        """Close at once, without flushing."""
        self.closing = True
        self._aborted = True
        self._out.clear()
        self.out_bytes = 0
        self._stop_reading(socket.SHUT_RDWR)

    def _stop_reading(self, how: int) -> None:
        # The reader waits in the kernel (readable) or on an event: wake it either
        # way. A socket shut down for reading reads as end-of-file.
        try:
            self.sock.shutdown(how)
        except OSError:
            pass
        for event in (self._login_wait, self._capacity, self._wake):
            if event is not None:
                event.set()

    async def refuse(self, code: str, reason: str) -> None:
        data = encode({"type": "error", "code": code, "reason": reason})
        with trio.move_on_after(1.0):
            try:
                if self.stream is not None:
                    await self.stream.send_all(data)
                else:
                    self.sock.send(data)  # a fresh socket's buffer has room
            except TRANSPORT_ERRORS:
                pass
        await self._close_socket()

    async def _close_socket(self) -> None:
        with trio.CancelScope(shield=True):
            if self.stream is not None:
                with trio.move_on_after(1.0):
                    try:
                        await self.stream.aclose()
                    except TRANSPORT_ERRORS:
                        pass
            else:
                trio.lowlevel.notify_closing(self.sock)
                self.sock.close()

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        gw = self.gw
        try:
            if self._direct:
                # The read loop is inline: an idle connection is this one coroutine
                # waiting in Trio's wait_readable, nothing else. It yields to the
                # other connections before handling a read only when the data was
                # already waiting (a read right after a wait-readable has just
                # yielded): one task step per request, not two.
                sock = self.sock
                waited = True
                while not self.closing:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        data = None  # (no exception kept alive while waiting)
                    except OSError:
                        break
                    if data is None:
                        await trio.lowlevel.wait_readable(sock)
                        waited = True
                        continue
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    waited = False
                    if not data or not await self._received(data):
                        break  # end of file, or close() shut the socket for reading
                    data = None
            else:
                await self._run_tls()
        finally:
            self.closing = True
            self.send_queued()
            if self._writing and not self._aborted:
                # The final frames are still being written (by the writer task).
                self._flushed = trio.Event()
                with trio.CancelScope(shield=True), trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                    await self._flushed.wait()
            await self._close_socket()
            gw._finished(self)
            if self.session is not None and self._detach and not gw.closing:
                gw.core.submit(Detach(self.session, self.epoch, gw.core.node_id), _ignore)

    async def _run_tls(self) -> None:
        assert self.stream is not None
        stream = self.stream
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tls_writer)
            try:
                while not self.closing:
                    data = await stream.receive_some(65536)
                    if not data or not await self._received(data):
                        break
            except TRANSPORT_ERRORS:
                pass
            if not self.closing or self._aborted:
                self.closing = True
                nursery.cancel_scope.cancel()  # nothing more can be written
            else:
                # The writer flushes the final frames (bounded).
                nursery.cancel_scope.deadline = trio.current_time() + FINAL_FLUSH_TIMEOUT
                if self._wake is not None:
                    self._wake.set()

    async def _received(self, data: bytes | bytearray) -> bool:
        """Handle the frames in ``data``; False once the connection must stop reading."""
        self.last_rx = time.monotonic()
        self.decoder.feed(data)
        frames: list[dict[str, Any]] = []
        broken: RemoteProtocolError | None = None
        try:
            for frame in self.decoder.frames():
                frames.append(frame)
        except RemoteProtocolError as e:
            broken = e  # good frames that came before the bad one are still served
        del data
        stats = self.gw.stats
        for frame in frames:
            if self.closing:
                return False
            stats.frames_in += 1
            if self.phase != LOGGED_IN:
                if not await self._authenticate(frame):
                    return False
                continue
            delay = self._throttle()
            if delay:
                await trio.sleep(delay)
                self.last_rx = time.monotonic()  # frames still queued: not idle
            max_inflight = self.gw.config.max_inflight
            while self._inflight >= max_inflight and not self.closing:
                self._capacity = trio.Event()
                await self._capacity.wait()
                self.last_rx = time.monotonic()
            if self.closing:
                return False
            self._dispatch(frame)
        if broken is not None:
            stats.protocol_errors += 1
            log.info("protocol error", peer=self.peer, code=broken.code, reason=broken.reason)
            self.close("error", broken.code, broken.reason)
            return False
        return True

    def _throttle(self) -> float:
        """Token bucket: at most frame_rate frames/s (bursts of frame_burst). Returns
        how long to wait before serving this frame."""
        cfg = self.gw.config
        now = time.monotonic()
        tokens = min(self.gw.burst, self._tokens + (now - self._refilled) * cfg.frame_rate)
        self._refilled = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return 0.0
        self.gw.stats.rejected_rate += 1
        self.push(encode({"type": "error", "code": "rate-limited",
                          "reason": f"over {cfg.frame_rate:g} frames/s; slowing down"}))
        self._tokens = 0.0
        self._refilled = now + (1 - tokens) / cfg.frame_rate
        return (1 - tokens) / cfg.frame_rate

    # --- login and resume -----------------------------------------------------------------

    async def _authenticate(self, frame: dict[str, Any]) -> bool:
        gw = self.gw
        ftype = frame["type"]
        rid = frame.get("rid")
        if ftype not in ("login", "resume"):
            self.close("error", "not-logged-in", f"{ftype} before login", rid=rid)
            return False
        if gw.closing:
            self.close("error", "shutdown", "the node is shutting down; connect to another node",
                       rid=rid)
            return False
        if gw.drained:
            self.close("error", "shutdown", "this node is drained; connect to another node",
                       rid=rid)
            return False
        if not gw.core.serving():
            gw.stats.rejected_fenced += 1
            why = ("is not a cluster member yet" if not gw.core.member
                   else "cannot reach a majority")
            self.close("error", "fenced", f"this node {why}; connect to another node", rid=rid)
            return False
        if gw.core.login_blocked(self.ip):
            gw.stats.rejected_rate += 1
            self.close("error", "rate-limited", "too many failed logins from this address; "
                       "try again in a minute", rid=rid)
            return False
        self.phase = AUTHENTICATING
        done = self._login_wait = trio.Event()
        now = wall()
        token = new_resume_token()
        cmd: Command
        if ftype == "login":
            user = frame["user"]
            try:
                verify_token(gw.keys.token, frame["token"], user, now)
            except AuthError as e:
                gw.stats.auth_failures += 1
                gw.core.login_failed(self.ip)
                log.info("login refused", peer=self.peer, user=user[:64], reason=str(e))
                self.close("error", "auth-failed", str(e), rid=rid)
                return False
            sid = new_session_id()
            cmd = Login(sid, user, gw.core.node_id, gw.core.inc, hash_resume_token(token),
                        frame.get("status", "online"), frame.get("text"), now)
        else:
            sid = frame["session"]
            token = frame["token"]
            cmd = Resume(sid, hash_resume_token(token), gw.core.node_id, gw.core.inc,
                         frame.get("last_seq", 0), new_session_id(), now,
                         frame.get("attempt", 0))
        ok = False

        def on_done(result: Result) -> None:
            nonlocal ok
            done.set()
            if not result.ok:
                if result.code == "bad-token":
                    gw.stats.auth_failures += 1
                    gw.core.login_failed(self.ip)
                self.close("error", result.code or "internal", result.reason or "", rid=rid)
                return
            assert result.value is not None
            if self.closing:
                # The connection is gone (closed while the login was in the log): the
                # session waits for a resume like any other whose connection was lost.
                if not gw.closing:
                    gw.core.submit(Detach(sid, result.value["epoch"], gw.core.node_id),
                                   _ignore)
                return
            ok = True
            self.session = sid
            self.epoch = result.value["epoch"]
            self.user = result.value["user"]
            self.phase = LOGGED_IN
            self.last_rx = time.monotonic()
            gw.register(self)
            reply: dict[str, Any] = {
                "type": "login-ok", "session": sid, "resume": token, "node": gw.core.node_id,
                "heartbeat": gw.config.client_heartbeat, "epoch": self.epoch, "user": self.user,
                "resumed": ftype == "resume",
            }
            if rid is not None:
                reply["rid"] = rid
            self.push(encode(reply))
            if ftype == "login":
                gw.stats.logins += 1
            else:
                gw.stats.resumes += 1

        self.gw.core.submit(cmd, on_done, source=self.ip)
        await done.wait()
        self._login_wait = None
        return ok and not self.closing

    # --- requests ----------------------------------------------------------------------------

    def _dispatch(self, f: dict[str, Any]) -> None:
        ftype = f["type"]
        if ftype == "ping":
            pong: dict[str, Any] = {"type": "pong"}
            if "data" in f:
                pong["data"] = f["data"]
            self.push(encode(pong))
            return
        sid, epoch, node = self.session, self.epoch, self.gw.core.node_id
        assert sid is not None
        rid = f.get("rid")
        cmd: Command
        if ftype == "send":
            cmd = Send(sid, epoch, node, f["cmid"], f["to"], f["body"], wall())
            self.gw.stats.messages_sent += 1
        elif ftype == "ack":
            cmd = Ack(sid, epoch, node, f["seqs"])
            self.gw.stats.acks += 1
        elif ftype == "presence":
            cmd = SetPresence(sid, epoch, node, f["status"], f.get("text"), wall())
            self.gw.stats.presence_updates += 1
        elif ftype == "allow":
            cmd = Allow(sid, epoch, node, f["user"])
        elif ftype == "revoke":
            cmd = Revoke(sid, epoch, node, f["user"])
        elif ftype == "subscribe":
            cmd = Subscribe(sid, epoch, node, f["user"])
        elif ftype == "unsubscribe":
            cmd = Unsubscribe(sid, epoch, node, f["user"])
        elif ftype == "bye":
            self._detach = False
            self.gw.core.submit(Logout(sid, epoch, node, wall()), self._on_logout)
            return
        else:  # login / resume on a logged-in connection
            self.push(encode({"type": "error", "code": "already-logged-in",
                              "reason": "this connection is already logged in",
                              **({"rid": rid} if rid is not None else {})}))
            return
        self._inflight += 1
        self.gw.core.submit(cmd, self._replier(rid))

    def _replier(self, rid: int | None) -> Callable[[Result], None]:
        def on_done(result: Result) -> None:
            self._inflight -= 1
            if self._capacity is not None:
                self._capacity.set()
                self._capacity = None
            if result.ok:
                if rid is not None:
                    frame: dict[str, Any] = {"type": "ok", "rid": rid}
                    if result.value:
                        frame.update(result.value)
                    self.push(encode(frame))
                return
            code = result.code or "internal"
            if code in ("moved", "no-session"):
                self.close("error", code, result.reason or "", detach=False, rid=rid)
                return
            frame = {"type": "error", "code": code, "reason": result.reason or ""}
            if rid is not None:
                frame["rid"] = rid
            self.push(encode(frame))

        return on_done

    def _on_logout(self, result: Result) -> None:
        self.close("bye", "logout", "logged out" if result.ok else (result.reason or ""),
                   detach=False)


def _ignore(_result: Result) -> None:
    pass

