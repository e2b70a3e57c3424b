"""When the leader's process dies, its kernel closes its links: the followers
campaign in turn at once instead of waiting out an election timeout. Three
real ``ReplicatedLog`` members on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from replication.raft import RaftTimings, ReplicatedLog
from replication.table import SessionTable

from .raftgroup import leader_of, propose_noop, raft_group

pytestmark = [pytest.mark.integration]


def _leader_among(logs: list[ReplicatedLog], members: list[int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        for k in members:
            if logs[k].status().role == "leader":
                return k
        assert time.monotonic() < deadline, "no new leader"
        time.sleep(0.01)


def test_followers_campaign_in_turn_when_the_leaders_links_close(tmp_path: Path) -> None:
    """With an election timeout of 3-4 s, a follower waited that long after the
    leader's last heartbeat. Now the follower first in turn (the lowest address
    among the survivors) campaigns at once and wins in one election; the other
    waits a step and votes for it."""
    slow = RaftTimings(election_min=3.0, election_max=4.0)
    with raft_group(tmp_path, timings=slow) as logs:
        lead = leader_of(logs)
        for seq in range(1, 6):
            propose_noop(logs[lead], seq)
        time.sleep(0.5)
        term = logs[lead].status().term
        before = ReplicatedLog.early_campaigns()
        survivors = [k for k in range(3) if k != lead]
        config = logs[lead].config
        t0 = time.monotonic()
        logs[lead].close()
        new = _leader_among(logs, survivors, timeout=10.0)
        took = time.monotonic() - t0
        first = min(survivors, key=lambda k: logs[k].config.self_addr)
        assert took < 1.5, f"a new leader only after {took:.2f} s"
        assert new == first
        assert logs[new].status().term == term + 1, "more than one election"
        assert ReplicatedLog.early_campaigns() > before
        logs[lead] = ReplicatedLog(config, SessionTable(), lambda _i, _b: None)
