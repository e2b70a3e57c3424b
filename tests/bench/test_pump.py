"""``bench.pump.MessagePump`` against a real node: every committed message
delivered once and acknowledged, open and closed loop, a recipient lost
mid-run counted apart; and ``bench core``'s message phase driven without a Trio
task step per message."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from bench.burst import LoginBurst
from bench.common import BenchCluster, Options
from bench.core import Plan, bench_messages
from bench.pump import MessagePump
from tests.conftest import Cluster

pytestmark = pytest.mark.integration


def _pairs(c: Cluster, n: int) -> tuple[LoginBurst, list[Any], list[Any]]:
    addr = c.client_addresses()[0]
    burst = LoginBurst([(addr, f"{role}{i}", c.token(f"{role}{i}"))
                        for role in ("r", "s") for i in range(n)])
    burst.login(timeout=30.0)
    assert len(burst.ok) == 2 * n, burst.failures()
    return burst, burst.conns[n:], burst.conns[:n]


def _mailboxes_empty(c: Cluster, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.status("n1")["mailbox"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_paced_run_delivers_every_committed_message_once_and_acks_it(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(1)
    burst, senders, recipients = _pairs(c, 3)
    try:
        pump = MessagePump(senders, recipients, ack_batch=16, ack_every=0.05)
        t0 = time.perf_counter()
        pump.run(rate=300.0, window=0, measure_from=t0 + 0.2, measure_to=t0 + 1.2, drain=5.0)
        st = pump.stats
        assert not st.failures.any()
        assert 300 <= st.sent <= 400 and st.committed == st.sent and st.shed == 0
        assert st.delivered == st.committed and st.duplicates == 0
        assert st.seen == set().union(*st.committed_ids.values())
        assert sorted(st.committed_ids) == [0, 1, 2]  # round-robin over the senders
        assert 250 <= len(st.e2e) <= 320 and len(st.commit) == len(st.e2e)
        assert all(0 < x < 5 for x in st.e2e)
        assert _mailboxes_empty(c)  # every delivery was acknowledged
        burst.logout(timeout=10.0)
    finally:
        burst.close()


def test_the_closed_loop_keeps_a_window_in_flight(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(1)
    burst, senders, recipients = _pairs(c, 2)
    try:
        pump = MessagePump(senders, recipients)
        t0 = time.perf_counter()
        pump.run(rate=None, window=4, measure_from=t0, measure_to=t0 + 0.8, drain=5.0)
        st = pump.stats
        assert st.committed == st.sent > 2 * 4 and st.failures.errors == {}
        assert st.delivered == st.committed and st.duplicates == 0
        assert _mailboxes_empty(c)
        burst.logout(timeout=10.0)
    finally:
        burst.close()


def test_a_second_run_with_the_same_users_sends_new_messages(
        make_cluster: Callable[..., Cluster]) -> None:
    """A send is identified by its cmid among its user's recent sends (a repeat is
    a retry, answered with the first message's id and not delivered again): a
    second pump logging in the same users must not repeat the first one's cmids."""
    c = make_cluster(1)
    for _run in range(2):
        burst, senders, recipients = _pairs(c, 2)
        try:
            pump = MessagePump(senders, recipients, ack_every=0.05)
            t0 = time.perf_counter()
            pump.run(rate=100.0, window=0, measure_from=t0, measure_to=t0 + 0.5, drain=5.0)
            st = pump.stats
            assert st.committed == st.sent > 0 and st.failures.errors == {}
            assert st.delivered == st.committed and st.undelivered(dropped=False) == 0
            burst.logout(timeout=10.0)
        finally:
            burst.close()


def test_a_lost_recipient_is_counted_apart_and_the_run_still_ends(
        make_cluster: Callable[..., Cluster]) -> None:
    """A recipient whose connection goes away keeps its messages in its mailbox:
    the pump does not wait the whole drain for them, and says which pair."""
    c = make_cluster(1)
    burst, senders, recipients = _pairs(c, 2)
    try:
        pump = MessagePump(senders, recipients)
        gone = recipients[1].sock
        assert gone is not None
        gone.shutdown(2)  # SHUT_RDWR: the pump reads end-of-file
        t0 = time.perf_counter()
        pump.run(rate=200.0, window=0, measure_from=t0, measure_to=t0 + 0.5, drain=20.0)
        took = time.perf_counter() - t0
        st = pump.stats
        assert took < 10.0, took
        assert st.failures.closed_early == 1 and st.dropped == {1}
        assert st.committed == st.sent and st.failures.errors == {}
        assert st.committed_ids[0] <= st.seen  # the other pair: every message delivered
        assert not (st.committed_ids[1] & st.seen)
        assert st.undelivered(dropped=False) == 0
        assert st.undelivered(dropped=True) == len(st.committed_ids[1]) > 0
    finally:
        burst.close()


class _AllSteps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


class _NoProgress:
    def add_task(self, *_a: object, **_k: object) -> int:
        return 0

    def update(self, *_a: object, **_k: object) -> None:
        pass


def test_a_message_phase_costs_no_task_step_per_message() -> None:
    """``bench core``'s message phase: logins, sends, replies, deliveries and acks
    all happen in the pump's thread, so the bench's Trio loop only keeps time
    (with ``RawConn``, a reader task per connection: steps for every frame)."""
    plan = Plan(login_clients=0, login_waves=0, presence_clients=(), presence_seconds=0,
                warmup=0.3, pairs_per_node=3, target_rates=(), window=4,
                message_seconds=1.5)
    steps = _AllSteps()

    async def phase(bc: BenchCluster) -> dict[str, Any]:
        with trio.fail_after(60):
            trio.lowlevel.add_instrument(steps)
            try:
                return await bench_messages(bc, plan, "same", 400.0, _NoProgress())
            finally:
                trio.lowlevel.remove_instrument(steps)

    with BenchCluster(Options(name="test"), "test-pump", nodes=1) as bc:
        bc.c.wait_ready(timeout=60)
        res = trio.run(phase, bc)
    assert res["pairs_active"] == 3 and res["committed"] >= 500
    assert res["delivered"] == res["committed"] and res["missing"] == 0
    assert res["duplicates"] == 0 and res["failures"]["closed_early"] == 0
    assert steps.count < 200, steps.count
