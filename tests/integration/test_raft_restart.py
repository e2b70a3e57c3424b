"""A member that restarts and takes long to restore its snapshot or to replay
its journal must not disrupt a healthy leader: three real ``ReplicatedLog``
members on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from replication.raft import ReplicatedLog
from replication.table import SessionTable

from .raftgroup import leader_of, propose_noop, raft_group

pytestmark = [pytest.mark.integration]


class _SlowToRestore(SessionTable):
    """A table whose snapshot takes 1.2 s to restore, as a node's 200,000
    sessions do: longer than the election timeout (0.35-0.7 s)."""

    def restore(self, data: bytes) -> None:
        time.sleep(1.2)
        super().restore(data)


def test_a_member_restored_slowly_waits_for_the_leader_before_campaigning(
        tmp_path: Path) -> None:
    """The restarted follower's election deadline, set before it loaded its
    snapshot, had long passed when it first reached its peers: it campaigned at
    once with a higher term and the healthy leader stepped down (seen at
    200,000 sessions: terms 1 -> 3). It now waits a full election timeout after
    restoring, and after each first connection, for the leader to reach it."""
    with raft_group(tmp_path, compaction_entries=20, compaction_seconds=3600) as logs:
        lead = leader_of(logs)
        seq = 0
        deadline = time.monotonic() + 20
        while not all(lg.status().compactions for lg in logs):  # every member has a snapshot
            assert time.monotonic() < deadline, "no compaction"
            seq += 1
            propose_noop(logs[lead], seq)
            time.sleep(0.004)
        time.sleep(0.5)
        term = logs[lead].status().term
        for round_ in range(3):
            k = next(i for i in range(3) if i != lead)
            config = logs[k].config
            logs[k].close()
            time.sleep(0.3)
            logs[k] = ReplicatedLog(config, _SlowToRestore(), lambda _i, _b: None)
            time.sleep(3.0)
            assert leader_of(logs) == lead, f"round {round_}: the leader changed"
            assert logs[lead].status().term == term, f"round {round_}: an election"
            assert logs[k].status().commit_index >= seq


class _SlowToReplay(SessionTable):
    """A table that takes 40 ms per command: a restarted member replaying a
    journal of a node's 200,000 logins holds its thread for seconds."""

    def apply(self, cmd: Any) -> Any:
        time.sleep(0.04)
        return super().apply(cmd)


def test_a_member_replaying_a_long_journal_waits_for_the_leader_before_campaigning(
        tmp_path: Path) -> None:
    """A restarted member applies its journal's committed entries in one tick,
    before it reads its sockets: its election deadline passed meanwhile, and it
    campaigned as soon as it had a connection, before the leader's first
    message could reach it (seen at 200,000 sessions: terms 2 -> 3 about 14 s
    after a restart). Its deadline now moves on by the time it spent applying,
    so the start grace (a retry period and an election timeout) still lies
    ahead when the replay ends."""
    with raft_group(tmp_path, compaction_entries=100_000, compaction_seconds=3600) as logs:
        lead = leader_of(logs)
        for seq in range(1, 61):  # 60 entries: 2.4 s to replay
            propose_noop(logs[lead], seq)
            time.sleep(0.01)
        k = next(i for i in range(3) if i != lead)
        deadline = time.monotonic() + 10
        while logs[k].status().last_applied < logs[lead].status().commit_index:
            assert time.monotonic() < deadline, "the follower did not catch up"
            time.sleep(0.05)
        time.sleep(1.5)  # the journal records its commit index once a second
        term = logs[lead].status().term
        config = logs[k].config
        logs[k].close()
        time.sleep(0.3)
        logs[k] = ReplicatedLog(config, _SlowToReplay(), lambda _i, _b: None)
        deadline = time.monotonic() + 15
        while logs[k].status().last_applied < logs[lead].status().commit_index:
            assert time.monotonic() < deadline, "the restarted member did not catch up"
            time.sleep(0.05)
        time.sleep(1.5)
        assert leader_of(logs) == lead, "the leader changed"
        assert logs[lead].status().term == term, "an election"
