"""A small blocking client for the nodes' admin channel (used by the CLI and tests)."""

from __future__ import annotations

import socket
from typing import Any

from node.admin import ADMIN_REPLIES, issue_admin_token
from node.auth import Keys
from node.config import parse_addr
from node.protocol import FrameDecoder, ProtocolError, encode


class AdminCallError(Exception):
    """The admin request failed; ``code`` says why (``unreachable``, ``auth-failed``...)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def admin_call(addr: str, keys: Keys, cmd: str, args: dict[str, Any] | None = None,
               timeout: float = 5.0) -> dict[str, Any]:
    """Send one admin request to ``addr`` (host:port) and return its result."""
    host, port = parse_addr(addr, "admin address")
    frame: dict[str, Any] = {"type": "admin", "token": issue_admin_token(keys, cmd),
                             "cmd": cmd}
    if args:
        frame["args"] = args
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(encode(frame))
            decoder = FrameDecoder(ADMIN_REPLIES, 16 * 1024 * 1024)
            while True:
                data = sock.recv(65536)
                if not data:
                    raise AdminCallError("unreachable", f"{addr} closed the connection")
                decoder.feed(data)
                for reply in decoder.frames():
                    if reply["type"] == "error":
                        raise AdminCallError(reply["code"], reply["reason"])
                    return dict(reply["result"])
    except ProtocolError as e:
        raise AdminCallError("bad-reply", f"{addr}: {e.reason}") from None
    except TimeoutError:
        raise AdminCallError("unreachable", f"{addr}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise AdminCallError("unreachable", f"{addr}: {e.strerror or e}") from None
