"""Multi-worker nodes: gateway worker processes sharing the client port
(SO_REUSEPORT), talking to the node's core process; and the in-process gateway
(--workers 0)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

import client
from client import Message, PresenceEvent, Reconnected
from cluster.membership import ClusterAdmin
from node.protocol import SERVER_FRAMES, FrameDecoder, encode
from tests.conftest import Cluster
from tests.integration.streams import stream_through

pytestmark = pytest.mark.integration

TWO = ["--workers", "2"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _status(c: Cluster, node: str) -> dict[str, Any]:
    return await trio.to_thread.run_sync(c.status, node)


async def _wait_status(c: Cluster, node: str, check: Callable[[dict[str, Any]], bool],
                       timeout: float = 10.0) -> dict[str, Any]:
    """Poll admin status until ``check`` holds (worker statistics arrive every 0.5 s)."""
    st: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            st = await _status(c, node)
            if check(st):
                return st
            await trio.sleep(0.1)
    raise AssertionError(f"status of {node} never matched: {st.get('workers')}")


def _raw_login(addr: str, user: str, token: str) -> dict[str, Any]:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(encode({"type": "login", "user": user, "token": token}))
        dec = FrameDecoder(SERVER_FRAMES)
        while True:
            data = s.recv(65536)
            if not data:
                return {"type": "closed"}
            dec.feed(data)
            frames = list(dec.frames())
            if frames:
                return frames[0]


async def _next_of(s: client.Session, kind: type, timeout: float = 10.0,
                   where: Callable[[Any], bool] = lambda e: True) -> Any:
    with trio.fail_after(timeout):
        while True:
            ev = await s.next_event()
            if isinstance(ev, kind) and where(ev):
                return ev


async def test_connections_spread_over_both_workers(make_cluster: Callable[..., Cluster]
                                                    ) -> None:
    c = make_cluster(1, TWO)
    with trio.fail_after(60):
        st = await _status(c, "n1")
        pids = [w["pid"] for w in st["workers"]]
        assert len(pids) == 2 and os.getpid() not in pids and st["pid"] not in pids
        assert all(w["listening"] for w in st["workers"])
        async with AsyncExitStack() as stack:
            for k in range(24):
                await stack.enter_async_context(
                    client.connect(c.client_addresses(), user=f"u{k}", token=c.token(f"u{k}")))
            st = await _wait_status(c, "n1", lambda s: s["connections"] == 24
                                    and sum(w["connections"] for w in s["workers"]) == 24)
            # The kernel spreads connections over the two listeners (2^-23 odds
            # of all on one).
            assert all(w["connections"] > 0 for w in st["workers"]), st["workers"]
            assert st["sessions_local"] == 24 == st["sessions"]


async def test_messages_and_presence_cross_workers_and_nodes(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3, TWO)
    n = c.client_addresses()
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            sessions: list[client.Session] = []
            users: list[str] = []

            async def join(node: str) -> None:
                user = f"p{len(users)}"
                users.append(user)
                sessions.append(await stack.enter_async_context(
                    client.connect([node], user=user, token=c.token(user))))

            # Users on n1 until both of its workers hold some, and two on n2.
            for _ in range(3):
                await join(n[0])
            while True:
                on_n1 = len(sessions)
                st = await _wait_status(c, "n1", lambda s: sum(
                    w["sessions"] for w in s["workers"]) == on_n1)  # noqa: B023
                if all(w["sessions"] > 0 for w in st["workers"]):
                    break
                assert len(sessions) < 20, st["workers"]
                await join(n[0])
            await join(n[1])
            await join(n[1])
            # Everyone lets everyone see their presence, and subscribes to everyone.
            for s in sessions:
                for user in users:
                    if user != s.user:
                        await s.allow(user)
            for s in sessions:
                for user in users:
                    if user != s.user:
                        assert await s.subscribe(user) is True
            # Each one messages every other one.
            sent: dict[str, set[int]] = {u: set() for u in users}
            for s in sessions:
                for user in users:
                    if user != s.user:
                        sent[user].add(await s.send(user, f"{s.user}->{user}"))
            for s in sessions:
                got: set[int] = set()
                while got != sent[s.user]:
                    m = await _next_of(s, Message)
                    assert m.body == f"{m.sender}->{s.user}"
                    await s.ack(m)
                    got.add(m.id)
            # A presence change reaches every subscriber, on both workers and nodes.
            await sessions[0].set_presence("busy", "in a meeting")
            for s in sessions[1:]:
                ev = await _next_of(s, PresenceEvent, where=lambda e: e.user == "p0"
                                    and e.status == "busy")
                assert ev.text == "in a meeting"


async def test_killing_a_worker_moves_its_clients_and_the_node_serves_on(
        make_cluster: Callable[..., Cluster]) -> None:
    """SIGKILL the worker holding alice while bob streams to her: she resumes (on
    another node first), nothing is lost, duplicated or reordered; clients of the
    other worker stay connected; the node keeps serving and restarts the worker."""
    c = make_cluster(3, TWO)
    addr = {s.id: s.client for s in c.specs}
    count, kill_after = 120, 30
    with trio.fail_after(120):
        async with client.connect([addr["n1"], addr["n2"], addr["n3"]], user="alice",
                                  token=c.token("alice"), ordered=True,
                                  connection_events=True) as alice, \
                client.connect([addr["n2"]], user="bob", token=c.token("bob"),
                               ordered=True) as bob:
            assert alice.node_id == "n1"
            st = await _wait_status(c, "n1", lambda s: s["connections"] == 1
                                    and sum(w["connections"] for w in s["workers"]) == 1)
            victim = next(w for w in st["workers"] if w["connections"] == 1)
            survivor = next(w for w in st["workers"] if w["index"] != victim["index"])
            # Other clients of n1 until some sit on the surviving worker.
            async with AsyncExitStack() as stack:
                others: list[client.Session] = []
                for k in range(12):
                    others.append(await stack.enter_async_context(client.connect(
                        [addr["n1"]], user=f"o{k}", token=c.token(f"o{k}"),
                        connection_events=True)))
                st = await _wait_status(c, "n1", lambda s: s["connections"] == 13
                                        and sum(w["connections"] for w in s["workers"]) == 13)
                on_survivor = next(w for w in st["workers"]
                                   if w["index"] == survivor["index"])["connections"]
                assert on_survivor > 0, st["workers"]

                await alice.allow("bob")
                await bob.allow("alice")
                await bob.subscribe("alice")
                session_id = alice.session_id

                async def kill() -> None:
                    os.kill(victim["pid"], signal.SIGKILL)

                got = await stream_through(alice, bob, count, kill_after, kill)

                assert [m.id for m in got.received] == got.sent, "lost, duplicated or reordered"
                assert alice.session_id == session_id and alice.node_id != "n1"
                assert got.reconnects and all(r.resumed for r in got.reconnects)
                assert all(ev.status != "offline" for ev in got.bob_saw), got.bob_saw

                # The node restarted the worker, and its other worker never stopped.
                st = await _wait_status(c, "n1", lambda s: all(
                    w["listening"] for w in s["workers"]) and any(
                    w["restarts"] == 1 for w in s["workers"]))
                again = next(w for w in st["workers"] if w["index"] == victim["index"])
                assert again["pid"] != victim["pid"] and not _alive(victim["pid"])
                kept = next(w for w in st["workers"] if w["index"] == survivor["index"])
                assert kept["pid"] == survivor["pid"] and kept["restarts"] == 0
                assert st["ready"] and not st["fenced"]
                # Clients of the killed worker resumed; the survivor's never noticed.
                moved = [s for s in others if s.node_id != "n1"]
                assert len(others) - len(moved) >= on_survivor
                for s in others:
                    mid = await bob.send(s.user, "still there?")
                    m = await _next_of(s, Message)
                    assert m.id == mid
            # n1 serves new clients (on both workers, including the restarted one). The
            # kernel spreads connections over the workers' listeners by a hash of the
            # address pair: a dozen all on one of two happens about once in 2,000 runs
            # (a CI run did), so up to two more dozen connect before that is a failure.
            async with AsyncExitStack() as stack:
                late = 0
                for _dozen in range(3):
                    for _ in range(12):
                        s = await stack.enter_async_context(client.connect(
                            [addr["n1"]], user=f"late{late}", token=c.token(f"late{late}")))
                        assert s.node_id == "n1"
                        late += 1
                    def all_in(st: dict[str, Any], n: int = late) -> bool:
                        return st["connections"] == n and sum(
                            w["connections"] for w in st["workers"]) == n

                    st = await _wait_status(c, "n1", all_in)
                    if all(w["connections"] > 0 for w in st["workers"]):
                        break
                assert all(w["connections"] > 0 for w in st["workers"]), st["workers"]


async def test_drain_with_workers(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3, TWO)
    n1 = c.spec("n1")
    others = [s.client for s in c.specs if s.id != "n1"]
    admin = ClusterAdmin([s.admin for s in c.specs], c.keys)
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            clients: list[client.Session] = []
            for k in range(10):
                clients.append(await stack.enter_async_context(client.connect(
                    [n1.client, *others], user=f"d{k}", token=c.token(f"d{k}"),
                    ordered=True, connection_events=True)))
            assert all(s.node_id == "n1" for s in clients)
            await _wait_status(c, "n1", lambda s: all(w["connections"] > 0
                                                      for w in s["workers"]))
            ids = [s.session_id for s in clients]
            result = await trio.to_thread.run_sync(lambda: admin.drain("n1"))
            assert result["connections"] == 0
            st = await _status(c, "n1")
            assert st["drained"] and not st["ready"] and st["connections"] == 0
            assert all(w["connections"] == 0 for w in st["workers"])
            for s in clients:
                ev = await _next_of(s, Reconnected, timeout=15)
                assert ev.resumed
            assert [s.session_id for s in clients] == ids
            assert all(s.node_id != "n1" for s in clients)
            mid = await clients[0].send("d1", "after the drain")
            m = await _next_of(clients[1], Message)
            assert m.id == mid
            # A drained node refuses logins on every worker.
            for k in range(8):
                reply = await trio.to_thread.run_sync(_raw_login, n1.client, f"x{k}",
                                                      c.token(f"x{k}"))
                assert (reply["type"], reply.get("code")) == ("error", "shutdown"), reply
            await trio.to_thread.run_sync(lambda: admin.undrain("n1"))
            st = await _wait_status(c, "n1", lambda s: s["ready"])
            async with client.connect([n1.client], user="back", token=c.token("back")) as s:
                assert s.node_id == "n1"


async def test_killing_the_node_takes_its_workers_down(make_cluster: Callable[..., Cluster]
                                                       ) -> None:
    c = make_cluster(1, TWO)
    st = await _status(c, "n1")
    pids = [w["pid"] for w in st["workers"]]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    await trio.to_thread.run_sync(c.kill, "n1")
    with trio.fail_after(10):
        while any(_alive(p) for p in pids):
            await trio.sleep(0.05)


async def test_in_process_gateway_with_workers_0(make_cluster: Callable[..., Cluster]
                                                 ) -> None:
    c = make_cluster(3, ["--workers", "0"])
    n = c.client_addresses()
    with trio.fail_after(60):
        st = await _status(c, "n1")
        assert st["workers"] == [] and st["ready"]
        async with client.connect([n[0]], user="ann", token=c.token("ann")) as a, \
                client.connect([n[1], n[2]], user="ben", token=c.token("ben"),
                               ordered=True) as b:
            await a.allow("ben")
            assert await b.subscribe("ann") is True
            ev = await _next_of(b, PresenceEvent, where=lambda e: e.user == "ann")
            assert ev.status == "online"
            mid = await a.send("ben", "hello")
            m = await _next_of(b, Message)
            assert (m.id, m.body) == (mid, "hello")
            st = await _status(c, "n1")
            assert st["connections"] == 1 and st["sessions_local"] == 1
            # Killing the node moves its client; the in-process path still fails over.
            await trio.to_thread.run_sync(c.kill, "n2")
            mid = await a.send("ben", "after the kill")
            t0 = time.monotonic()
            m = await _next_of(b, Message, timeout=20)
            assert m.id == mid and b.node_id != "n2", time.monotonic() - t0
