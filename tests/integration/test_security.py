"""Hardening with real processes and sockets: TLS, rogue peers, every limit,
privacy across nodes, and no secrets in logs or metrics."""

from __future__ import annotations

import os
import pickle
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trustme

import client
from client import Message, PresenceEvent
from cluster.adminclient import AdminCallError, admin_call
from cluster.ports import free_base_port
from node.auth import Keys
from node.protocol import SERVER_FRAMES, FrameDecoder, encode
from tests.conftest import TEST_NODE_ARGS, Cluster

pytestmark = pytest.mark.integration

LIMITS = ["--sessions-per-user", "2", "--allow-list-limit", "3", "--subscription-limit", "3",
          "--mailbox-limit", "5", "--max-connections", "12", "--failed-logins", "3",
          "--frame-rate", "20"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("limits"), 3, "127.0.0.1", free_base_port(3),
                [*TEST_NODE_ARGS, *LIMITS])
    c.start(timeout=60)
    yield c
    c.stop()


def raw(addr: str, source: str | None = None) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5,
                                 source_address=(source, 0) if source else None)
    s.settimeout(5)
    return s


def frames_until_close(s: socket.socket, limit: int = 1000) -> list[dict[str, object]]:
    dec = FrameDecoder(SERVER_FRAMES)
    out: list[dict[str, object]] = []
    while len(out) < limit:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        dec.feed(data)
        out.extend(dec.frames())
    return out


def login_raw(addr: str, user: str, token: str, source: str | None = None
              ) -> tuple[socket.socket, dict[str, object]]:
    s = raw(addr, source)
    s.sendall(encode({"type": "login", "user": user, "token": token}))
    dec = FrameDecoder(SERVER_FRAMES)
    while True:
        data = s.recv(65536)
        if not data:
            return s, {"type": "closed"}
        dec.feed(data)
        got = list(dec.frames())
        if got:
            return s, got[0]


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "node.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    c = Cluster(d / "c", 3, "127.0.0.1", free_base_port(3),
                [*TEST_NODE_ARGS, "--tls-cert", str(d / "node.pem"), "--tls-key",
                 str(d / "node.pem")])
    c.start(timeout=60)
    yield c, d / "ca.pem"
    c.stop()


async def test_tls_client_verifies_the_node(tls_cluster: tuple[Cluster, Path]) -> None:
    c, ca = tls_cluster
    ctx = ssl.create_default_context(cafile=str(ca))
    with trio.fail_after(30):
        async with client.connect(c.client_addresses(), user="tina", token=c.token("tina"),
                                  tls=ctx) as t:
            mid = await t.send("tina", "over TLS")
            m = await t.next_event(10)
            assert isinstance(m, Message) and m.id == mid
        # Verification is on by default: an unknown CA is refused.
        with pytest.raises(client.Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
            async with client.connect(c.client_addresses(), user="tina",
                                      token=c.token("tina"), tls=True, give_up_after=1):
                pass
        # A plaintext client gets no session from a TLS port.
        with pytest.raises((client.Unreachable, client.SwitchboardError)):
            async with client.connect(c.client_addresses(), user="tina",
                                      token=c.token("tina"), give_up_after=1,
                                      connect_timeout=1):
                pass


# --- rogue peers ---------------------------------------------------------------------------


async def test_rogue_peers_cannot_join_inject_or_read(make_cluster: Callable[..., Cluster],
                                                      tmp_path: Path) -> None:
    c = make_cluster()
    leader = c.leader()
    victim = next(s for s in c.specs if s.id != leader)
    marker = tmp_path / "pwned"
    # 1. A raw process on the Raft port: a pickle that would run code if unpickled,
    #    and a frame announcing 1 GiB (buffered before authentication by pysyncobj).
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    host, port = c.spec(leader).raft.rsplit(":", 1)  # type: ignore[arg-type]

    def attack() -> tuple[bytes, bool]:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(2)
            s.sendall(struct.pack("i", len(payload)) + payload)
            try:
                first = s.recv(4096)
            except TimeoutError:
                first = b""
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(5)
            try:
                s.sendall(struct.pack("i", 1 << 30) + b"x" * 65536)
                closed = s.recv(1) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            except TimeoutError:
                closed = False  # still buffering
        return first, closed

    with trio.fail_after(60):
        first, closed = await trio.to_thread.run_sync(attack)
        await trio.sleep(1)
    assert not marker.exists(), "an unauthenticated peer ran code in the node"
    assert b"append_entries" not in first and b"request_vote" not in first
    assert closed, "a frame of 1 GiB was not refused"
    # 2. A node with the wrong secret in the place of a real member cannot join.
    await trio.to_thread.run_sync(c.stop_node, victim.id)
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("r" * 64)
    cmd = c.command(victim)
    cmd[cmd.index("--secret-file") + 1] = str(wrong)
    cmd[cmd.index("--data-dir") + 1] = str(tmp_path / "rogue-data")
    rogue = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        await trio.sleep(3)
        rogue_keys = Keys.from_secret(wrong.read_bytes().strip())
        st = await trio.to_thread.run_sync(
            lambda: admin_call(victim.admin, rogue_keys, "status"))
        assert not st["ready"] and st["fenced"]
        assert st["leader"] is None and not st["connected"]
        leader_status = await trio.to_thread.run_sync(c.status, leader)
        assert victim.raft not in leader_status["connected"]
        # the real cluster still commits
        async with client.connect([c.spec(leader).client], user="ok",
                                  token=c.token("ok")) as s:
            assert await s.send("ok", "still fine") > 0
        with pytest.raises(AdminCallError, match="admin token refused"):
            await trio.to_thread.run_sync(lambda: admin_call(victim.admin, c.keys, "status"))
    finally:
        rogue.kill()
        rogue.wait()


# --- limits ----------------------------------------------------------------------------------


async def _third_session_refused(c: Cluster, user: str) -> None:
    """Two sessions of ``user`` (on two nodes) are allowed, a third (on the third) not."""
    n = c.client_addresses()
    async with client.connect(n[:1], user=user, token=c.token(user)), \
            client.connect(n[1:2], user=user, token=c.token(user)):
        with pytest.raises(client.SwitchboardError) as e:
            async with client.connect(n[2:], user=user, token=c.token(user)):
                pass
        assert e.value.code == "limit"


async def test_limits_are_in_force_once_the_cluster_is_ready(tmp_path: Path) -> None:
    """The per-user limits come from the leader's flags through the log: a cluster
    that says it is ready must already enforce them, on every node."""
    c = Cluster(tmp_path, 3, "127.0.0.1", free_base_port(3), [*TEST_NODE_ARGS, *LIMITS])
    try:
        await trio.to_thread.run_sync(lambda: c.start(timeout=60))
        with trio.fail_after(30):
            await _third_session_refused(c, "early")
            statuses = await trio.to_thread.run_sync(c.statuses)
        for st in statuses.values():
            assert st is not None and not st["limits_pending"]
            assert st["limits"] == {"sessions_per_user": 2, "allow_list": 3,
                                    "subscriptions": 3, "mailbox": 5}
    finally:
        await trio.to_thread.run_sync(c.stop)


async def test_sessions_per_user_limit(limited: Cluster) -> None:
    with trio.fail_after(30):
        await _third_session_refused(limited, "sam")


async def test_allow_and_subscription_limits(limited: Cluster) -> None:
    with trio.fail_after(30):
        async with client.connect(limited.client_addresses(), user="al",
                                  token=limited.token("al")) as a:
            for u in ("b1", "b2", "b3"):
                await a.allow(u)
                await a.subscribe(u)
            await a.allow("b1")  # already allowed: not a new entry
            with pytest.raises(client.SwitchboardError) as e:
                await a.allow("b4")
            assert e.value.code == "limit"
            with pytest.raises(client.SwitchboardError) as e:
                await a.subscribe("b4")
            assert e.value.code == "limit"
            await a.revoke("b3")
            await a.allow("b4")


async def test_full_mailbox_refuses_with_an_error(limited: Cluster) -> None:
    with trio.fail_after(30):
        async with client.connect(limited.client_addresses(), user="fil",
                                  token=limited.token("fil")) as f:
            for i in range(5):
                await f.send("away-user", f"m{i}")
            with pytest.raises(client.SwitchboardError) as e:
                await f.send("away-user", "one too many")
            assert e.value.code == "mailbox-full"
        async with client.connect(limited.client_addresses(), user="away-user",
                                  token=limited.token("away-user")) as r:
            got = [await r.next_event(10) for _ in range(5)]
            assert [m.body for m in got] == [f"m{i}" for i in range(5)]  # type: ignore[union-attr]
            await r.ack(got)  # type: ignore[arg-type]
            assert await r.send("away-user", "room again") > 0


async def test_message_body_limit(limited: Cluster) -> None:
    with trio.fail_after(30):
        async with client.connect(limited.client_addresses(), user="big",
                                  token=limited.token("big")) as b:
            with pytest.raises(client.SwitchboardError) as e:
                await b.send("big", "é" * 40_000)  # 80 KB of UTF-8, over 64 KiB
            assert e.value.code == "too-large-body"
            assert await b.send("big", "small") > 0  # the connection is fine


def test_frame_rate_limit(limited: Cluster) -> None:
    s, ok = login_raw(limited.client_addresses()[0], "fast", limited.token("fast"))
    try:
        assert ok["type"] == "login-ok"
        s.sendall(b"".join(encode({"type": "ping", "data": i}) for i in range(200)))
        dec = FrameDecoder(SERVER_FRAMES)
        got: list[dict[str, object]] = []
        t0 = time.monotonic()
        while sum(1 for f in got if f["type"] == "pong") < 200:
            data = s.recv(65536)
            assert data
            dec.feed(data)
            got.extend(dec.frames())
        took = time.monotonic() - t0
        assert any(f["type"] == "error" and f["code"] == "rate-limited" for f in got)
        assert took > 3.0, took  # 200 frames at 20/s with a burst of 40: throttled, served
    finally:
        s.close()


def test_connection_limit(limited: Cluster) -> None:
    """13 connections to a node with --max-connections 12: one is refused. Which one
    is up to the race between the node's gateway workers (each accepts on its own
    SO_REUSEPORT socket), so the test does not insist it is the last."""
    addr = limited.client_addresses()[2]
    conns = [raw(addr) for _ in range(13)]
    try:
        refused: list[socket.socket] = []
        deadline = time.monotonic() + 2.0  # well within the 5 s login deadline
        while time.monotonic() < deadline and not refused:
            readable, _, _ = select.select(conns, [], [], 0.1)
            refused = list(readable)
        time.sleep(0.3)  # a second refusal would show up by now
        readable, _, _ = select.select(conns, [], [], 0)
        assert len(readable) == 1, f"{len(readable)} connections refused, expected one"
        frames = frames_until_close(readable[0])
        assert frames and frames[-1]["code"] == "overloaded"
    finally:
        for s in conns:
            s.close()


def test_failed_logins_per_source_address(limited: Cluster) -> None:
    addr = limited.client_addresses()[1]
    for _ in range(3):
        s, reply = login_raw(addr, "victim", "not-a-token", source="127.0.0.2")
        s.close()
        assert reply["code"] == "auth-failed"
    s, reply = login_raw(addr, "victim", limited.token("victim"), source="127.0.0.2")
    s.close()
    assert reply["code"] == "rate-limited"
    s, reply = login_raw(addr, "victim", limited.token("victim"), source="127.0.0.3")
    s.close()
    assert reply["type"] == "login-ok"


# --- privacy ------------------------------------------------------------------------------


async def test_presence_privacy_across_nodes(limited: Cluster) -> None:
    n = limited.client_addresses()
    with trio.fail_after(40):
        async with client.connect(n[:1], user="pat", token=limited.token("pat")) as pat, \
                client.connect(n[2:], user="quin", token=limited.token("quin")) as quin, \
                client.connect(n[1:2], user="ray", token=limited.token("ray")) as ray:
            await pat.allow("quin")
            assert await quin.subscribe("pat") is True
            assert await ray.subscribe("pat") is False
            ev = await quin.next_event(10)
            assert isinstance(ev, PresenceEvent) and ev.status == "online"
            ev = await ray.next_event(10)
            assert isinstance(ev, PresenceEvent) and ev.status == "unknown"
            await pat.set_presence("busy", "secret meeting")
            ev = await quin.next_event(10)
            assert isinstance(ev, PresenceEvent) and ev.text == "secret meeting"
            await pat.revoke("quin")
            ev = await quin.next_event(10)
            assert isinstance(ev, PresenceEvent) and (ev.status, ev.text) == ("unknown", None)
            await pat.set_presence("online", "now public?")
            for watcher in (quin, ray):
                with trio.move_on_after(1):
                    ev = await watcher.next_event()
                    raise AssertionError(f"{watcher.user} saw {ev}")


# --- secrets -----------------------------------------------------------------------------


async def test_no_secrets_in_logs_or_metrics(limited: Cluster) -> None:
    token = limited.token("sly")
    resume_tokens: list[str] = []
    with trio.fail_after(30):
        async with client.connect(limited.client_addresses(), user="sly", token=token) as s:
            resume_tokens.append(s._resume_token or "")
            await s.send("sly", "hello")
        s2, _ = await trio.to_thread.run_sync(login_raw, limited.client_addresses()[0], "sly",
                                              token + "x")
        s2.close()
    await trio.to_thread.run_sync(lambda: admin_call(limited.specs[0].admin, limited.keys,
                                                     "status"))
    secret = limited.secret_file.read_text().strip()
    keys = limited.keys
    needles = [token, secret, *resume_tokens, keys.token.hex(), keys.admin.hex(),
               str(keys.raft_password)]
    metrics = b""
    for spec in limited.specs:
        with urllib.request.urlopen(f"http://{spec.metrics}/metrics", timeout=5) as r:
            metrics += r.read()
    haystacks = [metrics.decode()] + [
        (spec.data_dir / "node.log").read_text(errors="replace") for spec in limited.specs]
    for needle in needles:
        assert needle and all(needle not in h for h in haystacks), "a secret leaked"


def test_multi_node_cluster_needs_a_secret(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "cluster", "node", "--id", "n1", "--listen",
                        "127.0.0.1:0", "--raft", "127.0.0.1:0", "--peers", "127.0.0.1:1",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0 and "--insecure-no-secret" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1



async def test_the_rogue_pickle_would_run_without_a_secret(tmp_path: Path) -> None:
    """The attack above is real: without a cluster secret (--insecure-no-secret) the
    same frame runs code in the node. This is why the secret is mandatory."""
    base = free_base_port(1)
    marker = tmp_path / "pwned"
    c = Cluster(tmp_path / "c", 1, "127.0.0.1", base, [*TEST_NODE_ARGS,
                                                        "--insecure-no-secret"])
    c.prepare()
    np = c.start_node("n1")
    try:
        c.wait_announced(np)

        class Evil:
            def __reduce__(self) -> tuple[object, tuple[str]]:
                return (os.system, (f"touch {marker}",))

        payload = pickle.dumps(Evil())  # the peer framing without a secret: a bare pickle
        host, port = c.spec("n1").raft.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(struct.pack("i", len(payload)) + payload)
            with trio.fail_after(10):
                while not marker.exists():
                    await trio.sleep(0.1)
    finally:
        c.stop()
