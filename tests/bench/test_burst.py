"""``bench.burst.LoginBurst`` against a real node: many logins from one epoll
loop, each failure named, and a logout the node carries out."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bench.burst import LoginBurst
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
