"""Operations: membership changes under load, drain, admin errors, metrics, health."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import client
from chaos.checker import check_messages, check_order
from chaos.history import History
from chaos.workload import WorkloadClient, WorkloadConfig
from cluster.adminclient import AdminCallError, admin_call
from cluster.membership import ClusterAdmin
from node.auth import Keys
from tests.conftest import Cluster, workload_running
from tests.integration.rawlogin import raw_login

pytestmark = pytest.mark.integration


def _admin(c: Cluster) -> ClusterAdmin:
    return ClusterAdmin([s.admin for s in c.members()], c.keys)


def _start_joiner(c: Cluster) -> str:
    spec = c.add_spec()
    np = c.start_node(spec.id, ["--join"])
    c.wait_announced(np)
    return spec.id


async def test_grow_shrink_and_replace_the_leader_under_load(
        make_cluster: Callable[..., Cluster]) -> None:
    """3 → 5 → 3 members, then the leader replaced by a fresh node, while clients
    send messages: no acknowledged message lost, duplicated or reordered, and every
    replica ends identical."""
    c = make_cluster()
    t0 = time.monotonic()
    history = History(clock=lambda: time.monotonic() - t0)
    cfg = WorkloadConfig(users=4, rate=10)
    nodes = c.client_addresses()
    clients = [WorkloadClient(k, cfg, nodes, c.token(f"u{k}"), history, k) for k in range(4)]
    steps: list[str] = []

    def operate() -> None:
        ca = _admin(c)
        for _ in range(2):
            new = _start_joiner(c)
            ca.add(c.spec(new).admin, wait=60)
            steps.append(f"added {new}")
        assert len(ca.leader()["members"]) == 5
        for node in (c.specs[4].id, c.specs[3].id):
            ca.remove(node)
            c.removed.add(node)
            steps.append(f"removed {node}")
        ca = _admin(c)
        deadline = time.monotonic() + 15
        while len((leader := ca.leader())["members"]) != 3:
            assert time.monotonic() < deadline, leader["members"]
            time.sleep(0.2)
        ca.remove(leader["id"])
        c.removed.add(leader["id"])
        steps.append(f"removed leader {leader['id']}")
        ca = _admin(c)
        new = _start_joiner(c)
        ca.add(c.spec(new).admin, wait=60)
        steps.append(f"added {new}")

    with trio.fail_after(240):
        async with workload_running(clients):
            await trio.sleep(1)
            await trio.to_thread.run_sync(operate)
            await trio.sleep(4)
    messages = check_messages(history)
    order = check_order(history)
    assert messages.acked > 50, steps
    assert messages.valid, messages.anomalies
    assert order.valid, order.anomalies
    final = _admin(c).leader()
    assert len(final["members"]) == 3
    assert len(await trio.to_thread.run_sync(c.digests)) == 1


async def test_drain_moves_clients_and_keeps_their_sessions(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    target = c.specs[1]
    others = [s.client for s in c.specs if s.id != target.id]
    with trio.fail_after(60):
        async with client.connect([target.client, *others], user="dana",
                                  token=c.token("dana"), ordered=True,
                                  connection_events=True) as d, \
                client.connect([target.client, *others], user="eli", token=c.token("eli"),
                               ordered=True) as e:
            sid = d.session_id
            assert d.node_id == target.id
            result = await trio.to_thread.run_sync(lambda: _admin(c).drain(target.id))
            assert result["connections"] == 0
            ev = await d.next_event(15)
            assert isinstance(ev, client.Reconnected) and ev.resumed
            assert d.session_id == sid and d.node_id != target.id
            mid = await e.send("dana", "after the drain")
            m = await d.next_event(15)
            assert isinstance(m, client.Message) and m.id == mid
            st = await trio.to_thread.run_sync(c.status, target.id)
            assert st["drained"] and st["connections"] == 0 and not st["ready"]


def _sb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True,
                          text=True, timeout=60)


def test_admin_errors_are_one_line(make_cluster: Callable[..., Cluster],
                                   tmp_path: object) -> None:
    c = make_cluster()
    cluster_arg = ",".join(s.admin for s in c.specs)
    secret = str(c.secret_file)
    wrong = tmp_path / "wrong"  # type: ignore[operator]
    wrong.write_text("w" * 64)
    p = _sb("admin", "--cluster", cluster_arg, "--secret-file", str(wrong), "status")
    assert p.returncode != 0 and "wrong secret" in p.stderr and len(p.stderr.splitlines()) == 1
    p = _sb("admin", "--cluster", cluster_arg, "--secret-file", secret, "remove", "n9")
    assert p.returncode != 0 and "not a reachable member" in p.stderr
    assert len(p.stderr.splitlines()) == 1
    p = _sb("admin", "--cluster", "127.0.0.1:1", "--secret-file", secret, "drain", "n1")
    assert p.returncode != 0 and "cluster unreachable" in p.stderr
    # With one node down, removing another healthy one would leave no majority.
    leader = c.leader()
    follower = [s.id for s in c.specs if s.id != leader]
    c.kill(follower[0])
    p = _sb("admin", "--cluster", cluster_arg, "--secret-file", secret, "remove", follower[1])
    assert p.returncode != 0 and "would be up" in p.stderr, p.stderr
    # The dead member itself can be removed by its Raft address.
    p = _sb("admin", "--cluster", cluster_arg, "--secret-file", secret, "remove",
            c.spec(follower[0]).raft)
    assert p.returncode == 0, p.stderr
    assert len(_admin(c).leader()["members"]) == 2


async def test_removing_a_dead_node_orphans_its_sessions_a_few_per_tick(
        make_cluster: Callable[..., Cluster]) -> None:
    """``admin remove`` of a dead node, named by its Raft address, with
    ``--sessions-per-tick 1``: the next ticks of the leader's clock (0.5 s apart)
    orphan its six sessions a part at a time, not the Leave entry all at once
    (for a node of 200,000 sessions that one entry would hold every member's
    apply thread past an election timeout). Six ids fall in at least three of
    the 64 parts (but for odds of about 1e-6): three ticks, 1 s. Timeouts far
    beyond the test's keep the node's silence and the grace window out of it."""
    c = make_cluster(node_args=["--grace", "600", "--node-timeout", "600",
                                "--sessions-per-tick", "1"])
    leader = c.leader()
    assert leader is not None
    victim = next(s for s in c.specs if s.id != leader)
    raws = [await trio.to_thread.run_sync(raw_login, victim.client, f"rm{i}",
                                          c.token(f"rm{i}")) for i in range(6)]
    try:
        with trio.fail_after(60):
            while (await trio.to_thread.run_sync(c.status, leader))["sessions"] < 6:
                await trio.sleep(0.05)
            # The table learns the bound from the leader's ticks (0.5 s apart): a
            # Leave before the first one acts at once, as in logs without the bound.
            await trio.sleep(1.5)
            c.kill(victim.id)
            p = await trio.to_thread.run_sync(
                lambda: _sb("admin", "--cluster", ",".join(s.admin for s in c.specs),
                            "--secret-file", str(c.secret_file), "remove", victim.raft))
            assert p.returncode == 0, p.stderr
            assert f"removed {victim.id} " in p.stdout, p.stdout
            seen: dict[int, float] = {}
            while 6 not in seen:
                st = await trio.to_thread.run_sync(c.status, leader)
                seen.setdefault(st["orphaned"], time.monotonic())
                await trio.sleep(0.02)
    finally:
        for raw in raws:
            raw.close()
    first = min(t for n, t in seen.items() if n > 0)
    assert seen[6] - first >= 0.8, f"orphaned at once: {sorted(seen)}"
    assert len([n for n in seen if 0 < n < 6]) >= 2, sorted(seen)


async def test_one_membership_change_at_a_time(make_cluster: Callable[..., Cluster]) -> None:
    """While a change waits for its commit, a second one is refused."""
    c = make_cluster()
    leader = c.leader()
    assert leader is not None
    followers = [s.id for s in c.specs if s.id != leader]
    keys: Keys = c.keys
    results: dict[str, object] = {}

    def add(name: str, raft: str) -> None:
        try:
            results[name] = admin_call(c.spec(leader).admin, keys, "member-add",
                                       {"raft": raft, "id": name}, timeout=20)
        except AdminCallError as e:
            results[name] = e.code

    for f in followers:
        c.kill(f, signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, add, "x1", "127.0.0.1:1")
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(add, "x2", "127.0.0.1:2")
            assert results["x2"] == "change-in-progress"
            for f in followers:
                c.kill(f, signal.SIGCONT)
    finally:
        for f in followers:
            c.kill(f, signal.SIGCONT)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_metrics_exposition_parses(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    with trio.fail_after(30):
        async with client.connect(c.client_addresses()[:1], user="mo",
                                  token=c.token("mo")) as m:
            await m.send("mo", "count me")
            await m.set_presence("away")
            status, body = await trio.to_thread.run_sync(
                _get, f"http://{c.specs[0].metrics}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name in ("switchboard_connections", "switchboard_logins", "switchboard_sessions",
                 "switchboard_messages_sent", "switchboard_mailbox_messages",
                 "switchboard_raft_role", "switchboard_raft_term", "switchboard_fenced",
                 "switchboard_commit_latency_seconds", "switchboard_presence_updates",
                 "switchboard_core_queue_depth", "switchboard_journal_fsyncs",
                 "switchboard_journal_cuts", "switchboard_journal_cut_seconds_max",
                 "switchboard_gc_collections", "switchboard_gc_pause_seconds_max"):
        assert name in families, name
    sample = {s.name: s.value for f in families.values() for s in f.samples}
    assert sample["switchboard_logins_total"] >= 1
    assert sample["switchboard_messages_sent_total"] >= 1
    assert sample["switchboard_commit_latency_seconds_count"] >= 2
    assert await trio.to_thread.run_sync(_get, f"http://{c.specs[0].metrics}/healthz") == (
        200, "ok\n")
    assert (await trio.to_thread.run_sync(_get, f"http://{c.specs[0].metrics}/nope"))[0] == 404


async def test_readyz_false_when_fenced_true_after_rejoin(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(node_args=["--fence-after", "1.5"])
    target = c.specs[0]
    others = [s.id for s in c.specs if s.id != target.id]
    url = f"http://{target.metrics}/readyz"
    with trio.fail_after(60):
        assert (await trio.to_thread.run_sync(_get, url))[0] == 200
        for o in others:
            c.kill(o, signal.SIGSTOP)
        try:
            while (await trio.to_thread.run_sync(_get, url))[0] != 503:
                await trio.sleep(0.2)
        finally:
            for o in others:
                c.kill(o, signal.SIGCONT)
        while (await trio.to_thread.run_sync(_get, url))[0] != 200:
            await trio.sleep(0.2)


async def test_admin_transfer_moves_leadership_under_a_live_client(
        make_cluster: Callable[..., Cluster]) -> None:
    """`switchboard admin transfer NODE` hands leadership to NODE, then with no
    target to some other follower; a client on the old leader keeps its session
    and its messages through both handovers, and a second transfer to the
    leader itself is a one-line error."""
    c = make_cluster()
    cluster_arg = ",".join(s.admin for s in c.specs)
    secret = str(c.secret_file)
    first = c.leader()
    assert first is not None
    target = next(s.id for s in c.specs if s.id != first)
    with trio.fail_after(90):
        async with client.connect([c.spec(first).client], user="fay", token=c.token("fay"),
                                  ordered=True) as f, \
                client.connect(c.client_addresses(), user="gus", token=c.token("gus"),
                               ordered=True) as g:
            sid = f.session_id
            p = await trio.to_thread.run_sync(
                _sb, "admin", "--cluster", cluster_arg, "--secret-file", secret,
                "transfer", target)
            assert p.returncode == 0, p.stderr
            assert p.stdout.strip() == f"leader is now {c.spec(target).raft}", p.stdout
            assert await trio.to_thread.run_sync(c.leader) == target
            mid = await g.send("fay", "after the first handover")
            m = await f.next_event(15)
            assert isinstance(m, client.Message) and m.id == mid
            p = await trio.to_thread.run_sync(
                _sb, "admin", "--cluster", cluster_arg, "--secret-file", secret,
                "transfer", target)
            assert p.returncode != 0 and "already the leader" in p.stderr, p.stderr
            assert len(p.stderr.splitlines()) == 1
            p = await trio.to_thread.run_sync(
                _sb, "admin", "--cluster", cluster_arg, "--secret-file", secret, "transfer")
            assert p.returncode == 0, p.stderr
            now = await trio.to_thread.run_sync(c.leader)
            assert now != target
            mid = await f.send("gus", "after the second handover")
            m = await g.next_event(15)
            assert isinstance(m, client.Message) and m.id == mid
            assert f.session_id == sid and f.node_id == first
