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
    lock = threading.Lock()
    applied: list[dict[int, float]] = [{} for _ in range(3)]  # batch seq -> when applied
    at_index: list[dict[int, int]] = [{} for _ in range(3)]  # batch seq -> log index
    digests: list[list[tuple[str, int, str]]] = [[] for _ in range(3)]

    def on_applied(member: int) -> Any:
        def record(index: int, batch: AppliedBatch) -> None:
            with lock:
                applied[member][batch.seq] = time.monotonic()
                at_index[member][batch.seq] = index
        return record

    def on_checkpoint(member: int) -> Any:
        def record(tag: str, index: int, digest: str) -> None:
            with lock:
                digests[member].append((tag, index, digest))
        return record

    with raft_group(tmp_path, on_applied, on_checkpoint=on_checkpoint, fsync=False) as logs:
        k = leader_of(logs)
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
        assert max(noops) < 0.75 * DIGEST_SECONDS, noops
        assert got[0] and got[0] == got[1] == got[2], got
        tag, index, digest = got[0][0]
        assert tag == "c1" and index == at_index[0][1] and not digest.startswith("unavailable")


def test_a_digest_that_cannot_be_computed_is_reported_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest child that dies, or a checkpoint while a member already runs
    ``MAX_DIGEST_CHILDREN`` digests, is reported as unavailable (never digested
    on the tick thread), so whoever waits for it hears at once."""
    def dying_digest(_table: SessionTable) -> str:
        os._exit(3)  # the child dies without a word

    monkeypatch.setattr(SessionTable, "digest", dying_digest)
    lock = threading.Lock()
    digests: list[list[tuple[str, int, str]]] = [[] for _ in range(3)]
    applied: list[set[int]] = [set() for _ in range(3)]

    def on_applied(member: int) -> Any:
        def record(_index: int, batch: AppliedBatch) -> None:
            with lock:
                applied[member].add(batch.seq)
        return record

    def on_checkpoint(member: int) -> Any:
        def record(tag: str, index: int, digest: str) -> None:
            with lock:
                digests[member].append((tag, index, digest))
        return record

    def wait_applied(seq: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if all(seq in a for a in applied):
                    return
            time.sleep(0.01)
        raise AssertionError(f"batch {seq} not applied everywhere")

    with raft_group(tmp_path, on_applied, on_checkpoint=on_checkpoint, fsync=False) as logs:
        k = leader_of(logs)
        propose(logs[k], 1, Checkpoint("dies"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if all(d for d in digests):
                    break
            time.sleep(0.02)
        with lock:
            assert all(d and d[0][0] == "dies" and d[0][2].startswith("unavailable")
                       for d in digests), digests

        # Every slot busy: the next checkpoint is not digested, and says so.
        gate = threading.Event()

        def waiting_digest(_table: SessionTable) -> str:
            gate.wait(30)  # in the children: never set there, they wait it out
            return "0" * 16

        monkeypatch.setattr(SessionTable, "digest", waiting_digest)
        monkeypatch.setattr(raft, "DIGEST_DEADLINE", 3.0)
        for seq, tag in enumerate(["a", "b", "c"], start=2):  # one entry each
            propose(logs[k], seq, Checkpoint(tag))
            wait_applied(seq)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if all(len(d) >= 4 for d in digests):
                    break
            time.sleep(0.02)
        with lock:
            for d in digests:
                by_tag = {tag: digest for tag, _i, digest in d}
                assert by_tag.get("c", "").startswith("unavailable: too many"), d
