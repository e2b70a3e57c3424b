"""Login bursts: many connections logged in at once by one epoll loop.

``bench core``'s logins phase measures how fast a node accepts and logs in
clients. Driven by ``loadgen.RawConn`` (Trio, a reader and a writer task per
connection) the load generator spent about as much CPU per login as the three
nodes together (scratch runs on 2026-11-27: 450-520 µs of the bench process per
login and logout, against 640 µs for the nodes and their workers), and on a
2-core machine that CPU is taken from the node under test. Here one thread
drives every socket with non-blocking calls on one ``select.epoll``: no task,
no event and no cancel scope per connection. It speaks the same protocol
(``node.protocol``'s codec): a ``login`` frame out, ``login-ok`` or ``error``
back; ``logout`` says ``bye`` and waits for the node to close.

Blocking: call ``login`` and ``logout`` from a thread (``trio.to_thread``).
Time stamps are ``time.perf_counter()`` of this process.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from node.protocol import SERVER_FRAMES, FrameDecoder, RemoteProtocolError, encode

CLIENT_NAME = "bench.burst (raw protocol: one epoll loop + node.protocol codec)"

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BYE = encode({"type": "bye"})


@dataclass
class BurstConn:
    """One connection of a burst, and what became of its login."""

    addr: tuple[str, int]
    user: str
    token: str
    sock: socket.socket | None = None
    out: bytes = b""  # still to send
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(SERVER_FRAMES))
    t_connect: float = 0.0
    t_login_ok: float = 0.0
    session: str | None = None
    node: str | None = None
    error: str | None = None  # why the login failed (an error code, "timeout", ...)
    closed: bool = False  # the node closed the connection (after bye: as asked)

    @property
    def ok(self) -> bool:
        return self.session is not None and self.error is None


def _split(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class LoginBurst:
    """Log in one connection per ``(address, user, token)``, all at once."""

    def __init__(self, targets: Sequence[tuple[str, str, str]]):
        self.conns = [BurstConn(_split(a), u, t) for a, u, t in targets]

    @property
    def ok(self) -> list[BurstConn]:
        return [c for c in self.conns if c.ok]

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.conns:
            if c.error is not None:
                out[c.error] = out.get(c.error, 0) + 1
        return out

    def login(self, timeout: float = 30.0) -> None:
        """Connect every connection, send its login, and wait for each answer (or
        ``timeout``; the ones still waiting fail with "timeout" and are closed)."""
        ep = select.epoll()
        by_fd: dict[int, BurstConn] = {}
        try:
            for c in self.conns:
                self._connect(c, ep, by_fd)
            deadline = time.monotonic() + timeout
            while by_fd:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for fd, mask in ep.poll(min(left, 1.0), 1024):
                    conn = by_fd.get(fd)
                    if conn is not None and not self._step(conn, mask, ep):
                        del by_fd[fd]
                        if conn.sock is not None:  # a closed socket has left the epoll set
                            ep.unregister(fd)
            for c in by_fd.values():
                c.error = "timeout"
                self._drop(c)
        finally:
            ep.close()

    def _connect(self, c: BurstConn, ep: select.epoll, by_fd: dict[int, BurstConn]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock = s
        c.out = encode({"type": "login", "user": c.user, "token": c.token,
                        "status": "online"})
        c.t_connect = time.perf_counter()
        err = s.connect_ex(c.addr)
        if err not in (0, errno.EINPROGRESS):
            c.error = "connect-failed"
            self._drop(c)
            return
        by_fd[s.fileno()] = c
        ep.register(s.fileno(), _OUT)

    def _step(self, c: BurstConn, mask: int, ep: select.epoll) -> bool:
        """Advance ``c`` on an epoll event; False once its login is decided."""
        s = c.sock
        assert s is not None
        if c.out:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                c.error = "connect-failed"
                self._drop(c)
                return False
            try:
                sent = s.send(c.out)
            except BlockingIOError:
                return True
            except OSError:
                c.error = "connect-failed"
                self._drop(c)
                return False
            c.out = c.out[sent:]
            if not c.out:
                ep.modify(s.fileno(), _IN)
            return True
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            c.error = "closed"
            self._drop(c)
            return False
        now = time.perf_counter()
        c.decoder.feed(data)
        try:
            for f in c.decoder.frames():
                t = f["type"]
                if t == "login-ok":
                    c.session, c.node, c.t_login_ok = f["session"], f["node"], now
                    return False
                if t == "error":
                    c.error = f["code"]
                elif t == "bye":
                    c.error = c.error or f"bye:{f['code']}"
                if c.error is not None:
                    self._drop(c)
                    return False
        except RemoteProtocolError:
            c.error = "protocol-error"
            self._drop(c)
            return False
        return True

    def logout(self, timeout: float = 15.0) -> None:
        """Say bye on every logged-in connection, wait until the node closes each
        (or ``timeout``), then close them all."""
        ep = select.epoll()
        by_fd: dict[int, BurstConn] = {}
        try:
            for c in self.ok:
                assert c.sock is not None
                try:
                    c.sock.send(_BYE)
                except OSError:
                    continue
                by_fd[c.sock.fileno()] = c
                ep.register(c.sock.fileno(), _IN)
            deadline = time.monotonic() + timeout
            while by_fd and (left := deadline - time.monotonic()) > 0:
                for fd, _mask in ep.poll(min(left, 1.0), 1024):
                    c = by_fd[fd]
                    assert c.sock is not None
                    try:
                        data = c.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:  # frames before the close (its bye) need no reading
                        c.closed = True
                        ep.unregister(fd)
                        del by_fd[fd]
        finally:
            ep.close()
            self.close()

    def close(self) -> None:
        for c in self.conns:
            self._drop(c)

    @staticmethod
    def _drop(c: BurstConn) -> None:
        if c.sock is not None:
            c.sock.close()
            c.sock = None
