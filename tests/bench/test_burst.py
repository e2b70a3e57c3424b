"""The load generators against a real node: ``bench.burst.LoginBurst`` (many
logins from one epoll loop, each failure named, a logout the node carries
out) and ``bench.loadgen.RawConn`` (requests written without a task step)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from bench.burst import LoginBurst
from bench.loadgen import Counters, RawConn, open_and_login
from cluster.ports import free_base_port
from tests.conftest import Cluster

pytestmark = pytest.mark.integration


def test_a_burst_logs_in_names_failures_and_logs_out(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(1, ["--workers", "2"])
    addr = c.client_addresses()[0]
    dead = f"127.0.0.1:{free_base_port(1)}"  # nothing listens there
    targets = [(addr, f"u{i}", c.token(f"u{i}")) for i in range(200)]
    targets += [(addr, "mallory", c.token("eve")), (dead, "v", c.token("v"))]
    burst = LoginBurst(targets)
    try:
        burst.login(timeout=30.0)
        ok = burst.ok
        assert len(ok) == 200
        assert len({b.session for b in ok}) == 200
        assert all(b.node == "n1" and b.t_login_ok > b.t_connect > 0 for b in ok)
        assert burst.failures() == {"auth-failed": 1, "connect-failed": 1}
        assert c.status("n1")["sessions_local"] == 200

        burst.logout(timeout=15.0)
        assert all(b.closed for b in ok)
        deadline = time.monotonic() + 10
        while c.status("n1")["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.status("n1")["sessions"] == 0
    finally:
        burst.close()


class _Steps(trio.abc.Instrument):
    """Counts the steps of tasks whose name contains ``part``."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.part in task.name:
            self.count += 1


async def test_raw_requests_are_written_without_a_writer_step(
        make_cluster: Callable[..., Cluster]) -> None:
    """``RawConn`` writes each request on its socket at once (pipelined ones
    issued while handling a read go out together, after it): the load
    generator spends no task step per request, CPU taken from the nodes on a
    2-core machine. Every request is still answered, in order."""
    c = make_cluster(1)
    conn = RawConn(c.client_addresses()[0], "alice", c.token("alice"), Counters())
    answered: list[int] = []
    total = 300

    def on_reply(rc: RawConn, _kind: str, _t: float, f: dict[str, Any], _now: float) -> None:
        assert f["type"] == "ok", f
        answered.append(f["rid"])
        if rc.next_rid <= total:  # one more per answer: 8 in flight
            rc.request({"type": "presence", "status": "away", "text": f"{rc.next_rid}"},
                       "presence")

    conn.on_reply = on_reply
    steps = _Steps("RawConn._writer")
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            assert await open_and_login(n, conn)
            trio.lowlevel.add_instrument(steps)
            try:
                for _ in range(8):
                    conn.request({"type": "presence", "status": "online", "text": "x"},
                                 "presence")
                while len(answered) < total:
                    await trio.sleep(0.01)
            finally:
                trio.lowlevel.remove_instrument(steps)
            await conn.logout()
            n.cancel_scope.cancel()
    assert answered == list(range(1, total + 1))
    assert steps.count == 0
