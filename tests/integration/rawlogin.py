"""A client that logs in and then says nothing, on a plain blocking socket: it
never resumes, so its session stays where it was when its node goes."""

from __future__ import annotations

import socket

from node.protocol import SERVER_FRAMES, FrameDecoder, encode


def raw_login(addr: str, user: str, token: str) -> socket.socket:
    """Log ``user`` in at ``addr`` (``host:port``); the open socket."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(encode({"type": "login", "user": user, "token": token}))
    dec = FrameDecoder(SERVER_FRAMES)
    while True:
        data = s.recv(65536)
        assert data
        dec.feed(data)
        frames = list(dec.frames())
        if frames:
            assert frames[0]["type"] == "login-ok", frames
            return s
