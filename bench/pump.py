"""Message load from one epoll loop: the senders and recipients of ``bench core`` (c).

Driven by ``loadgen.RawConn`` (Trio, a reader task per connection, a pacer and
an ack flusher task) the load generator took 0.30-0.33 cores at 5,000 messages/s
(60-66 µs per message; ``bench core`` runs on 2026-11-27), on a 2-core machine whose
every core the three nodes and their workers need at that rate. Here one thread
drives every connection with non-blocking calls on one ``select.epoll``, as
``bench.burst`` does for logins, which hands its logged-in connections over.

It speaks the same protocol with the same codec (``node.protocol``): ``send``
requests matched to their ``ok``/``error`` by ``rid``, ``deliver`` frames read and
acknowledged in batches (``ack``), a ``ping`` on a connection silent for a while.
Load is open loop at an offered rate (latency counted from each send's
scheduled time, so a late load generator cannot hide queueing) or closed loop
(a window of sends in flight per sender, the next sent on each reply).

Blocking: call ``run`` from a thread (``trio.to_thread``). Time stamps are
``time.perf_counter()`` of this process; a frame is stamped when the chunk
carrying it was read.
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from node.protocol import FrameDecoder, RemoteProtocolError, encode

from .burst import BurstConn
from .loadgen import Counters, read_stamp, stamp_body

CLIENT_NAME = "bench.pump (raw protocol: one epoll loop + node.protocol codec)"

_IN = select.EPOLLIN
_INOUT = select.EPOLLIN | select.EPOLLOUT
_PING = encode({"type": "ping"})


@dataclass
class PumpStats:
    """What a pump run saw; latencies in seconds, only for sends scheduled inside
    the measuring window (deliveries counted per second: read inside it)."""

    sent: int = 0
    committed: int = 0
    shed: int = 0  # open loop: not sent, the sender had too many in flight
    delivered: int = 0
    delivered_in_window: int = 0
    duplicates: int = 0
    e2e: list[float] = field(default_factory=list)
    commit: list[float] = field(default_factory=list)
    slow: list[tuple[float, float]] = field(default_factory=list)  # (send time, e2e s)
    seen: set[int] = field(default_factory=set)
    committed_ids: dict[int, set[int]] = field(default_factory=dict)  # pair -> message ids
    failures: Counters = field(default_factory=Counters)  # error replies, byes, closes
    dropped: set[int] = field(default_factory=set)  # pairs whose recipient was closed

    def undelivered(self, dropped: bool) -> int:
        """Committed messages never delivered, to recipients that stayed connected
        (``dropped`` False: missing) or whose connection went (True: stranded)."""
        return sum(len(ids - self.seen) for i, ids in self.committed_ids.items()
                   if (i in self.dropped) == dropped)


class _Conn:
    """A logged-in connection as the pump drives it."""

    __slots__ = ("acks", "closed", "cmid", "decoder", "index", "last_tx", "out", "pending", "rid",
                 "sender", "sock", "to")

    def __init__(self, c: BurstConn, index: int, sender: bool, to: str = ""):
        assert c.sock is not None
        self.sock: socket.socket = c.sock
        self.decoder: FrameDecoder = c.decoder  # may hold frames read with the login's answer
        self.index = index
        self.sender = sender
        self.to = to  # a sender's recipient
        self.out = b""  # what the socket did not take yet
        self.pending: dict[int, float] = {}  # rid -> scheduled send time
        self.rid = 1
        # A user's send is identified by its cmid among the user's recent sends (a
        # repeat is a retry: answered, not applied again), so cmids must not repeat
        # across pumps that log in the same users: a random 30-bit prefix, as the
        # client library does.
        self.cmid = (random.getrandbits(30) << 24) + 1
        self.acks: list[int] = []
        self.last_tx = time.perf_counter()
        self.closed = False


class MessagePump:
    """Senders each paired with one recipient (``senders[i]`` sends to ``recipients[i]``)."""

    def __init__(self, senders: Sequence[BurstConn], recipients: Sequence[BurstConn],
                 body_size: int = 100, ack_batch: int = 128, ack_every: float = 0.05,
                 ping_every: float = 4.0, max_inflight: int = 2000, slow: float = 0.1):
        assert len(senders) == len(recipients)
        self.senders = [_Conn(s, i, True, r.user)
                        for i, (s, r) in enumerate(zip(senders, recipients, strict=True))]
        self.recipients = [_Conn(r, i, False) for i, r in enumerate(recipients)]
        self.body_size = body_size
        self.ack_batch = ack_batch
        self.ack_every = ack_every
        self.ping_every = ping_every
        self.max_inflight = max_inflight
        self.slow = slow
        self.stats = PumpStats()
        self._ep: select.epoll | None = None
        self._window = (0.0, 0.0)
        self._sending = True
        self._closed_loop = False  # the next send goes out on each reply

    def run(self, *, rate: float | None, window: int, measure_from: float,
            measure_to: float, drain: float = 5.0, linger: float = 0.2) -> None:
        """Send until ``measure_to`` (``perf_counter``) at ``rate`` per second spread
        round-robin over the senders, or with ``window`` sends in flight per sender
        (``rate`` None); then wait up to ``drain`` seconds for every reply and every
        committed message's delivery, and ``linger`` more for a wrong duplicate."""
        self._window = (measure_from, measure_to)
        self._closed_loop = rate is None
        conns = [*self.senders, *self.recipients]
        ep = self._ep = select.epoll()
        by_fd = {c.sock.fileno(): c for c in conns}
        try:
            for c in conns:
                ep.register(c.sock.fileno(), _IN)
            now = time.perf_counter()
            for c in conns:  # frames that came with a login's answer
                self._handle(c, now)
            if rate is None:
                for s in self.senders:
                    for _ in range(window):
                        self._send(s, time.perf_counter())
            interval = 1.0 / rate if rate else 0.0
            nxt = time.perf_counter()
            k = 0
            next_ack = nxt + self.ack_every
            next_ping = nxt + 1.0
            end = measure_to + drain
            while True:
                now = time.perf_counter()
                if self._sending and now >= measure_to:
                    self._sending = False
                if not self._sending and (now >= end or self._drained()):
                    break
                wake = min(next_ack, next_ping, end)
                if self._sending and rate:
                    wake = min(wake, nxt)
                self._poll(by_fd, max(0.0, wake - now))
                now = time.perf_counter()
                if self._sending and rate:
                    senders = self.senders
                    while nxt <= now:
                        s = senders[k % len(senders)]
                        k += 1
                        if s.closed:
                            pass
                        elif len(s.pending) >= self.max_inflight:
                            self.stats.shed += 1
                        else:
                            self._send(s, nxt)
                        nxt += interval
                if now >= next_ack:
                    next_ack = now + self.ack_every
                    for r in self.recipients:
                        self._flush_acks(r)
                if now >= next_ping:
                    next_ping = now + 1.0
                    for c in conns:
                        if not c.closed and now - c.last_tx >= self.ping_every:
                            self._write(c, _PING)
            for r in self.recipients:  # acknowledge the last deliveries, as a client would
                self._flush_acks(r)
            linger_end = time.perf_counter() + linger
            while (left := linger_end - time.perf_counter()) > 0:
                self._poll(by_fd, left)
        finally:
            for c in conns:
                if not c.closed:
                    try:
                        ep.unregister(c.sock.fileno())
                    except OSError:
                        pass
            ep.close()
            self._ep = None

    def _poll(self, by_fd: dict[int, _Conn], timeout: float) -> None:
        """Wait up to ``timeout`` s for socket events and handle them."""
        assert self._ep is not None
        for fd, _mask in self._ep.poll(timeout, 1024):
            conn = by_fd.get(fd)
            if conn is not None and not conn.closed:
                self._event(conn)

    def _drained(self) -> bool:
        st = self.stats
        return (not any(s.pending for s in self.senders if not s.closed)
                and st.delivered >= st.committed - st.undelivered(dropped=True))

    # --- writing ---------------------------------------------------------------------------

    def _send(self, s: _Conn, t0: float) -> None:
        rid = s.rid
        s.rid += 1
        cmid = s.cmid
        s.cmid += 1
        s.pending[rid] = t0
        self.stats.sent += 1
        self._write(s, encode({"type": "send", "rid": rid, "cmid": cmid, "to": s.to,
                               "body": stamp_body(t0, s.index, self.body_size)}))

    def _flush_acks(self, r: _Conn) -> None:
        if r.acks and not r.closed:
            self._write(r, encode({"type": "ack", "seqs": r.acks}))
            r.acks = []

    def _write(self, c: _Conn, data: bytes) -> None:
        if c.closed:
            return
        c.last_tx = time.perf_counter()
        if c.out:  # the socket is full: EPOLLOUT will send the rest, in order
            c.out += data
            return
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost(c)
            return
        if sent < len(data):
            c.out = data[sent:]
            assert self._ep is not None
            self._ep.modify(c.sock.fileno(), _INOUT)

    # --- reading ---------------------------------------------------------------------------

    def _event(self, c: _Conn) -> None:
        if c.out:
            try:
                sent = c.sock.send(c.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost(c)
                return
            c.out = c.out[sent:]
            if not c.out:
                assert self._ep is not None
                self._ep.modify(c.sock.fileno(), _IN)
        try:
            data = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(c)
            return
        c.decoder.feed(data)
        self._handle(c, time.perf_counter())

    def _handle(self, c: _Conn, now: float) -> None:
        st = self.stats
        lo, hi = self._window
        try:
            for f in c.decoder.frames():
                t = f["type"]
                if t == "deliver":
                    mid = f["id"]
                    if mid in st.seen:
                        st.duplicates += 1
                    else:
                        st.seen.add(mid)
                        st.delivered += 1
                        stamp = read_stamp(f["body"])
                        if stamp is not None and lo <= stamp[0] < hi:
                            e2e = now - stamp[0]
                            st.e2e.append(e2e)
                            if e2e >= self.slow:
                                st.slow.append((stamp[0], e2e))
                        if lo <= now < hi:
                            st.delivered_in_window += 1
                    c.acks.append(f["seq"])
                    if len(c.acks) >= self.ack_batch:
                        self._flush_acks(c)
                elif t == "ok" or t == "error":
                    rid = f.get("rid")
                    t0 = c.pending.pop(rid, None) if rid is not None else None
                    if t == "error":
                        st.failures.error(f["code"])
                    elif t0 is not None:
                        st.committed += 1
                        mid = f.get("id")
                        if mid is not None:
                            st.committed_ids.setdefault(c.index, set()).add(int(mid))
                        if lo <= t0 < hi:
                            st.commit.append(now - t0)
                    if t0 is not None and self._sending and c.sender and self._closed_loop:
                        self._send(c, time.perf_counter())
                elif t == "bye":
                    st.failures.byes[f["code"]] = st.failures.byes.get(f["code"], 0) + 1
                # pong, presence-event: nothing to do
        except RemoteProtocolError:
            st.failures.protocol_errors += 1
            self._lost(c)

    def _lost(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        self.stats.failures.closed_early += 1
        if not c.sender:
            self.stats.dropped.add(c.index)
        if self._ep is not None:
            try:
                self._ep.unregister(c.sock.fileno())
            except OSError:
                pass
