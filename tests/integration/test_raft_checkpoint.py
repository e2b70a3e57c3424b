"""A checkpoint's digest through three real ``ReplicatedLog`` members on loopback.

Each member digested the whole table when it applied a ``Checkpoint``, on its
tick thread: with 200,000 sessions that held every tick thread for 3-4 s at
once (seen at the end of the capacity bench, whose replica check commits one),
no member sent or answered a Raft message meanwhile, the followers elected a
new leader and every node fenced itself. The digest is now computed in a
forked child after the checkpoint's entry applied.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from replication.batch import AppliedBatch
from replication.commands import Checkpoint, Noop
from replication.table import SessionTable

from .raftgroup import leader_of, propose, raft_group

pytestmark = [pytest.mark.integration]

DIGEST_SECONDS = 2.0


def test_a_slow_checkpoint_digest_never_holds_the_tick_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a digest that takes 2 s on every member, entries proposed right after
    the checkpoint commit everywhere at once, the leader stays leader in the same
    term, and every member reports the same digest at the same log index."""
    real_digest = SessionTable.digest

    def slow_digest(table: SessionTable) -> str:
        time.sleep(DIGEST_SECONDS)
        return real_digest(table)

    monkeypatch.setattr(SessionTable, "digest", slow_digest)
    lock = threading.Lock()
    applied: list[dict[int, float]] = [{} for _ in range(3)]  # noop seq -> when applied
    digests: list[list[tuple[str, int, str]]] = [[] for _ in range(3)]

    def on_applied(member: int) -> Any:
        def record(_index: int, batch: AppliedBatch) -> None:
            with lock:
                applied[member][batch.seq] = time.monotonic()
        return record

    def on_checkpoint(member: int) -> Any:
        def record(tag: str, index: int, digest: str) -> None:
            with lock:
                digests[member].append((tag, index, digest))
        return record

    with raft_group(tmp_path, on_applied, on_checkpoint=on_checkpoint, fsync=False) as logs:
        k = leader_of(logs)
        term = logs[k].status().term
        propose(logs[k], 1, Checkpoint("c1"))
        t0 = time.monotonic()
        for seq in range(2, 7):
            propose(logs[k], seq, Noop())
            time.sleep(0.05)
        deadline = t0 + 10
        while time.monotonic() < deadline:
            with lock:
                if all(len(d) == 1 for d in digests) and all(len(a) == 6 for a in applied):
                    break
            time.sleep(0.02)
        with lock:
            noops = [max(a[s] for s in range(2, 7)) - t0 for a in applied if len(a) == 6]
            got = [list(d) for d in digests]
        assert len(noops) == 3, applied
        # The noops commit and apply everywhere well before one digest is done.
        assert max(noops) < DIGEST_SECONDS / 2, noops
        assert got[0] and got[0] == got[1] == got[2], got
        assert got[0][0][0] == "c1"
        st = logs[k].status()
        assert st.role == "leader" and st.term == term
