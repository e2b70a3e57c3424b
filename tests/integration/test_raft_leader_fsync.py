"""The leader fsyncs a new entry after sending it to the followers, never after
applying it: three real ``ReplicatedLog`` members on loopback, fsync on.

Before, the leader fsynced each proposed entry before pysyncobj sent it, so a
commit waited for two fsyncs in a row (the leader's, then a follower's); now
the two overlap. The leader's copy must still be durable before it counts
itself toward the commit, so before the entry is applied.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.journal as pjournal
import pytest

from replication.batch import AppliedBatch, encode_batch
from replication.commands import Noop
from replication.raft import RaftTimings

from .raftgroup import leader_of, propose_noop, raft_group

pytestmark = [pytest.mark.integration]


def _last_index(journal: Any) -> int:
    return int(pjournal.FileJournal.__getitem__(journal, -1)[1])


class _Recorder:
    """The leader's sends, fsyncs and applies of origin ``t``, in order, each with
    the log index they concern (the journal's last entry for a send or fsync)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.is_leader = [False] * 3

    def on_applied(self, member: int) -> Any:
        def record(index: int, batch: AppliedBatch) -> None:
            if self.is_leader[member] and batch.origin == "t":
                with self.lock:
                    self.events.append(("applied", index))
        return record

    def watch(self, logs: list[Any]) -> int:
        """Hook the leader's fsync and send; the leader's index."""
        k = leader_of(logs)
        sync = logs[k]._sync
        journal = sync._SyncObj__raftLog
        fsync, send = journal._sync, sync._SyncObj__sendAppendEntries

        def recording_fsync() -> None:
            with self.lock:
                self.events.append(("fsync", _last_index(journal)))
            fsync()

        def recording_send(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.events.append(("send", _last_index(journal)))
            return send(*args, **kwargs)

        journal._sync = recording_fsync
        sync._SyncObj__sendAppendEntries = recording_send
        self.is_leader[k] = True
        return k

    def applied(self) -> int:
        with self.lock:
            return sum(1 for e in self.events if e[0] == "applied")

    def seen(self) -> list[tuple[str, int]]:
        with self.lock:
            return list(self.events)


def test_leader_fsyncs_after_sending_and_before_applying(tmp_path: Path) -> None:
    rec = _Recorder()
    with raft_group(tmp_path, rec.on_applied, fsync=True) as logs:
        k = rec.watch(logs)
        failures: list[str] = []
        for seq in range(1, 6):
            logs[k].propose(encode_batch("t", 1, seq, [(0, Noop())]),
                            lambda reason, _maybe: failures.append(reason))
            deadline = time.monotonic() + 10
            while rec.applied() < seq:
                assert time.monotonic() < deadline, f"batch {seq} not applied: {failures}"
                time.sleep(0.01)
        seen = rec.seen()
        for _, index in (e for e in seen if e[0] == "applied"):
            first_fsync = next(i for i, e in enumerate(seen) if e[0] == "fsync" and e[1] >= index)
            first_send = next(i for i, e in enumerate(seen) if e[0] == "send" and e[1] >= index)
            applied_at = seen.index(("applied", index))
            assert first_send < first_fsync < applied_at, (index, seen)


def test_compaction_succeeds_with_fsync_on(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    """Every member compacts its log (a full dump written, the log cut) with the
    fsyncing journal in place: nothing unpicklable was added to the SyncObj."""
    applied = [0, 0, 0]

    def counter(k: int) -> Callable[[int, AppliedBatch], None]:
        def on_applied(_index: int, batch: AppliedBatch) -> None:
            if batch.origin == "t":
                applied[k] += 1
        return on_applied

    with raft_group(tmp_path, on_applied=counter, fsync=True, compaction_entries=50,
                    compaction_seconds=1) as logs:
        leader = logs[leader_of(logs)]
        for seq in range(1, 201):
            propose_noop(leader, seq)
            time.sleep(0.005)
        deadline = time.monotonic() + 20
        while True:
            st = [lg.status() for lg in logs]
            dumps = [(tmp_path / f"m{k}" / "raft.dump").exists() for k in range(3)]
            if all(dumps) and applied == [200] * 3 and all(s.log_len < 150 for s in st):
                break
            assert time.monotonic() < deadline, (dumps, st)
            time.sleep(0.1)
        assert "Failed to store full dump" not in caplog.text


def test_leader_applies_the_committed_entry_before_fsyncing_the_next(tmp_path: Path) -> None:
    """When an entry commits, the leader sends the next one, applies the committed
    one and only then fsyncs the next, so the committed entry's proposers do not
    wait for that fsync (before, they did: send, fsync, apply)."""
    rec = _Recorder()
    # No pacing: the next entry goes as soon as the previous one commits.
    with raft_group(tmp_path, rec.on_applied, fsync=True,
                    timings=RaftTimings(entry_interval=0.0)) as logs:
        k = rec.watch(logs)
        failures: list[str] = []
        for seq in range(1, 501):  # faster than entries commit: some always queued
            logs[k].propose(encode_batch("t", 1, seq, [(0, Noop())]),
                            lambda reason, _maybe: failures.append(reason))
            if seq % 5 == 0:
                time.sleep(0.001)
        deadline = time.monotonic() + 20
        while rec.applied() < 500:
            assert time.monotonic() < deadline, f"not all applied: {failures}"
            time.sleep(0.01)
        seen = rec.seen()
    overlapped = 0
    for at, (kind, index) in enumerate(seen):
        if kind != "applied" or (at > 0 and seen[at - 1] == ("applied", index)):
            continue
        # The latest send before this apply: if it carried a later entry, that
        # entry's fsync must come after the apply, not between the two.
        sends = [i for i in range(at) if seen[i][0] == "send"]
        if not sends or seen[sends[-1]][1] <= index:
            continue
        overlapped += 1
        between = [e for e in seen[sends[-1] + 1:at] if e[0] == "fsync"]
        assert not between, (index, seen[sends[-1]:at + 1])
    assert overlapped >= 10, (overlapped, seen[:40])
