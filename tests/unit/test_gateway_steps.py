"""A logged-in client connection's read loop (``ClientConnection.run``), on a
real ``Gateway`` and ``Core`` (no log) over a socket pair: a request costs its
task one step, not two, and a connection whose data keeps coming still yields
between reads."""

from __future__ import annotations

import socket
from pathlib import Path

import trio
import trio.testing

from node.auth import Keys
from node.config import NodeConfig
from node.core import Core
from node.gateway import LOGGED_IN, ClientConnection, Gateway
from node.protocol import encode
from tests.unit.sockframes import read_frames


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


def _connection(tmp_path: Path) -> tuple[ClientConnection, socket.socket, socket.socket]:
    cfg = NodeConfig(id="n1", listen=("127.0.0.1", 0), raft="127.0.0.1:1", peers=(),
                     data_dir=tmp_path, secret_file=None, insecure=True,
                     frame_rate=1e9, frame_burst=10**9)  # no throttling sleeps
    gateway = Gateway(cfg, Core(cfg, None), Keys.insecure())
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = ClientConnection(gateway, ours, ("127.0.0.1", 5000))
    conn.session, conn.epoch, conn.user, conn.phase = "s1", 1, "alice", LOGGED_IN
    gateway.register(conn)
    return conn, ours, theirs


async def test_a_request_costs_the_connection_one_step(tmp_path: Path) -> None:
    conn, _ours, theirs = _connection(tmp_path)
    steps = _Steps()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(conn.run, name="conn")
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(steps)
            try:
                for rid in range(1, 6):
                    theirs.send(encode({"type": "ping", "data": rid}))
                    await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert [f["type"] for f in read_frames(theirs)] == ["pong"] * 5
            theirs.shutdown(socket.SHUT_WR)  # end of file: run() returns
    assert steps.names.count("conn") == 5
    theirs.close()


async def test_a_connection_with_data_waiting_yields_between_reads(tmp_path: Path) -> None:
    """Back-to-back reads (the client writes faster than the task reads) still
    let other tasks in between: a busy client cannot starve the others."""
    conn, _ours, theirs = _connection(tmp_path)
    stats = conn.gw.stats
    other_ran: list[int] = []  # the connection's frames handled, each time the other ran

    async def other() -> None:
        while True:
            other_ran.append(stats.frames_in)
            await trio.sleep(0)

    frames = b"".join(encode({"type": "ping", "data": i}) for i in range(1, 20001))
    got = bytearray()

    def drain() -> None:
        theirs.settimeout(20)
        while chunk := theirs.recv(1 << 16):
            got.extend(chunk)
            if got.count(b"pong") == 20000:
                return

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            conn.gw._handlers = n  # the gateway's writer tasks, when a socket is full
            n.start_soon(conn.run, name="conn")
            n.start_soon(other)
            n.start_soon(trio.to_thread.run_sync, drain)
            await trio.to_thread.run_sync(theirs.sendall, frames)
            while got.count(b"pong") < 20000:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert got.count(b"pong") == 20000
    # The other task ran while the connection was mid-stream, between its reads
    # (64 KiB, a few thousand pings each), not only once it had read everything.
    assert sum(0 < n < 20000 for n in other_ran) >= 3, other_ran[:50]
    theirs.close()
