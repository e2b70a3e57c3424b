"""Elections after a leader loss: three real ``ReplicatedLog`` members on
loopback, the leader closed (its links and its listening socket close with it,
as a killed process's do)."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from replication.raft import PROBE_HOLD, RaftTimings, ReplicatedLog

from .raftgroup import leader_of, propose_noop, raft_group

pytestmark = [pytest.mark.integration]


def test_a_leader_lost_after_a_quiet_spell_is_replaced_in_one_term(tmp_path: Path) -> None:
    """After a spell longer than the connection timeout with only heartbeats,
    the followers' link to each other had read nothing for that long, so the
    first vote request closed it instead of going out: the vote was lost and
    the election took a second term (about 1.1 s instead of 0.45 s with the
    default timings). Non-leaders now keep that link alive, and the first
    candidate wins. The followers wait for their election timeouts here (no
    early campaign), whose range is widened so that a genuine split vote (both
    followers timing out within a few milliseconds) stays rare."""
    timings = RaftTimings(connection_timeout=2.0, election_min=0.35, election_max=1.9,
                          leader_lost_step=0.0)
    with raft_group(tmp_path, timings=timings) as logs:
        lead = leader_of(logs)
        propose_noop(logs[lead], 1)
        time.sleep(3.0)  # > connection_timeout: heartbeats only
        term = logs[lead].status().term
        logs[lead].close()
        new = leader_of(logs, among=[k for k in range(3) if k != lead])
        assert logs[new].status().term == term + 1


# Election timeouts far longer than anything else in these tests: an election
# that happens within them was brought forward.
_SLOW = RaftTimings(election_min=4.0, election_max=5.0)


def _close_leader_early(logs: list[ReplicatedLog], lead: int) -> tuple[int, int]:
    """Close the leader ``lead`` (of a group on ``_SLOW`` timings); check that
    another member leads within 3 s, one term up. Returns the probes and early
    campaigns this process had counted before the close."""
    term = logs[lead].status().term
    _alive, probes, early = ReplicatedLog.link_statistics()
    t0 = time.monotonic()
    logs[lead].close()
    new = leader_of(logs, among=[k for k in range(3) if k != lead])
    assert time.monotonic() - t0 < 3.0, "the followers waited for their election timeout"
    assert logs[new].status().term == term + 1
    return probes, early


def test_a_killed_leader_is_replaced_without_waiting_for_the_election_timeout(
        tmp_path: Path) -> None:
    """A killed leader's kernel closes its links and refuses connections: a
    follower whose link to it closes tries its address, and on a refusal
    campaigns in its turn among the followers, so the new leader is there well
    before anyone's election timeout (4-5 s here), in one term. A member that
    is closed (a node stopped by SIGTERM) stops listening first, so both
    followers' probes are refused, not accepted by a listener about to go."""
    with raft_group(tmp_path, timings=_SLOW) as logs:
        lead = leader_of(logs)
        propose_noop(logs[lead], 1)
        time.sleep(0.5)
        probes, early = _close_leader_early(logs, lead)
        time.sleep(1.0)  # pysyncobj's reconnects to the dead leader fail meanwhile
        _alive, probes_after, early_after = ReplicatedLog.link_statistics()
        # One probe per follower (a failed reconnect is no news), each refused:
        # the closed leader stopped listening before its links closed.
        assert (probes_after - probes, early_after - early) == (2, 2)


def test_a_leader_whose_listener_outlives_its_links_for_a_moment_counts_as_gone(
        tmp_path: Path) -> None:
    """A SIGKILLed process's kernel closes its files one by one: its listener may
    take a follower's probe after the links closed, then resets it as it closes
    (measured: bench/results/ab-20261128-s12/race.py.txt). Such a probe used to
    count as a live leader, and the followers waited out their election
    timeouts; a probe that is reset within ``PROBE_HOLD`` now counts as gone.
    The leader here closes its links, then its listener a moment later."""
    with raft_group(tmp_path, timings=_SLOW) as logs:
        lead = leader_of(logs)
        propose_noop(logs[lead], 1)
        time.sleep(0.5)
        sync = logs[lead]._sync
        transport = sync._SyncObj__transport
        destroy = sync._doDestroy

        def dying() -> None:
            for node in list(transport._nodes):
                transport.dropNode(node)
            time.sleep(PROBE_HOLD * 0.8)  # the followers' probes connect meanwhile
            transport._server.unbind()
            destroy()

        sync._doDestroy = dying  # type: ignore[method-assign]  # called on its tick thread
        _probes, early = _close_leader_early(logs, lead)
        assert ReplicatedLog.link_statistics()[2] > early


def test_a_dropped_link_to_a_live_leader_starts_no_election(tmp_path: Path) -> None:
    """The follower's probe of a live leader's address connects: the leader is
    not gone, the link is made again (pysyncobj retries it) and nobody
    campaigns."""
    with raft_group(tmp_path, timings=_SLOW) as logs:
        lead = leader_of(logs)
        propose_noop(logs[lead], 1)
        time.sleep(0.5)
        term = logs[lead].status().term
        follower = (lead + 1) % 3
        sync = logs[follower]._sync
        leader_node = sync._SyncObj__raftLeader
        transport = sync._SyncObj__transport
        _alive, probes, early = ReplicatedLog.link_statistics()
        # Peer links are only touched on the tick thread.
        logs[follower]._tick_calls.append(lambda: transport._connections[leader_node].disconnect())
        deadline = time.monotonic() + 10
        while ReplicatedLog.link_statistics()[1] == probes:
            assert time.monotonic() < deadline, "the follower never probed the leader"
            time.sleep(0.01)
        time.sleep(2.0)
        assert [lg.status().role for lg in logs].count("leader") == 1
        assert logs[lead].status().role == "leader"
        assert logs[lead].status().term == term
        assert leader_node.address in logs[follower].status().connected
        assert ReplicatedLog.link_statistics()[2] == early


def test_a_closed_member_stops_listening_before_its_links_close(tmp_path: Path) -> None:
    """pysyncobj closed a member's links before its listening socket: a follower
    that probed the address as soon as its link closed could be accepted by the
    listener about to go (seen with five members), and then waited out its
    election timeout. At the first link's close the address now refuses."""
    with raft_group(tmp_path) as logs:
        lead = leader_of(logs)
        member = logs[lead]
        transport = member._sync._SyncObj__transport
        host, port = member.config.self_addr.rsplit(":", 1)
        seen: list[int] = []
        drop_node = transport.dropNode

        def dropping(node: Any) -> None:
            if not seen:
                with socket.socket() as probe:
                    probe.settimeout(2.0)
                    seen.append(probe.connect_ex((host, int(port))))
            drop_node(node)

        transport.dropNode = dropping
        member.close()
        assert seen == [errno.ECONNREFUSED]
