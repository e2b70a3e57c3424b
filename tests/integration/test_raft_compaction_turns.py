"""Members compact in turns, never together: three real ``ReplicatedLog``
members on loopback under a steady stream of entries.

Left to pysyncobj, every member reached the entry threshold at the same log
index and compacted at once: three compaction children forked together on the
same cores, and three journal cuts at the same moment stalled a quorum.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from replication.raft import ReplicatedLog

from .raftgroup import leader_of, propose_noop, raft_group

pytestmark = [pytest.mark.integration]

EVERY = 240  # compaction_entries: a member's turn is 80 indices of each 240


def test_members_compact_in_turns(tmp_path: Path) -> None:
    started_before = ReplicatedLog.compaction_statistics()[0]
    with raft_group(tmp_path, fsync=True, compaction_entries=EVERY,
                    compaction_seconds=3600) as logs:
        leader = logs[leader_of(logs)]
        starts: list[list[int]] = [[], [], []]  # the log index of each compaction
        seq = 0
        deadline = time.monotonic() + 30
        while min(len(s) for s in starts) < 3:
            assert time.monotonic() < deadline, starts
            seq += 1
            propose_noop(leader, seq)
            time.sleep(0.004)
            for k, lg in enumerate(logs):
                st = lg.status()
                if st.compactions > len(starts[k]):
                    starts[k].append(st.compaction_index)
        members = logs[0].status().members
    # the process's compaction starts, timed (three members in this process)
    assert ReplicatedLog.compaction_statistics()[0] - started_before >= 9
    for k, lg in enumerate(logs):
        turn = members.index(lg.config.self_addr)
        # each in its own turn (the snapshot ends one before the applied index),
        # once per cycle of EVERY indices
        assert all((i + 1) * 3 // EVERY % 3 == turn for i in starts[k]), (k, turn, starts)
        assert all(EVERY // 2 < b - a < 2 * EVERY
                   for a, b in zip(starts[k][1:], starts[k][2:], strict=False)), (k, starts)
