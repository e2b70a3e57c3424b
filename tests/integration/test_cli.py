"""The ``switchboard`` command: bring-up, one-line errors, token, chat and admin status."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import client
from client import Message
from cluster.ports import free_base_port
from tests.conftest import Cluster

pytestmark = pytest.mark.integration

SB = [sys.executable, "-m", "cluster"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SB, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    assert "unrecognized arguments" in one_line_error(run("up", "--bogus"))
    assert "not a port number" in one_line_error(run("up", "--base-port", "http"))
    assert "required" in one_line_error(run("node", "--id", "n1"))
    line = one_line_error(run("token", "alice", "--secret-file", str(tmp_path / "nope")))
    assert "cannot read the secret file" in line
    line = one_line_error(run("chat", "--nodes", "nonsense", "--user", "a", "--token", "t"))
    assert "expected host:port" in line


def test_unusable_addresses_are_one_line_errors(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x" * 64)
    common = ["--id", "n1", "--data-dir", str(tmp_path / "n1"), "--secret-file", str(secret)]
    line = one_line_error(run("node", "--listen", "127.0.0.1:99999", "--raft",
                              "127.0.0.1:12001", *common))
    assert "port out of range" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(run("node", "--listen", "127.0.0.1:0", "--raft",
                                  f"127.0.0.1:{port}", *common))
        assert "Address already in use" in line
        line = one_line_error(run("node", "--listen", f"127.0.0.1:{port}", "--raft",
                                  "127.0.0.1:0", *common))
        assert "Address already in use" in line
    line = one_line_error(run("node", "--listen", "192.0.2.77:7000", "--raft",
                              "127.0.0.1:0", *common))
    assert "address" in line.lower()
    line = one_line_error(run("node", "--listen", "127.0.0.1:0", "--raft", "127.0.0.1:0",
                              "--batches-in-flight", "0", *common))
    assert "--batches-in-flight must be between 1 and 16" in line
    line = one_line_error(run("node", "--listen", "127.0.0.1:0", "--raft", "127.0.0.1:0",
                              "--sessions-per-tick", "0", *common))
    assert "--sessions-per-tick must be between 1 and 1000000" in line


def test_admin_status_unreachable_is_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("y" * 64)
    line = one_line_error(run("admin", "--cluster", "127.0.0.1:1", "--secret-file",
                              str(secret), "status"))
    assert "cluster unreachable" in line


def test_up_json_runs_until_sigterm(tmp_path: Path) -> None:
    """``switchboard up --json`` prints one JSON object per node, creates the secret
    with mode 0600, and stops every node cleanly on SIGTERM."""
    base = free_base_port(3)
    data = tmp_path / "data"
    proc = subprocess.Popen([*SB, "up", "--json", "--data-dir", str(data), "--base-port",
                             str(base)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        rows = [json.loads(proc.stdout.readline()) for _ in range(3)]
        for row in rows:
            assert {"id", "client", "raft", "admin", "metrics", "pid"} <= set(row)
        assert [r["client"] for r in rows] == [f"127.0.0.1:{base + k}" for k in range(3)]
        assert stat.S_IMODE(os.stat(data / "secret").st_mode) == 0o600
        status = run("admin", "--cluster", ",".join(r["admin"] for r in rows),
                     "--secret-file", str(data / "secret"), "status", "--json")
        assert status.returncode == 0, status.stderr
        roles = sorted(n["role"] for n in json.loads(status.stdout)["nodes"])
        assert roles == ["follower", "follower", "leader"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for row in rows:
            with pytest.raises(ProcessLookupError):
                os.kill(row["pid"], 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_a_data_dir_of_another_layout(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "cluster.json").write_text(json.dumps({"nodes": 5, "host": "127.0.0.1",
                                                   "base_port": 9000}))
    line = one_line_error(run("up", "--data-dir", str(data), "--base-port", "9100"))
    assert "use the same flags" in line


async def test_chat_client(make_cluster: Callable[..., Cluster]) -> None:
    """A person at the terminal: /allow, /watch, /away, /msg; incoming messages and
    presence changes are printed as they arrive."""
    c = make_cluster()
    nodes = ",".join(c.client_addresses())
    proc = await trio.lowlevel.open_process(
        [*SB, "chat", "--nodes", nodes, "--user", "alice", "--token", c.token("alice")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    out = b""

    async def expect(text: str, timeout: float = 15) -> None:
        nonlocal out
        with trio.fail_after(timeout):
            while text.encode() not in out:
                chunk = await proc.stdout.receive_some(65536)  # type: ignore[union-attr]
                assert chunk, f"chat exited; output so far: {out!r}"
                out += chunk

    try:
        with trio.fail_after(60):
            await expect("logged in as alice")
            async with client.connect(c.client_addresses(), user="bob",
                                      token=c.token("bob")) as bob:
                await bob.allow("alice")
                await bob.subscribe("alice")
                for line in ("/allow bob", "/watch bob", "/away lunch", "/msg bob hello bob"):
                    await proc.stdin.send_all(line.encode() + b"\n")
                await expect("watching bob")
                m = await bob.next_event(15)
                while not isinstance(m, Message):
                    m = await bob.next_event(15)
                assert (m.sender, m.body) == ("alice", "hello bob")
                await bob.send("alice", "hi alice")
                await expect("<bob> hi alice")
                await bob.set_presence("busy", "in a meeting")
                await expect("bob is busy (in a meeting)")
            await expect("bob is offline")
            await proc.stdin.send_all(b"/quit\n")
            with trio.fail_after(10):
                assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_token_command_prints_a_valid_token(tmp_path: Path) -> None:
    from node.auth import Keys, read_secret, verify_token

    secret = tmp_path / "s"
    secret.write_text("z" * 64)
    p = run("token", "zoe", "--secret-file", str(secret), "--ttl", "60")
    assert p.returncode == 0
    verify_token(Keys.from_secret(read_secret(secret)).token, p.stdout.strip(), "zoe")
    time.sleep(0)
