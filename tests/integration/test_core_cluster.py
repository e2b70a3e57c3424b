"""The cluster core with 3 real node processes on loopback and real clients."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import anyio
import cbor2
import pytest
import trio

import client
from client import Message, PresenceEvent
from cluster.ports import free_base_port
from node.auth import issue_token
from node.protocol import CLIENT_FRAMES, SERVER_FRAMES, FrameDecoder, encode
from tests.conftest import TEST_NODE_ARGS, Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("core"), 3, "127.0.0.1", free_base_port(3),
                TEST_NODE_ARGS)
    c.start(timeout=60)
    yield c
    c.stop()


async def next_of(session: client.Session, kind: type, timeout: float = 10.0,
                  where: object = None) -> object:
    """The next event of ``kind`` (and matching ``where(event)``), skipping others."""
    with trio.fail_after(timeout):
        async for ev in session.events():
            if isinstance(ev, kind) and (where is None or where(ev)):  # type: ignore[operator]
                return ev
    raise AssertionError("events() ended")


async def test_presence_crosses_nodes(cluster: Cluster) -> None:
    """alice on node 1 and bob on node 3 see each other's presence changes."""
    n = cluster.client_addresses()
    with trio.fail_after(30):
        async with client.connect([n[0]], user="alice", token=cluster.token("alice")) as a, \
                client.connect([n[2]], user="bob", token=cluster.token("bob")) as b:
            assert a.node_id == "n1" and b.node_id == "n3"
            await a.allow("bob")
            await b.allow("alice")
            assert await a.subscribe("bob") is True
            assert await b.subscribe("alice") is True
            ev = await next_of(b, PresenceEvent, where=lambda e: e.user == "alice")
            assert ev.status == "online"  # type: ignore[attr-defined]
            await a.set_presence("away", "lunch")
            ev = await next_of(b, PresenceEvent, where=lambda e: e.status == "away")
            assert (ev.user, ev.text) == ("alice", "lunch")  # type: ignore[attr-defined]
            await b.set_presence("busy", "coding")
            ev = await next_of(a, PresenceEvent, where=lambda e: e.status == "busy")
            assert (ev.user, ev.text) == ("bob", "coding")  # type: ignore[attr-defined]


async def test_presence_needs_allow(cluster: Cluster) -> None:
    """Nobody sees a user's presence unless that user allowed them."""
    n = cluster.client_addresses()
    with trio.fail_after(30):
        async with client.connect([n[1]], user="carol", token=cluster.token("carol")) as c, \
                client.connect([n[2]], user="dave", token=cluster.token("dave")) as d:
            assert await d.subscribe("carol") is False
            ev = await next_of(d, PresenceEvent)
            assert ev.status == "unknown"  # type: ignore[attr-defined]
            await c.set_presence("busy")
            await c.allow("dave")
            ev = await next_of(d, PresenceEvent)
            assert ev.status == "busy"  # type: ignore[attr-defined]
            await c.revoke("dave")
            ev = await next_of(d, PresenceEvent)
            assert ev.status == "unknown"  # type: ignore[attr-defined]
            await c.set_presence("online", "back")
            with trio.move_on_after(0.5):
                ev = await next_of(d, PresenceEvent)
                raise AssertionError(f"dave saw {ev} after the revoke")


async def test_fifty_messages_each_way_in_order(cluster: Cluster) -> None:
    n = cluster.client_addresses()
    with trio.fail_after(60):
        async with client.connect([n[0]], user="erin", token=cluster.token("erin")) as e, \
                client.connect([n[2]], user="frank", token=cluster.token("frank")) as f:

            async def send_all(s: client.Session, to: str) -> list[int]:
                return [await s.send(to, f"{s.user}-{i}") for i in range(50)]

            async def receive(s: client.Session, sender: str) -> list[str]:
                got: list[str] = []
                while len(got) < 50:
                    m = await next_of(s, Message)
                    assert isinstance(m, Message) and m.sender == sender
                    got.append(str(m.body))
                    await s.ack(m)
                return got

            results: dict[str, object] = {}
            async with trio.open_nursery() as nursery:
                async def run(key: str, fn: object, *args: object) -> None:
                    results[key] = await fn(*args)  # type: ignore[operator]

                nursery.start_soon(run, "e_ids", send_all, e, "frank")
                nursery.start_soon(run, "f_ids", send_all, f, "erin")
                nursery.start_soon(run, "e_got", receive, e, "frank")
                nursery.start_soon(run, "f_got", receive, f, "erin")
            assert results["f_got"] == [f"erin-{i}" for i in range(50)]
            assert results["e_got"] == [f"frank-{i}" for i in range(50)]
            ids = results["e_ids"]
            assert isinstance(ids, list) and ids == sorted(ids) and len(set(ids)) == 50


async def test_offline_delivery_on_login(cluster: Cluster) -> None:
    """Messages to an offline user wait in the mailbox until the next login; acked
    messages are not delivered again."""
    n = cluster.client_addresses()
    with trio.fail_after(30):
        async with client.connect([n[0]], user="gina", token=cluster.token("gina")) as g:
            ids = [await g.send("hank", f"while you were out {i}") for i in range(3)]
        async with client.connect([n[1]], user="hank", token=cluster.token("hank")) as h:
            got = [await next_of(h, Message) for _ in range(3)]
            assert [m.id for m in got] == ids  # type: ignore[attr-defined]
            assert [m.sender for m in got] == ["gina"] * 3  # type: ignore[attr-defined]
            await h.ack(got[:2])  # type: ignore[arg-type]
        async with client.connect([n[2]], user="hank", token=cluster.token("hank")) as h:
            m = await next_of(h, Message)
            assert m.id == ids[2]  # type: ignore[attr-defined]


async def test_messages_reach_every_session_of_the_recipient(cluster: Cluster) -> None:
    n = cluster.client_addresses()
    with trio.fail_after(30):
        async with client.connect([n[0]], user="ivy", token=cluster.token("ivy")) as i1, \
                client.connect([n[2]], user="ivy", token=cluster.token("ivy")) as i2, \
                client.connect([n[1]], user="jack", token=cluster.token("jack")) as j:
            mid = await j.send("ivy", "both of you")
            m1 = await next_of(i1, Message)
            m2 = await next_of(i2, Message)
            assert m1.id == m2.id == mid  # type: ignore[attr-defined]


def _raw_connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.settimeout(5)
    return s


def _read_frames(s: socket.socket) -> list[dict[str, object]]:
    """Every frame until the node closes the connection."""
    dec = FrameDecoder(SERVER_FRAMES)
    frames: list[dict[str, object]] = []
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        dec.feed(data)
        frames.extend(dec.frames())
    return frames


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x00\x00\x00\x05hello", "bad-frame"),
        (struct.pack(">I", 10**9) + b"x", "too-large"),
        (struct.pack(">I", 3) + cbor2.dumps([1, 2]), "bad-frame"),
        (encode({"type": "launch-missiles"}), "unknown-type"),
        (encode({"type": "login", "user": 7, "token": "x"}), "bad-field"),
        (encode({"type": "send", "rid": 1, "cmid": 1, "to": "x", "body": "y"}),
         "not-logged-in"),
        (encode({"type": "login", "user": "mallory", "token": "forged.token.here"}),
         "auth-failed"),
    ],
)
async def test_bad_input_is_refused_while_others_keep_working(
        cluster: Cluster, payload: bytes, code: str) -> None:
    """Garbage, oversize frames, unknown types, wrong fields and forged tokens get an
    error frame and a close, and a logged-in client on the same node keeps working."""
    n = cluster.client_addresses()
    with trio.fail_after(30):
        async with client.connect([n[0]], user="kim", token=cluster.token("kim")) as k:
            def attack() -> list[dict[str, object]]:
                s = _raw_connect(n[0])
                try:
                    s.sendall(payload)
                    return _read_frames(s)
                finally:
                    s.close()

            frames = await trio.to_thread.run_sync(attack)
            assert frames and frames[-1]["type"] == "error", frames
            assert frames[-1]["code"] == code
            assert await k.send("kim", "still here") > 0
            m = await next_of(k, Message)
            assert m.body == "still here"  # type: ignore[attr-defined]


async def test_wrong_secret_and_expired_tokens_are_refused(cluster: Cluster) -> None:
    n = cluster.client_addresses()
    forged = issue_token(b"not the cluster key at all......", "lee")
    expired = issue_token(cluster.keys.token, "lee", ttl=-60)
    other_user = cluster.token("someone-else")
    for token in (forged, expired, other_user):
        with trio.fail_after(15):
            with pytest.raises(client.AuthFailed):
                async with client.connect(n, user="lee", token=token):
                    pass


async def test_login_deadline_closes_silent_connections(cluster: Cluster) -> None:
    """A connection that never logs in is closed after the login deadline."""
    n = cluster.client_addresses()

    def silent() -> list[dict[str, object]]:
        s = _raw_connect(n[1])
        s.settimeout(15)
        try:
            return _read_frames(s)
        finally:
            s.close()

    with trio.fail_after(20):
        frames = await trio.to_thread.run_sync(silent)
    assert frames and frames[-1]["code"] == "timeout"


def test_client_library_under_asyncio(cluster: Cluster) -> None:
    """The client library runs on asyncio as well as Trio."""
    n = cluster.client_addresses()

    async def main() -> tuple[str, str]:
        async with client.connect(n, user="asy", token=cluster.token("asy")) as s:
            await s.send("asy", "via asyncio")
            m = await s.next_event(10)
            assert isinstance(m, Message)
            await s.ack(m)
            return str(m.body), asyncio.get_running_loop().__class__.__name__

    body, loop = anyio.run(main, backend="asyncio")
    assert body == "via asyncio" and "EventLoop" in loop


async def test_connect_spreads_over_nodes(cluster: Cluster) -> None:
    """By default connect() picks a random node; ordered=True takes the first."""
    n = cluster.client_addresses()
    seen: set[str] = set()
    with trio.fail_after(60):
        for i in range(12):
            async with client.connect(n, user=f"spread{i}",
                                      token=cluster.token(f"spread{i}")) as s:
                assert s.node is not None
                seen.add(s.node)
        async with client.connect(n, user="ord", token=cluster.token("ord"),
                                  ordered=True) as s:
            assert s.node == n[0]
    assert len(seen) >= 2


async def test_raw_protocol_ping_and_bye(cluster: Cluster) -> None:
    """A client written from docs/protocol.md alone: login, ping/pong, bye."""
    n = cluster.client_addresses()

    def session() -> list[dict[str, object]]:
        s = _raw_connect(n[2])
        try:
            s.sendall(encode({"type": "login", "user": "raw", "token": cluster.token("raw"),
                              "rid": 1}))
            s.sendall(encode({"type": "ping", "data": 42}))
            s.sendall(encode({"type": "bye"}))
            return _read_frames(s)
        finally:
            s.close()

    with trio.fail_after(20):
        frames = await trio.to_thread.run_sync(session)
    types = [f["type"] for f in frames]
    assert types[0] == "login-ok" and frames[0]["rid"] == 1
    assert {"type": "pong", "data": 42} in frames
    assert frames[-1]["type"] == "bye" and frames[-1]["code"] == "logout"
    for f in frames:
        FrameDecoder(SERVER_FRAMES)  # the schema knows every type the node sent
        assert f["type"] in SERVER_FRAMES
    assert "login" in CLIENT_FRAMES
