"""Reading what a gateway wrote to the client end of a socket pair, in tests."""

from __future__ import annotations

import socket
import struct
from typing import Any

import cbor2


def read_frames(sock: socket.socket) -> list[dict[str, Any]]:
    """Every whole frame waiting on ``sock`` now (it is made non-blocking)."""
    data = b""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(cbor2.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out
