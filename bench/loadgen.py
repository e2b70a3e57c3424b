"""A lean raw-protocol load generator: Trio sockets and the ``node.protocol`` codec.

The client library (``client.session``) is built for one application session:
anyio streams, a task group, a pinger and an events queue per session. On this
2-core machine that costs as much CPU as the nodes themselves, so the benches
generate load with this module instead: one ``RawConn`` per connection, a
reader task each, many connections in one nursery, requests pipelined and
matched to their replies by ``rid``. Frames are written on the socket at once
(those queued while the connection's own replies are being handled go out
together after them); a writer task takes over only when the socket is full,
so a request costs no task step of its own. No reconnects, no resume,
no retries: a bench connection that fails is counted, not repaired.

Time stamps are ``time.perf_counter()`` of this process; a reply is stamped
when the chunk carrying it was received.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from node.ipc import write_all
from node.protocol import SERVER_FRAMES, FrameDecoder, RemoteProtocolError, encode

CLIENT_NAME = "bench.loadgen (raw protocol: trio sockets + node.protocol codec)"

ReplyHook = Callable[["RawConn", str, float, dict[str, Any], float], None]
"""(conn, kind, t_sent, frame, t_received) for each ``ok``/``error`` reply."""
DeliverHook = Callable[["RawConn", dict[str, Any], float], None]
"""(conn, deliver frame, t_received) for each ``deliver``."""
PresenceHook = Callable[["RawConn", dict[str, Any], float], None]
"""(conn, presence-event frame, t_received) for each ``presence-event``."""

TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
STAMP = struct.Struct("<dI")  # (send time, sender index) at the head of a message body
IP_BIND_ADDRESS_NO_PORT = 24  # Linux
SO_TIMESTAMPNS = 35  # Linux: kernel receive time stamps (SCM_TIMESTAMPNS has the same value)
_TIMESPEC = struct.Struct("@qq")


def _kernel_stamp(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """CLOCK_REALTIME seconds from an SCM_TIMESTAMPNS control message, if any."""
    for level, kind, data in ancdata:
        if level == trio.socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec + nsec / 1e9
    return None


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def stamp_body(t: float, sender: int, size: int) -> bytes:
    head = STAMP.pack(t, sender)
    return head + b"x" * max(0, size - len(head))


def read_stamp(body: bytes | str) -> tuple[float, int] | None:
    if isinstance(body, bytes) and len(body) >= STAMP.size:
        t, sender = STAMP.unpack_from(body)
        return float(t), int(sender)
    return None


@dataclass
class Counters:
    """Failures across a group of connections (anything here is worth reporting)."""

    errors: dict[str, int] = field(default_factory=dict)  # error code -> replies
    closed_early: int = 0  # logged-in connections the node closed (or reset) while in use
    byes: dict[str, int] = field(default_factory=dict)  # bye code -> count (unexpected ones)
    protocol_errors: int = 0
    login_failures: dict[str, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"errors": self.errors, "closed_early": self.closed_early, "byes": self.byes,
                "protocol_errors": self.protocol_errors,
                "login_failures": self.login_failures}

    def any(self) -> bool:
        return bool(self.errors or self.closed_early or self.byes or self.protocol_errors
                    or self.login_failures)


def _no_reply(_c: RawConn, _k: str, _t: float, _f: dict[str, Any], _n: float) -> None:
    pass


def _no_deliver(_c: RawConn, _f: dict[str, Any], _n: float) -> None:
    pass


def _no_presence(_c: RawConn, _f: dict[str, Any], _n: float) -> None:
    pass


class RawConn:
    """One client connection speaking the wire protocol directly."""

    def __init__(self, addr: str, user: str, token: str, counters: Counters,
                 index: int = 0):
        self.addr = addr
        self.user = user
        self.token = token
        self.index = index
        self.counters = counters
        self.on_reply: ReplyHook = _no_reply
        self.on_deliver: DeliverHook = _no_deliver
        self.on_presence: PresenceHook = _no_presence
        self.stream: trio.SocketStream | None = None
        self.decoder = FrameDecoder(SERVER_FRAMES)
        self.pending: dict[int, tuple[str, float]] = {}
        self.next_rid = 1
        self.next_cmid = 1
        self.session: str | None = None
        self.node: str | None = None
        self.logged_in = trio.Event()
        self.login_error: str | None = None
        self.t_connect = 0.0
        self.t_login_ok = 0.0
        self.closed = trio.Event()
        self.closing = False  # we said bye: a bye or EOF from the node is expected
        self.dropped = False  # the node closed (or reset) the connection while in use
        self.bye_code: str | None = None
        self.last_tx = 0.0
        # With kernel_stamps (set before connect), each read also records when the
        # kernel received its data (rx_kernel, CLOCK_REALTIME): a busy load
        # generator then cannot inflate a measured delivery time.
        self.kernel_stamps = False
        self.rx_kernel: float | None = None
        # A local (source) address to bind before connecting: one source address
        # gives at most ~28k connections to one server address (ephemeral ports).
        self.source: str | None = None
        self._sock: socket.socket | None = None
        self._out: list[bytes] = []
        self._corked = False  # handling frames of one read: their requests go out after
        self._writing = False  # the writer task holds unsent bytes (the socket was full)
        self._wake = trio.Event()

    # --- setting up -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the TCP connection (raises OSError)."""
        self.t_connect = time.perf_counter()
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            if self.kernel_stamps:
                sock.setsockopt(trio.socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if self.source is not None:
                # Without this, bind() picks the port itself and searches the whole
                # port range for each of many thousands of sockets (kernel time
                # grows with the count); with it the port is chosen at connect().
                sock.setsockopt(trio.socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                await sock.bind((self.source, 0))
            await sock.connect(_split(self.addr))
        except BaseException:
            sock.close()
            raise
        self._sock = raw
        self.stream = trio.SocketStream(sock)

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._reader)
        nursery.start_soon(self._writer)

    def send_login(self, status: str = "online") -> None:
        self.post({"type": "login", "user": self.user, "token": self.token, "status": status})

    # --- writing ------------------------------------------------------------------------------

    def post(self, frame: dict[str, Any]) -> None:
        """Send a frame that expects no reply matched by rid."""
        self._emit(encode(frame))

    def request(self, frame: dict[str, Any], kind: str, t0: float | None = None) -> int:
        """Send a request; its reply goes to ``on_reply`` with ``kind`` and ``t0``."""
        rid = self.next_rid
        self.next_rid += 1
        frame["rid"] = rid
        self.pending[rid] = (kind, time.perf_counter() if t0 is None else t0)
        self._emit(encode(frame))
        return rid

    def send_message(self, to: str, body: bytes, t0: float | None = None) -> int:
        cmid = self.next_cmid
        self.next_cmid += 1
        return self.request({"type": "send", "cmid": cmid, "to": to, "body": body}, "send", t0)

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        if not self._corked and not self._writing:
            self._flush()

    def _flush(self) -> None:
        """Write what is queued on the socket now; the writer task gets the rest."""
        if not self._out or self._sock is None or self.closed.is_set():
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost()
            return
        self.last_tx = time.perf_counter()
        if sent < len(data):
            self._out.append(data[sent:])
            self._writing = True  # until the writer task has sent it
            self._wake.set()

    async def _writer(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self.closed.is_set():
                await self._wake.wait()
                self._wake = trio.Event()
                while self._out and not self.closed.is_set():
                    self._writing = True
                    data = b"".join(self._out)
                    self._out = []
                    await write_all(sock, data)
                    self.last_tx = time.perf_counter()
                self._writing = False
        except (trio.ClosedResourceError, OSError):
            self._lost()

    # --- reading -------------------------------------------------------------------------------

    async def _reader(self) -> None:
        stream = self.stream
        assert stream is not None
        decoder = self.decoder
        pending = self.pending
        try:
            while True:
                if self.kernel_stamps:
                    data, anc, _flags, _addr = await stream.socket.recvmsg(262144, 256)
                    self.rx_kernel = _kernel_stamp(anc)
                else:
                    data = await stream.receive_some(262144)
                if not data:
                    break
                now = time.perf_counter()
                decoder.feed(data)
                self._corked = True
                try:
                    self._handle(decoder, pending, now)
                finally:
                    self._corked = False
                if self._out and not self._writing:
                    self._flush()
        except RemoteProtocolError:
            self.counters.protocol_errors += 1
        except TRANSPORT_ERRORS:
            pass
        self._lost()

    def _handle(self, decoder: FrameDecoder, pending: dict[int, tuple[str, float]],
                now: float) -> None:
        for f in decoder.frames():
            t = f["type"]
            if t == "deliver":
                self.on_deliver(self, f, now)
            elif t == "ok" or t == "error":
                rid = f.get("rid")
                p = pending.pop(rid, None) if rid is not None else None
                if t == "error":
                    self.counters.error(f["code"])
                    if not self.logged_in.is_set():
                        self.login_error = f["code"]
                        self.logged_in.set()
                if p is not None:
                    self.on_reply(self, p[0], p[1], f, now)
            elif t == "login-ok":
                self.session = f["session"]
                self.node = f["node"]
                self.t_login_ok = now
                self.logged_in.set()
            elif t == "presence-event":
                self.on_presence(self, f, now)
            elif t == "bye":
                self.bye_code = f["code"]
                if not self.closing:
                    self.counters.byes[f["code"]] = self.counters.byes.get(f["code"], 0) + 1
            # pong: nothing to do

    def _lost(self) -> None:
        if self.closed.is_set():
            return
        if not self.closing and self.session is not None:
            self.dropped = True
            self.counters.closed_early += 1
        if not self.logged_in.is_set():
            self.login_error = self.login_error or "closed"
            self.logged_in.set()
        self.closed.set()
        self._wake.set()

    # --- tearing down -------------------------------------------------------------------------

    async def logout(self, timeout: float = 5.0) -> None:
        """Say bye (the node logs the session out) and wait for the close."""
        if self.closed.is_set() or self.stream is None:
            return
        self.closing = True
        self.post({"type": "bye"})
        with trio.move_on_after(timeout):
            await self.closed.wait()
        await self.aclose()

    async def aclose(self) -> None:
        self.closing = True
        if self.stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await self.stream.aclose()
                except TRANSPORT_ERRORS:
                    pass
        self.closed.set()
        self._wake.set()


# --- groups of connections ---------------------------------------------------------------------


async def open_and_login(nursery: trio.Nursery, conn: RawConn, timeout: float = 20.0) -> bool:
    """Connect, start the connection's tasks in ``nursery`` and log in.

    Returns True on login-ok; False (counted in ``conn.counters``) otherwise.
    """
    try:
        with trio.fail_after(timeout):
            await conn.connect()
            conn.start(nursery)
            conn.send_login()
            await conn.logged_in.wait()
    except (TimeoutError, *TRANSPORT_ERRORS) as e:
        code = "timeout" if isinstance(e, TimeoutError) else "connect-failed"
        conn.counters.login_failures[code] = conn.counters.login_failures.get(code, 0) + 1
        await conn.aclose()
        return False
    if conn.login_error is not None or conn.session is None:
        code = conn.login_error or "no-session"
        conn.counters.login_failures[code] = conn.counters.login_failures.get(code, 0) + 1
        await conn.aclose()
        return False
    return True


async def login_all(nursery: trio.Nursery, conns: Sequence[RawConn], concurrency: int,
                    timeout: float = 30.0) -> list[RawConn]:
    """Log in every connection, at most ``concurrency`` at a time; the ones that made it."""
    limit = trio.CapacityLimiter(max(1, concurrency))
    ok: list[RawConn] = []

    async def one(c: RawConn) -> None:
        async with limit:
            if await open_and_login(nursery, c, timeout):
                ok.append(c)

    async with trio.open_nursery() as inner:
        for c in conns:
            inner.start_soon(one, c)
    return ok


async def logout_all(conns: Sequence[RawConn], timeout: float = 10.0) -> None:
    async with trio.open_nursery() as n:
        for c in conns:
            n.start_soon(c.logout, timeout)


async def keepalive(conns: Sequence[RawConn], every: float = 4.0) -> None:
    """Ping connections that have written nothing for ``every`` seconds (the nodes
    close a connection silent for 2.5 client heartbeats)."""
    while True:
        await trio.sleep(every)
        now = time.perf_counter()
        for c in conns:
            if not c.closed.is_set() and now - c.last_tx >= every:
                c.post({"type": "ping"})


def spread(addresses: Sequence[str], i: int) -> str:
    """Client ``i``'s node: round-robin over the cluster."""
    return addresses[i % len(addresses)]
