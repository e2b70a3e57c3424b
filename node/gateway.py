"""The connection side of a node: the client listener, one task per client, and
the carrying-out of the core's effects on local connections.

A gateway runs in the node's process (``--workers 0``) or in each of the node's
gateway worker processes (``node.worker``), which share the client port with
SO_REUSEPORT; either way it talks to the core through ``node.interfaces.CoreLike``.

Each connection has one task, its reader, which decodes frames
(``node.protocol``) and dispatches them without waiting for commits (requests
are pipelined: a reply is queued when the core calls back). Output does not
need a task: on a plain TCP connection ``push`` writes the bytes at once with a
non-blocking send, and only when the kernel's send buffer is full does it queue
the rest and start a writer task (in the connection's nursery) that flushes
the queue with ``send_all`` and ends when it is empty; bytes always leave in
push order. A TLS connection keeps a writer task for its whole life (an
``SSLStream`` cannot be written synchronously). A connection whose queue grows
past ``outbox_limit`` is dropped (its session waits for a resume, and nothing
acknowledged is lost: the mailbox keeps every message until the recipient acks
it).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
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
FINAL_FLUSH_TIMEOUT = 10.0  # a closing connection's last frames, to a client that reads


async def open_reuseport_listener(host: str, port: int) -> trio.SocketListener:
    """A listener on ``host:port`` with SO_REUSEPORT: every gateway worker of a node
    binds one, and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


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
        self.max_here = min(config.max_connections, PROCESS_MAX_CONNECTIONS)
        self.accepted_burst = 0  # connections accepted since the last look (worker GC)
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
            self.ssl_context = ctx
        core.effect_sink = self.handle_effects
        core.restore_sink = self.handle_restore
        core.fence_sink = self.handle_fence

    @property
    def drained(self) -> bool:
        return self._drained

    async def serve(self, *, reuse_port: bool = False,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.config.listen
        tcp: list[trio.SocketListener]
        if reuse_port:
            tcp = [await open_reuseport_listener(host, port)]
        else:
            tcp = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        sockname = tcp[0].socket.getsockname()
        self.address = format_addr(host, sockname[1])
        listeners: list[trio.abc.Listener[Any]] = list(tcp)
        if self.ssl_context is not None:
            listeners = [trio.SSLListener(t, self.ssl_context, https_compatible=False)
                         for t in tcp]
        try:
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptors:
                    self._accepting = acceptors.cancel_scope
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, handlers)
                    self._listening = True
                    task_status.started(self.address)
                # Shutting down: the listeners are closed; connections finish on their own.
                self._listening = False
        finally:
            self._listening = False

    def listening(self) -> bool:
        return self._listening and not self.closing

    async def _accept_loop(self, listener: trio.abc.Listener[Any], handlers: trio.Nursery
                           ) -> None:
        """Accept, and decide admission at once (before the next accept), so that the
        node-wide connection count sees connections in the order they were accepted."""
        try:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept failed; retrying", error=os.strerror(exc.errno or 0))
                    await trio.sleep(0.1)
                    continue
                self.stats.connections_total += 1
                conn = ClientConnection(self, stream)
                here = len(self.connections)
                if (here >= self.max_here or here + self.core.connections_elsewhere()
                        >= self.config.max_connections):
                    self.stats.rejected_full += 1
                    handlers.start_soon(conn.refuse, "overloaded",
                                        "this node is full; connect to another node")
                    continue
                if self.closing:
                    handlers.start_soon(conn.refuse, "shutdown", "the node is shutting down")
                    continue
                self.connections.add(conn)
                self.core.connections_changed(len(self.connections))
                self.accepted_burst += 1
                handlers.start_soon(self._handle, conn)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def _handle(self, conn: ClientConnection) -> None:
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.core.connections_changed(len(self.connections))
            if conn.session is not None and self.sessions.get(conn.session) is conn:
                del self.sessions[conn.session]

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
                if c is not None:
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

    def workers(self) -> list[dict[str, Any]]:
        return []


class ClientConnection:
    """One client: one task (the reader); output is written from ``push`` itself.
    See the module docstring."""

    __slots__ = (
        "_broken", "_cancel", "_capacity", "_detach", "_direct", "_fpos", "_frames",
        "_inflight", "_nursery", "_out", "_reading", "_refilled", "_tokens", "_wake",
        "_writing", "closing", "decoder", "epoch", "gw", "ip", "out_bytes", "port",
        "session", "stream", "user",
    )

    def __init__(self, gateway: Gateway, stream: Any):
        self.gw = gateway
        self.stream = stream  # a trio SocketStream, or an SSLStream around one
        cfg = gateway.config
        self.decoder = FrameDecoder(CLIENT_FRAMES, cfg.max_frame)
        self._frames: list[dict[str, Any]] = []
        self._fpos = 0
        self._broken: RemoteProtocolError | None = None
        self.session: str | None = None
        self.epoch = 0
        self.user: str | None = None
        # Plain TCP: push() writes with a non-blocking send on the socket itself.
        self._direct = isinstance(stream, trio.SocketStream)
        self._out: list[bytes] = []
        self.out_bytes = 0
        self._writing = False  # a writer task owns the stream's sending side
        self._wake: trio.Event | None = None  # the TLS writer's
        self.closing = False
        self._detach = True
        self._inflight = 0
        self._capacity: trio.Event | None = None
        self._cancel: trio.CancelScope | None = None
        self._reading: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.ip = "?"
        self.port = 0
        try:
            raw = stream if self._direct else stream.transport_stream
            peer = raw.socket.getpeername()
            self.ip = str(peer[0])
            self.port = int(peer[1])
        except (OSError, AttributeError):
            pass
        self._tokens = float(cfg.frame_burst)
        self._refilled = time.monotonic()

    @property
    def peer(self) -> str:
        return f"{self.ip}:{self.port}"

    # --- output ---------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        if self.closing:
            return
        if self._direct and not self._writing:
            # Nothing queued: straight into the kernel's send buffer, no task switch.
            try:
                sent = os.write(self.stream.socket.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset, or already closed: the reader will see it too
                self.abort()
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._out.append(data)
            self.out_bytes += len(data)
            self._start_flush()
            return
        self._out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > self.gw.config.outbox_limit:
            self.gw.stats.dropped_slow += 1
            log.warning("dropping slow client", peer=self.peer, session=self.session,
                        queued=self.out_bytes)
            self._out.clear()
            self.out_bytes = 0
            self.abort()
            return
        if self._wake is not None:
            self._wake.set()

    def _start_flush(self) -> None:
        """The kernel buffer is full: a writer task sends the rest, in order."""
        self._writing = True
        if self._nursery is not None:
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            while self._out:
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out = []
                self.out_bytes = 0
                await self.stream.send_all(data)
        except TRANSPORT_ERRORS:
            self.abort()
        finally:
            self._writing = False

    async def _tls_writer(self) -> None:
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
        if self._reading is not None:
            self._reading.cancel()
        if self._wake is not None:
            self._wake.set()

    def abort(self) -> None:
        """Close at once, without flushing."""
        self.closing = True
        if self._cancel is not None:
            self._cancel.cancel()

    async def refuse(self, code: str, reason: str) -> None:
        with trio.move_on_after(1.0):
            try:
                await self.stream.send_all(encode({"type": "error", "code": code,
                                                   "reason": reason}))
            except TRANSPORT_ERRORS:
                pass
        await self._aclose()

    async def _aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await self.stream.aclose()
            except TRANSPORT_ERRORS:
                pass

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if not self._direct:
                        nursery.start_soon(self._tls_writer)
                    elif self._writing:  # pushed before run(): the kernel buffer was full
                        nursery.start_soon(self._flush)
                    with trio.CancelScope() as self._reading:
                        await self._read_until_done()
                    if not self.closing:
                        # EOF or a transport error: nothing more can be written.
                        self.closing = True
                        nursery.cancel_scope.cancel()
                    else:
                        # Closing: the writer (if any) flushes the final frames.
                        nursery.cancel_scope.deadline = min(
                            nursery.cancel_scope.deadline,
                            trio.current_time() + FINAL_FLUSH_TIMEOUT)
        finally:
            self.closing = True
            self._nursery = None
            await self._aclose()
            gw = self.gw
            if self.session is not None and self._detach and not gw.closing:
                gw.core.submit(Detach(self.session, self.epoch, gw.core.node_id), _ignore)

    async def _read_until_done(self) -> None:
        try:
            await self._reader()
        except TRANSPORT_ERRORS:
            pass
        except RemoteProtocolError as e:
            self.gw.stats.protocol_errors += 1
            log.info("protocol error", peer=self.peer, code=e.code, reason=e.reason)
            self.close("error", e.code, e.reason)

    async def _next_frame(self) -> dict[str, Any] | None:
        frames = self._frames
        while self._fpos >= len(frames):
            if frames:
                frames.clear()
                self._fpos = 0
            if self._broken is not None:
                raise self._broken
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)
            try:
                for frame in self.decoder.frames():
                    frames.append(frame)
            except RemoteProtocolError as e:
                # Good frames that came before the bad one are still served.
                self._broken = e
        self.gw.stats.frames_in += 1
        frame = frames[self._fpos]
        self._fpos += 1
        return frame

    async def _reader(self) -> None:
        cfg = self.gw.config
        frame = None
        with trio.move_on_after(cfg.login_deadline):
            frame = await self._next_frame()
        if frame is None:
            if not self.closing:
                self.close("error", "timeout", f"no login within {cfg.login_deadline:g} s")
            return
        if not await self._authenticate(frame):
            return
        idle = cfg.client_heartbeat * 2.5
        while not self.closing:
            got = None
            with trio.move_on_after(idle) as scope:
                got = await self._next_frame()
            if scope.cancelled_caught:
                self.close("error", "timeout", f"no frame for {idle:g} s")
                return
            if got is None:
                return
            await self._throttle()
            while self._inflight >= cfg.max_inflight:
                self._capacity = trio.Event()
                await self._capacity.wait()
            self._dispatch(got)

    async def _throttle(self) -> None:
        """Token bucket: at most frame_rate frames/s (bursts of frame_burst)."""
        cfg = self.gw.config
        now = time.monotonic()
        self._tokens = min(float(cfg.frame_burst),
                           self._tokens + (now - self._refilled) * cfg.frame_rate)
        self._refilled = now
        if self._tokens < 1:
            self.gw.stats.rejected_rate += 1
            self.push(encode({"type": "error", "code": "rate-limited",
                              "reason": f"over {cfg.frame_rate:g} frames/s; slowing down"}))
            await trio.sleep((1 - self._tokens) / cfg.frame_rate)
            self._tokens = 1.0
            self._refilled = time.monotonic()
        self._tokens -= 1

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
        done = trio.Event()
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
                         frame.get("last_seq", 0), new_session_id(), now)
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

        self.gw.core.submit(cmd, on_done)
        await done.wait()
        return ok

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

