"""The leader's group commit (``replication.raft._SyncObj``), on three real
``ReplicatedLog`` members on loopback: with every member proposing at once, the
batches queued while an entry is in flight go into one entry, every member
applies every batch exactly once and in the same order, and the old
one-batch entries still mean what they meant."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from replication.batch import AppliedBatch, encode_batch
from replication.commands import Noop
from replication.raft import APPEND_ENTRIES_BYTES, RaftTimings

from .raftgroup import leader_of, raft_group

pytestmark = [pytest.mark.integration]

PER_MEMBER = 150


def test_batches_queued_meanwhile_share_one_entry(tmp_path: Path) -> None:
    seen: list[list[tuple[str, int, int]]] = [[], [], []]
    lock = threading.Lock()

    def recorder(k: int) -> Callable[[int, AppliedBatch], None]:
        def on_applied(index: int, batch: AppliedBatch) -> None:
            if batch.origin.startswith("p"):
                with lock:
                    seen[k].append((batch.origin, batch.seq, index))
        return on_applied

    with raft_group(tmp_path, on_applied=recorder, fsync=True) as logs:
        leader_of(logs)
        start = max(lg.status().commit_index for lg in logs)
        failures: list[str] = []
        for seq in range(1, PER_MEMBER + 1):  # every member proposes, none waits
            for k, lg in enumerate(logs):
                lg.propose(encode_batch(f"p{k}", 1, seq, [(seq, Noop())]),
                           lambda reason, _maybe: failures.append(reason))
        deadline = time.monotonic() + 30
        while True:
            with lock:
                done = [len(s) for s in seen]
            if done == [3 * PER_MEMBER] * 3:
                break
            assert time.monotonic() < deadline, (done, failures)
            time.sleep(0.05)
        end = max(lg.status().commit_index for lg in logs)
    assert not failures
    orders = [[(o, s) for o, s, _ in member] for member in seen]
    assert orders[0] == orders[1] == orders[2], "members applied different orders"
    assert sorted(orders[0]) == sorted((f"p{k}", s) for k in range(3)
                                       for s in range(1, PER_MEMBER + 1))
    for k in range(3):  # each member's own batches stay in its order
        mine = [s for o, s in orders[0] if o == f"p{k}"]
        assert mine == sorted(mine)
    # 450 batches in far fewer entries: many entries carried several batches.
    entries = end - start
    assert entries < 3 * PER_MEMBER / 2, entries
    assert len({i for _, _, i in seen[0]}) < 3 * PER_MEMBER / 2


def test_a_single_batch_entry_keeps_its_method_id(tmp_path: Path) -> None:
    """``apply_batch`` keeps method id 0 beside the new ``apply_batches``, so a
    journal written before group commit replays the same way."""
    with raft_group(tmp_path, fsync=False) as logs:
        assert logs[0]._sync._batch_ids() == (0, 1)


def test_merged_entries_stay_under_the_unchunked_size(tmp_path: Path) -> None:
    """Batches whose bytes pickle to twice their size (every byte >= 0x80) are
    not merged past ``MERGED_ENTRY_BYTES``: an entry over pysyncobj's chunk size
    goes down its broken chunked path (the followers fail to unpickle it; seen
    here as UnicodeDecodeError in their tick)."""
    sizes = [1_000, 450 * 1024, 700 * 1024, 450 * 1024]
    with raft_group(tmp_path, fsync=False) as logs:
        leader = logs[leader_of(logs)]
        failures: list[str] = []
        held, release = threading.Event(), threading.Event()

        def hold_once() -> None:  # the leader's tick thread waits while all are queued
            if not held.is_set():
                held.set()
                release.wait(10)

        leader._sync.addOnTickCallback(hold_once)
        assert held.wait(10)
        for seq, size in enumerate(sizes, start=1):
            head = cbor2.dumps(["big", 1, seq, []])
            leader.propose(head + b"\xff" * (size - len(head)),
                           lambda reason, _maybe: failures.append(reason))
        release.set()
        deadline = time.monotonic() + 20
        while True:
            counts = [lg.applier.batches + lg.applier.rejected for lg in logs]
            if min(counts) >= len(sizes):
                break
            assert time.monotonic() < deadline, (counts, failures)
            time.sleep(0.05)
        assert not failures
        journal = leader._sync._SyncObj__raftLog
        entry_sizes = [len(journal[i][0]) for i in range(len(journal))]
        assert max(entry_sizes) < APPEND_ENTRIES_BYTES, entry_sizes


def test_leadership_transfer_runs_on_the_tick_thread(tmp_path: Path) -> None:
    """pysyncobj sends the transfer request on the peer link at once; links are
    only written from the tick thread, so the call is made there."""
    with raft_group(tmp_path, fsync=False) as logs:
        k = leader_of(logs)
        sync = logs[k]._sync
        threads: list[str] = []
        real = sync.transferLeadership

        def recording(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return real(*args, **kwargs)

        sync.transferLeadership = recording  # type: ignore[method-assign]
        done = threading.Event()
        result: list[str | None] = []

        def on_done(err: str | None) -> None:
            result.append(err)
            done.set()

        logs[k].transfer_leadership(None, on_done)
        assert done.wait(10)
        assert threads == [sync._SyncObj__thread.name]
        assert result == [None]
        deadline = time.monotonic() + 10
        while logs[k].status().role == "leader":
            assert time.monotonic() < deadline, "leadership did not move"
            time.sleep(0.05)


def test_a_paced_leader_lets_batches_share_the_next_entry(tmp_path: Path) -> None:
    """With ``entry_interval`` set, the leader starts a new entry no sooner than
    that after its previous one: batches proposed right after an entry share the
    next one, which starts on time; after a quiet spell a batch goes at once."""
    interval = 0.4
    applied: list[tuple[int, int, float]] = []  # (seq, log index, when), on the leader
    lock = threading.Lock()
    leader_k = [-1]

    def recorder(k: int) -> Callable[[int, AppliedBatch], None]:
        def on_applied(index: int, batch: AppliedBatch) -> None:
            if batch.origin == "paced" and k == leader_k[0]:
                with lock:
                    applied.append((batch.seq, index, time.monotonic()))
        return on_applied

    def wait_applied(n: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            with lock:
                if len(applied) >= n:
                    return
            assert time.monotonic() < deadline, applied
            time.sleep(0.005)

    with raft_group(tmp_path, on_applied=recorder, fsync=False,
                    timings=RaftTimings(entry_interval=interval)) as logs:
        leader_k[0] = leader_of(logs)
        leader = logs[leader_k[0]]
        failures: list[str] = []

        def propose(seq: int) -> None:
            leader.propose(encode_batch("paced", 1, seq, [(seq, Noop())]),
                           lambda reason, _maybe: failures.append(reason))

        time.sleep(interval)  # quiet: nothing proposed for a whole interval
        t0 = time.monotonic()
        propose(1)
        wait_applied(1)
        assert applied[0][2] - t0 < interval / 2, "a batch after a quiet spell waited"
        for seq in range(2, 7):  # one after another, right after entry 1
            propose(seq)
            time.sleep(0.01)
        wait_applied(6)
        assert not failures
        assert [s for s, _, _ in applied] == [1, 2, 3, 4, 5, 6]
        indices = {i for s, i, _ in applied if s > 1}
        assert len(indices) == 1, applied  # unpaced: batch 2 went alone, at once
        assert indices.pop() == applied[0][1] + 1
        # Started when due (the tick's poll is cut short), not at its next 20 ms tick
        # or heartbeat: well before a second interval has passed.
        waited = applied[1][2] - applied[0][2]
        assert interval * 0.8 <= waited < interval * 1.6, waited


def test_the_group_commit_state_stays_out_of_snapshots(tmp_path: Path) -> None:
    """pysyncobj pickles every attribute set after its constructor into each
    snapshot (replicated state); the leader's pacing and send bookkeeping is
    per-process, so it is all set before."""
    with raft_group(tmp_path, fsync=False) as logs:
        for lg in logs:
            sync = lg._sync
            replicated = set(vars(sync)) - sync._SyncObj__properies  # type: ignore[attr-defined]
            assert not {k for k in replicated if k.startswith("_sb_")}, replicated
