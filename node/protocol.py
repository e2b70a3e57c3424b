"""The client wire protocol, sans I/O: bytes in, frames out; frames in, bytes out.

A frame is a 4-byte big-endian length followed by that many bytes holding one
CBOR map with a text ``type`` key. docs/protocol.md specifies every frame type,
field and error code. ``FrameDecoder`` validates each received frame against
the schema of its direction and raises ``RemoteProtocolError`` (the peer broke
the protocol) with a wire error code; encoding a frame we may not send raises
``LocalProtocolError`` (our bug).

Shared by the node (Trio) and the client library (anyio); imports no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import cbor2

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 256 * 1024
PROTOCOL_VERSION = 1


class ProtocolError(Exception):
    """A protocol violation; ``code`` is the wire error code."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


# Field type specs: a tuple of accepted Python types. "ints" is a list of ints.
_S = (str,)
_I = (int,)
_B = (bytes,)
_F = (int, float)
_OPT_S = (str, type(None))
_OPT_F = (int, float, type(None))
_BODY = (str, bytes)
_ANY_SCALAR = (str, bytes, int, float, type(None))
INTS = "ints"

# type -> (required fields, optional fields)
Schema = dict[str, tuple[dict[str, Any], dict[str, Any]]]

CLIENT_FRAMES: Schema = {
    "login": ({"user": _S, "token": _S}, {"rid": _I, "status": _S, "text": _OPT_S}),
    "resume": ({"session": _S, "token": _S}, {"rid": _I, "last_seq": _I, "attempt": _I}),
    "presence": ({"rid": _I, "status": _S}, {"text": _OPT_S}),
    "allow": ({"rid": _I, "user": _S}, {}),
    "revoke": ({"rid": _I, "user": _S}, {}),
    "subscribe": ({"rid": _I, "user": _S}, {}),
    "unsubscribe": ({"rid": _I, "user": _S}, {}),
    "send": ({"rid": _I, "cmid": _I, "to": _S, "body": _BODY}, {}),
    "ack": ({"seqs": INTS}, {"rid": _I}),
    "ping": ({}, {"data": _ANY_SCALAR}),
    "bye": ({}, {}),
}

SERVER_FRAMES: Schema = {
    "login-ok": (
        {"session": _S, "resume": _S, "node": _S, "heartbeat": _F, "epoch": _I, "user": _S},
        {"rid": _I, "resumed": (bool,), "nodes": (list,)},
    ),
    "ok": ({"rid": _I}, {"id": (int, type(None)), "seq": _I, "visible": (bool,),
                         "duplicate": (bool,), "acked": _I}),
    "error": ({"code": _S, "reason": _S}, {"rid": _I}),
    "presence-event": ({"user": _S, "status": _S}, {"text": _OPT_S, "last_seen": _OPT_F}),
    "deliver": ({"seq": _I, "id": _I, "from": _S, "body": _BODY, "ts": _F}, {}),
    "pong": ({}, {"data": _ANY_SCALAR}),
    "bye": ({"code": _S, "reason": _S}, {"redirect": (list,)}),
}

ERROR_CODES = {
    "bad-frame": "the bytes are not a CBOR map with a text 'type' (the connection is closed)",
    "too-large": "the frame's length prefix is over the limit (the connection is closed)",
    "unknown-type": "no frame of this type exists (the connection is closed)",
    "bad-field": "a field is missing, unexpected or of the wrong type (the connection is closed)",
    "auth-failed": "the login token is wrong, forged or expired (the connection is closed)",
    "not-logged-in": "this frame needs a logged-in session (the connection is closed)",
    "already-logged-in": "a second login or resume on the same connection",
    "no-session": "the session does not exist: expired, ended or never existed",
    "bad-token": "the resume token does not match the session",
    "moved": "the session was resumed on another connection (this one is closed)",
    "stale": "a resume attempt numbered no higher than one already applied (it came late)",
    "invalid": "a value is out of range (bad status, bad user name, text too long)",
    "too-large-body": "the message body is over the limit",
    "unavailable": "the cluster could not commit in time; the outcome is unknown, retry",
    "limit": "a per-user limit is reached (sessions, allow list or subscriptions)",
    "mailbox-full": "the recipient has too many unacknowledged messages; retry later",
    "rate-limited": "too many frames, or too many failed logins from this address; slow down",
    "fenced": "this node cannot reach a majority; reconnect to another node",
    "overloaded": "the node is at its connection limit (the connection is closed)",
    "conflict": "a login's session id collides with an existing session; retry the login",
    "reconnect": "(bye) the node cannot vouch for the session any more: resume elsewhere",
    "logout": "(bye) the session ended at the client's request",
    "shutdown": "the node is shutting down; reconnect to another node",
    "timeout": "no frame within the heartbeat deadline (the connection is closed)",
    "internal": "a bug in the node; the request may be retried",
}

_REJECT_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260,
                261, 1004, 55799)


def _reject_tag(*_args: Any) -> Any:
    raise ValueError("CBOR tags are not allowed")


_SEMANTIC_REJECT = {t: _reject_tag for t in _REJECT_TAGS}


def _check_fields(frame: dict[str, Any], schema: Schema, err: type[ProtocolError]) -> None:
    ftype = frame.get("type")
    if not isinstance(ftype, str):
        raise err("bad-frame", "a frame is a CBOR map with a text 'type'")
    spec = schema.get(ftype)
    if spec is None:
        raise err("unknown-type", f"unknown frame type {ftype[:40]!r}")
    required, optional = spec
    for name, types in required.items():
        if name not in frame:
            raise err("bad-field", f"{ftype}: missing field {name!r}")
        _check_value(ftype, name, frame[name], types, err)
    for name, value in frame.items():
        if name == "type" or name in required:
            continue
        types = optional.get(name)
        if types is None:
            key = name[:40] if isinstance(name, str) else type(name).__name__
            raise err("bad-field", f"{ftype}: unexpected field {key!r}")
        _check_value(ftype, name, value, types, err)


def _check_value(ftype: str, name: str, value: Any, types: Any,
                 err: type[ProtocolError]) -> None:
    if types == INTS:
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return
        raise err("bad-field", f"{ftype}: field {name!r} must be an array of integers")
    if isinstance(value, bool) and bool not in types:
        raise err("bad-field", f"{ftype}: field {name!r} has the wrong type (bool)")
    if not isinstance(value, types):
        raise err("bad-field",
                  f"{ftype}: field {name!r} has the wrong type ({type(value).__name__})")


def encode(frame: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode one frame (no schema check; for frames built by our own code)."""
    payload = cbor2.dumps(frame)
    if len(payload) > max_frame:
        raise LocalProtocolError("too-large", f"frame of {len(payload)} bytes over {max_frame}")
    return HEADER.pack(len(payload)) + payload


def encode_checked(frame: dict[str, Any], schema: Schema,
                   max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode one frame after checking it against ``schema`` (LocalProtocolError if bad)."""
    _check_fields(frame, schema, LocalProtocolError)
    return encode(frame, max_frame)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, iterate ``frames()``.

    After a ``RemoteProtocolError`` the stream is unusable (framing is lost) and
    the decoder stays broken: the connection must be closed.
    """

    __slots__ = ("_broken", "_buf", "max_frame", "schema")

    def __init__(self, schema: Schema, max_frame: int = DEFAULT_MAX_FRAME):
        self.schema = schema
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken: RemoteProtocolError | None = None

    def feed(self, data: bytes | bytearray) -> None:
        if self._broken is None:
            self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def frames(self) -> Iterator[dict[str, Any]]:
        """Yield every complete frame buffered so far."""
        if self._broken is not None:
            raise self._broken
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (length,) = HEADER.unpack_from(buf, pos)
                if length > self.max_frame:
                    raise RemoteProtocolError(
                        "too-large", f"frame length {length} over the limit {self.max_frame}")
                if length == 0:
                    raise RemoteProtocolError("bad-frame", "empty frame")
                if len(buf) - pos - 4 < length:
                    break
                payload = bytes(buf[pos + 4: pos + 4 + length])
                pos += 4 + length
                yield self._decode(payload)
        except RemoteProtocolError as e:
            self._broken = e
            self._buf = bytearray()
            raise
        finally:
            if self._broken is None and pos:
                del buf[:pos]

    def _decode(self, payload: bytes) -> dict[str, Any]:
        try:
            frame = cbor2.loads(
                payload,
                tag_hook=_reject_tag,
                semantic_decoders=_SEMANTIC_REJECT,
                max_depth=8,
                strict_hashable_types=True,
            )
        except Exception as e:  # cbor2 raises many types on hostile input
            raise RemoteProtocolError("bad-frame", f"undecodable CBOR: {str(e)[:80]}") from None
        if not isinstance(frame, dict):
            raise RemoteProtocolError("bad-frame", "a frame is a CBOR map")
        _check_fields(frame, self.schema, RemoteProtocolError)
        return frame
