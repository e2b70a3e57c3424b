"""The admin channel: authenticated requests from operators and tooling.

Framing is the client protocol's (4-byte length + CBOR map). A request is
``{"type": "admin", "token": JWT, "cmd": name, "args": {...}}``; the token is an
HS256 JWT with ``sub`` = ``admin`` signed with the admin key derived from the
cluster secret. The answer is ``{"type": "admin-ok", "result": {...}}`` or an
``error`` frame. One request per connection.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import structlog
import trio

from replication.commands import Checkpoint, Join, Leave
from replication.raft import DIGEST_DEADLINE

from .auth import Keys
from .config import NodeConfig, format_addr
from .core import Core
from .interfaces import GatewayLike
from .protocol import FrameDecoder, RemoteProtocolError, Schema, encode

log = structlog.get_logger("switchboard.admin")

_S = (str,)
ADMIN_FRAMES: Schema = {"admin": ({"token": _S, "cmd": _S}, {"args": (dict,)})}
ADMIN_REPLIES: Schema = {
    "admin-ok": ({"result": (dict,)}, {}),
    "error": ({"code": _S, "reason": _S}, {"rid": (int,)}),
}

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AdminError(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def issue_admin_token(keys: Keys, cmd: str, ttl: float = 30.0) -> str:
    """A single-use token for one admin command: ``jti`` is a nonce the node
    remembers, ``cmd`` binds it to the command, so a captured request cannot be
    replayed or turned into another command."""
    now = time.time()
    return jwt.encode({"sub": "admin", "cmd": cmd, "jti": secrets.token_hex(16),
                       "iat": int(now), "exp": int(now + ttl)}, keys.admin, algorithm="HS256")


class _Nonces:
    """Admin token ids seen within their lifetime (replay protection)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def use(self, jti: str, exp: float) -> bool:
        now = time.time()
        if len(self.seen) > 10_000:
            self.seen = {k: v for k, v in self.seen.items() if v > now}
        if jti in self.seen:
            return False
        self.seen[jti] = exp + 10
        return True


_nonces = _Nonces()


def verify_admin_token(keys: Keys, token: str, cmd: str) -> None:
    try:
        claims = jwt.decode(token, keys.admin, algorithms=["HS256"], leeway=5,
                            options={"require": ["sub", "exp", "jti", "cmd"]})
    except jwt.InvalidTokenError as e:
        raise AdminError("auth-failed", f"admin token refused: {e}") from None
    if claims.get("sub") != "admin":
        raise AdminError("auth-failed", "not an admin token")
    if claims.get("cmd") != cmd:
        raise AdminError("auth-failed", "the admin token is for another command")
    if not _nonces.use(str(claims["jti"]), float(claims["exp"])):
        raise AdminError("auth-failed", "the admin token was already used (replay)")


class AdminServer:
    """Serves admin requests for one node."""

    def __init__(self, config: NodeConfig, core: Core, gateway: GatewayLike, keys: Keys,
                 addresses: dict[str, str | None], stop: trio.Event | None = None):
        self.config = config
        self.stop = stop if stop is not None else trio.Event()
        self._change = trio.Lock()
        self.core = core
        self.gateway = gateway
        self.keys = keys
        self.addresses = addresses
        self.started = time.monotonic()
        self.handlers: dict[str, Handler] = {
            "status": self._status,
            "checkpoint": self._checkpoint,
            "digest": self._digest,
            "member-add": self._member_add,
            "member-remove": self._member_remove,
            "transfer": self._transfer,
            "drain": self._drain,
            "undrain": self._undrain,
            "retire": self._retire,
        }
        self.address: str | None = None

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        assert self.config.admin is not None
        host, port = self.config.admin
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.address = format_addr(host, listeners[0].socket.getsockname()[1])
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder(ADMIN_FRAMES, 64 * 1024)
        try:
            with trio.move_on_after(60):
                frame = None
                while frame is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.feed(data)
                    for f in decoder.frames():
                        frame = f
                        break
                reply = await self._answer(frame)
                await stream.send_all(encode(reply, 16 * 1024 * 1024))
        except RemoteProtocolError as e:
            await _send_quietly(stream, {"type": "error", "code": e.code, "reason": e.reason})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _answer(self, frame: dict[str, Any]) -> dict[str, Any]:
        try:
            verify_admin_token(self.keys, frame["token"], frame["cmd"])
            handler = self.handlers.get(frame["cmd"])
            if handler is None:
                raise AdminError("unknown-command", f"unknown admin command {frame['cmd']!r}")
            result = await handler(frame.get("args", {}))
            return {"type": "admin-ok", "result": result}
        except AdminError as e:
            log.info("admin request refused", cmd=frame.get("cmd"), code=e.code, reason=e.reason)
            return {"type": "error", "code": e.code, "reason": e.reason}

    async def _status(self, _args: dict[str, Any]) -> dict[str, Any]:
        await self.gateway.refresh()
        return node_status(self.config, self.core, self.gateway, self.addresses, self.started)

    # --- membership (one change at a time, on the leader) ----------------------

    def _leader_status(self) -> Any:
        st = self.core.statistics().raft
        if st.role != "leader":
            raise AdminError("not-leader", f"this node is not the leader (leader: {st.leader})")
        return st

    @staticmethod
    def _addr_arg(args: dict[str, Any], key: str) -> str:
        value = args.get(key)
        if not isinstance(value, str) or ":" not in value:
            raise AdminError("bad-args", f"{key} must be a host:port string")
        return value

    async def _member_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """Add a node (started with --join) to the Raft cluster, then mark it joined."""
        raft = self._addr_arg(args, "raft")
        node_id = args.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise AdminError("bad-args", "id must be the new node's id")
        if self._change.locked():
            raise AdminError("change-in-progress", "another membership change is in progress")
        async with self._change:
            st = self._leader_status()
            if raft in st.members:
                raise AdminError("already-a-member", f"{raft} is already a member")
            healthy = 1 + len(st.connected)
            new_size = len(st.members) + 1
            if healthy <= new_size / 2:
                raise AdminError(
                    "would-lose-quorum",
                    f"only {healthy} of {len(st.members)} members are up; adding a node that "
                    f"has not caught up would leave no majority of {new_size}")
            err = await self.core.raft_call(
                lambda cb: self.core.log.add_member(raft, cb))  # type: ignore[union-attr]
            if err is not None:
                raise AdminError("refused", f"the Raft log refused the change: {err}")
            result = await self.core.request(Join(node_id), timeout=15)
            if not result.ok:
                raise AdminError(result.code or "internal", result.reason or "")
            log.info("member added", member=node_id, raft=raft)
            return {"added": node_id, "raft": raft,
                    "members": sorted([*st.members, raft])}

    async def _member_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        raft = self._addr_arg(args, "raft")
        node_id = args.get("id") if isinstance(args.get("id"), str) else raft
        if self._change.locked():
            raise AdminError("change-in-progress", "another membership change is in progress")
        async with self._change:
            st = self._leader_status()
            if raft not in st.members:
                raise AdminError("not-a-member", f"{raft} is not a member of the cluster")
            if raft == self.config.raft:
                raise AdminError("is-leader", "the leader cannot remove itself: transfer "
                                 "leadership first")
            remaining = [m for m in st.members if m != raft]
            healthy = sum(1 for m in remaining if m == self.config.raft or m in st.connected)
            if healthy <= len(remaining) / 2:
                raise AdminError(
                    "would-lose-quorum",
                    f"after removing {node_id} only {healthy} of {len(remaining)} members "
                    "would be up")
            err = await self.core.raft_call(
                lambda cb: self.core.log.remove_member(raft, cb))  # type: ignore[union-attr]
            if err is not None:
                raise AdminError("refused", f"the Raft log refused the change: {err}")
            # The table finds a dead member named by its Raft address by that address.
            left = await self.core.request(Leave(str(node_id), bounded=1), timeout=15)
            if left.ok and left.value:
                node_id = left.value.get("left", node_id)
            if node_id == raft:
                log.warning("removed member not known by its Raft address: its sessions "
                            "wait for its silence to be noticed", raft=raft)
            log.info("member removed", member=node_id, raft=raft)
            return {"removed": node_id, "raft": raft, "members": sorted(remaining)}

    async def _transfer(self, args: dict[str, Any]) -> dict[str, Any]:
        """Hand leadership to ``raft`` (or the most caught-up follower) and wait for it."""
        target = args.get("raft")
        if target is not None and not isinstance(target, str):
            raise AdminError("bad-args", "raft must be a host:port string")
        if target == self.config.raft:
            raise AdminError("bad-args", "this node is already the leader")
        self._leader_status()
        # pysyncobj hands over only to a follower whose log matches the leader's to
        # the last entry, and the handover fails if the leader appends more before
        # the target's election: under load, retry a few times.
        err: str | None = "not tried"
        for _attempt in range(4):
            with trio.move_on_after(1.5):
                err = "not caught up"
                while err is not None:
                    err = await self.core.raft_call(
                        lambda cb: self.core.log.transfer_leadership(  # type: ignore[union-attr]
                            target, cb))
                    if err is not None:
                        await trio.sleep(0.005)
            if err is not None:
                continue
            with trio.move_on_after(1.5):
                while self.core.statistics().raft.role == "leader":
                    await trio.sleep(0.02)
                while self.core.statistics().raft.leader in (None, self.config.raft):
                    await trio.sleep(0.02)
                return {"leader": self.core.statistics().raft.leader}
        why = err or "the leader was re-elected"
        raise AdminError("refused", f"leadership did not move ({why}); the target must be "
                         "connected and caught up")

    async def _drain(self, args: dict[str, Any]) -> dict[str, Any]:
        left = await self.gateway.drain(float(args.get("timeout", 10)))
        log.info("drained", connections_left=left)
        return {"drained": self.config.id, "connections": left}

    async def _undrain(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.gateway.undrain()
        return {"undrained": self.config.id}

    async def _retire(self, _args: dict[str, Any]) -> dict[str, Any]:
        """Stop this node cleanly (after it was removed from the cluster)."""
        self.stop.set()
        return {"retiring": self.config.id}

    async def _checkpoint(self, args: dict[str, Any]) -> dict[str, Any]:
        """Commit a checkpoint; every replica records its digest at that log position."""
        tag = args.get("tag") or secrets.token_hex(8)
        if not isinstance(tag, str):
            raise AdminError("bad-args", "tag must be a string")
        result = await self.core.request(Checkpoint(tag), timeout=10)
        if not result.ok:
            raise AdminError(result.code or "internal", result.reason or "")
        with trio.move_on_after(DIGEST_DEADLINE + 10):
            index, digest = await self.core.wait_checkpoint(tag)
            return {"tag": tag, "index": index, "digest": _usable(tag, digest)}
        raise AdminError("not-applied", f"checkpoint {tag} committed, no digest here yet")

    async def _digest(self, args: dict[str, Any]) -> dict[str, Any]:
        """This replica's digest at checkpoint ``tag`` (waits up to ``timeout`` s for it)."""
        tag = args.get("tag")
        timeout = args.get("timeout", 10)
        if not isinstance(tag, str) or not isinstance(timeout, int | float):
            raise AdminError("bad-args", "digest needs a string tag and a numeric timeout")
        with trio.move_on_after(min(float(timeout), 60.0)):
            index, digest = await self.core.wait_checkpoint(tag)
            return {"tag": tag, "index": index, "digest": _usable(tag, digest)}
        raise AdminError("not-applied", f"checkpoint {tag} not applied here yet")


def _usable(tag: str, digest: str) -> str:
    """A digest the node could compute, or the reason it could not, as an error."""
    if digest.startswith("unavailable"):
        raise AdminError("digest-unavailable", f"checkpoint {tag}: {digest}")
    return digest


def node_status(config: NodeConfig, core: Core, gateway: GatewayLike,
                addresses: dict[str, str | None], started: float) -> dict[str, Any]:
    cs = core.statistics()
    gs = gateway.statistics()
    ts = core.table.statistics()
    raft = cs.raft
    return {
        "id": config.id,
        "pid": os.getpid(),
        **addresses,
        "role": raft.role,
        "leader": raft.leader,
        "term": raft.term,
        "commit_index": raft.commit_index,
        "last_applied": raft.last_applied,
        "log_len": raft.log_len,
        "compactions": raft.compactions,
        "compaction_index": raft.compaction_index,
        "has_quorum": raft.has_quorum,
        "members": list(raft.members),
        "connected": list(raft.connected),
        "match_index": raft.match_index,
        "fenced": cs.fenced,
        "member": core.member,
        "drained": gateway.drained,
        "ready": core.serving() and not gateway.drained and gateway.listening(),
        "limits": dataclasses.asdict(core.table.user_limits),
        "limits_pending": core.limits_pending(),
        "connections": gs.connections,
        "sessions_local": gs.sessions_local,
        "sessions": ts.sessions,
        "orphaned": ts.orphaned,
        "users": ts.users,
        "mailbox": ts.mailbox_messages,
        "uptime": round(time.monotonic() - started, 1),
        "incarnation": core.inc,
        "insecure": config.insecure,
        "tls": config.tls_cert is not None,
        "workers": gateway.workers(),
        # [time.monotonic() at the start, kind, ms]: see Core.recent_stalls
        "stalls": [[round(t, 4), kind, round(sec * 1000, 1)]
                   for t, kind, sec in core.recent_stalls()],
    }


async def _send_quietly(stream: trio.SocketStream, frame: dict[str, Any]) -> None:
    try:
        await stream.send_all(encode(frame))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
