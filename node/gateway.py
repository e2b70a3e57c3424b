"""The connection side of a node: the client listener, one task pair per client,
and the carrying-out of the core's effects on local connections.

Each connection has a reader task that decodes frames (``node.protocol``) and
dispatches them without waiting for commits (requests are pipelined: a reply
is queued when the core calls back), and a writer task that drains the
connection's outbox. Effects reach a connection by appending already-encoded
bytes to its outbox; a connection whose outbox grows past ``outbox_limit`` is
dropped (its session waits for a resume, and nothing acknowledged is lost: the
mailbox keeps every message until the recipient acks it).
"""

from __future__ import annotations

import ssl
import time
from collections import deque
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
from .core import Core
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


class Gateway:
    """Client connections of one node; see the module docstring."""

    def __init__(self, config: NodeConfig, core: Core, keys: Keys):
        self.config = config
        self.core = core
        self.keys = keys
        self.sessions: dict[str, ClientConnection] = {}
        self.connections: set[ClientConnection] = set()
        self.stats = GatewayStats()
        self.closing = False
        self.drained = False  # an operator moved this node's clients away
        self.address: str | None = None
        self._failures: dict[str, deque[float]] = {}  # source address -> failed logins
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
            self.ssl_context = ctx
        core.effect_sink = self.handle_effects
        core.restore_sink = self.handle_restore
        core.fence_sink = self.handle_fence

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        host, port = self.config.listen
        tcp = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        sockname = tcp[0].socket.getsockname()
        self.address = format_addr(host, sockname[1])
        listeners: list[trio.abc.Listener[Any]] = list(tcp)
        if self.ssl_context is not None:
            listeners = [trio.SSLListener(t, self.ssl_context, https_compatible=False)
                         for t in tcp]
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    # --- failed logins per source address ------------------------------------------

    def _failures_of(self, ip: str) -> deque[float]:
        now = time.monotonic()
        q = self._failures.get(ip)
        if q is None:
            if len(self._failures) > 100_000:  # forget the idle ones
                for key in [k for k, v in self._failures.items() if not v or v[-1] < now - 60]:
                    del self._failures[key]
            q = self._failures[ip] = deque()
        while q and q[0] < now - 60:
            q.popleft()
        return q

    def login_blocked(self, ip: str) -> bool:
        return len(self._failures_of(ip)) >= self.config.failed_logins

    def login_failed(self, ip: str) -> None:
        self._failures_of(ip).append(time.monotonic())

    async def _handle(self, stream: Any) -> None:
        self.stats.connections_total += 1
        conn = ClientConnection(self, stream)
        if len(self.connections) >= self.config.max_connections:
            self.stats.rejected_full += 1
            await conn.refuse("overloaded", "this node is full; connect to another node")
            return
        if self.closing:
            await conn.refuse("shutdown", "the node is shutting down")
            return
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
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
        self.drained = True
        for c in list(self.connections):
            c.close("bye", "shutdown", "this node is being drained; reconnect elsewhere",
                    detach=False)
        with trio.move_on_after(timeout):
            while self.connections:
                await trio.sleep(0.02)
        return len(self.connections)

    def undrain(self) -> None:
        self.drained = False

    async def shutdown(self) -> None:
        """Stop accepting, tell every client to move, wait briefly for outboxes to drain."""
        self.closing = True
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


class ClientConnection:
    """One client: a reader task and a writer task; see the module docstring."""

    def __init__(self, gateway: Gateway, stream: Any):
        self.gw = gateway
        self.stream = stream  # a trio SocketStream, or an SSLStream around one
        cfg = gateway.config
        self.decoder = FrameDecoder(CLIENT_FRAMES, cfg.max_frame)
        self._frames: deque[dict[str, Any]] = deque()
        self._broken: RemoteProtocolError | None = None
        self.session: str | None = None
        self.epoch = 0
        self.user: str | None = None
        self._out: list[bytes] = []
        self.out_bytes = 0
        self._wake = trio.Event()
        self.closing = False
        self._detach = True
        self._inflight = 0
        self._capacity = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self.ip = "?"
        self.peer = "?"
        try:
            raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
            peer = raw.socket.getpeername()
            self.ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        except (OSError, AttributeError):
            pass
        self._tokens = float(cfg.frame_burst)
        self._refilled = time.monotonic()

    # --- output ---------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        if self.closing:
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
        self._wake.set()

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

    async def _writer(self) -> None:
        stream = self.stream
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._out:
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out = []
                self.out_bytes = 0
                await stream.send_all(data)
            if self.closing and not self._out:
                return

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
                    nursery.start_soon(self._reader_then_stop, nursery.cancel_scope)
                    try:
                        await self._writer()
                    except TRANSPORT_ERRORS:
                        pass
                    nursery.cancel_scope.cancel()
        finally:
            await self._aclose()
            if self.session is not None and self._detach and not self.gw.closing:
                gw = self.gw
                gw.core.submit(Detach(self.session, self.epoch, gw.core.node_id), _ignore)

    async def _reader_then_stop(self, scope: trio.CancelScope) -> None:
        try:
            await self._reader()
        except TRANSPORT_ERRORS:
            pass
        except RemoteProtocolError as e:
            self.gw.stats.protocol_errors += 1
            log.info("protocol error", peer=self.peer, code=e.code, reason=e.reason)
            self.close("error", e.code, e.reason)
            return
        if not self.closing:
            # EOF or transport error: nothing more can be written.
            scope.cancel()

    async def _next_frame(self) -> dict[str, Any] | None:
        while not self._frames:
            if self._broken is not None:
                raise self._broken
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)
            try:
                for frame in self.decoder.frames():
                    self._frames.append(frame)
            except RemoteProtocolError as e:
                # Good frames that came before the bad one are still served.
                self._broken = e
        self.gw.stats.frames_in += 1
        return self._frames.popleft()

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
        if gw.login_blocked(self.ip):
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
                gw.login_failed(self.ip)
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
                    gw.login_failed(self.ip)
                self.close("error", result.code or "internal", result.reason or "", rid=rid)
                return
            assert result.value is not None
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
            self._capacity.set()
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

