"""The channel between a node's core process and its gateway workers.

Frames are the client protocol's framing (4-byte big-endian length + one CBOR
map, ``node.protocol.HEADER``) with a short text ``t`` naming the frame, over a
Unix socket pair the core creates for each worker. Both ends are our own
processes, so frames are not checked against a schema; a malformed frame is a
bug and ends the channel.

Each side writes through ``Channel.send``, which appends to one ordered buffer
that a single writer task flushes: every frame queued during one pass of the
event loop goes out in one write, and frames leave in the order they were sent.
The frames are listed in docs/failover.md ("Gateway workers").
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import structlog
import trio

from .protocol import HEADER

log = structlog.get_logger("switchboard.ipc")

MAX_IPC_FRAME = 64 * 1024 * 1024
MAX_BUFFERED = 512 * 1024 * 1024  # queued to a peer that does not read: it is stuck


class ChannelBroken(Exception):
    """The peer went away, or sent something that is not a frame."""


def encode_ipc(frame: dict[str, Any]) -> bytes:
    payload = cbor2.dumps(frame)
    return HEADER.pack(len(payload)) + payload


class IpcDecoder:
    """Incremental decoder for IPC frames (no schema: both ends are ours)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> Iterator[dict[str, Any]]:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (length,) = HEADER.unpack_from(buf, pos)
                if length > MAX_IPC_FRAME:
                    raise ChannelBroken(f"IPC frame of {length} bytes")
                if len(buf) - pos - 4 < length:
                    break
                frame = cbor2.loads(bytes(buf[pos + 4: pos + 4 + length]))
                pos += 4 + length
                if not isinstance(frame, dict):
                    raise ChannelBroken("an IPC frame is a CBOR map")
                yield frame
        finally:
            if pos:
                del buf[:pos]


async def write_all(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data`` on the non-blocking ``sock``, waiting in Trio only while
    the socket is full. Unlike ``SocketStream.send_all`` it does not end with a
    checkpoint: a write the socket takes at once costs its task no extra step."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


class Channel:
    """One end of an IPC socket: ordered, coalescing sends and a frame reader."""

    def __init__(self, sock: socket.socket, name: str):
        sock.setblocking(False)
        self._sock = sock
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.name = name
        self._out: list[bytes] = []
        self.out_bytes = 0
        self._wake = trio.Event()
        self._sending = False  # the writer task is inside send_all
        self._decoder = IpcDecoder()
        self._handle: Callable[[dict[str, Any]], None] | None = None
        self._batch: Callable[[bool], None] | None = None
        self._handling = False
        self.closed = False

    def send(self, frame: dict[str, Any], now: bool = False) -> None:
        """Queue one frame (never blocks; frames leave in this order). With ``now``,
        write it (and whatever is queued) before returning if the socket takes it,
        instead of at the writer's next turn: for frames that must reach the peer
        before anything this process writes elsewhere afterwards."""
        if self.closed:
            return
        data = encode_ipc(frame)
        self._out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > MAX_BUFFERED:
            log.error("IPC peer does not read; closing the channel", peer=self.name,
                      queued=self.out_bytes)
            self.close()
            return
        if now and not self._sending:
            data = b"".join(self._out)
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            self._out = [data[sent:]] if sent < len(data) else []
            self.out_bytes = len(data) - sent
            if not self._out:
                return
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._out.clear()
        self._wake.set()
        try:
            self.stream.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    async def writer(self) -> None:
        """Flush queued frames until the channel closes; returns on a broken peer.

        It writes on the socket itself rather than through ``send_all``, whose
        final checkpoint costs a pass of the event loop per flush; it waits in
        Trio only when the socket is full."""
        sock = self._sock
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._out and not self.closed:
                    data = b"".join(self._out)
                    self._out = []
                    self.out_bytes = 0
                    self._sending = True
                    try:
                        await write_all(sock, data)
                    finally:
                        self._sending = False
        except (trio.ClosedResourceError, OSError):
            self.closed = True

    async def reader(self, handle: Callable[[dict[str, Any]], None],
                     batch: Callable[[bool], None] | None = None) -> None:
        """Call ``handle`` for each frame, in order, until the peer closes; and
        ``batch(True)``/``batch(False)`` around the frames of each read."""
        self._handle = handle
        self._batch = batch
        try:
            while True:
                data = await self.stream.receive_some(1 << 20)
                if not data:
                    return
                self._feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        except (ChannelBroken, cbor2.CBORDecodeError) as e:
            log.error("bad IPC frame; closing the channel", peer=self.name, error=str(e))
            return
        finally:
            self.closed = True

    def _feed(self, data: bytes) -> None:
        assert self._handle is not None
        self._decoder.feed(data)
        self._handling = True
        if self._batch is not None:
            self._batch(True)
        try:
            for frame in self._decoder.frames():
                self._handle(frame)
        finally:
            self._handling = False
            if self._batch is not None:
                self._batch(False)

    def poll(self) -> None:
        """Handle, now, the frames the peer has already sent (without waiting). A
        process reading several channels uses it to see, before acting on one
        channel's frame, what the other peers sent before it."""
        if self._handling or self._handle is None or self.closed:
            return
        try:
            while True:
                try:
                    data = self._sock.recv(1 << 20)
                except BlockingIOError:
                    return
                if not data:
                    return  # end of file stays readable: the reader task sees it too
                self._feed(data)
        except (OSError, ChannelBroken, cbor2.CBORDecodeError) as e:
            log.error("IPC channel broken", peer=self.name, error=str(e))
            self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    async def aclose(self) -> None:
        self.closed = True
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


def poll_all(channels: list[Channel]) -> None:
    """``poll()`` each of ``channels`` that has data waiting: one ``select`` call
    finds them, instead of a failing ``recv`` on every idle channel."""
    live = [c for c in channels if not c.closed]  # poll() checks the rest itself
    if not live:
        return
    try:
        ready, _, _ = select.select(live, [], [], 0)
    except (OSError, ValueError):  # a socket closed meanwhile: poll them one by one
        ready = live
    for c in ready:
        c.poll()
