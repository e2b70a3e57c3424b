"""A checkpoint's digest through three real ``ReplicatedLog`` members on loopback.

Each member digested the whole table when it applied a ``Checkpoint``, on its
tick thread: with 200,000 sessions that held every tick thread for 3-4 s at
once (seen at the end of the capacity bench, whose replica check commits one),
no member sent or answered a Raft message meanwhile, the followers elected a
new leader and every node fenced itself. The digest is now computed in a
forked child after the checkpoint's entry applied.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import replication.raft as raft
from replication.batch import AppliedBatch
from replication.commands import Checkpoint, Noop
from replication.table import SessionTable

from .raftgroup import leader_of, propose, raft_group

pytestmark = [pytest.mark.integration]

DIGEST_SECONDS = 2.0


class _Members:
    """What each of the three members applied (batch seq -> (when, log index))
    and reported for checkpoints (tag, log index, digest)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: list[dict[int, tuple[float, int]]] = [{} for _ in range(3)]
        self.digests: list[list[tuple[str, int, str]]] = [[] for _ in range(3)]

    def on_applied(self, member: int) -> Any:
        def record(index: int, batch: AppliedBatch) -> None:
            with self.lock:
                self.applied[member][batch.seq] = (time.monotonic(), index)
        return record

    def on_checkpoint(self, member: int) -> Any:
        def record(tag: str, index: int, digest: str) -> None:
            with self.lock:
                self.digests[member].append((tag, index, digest))
        return record

    def wait(self, done: Any, timeout: float = 10.0) -> bool:
        """Until ``done(applied, digests)`` holds (under the lock), or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if done(self.applied, self.digests):
                    return True
            time.sleep(0.01)
        return False


def test_a_slow_checkpoint_digest_never_holds_the_tick_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a digest that takes 2 s on every member, entries proposed right after
    the checkpoint commit everywhere well before one digest is done (before, no
    entry committed for 10 s: the members elected a leader after another), and
    every member reports the same digest at the checkpoint's log index."""
    real_digest = SessionTable.digest

    def slow_digest(table: SessionTable) -> str:
        time.sleep(DIGEST_SECONDS)
        return real_digest(table)

    monkeypatch.setattr(SessionTable, "digest", slow_digest)
    m = _Members()
    with raft_group(tmp_path, m.on_applied, on_checkpoint=m.on_checkpoint, fsync=False) as logs:
        k = leader_of(logs)
        propose(logs[k], 1, Checkpoint("c1"))
        t0 = time.monotonic()
        for seq in range(2, 7):
            propose(logs[k], seq, Noop())
            time.sleep(0.05)
        m.wait(lambda applied, digests: all(len(d) == 1 for d in digests)
               and all(len(a) == 6 for a in applied))
        with m.lock:
            noops = [max(a[s][0] for s in range(2, 7)) - t0 for a in m.applied if len(a) == 6]
            got = [list(d) for d in m.digests]
            checkpoint_index = m.applied[0][1][1]
        assert len(noops) == 3, m.applied
        # The noops commit and apply everywhere well before one digest is done.
        assert max(noops) < 0.75 * DIGEST_SECONDS, noops
        assert got[0] and got[0] == got[1] == got[2], got
        tag, index, digest = got[0][0]
        assert tag == "c1" and index == checkpoint_index and not digest.startswith("unavailable")


def test_a_digest_that_cannot_be_computed_is_reported_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest child that dies, or a checkpoint while a member already runs
    ``MAX_DIGEST_CHILDREN`` digests, is reported as unavailable (never digested
    on the tick thread), so whoever waits for it hears at once."""
    def dying_digest(_table: SessionTable) -> str:
        os._exit(3)  # the child dies without a word

    monkeypatch.setattr(SessionTable, "digest", dying_digest)
    m = _Members()
    with raft_group(tmp_path, m.on_applied, on_checkpoint=m.on_checkpoint, fsync=False) as logs:
        k = leader_of(logs)
        propose(logs[k], 1, Checkpoint("dies"))
        m.wait(lambda _applied, digests: all(digests))
        with m.lock:
            assert all(d and d[0][0] == "dies" and d[0][2].startswith("unavailable")
                       for d in m.digests), m.digests

        # Every slot busy: the next checkpoint is not digested, and says so.
        gate = threading.Event()

        def waiting_digest(_table: SessionTable) -> str:
            gate.wait(30)  # in the children: never set there, they wait it out
            return "0" * 16

        monkeypatch.setattr(SessionTable, "digest", waiting_digest)
        monkeypatch.setattr(raft, "DIGEST_DEADLINE", 3.0)
        for seq, tag in enumerate(["a", "b", "c"], start=2):  # one entry each
            propose(logs[k], seq, Checkpoint(tag))
            assert m.wait(lambda applied, _d, seq=seq: all(seq in a for a in applied)), seq
        m.wait(lambda _applied, digests: all(len(d) >= 4 for d in digests))
        with m.lock:
            for d in m.digests:
                by_tag = {tag: digest for tag, _i, digest in d}
                assert by_tag.get("c", "").startswith("unavailable: too many"), d
