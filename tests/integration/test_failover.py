"""Seamless failover with real node processes: resume on a surviving node, nothing
lost, nothing duplicated, no presence flap; expiry; failure detection; fencing;
rejoin and catch-up."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import trio

import client
from client import Message, PresenceEvent, Reconnected
from tests.conftest import Cluster
from tests.integration.rawlogin import raw_login
from tests.integration.streams import stream_through

pytestmark = pytest.mark.integration


async def _settle_presence(a: client.Session, b: client.Session) -> None:
    await a.allow(b.user)
    await b.allow(a.user)
    await a.subscribe(b.user)
    await b.subscribe(a.user)


async def stream_through_kill(c: Cluster, victim: str, bob_node: str, count: int = 150,
                              kill_after: int = 40) -> None:
    """bob (on ``bob_node``) streams ``count`` messages to alice (on ``victim``);
    ``victim`` is SIGKILLed after ``kill_after`` of them were acknowledged."""
    addr = {s.id: s.client for s in c.specs}
    others = [addr[n] for n in addr if n != victim]
    with trio.fail_after(90):
        async with client.connect([addr[victim], *others], user="alice",
                                  token=c.token("alice"), ordered=True,
                                  connection_events=True) as alice, \
                client.connect([addr[bob_node]], user="bob", token=c.token("bob"),
                               ordered=True) as bob:
            assert alice.node_id == victim and bob.node_id == bob_node
            await _settle_presence(alice, bob)
            session_id = alice.session_id

            async def kill() -> None:
                await trio.to_thread.run_sync(c.kill, victim)

            got = await stream_through(alice, bob, count, kill_after, kill)

            assert [m.id for m in got.received] == got.sent, "lost, duplicated or reordered"
            assert [m.body for m in got.received] == [f"m{i}" for i in range(count)]
            assert alice.session_id == session_id
            assert alice.node_id != victim
            assert got.reconnects and all(r.resumed for r in got.reconnects)
            assert all(ev.status != "offline" for ev in got.bob_saw), got.bob_saw


async def test_kill_the_follower_holding_alice(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.leader()
    followers = [s.id for s in c.specs if s.id != leader]
    await stream_through_kill(c, victim=followers[0], bob_node=followers[1])


async def test_kill_the_leader_holding_alice(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.leader()
    assert leader is not None
    bob_node = next(s.id for s in c.specs if s.id != leader)
    await stream_through_kill(c, victim=leader, bob_node=bob_node)


async def _offline_after(watcher: client.Session, user: str, timeout: float) -> float:
    t0 = time.monotonic()
    with trio.fail_after(timeout):
        async for ev in watcher.events():
            if isinstance(ev, PresenceEvent) and ev.user == user and ev.status == "offline":
                assert ev.last_seen is not None
                return time.monotonic() - t0
    raise AssertionError("events ended")


async def test_session_expires_after_the_grace_window(
        make_cluster: Callable[..., Cluster]) -> None:
    """A client that vanishes without logging out keeps its presence for the grace
    window (no flap), then expires through the log: watchers see it go offline."""
    c = make_cluster(node_args=["--grace", "2"])
    n = c.client_addresses()
    with trio.fail_after(40):
        async with client.connect([n[1]], user="bob", token=c.token("bob")) as bob:
            raw = await trio.to_thread.run_sync(raw_login, n[0], "zed", c.token("zed"))
            async with client.connect([n[2]], user="zed", token=c.token("zed")) as z2:
                await z2.allow("bob")
            # zed's second session logged out; the raw one keeps zed online.
            await bob.subscribe("zed")
            ev = await bob.next_event(10)
            assert isinstance(ev, PresenceEvent) and ev.status == "online"
            raw.close()  # the client dies: no bye
            took = await _offline_after(bob, "zed", timeout=15)
            assert 1.5 <= took <= 6.0, took


async def test_dead_node_sessions_are_orphaned_then_expire(
        make_cluster: Callable[..., Cluster]) -> None:
    """A node that dies with a client that never comes back: its sessions are orphaned
    within node-timeout and expire after the grace window."""
    c = make_cluster(node_args=["--grace", "1", "--node-timeout", "2"])
    leader = c.leader()
    victim = next(s for s in c.specs if s.id != leader)
    watcher_node = next(s for s in c.specs if s.id not in (leader, victim.id))
    with trio.fail_after(40):
        async with client.connect([watcher_node.client], user="bob",
                                  token=c.token("bob")) as bob:
            async with client.connect([victim.client], user="yan",
                                      token=c.token("yan")) as y:
                await y.allow("bob")
            raw = await trio.to_thread.run_sync(raw_login, victim.client, "yan",
                                                c.token("yan"))
            await bob.subscribe("yan")
            while True:
                ev = await bob.next_event(10)
                if isinstance(ev, PresenceEvent) and ev.status == "online":
                    break
            await trio.to_thread.run_sync(c.kill, victim.id)
            took = await _offline_after(bob, "yan", timeout=20)
            raw.close()
            # node-timeout 2 s + grace 1 s + tick and commit slack
            assert took <= 6.0, took


async def test_a_dead_node_sessions_expire_a_bounded_number_per_tick(
        make_cluster: Callable[..., Cluster]) -> None:
    """With ``--sessions-per-tick 2`` the six sessions of a dead node expire two per
    tick of the leader's clock (ticks 0.5 s apart), not all in one: their watcher
    sees them go offline over at least two tick intervals."""
    c = make_cluster(node_args=["--grace", "1", "--node-timeout", "2",
                                "--sessions-per-tick", "2"])
    leader = c.leader()
    victim = next(s for s in c.specs if s.id != leader)
    watcher_node = next(s for s in c.specs if s.id not in (leader, victim.id))
    users = [f"exp{i}" for i in range(6)]
    with trio.fail_after(60):
        async with client.connect([watcher_node.client], user="bob",
                                  token=c.token("bob")) as bob:
            raws = []
            for user in users:
                async with client.connect([victim.client], user=user,
                                          token=c.token(user)) as other:
                    await other.allow("bob")
                raws.append(await trio.to_thread.run_sync(raw_login, victim.client, user,
                                                          c.token(user)))
                await bob.subscribe(user)
            online: set[str] = set()
            while online != set(users):
                ev = await bob.next_event(10)
                if isinstance(ev, PresenceEvent) and ev.status == "online":
                    online.add(ev.user)
            await trio.to_thread.run_sync(c.kill, victim.id)
            offline: dict[str, float] = {}
            async for ev in bob.events():
                if isinstance(ev, PresenceEvent) and ev.status == "offline":
                    offline[ev.user] = time.monotonic()
                    if len(offline) == len(users):
                        break
            for raw in raws:
                raw.close()
    assert set(offline) == set(users)
    spread = max(offline.values()) - min(offline.values())
    assert spread >= 0.8, f"all six expired within {spread:.3f} s: one tick"


async def test_a_node_without_a_majority_fences_and_clients_move(
        make_cluster: Callable[..., Cluster]) -> None:
    """When the other two nodes stop (SIGSTOP), the remaining node cannot commit: it
    fences itself within fence-after, tells its clients to go, and reports it; when a
    majority is back the client resumes its session and gets what was sent."""
    c = make_cluster(node_args=["--fence-after", "1.5"])
    leader = c.leader()
    minority = next(s for s in c.specs if s.id != leader)
    others = [s for s in c.specs if s.id != minority.id]
    with trio.fail_after(60):
        async with client.connect([minority.client, *(o.client for o in others)],
                                  user="amy", token=c.token("amy"), ordered=True,
                                  connection_events=True, connect_timeout=1) as amy:
            sid = amy.session_id
            for o in others:
                c.procs[o.id].proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                while True:
                    st = await trio.to_thread.run_sync(c.status, minority.id)
                    if st["fenced"]:
                        break
                    assert time.monotonic() - t0 < 5, "the minority node never fenced"
                    await trio.sleep(0.1)
                fenced_after = time.monotonic() - t0
                assert fenced_after <= 3.5
            finally:
                for o in others:
                    c.procs[o.id].proc.send_signal(signal.SIGCONT)
            ev = await amy.next_event(30)
            while not isinstance(ev, Reconnected):
                ev = await amy.next_event(30)
            assert ev.resumed and amy.session_id == sid
            async with client.connect([others[0].client], user="ben",
                                      token=c.token("ben")) as ben:
                mid = await ben.send("amy", "welcome back")
            m = await amy.next_event(15)
            while not isinstance(m, Message):
                m = await amy.next_event(15)
            assert m.id == mid


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data-dir", "empty-data-dir"])
async def test_restarted_node_catches_up(make_cluster: Callable[..., Cluster],
                                         wipe: bool) -> None:
    """A node restarted with its data dir rejoins and catches up; with an empty data
    dir it catches up from its peers (a snapshot, compaction being forced small)."""
    c = make_cluster(node_args=["--compaction-entries", "50"])
    t0 = time.monotonic()
    leader = c.leader()
    victim = next(s for s in c.specs if s.id != leader)
    live = [s for s in c.specs if s.id != victim.id]
    with trio.fail_after(120):
        await trio.to_thread.run_sync(c.kill, victim.id)
        async with client.connect([live[0].client], user="kai", token=c.token("kai")) as k:
            for i in range(300):
                await k.send(f"user{i % 7}", f"while n was down {i}")
            await k.set_presence("busy", "catching up")
        if wipe:
            shutil.rmtree(victim.data_dir / "raft")
        await trio.to_thread.run_sync(c.restart, victim.id)
        await trio.to_thread.run_sync(lambda: c.wait_ready([victim.id], timeout=60))
        digests = await trio.to_thread.run_sync(c.digests)
        assert len(digests) == 1
        # Each compaction forked a child: the nodes list those holds among their
        # stalls, in the machine's monotonic clock.
        now = time.monotonic()
        forks = [e for s in live for e in c.status(s.id)["stalls"] if e[1] == "fork"]
        assert forks and all(t0 <= e[0] <= now and e[2] >= 0 for e in forks), forks
        async with client.connect([victim.client], user="user3",
                                  token=c.token("user3")) as u:
            m = await u.next_event(10)
            assert isinstance(m, Message) and m.sender == "kai"


async def test_chat_client_reports_failover(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    leader = c.leader()
    victim = next(s for s in c.specs if s.id != leader)
    nodes = ",".join([victim.client, *(s.client for s in c.specs if s.id != victim.id)])
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "cluster", "chat", "--nodes", nodes, "--user", "cat",
         "--token", c.token("cat"), "--ordered"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    out = b""

    async def expect(text: str, timeout: float = 20) -> None:
        nonlocal out
        with trio.fail_after(timeout):
            while text.encode() not in out:
                chunk = await proc.stdout.receive_some(65536)  # type: ignore[union-attr]
                assert chunk, out
                out += chunk

    try:
        await expect(f"on node {victim.id}")
        await trio.to_thread.run_sync(c.kill, victim.id)
        await expect("session resumed")
        async with client.connect(c.client_addresses()[::-1], user="dog",
                                  token=c.token("dog")) as dog:
            await dog.send("cat", "still there?")
        await expect("<dog> still there?")
        await proc.stdin.send_all(b"/quit\n")
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
