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

import pytest

from replication.batch import AppliedBatch, encode_batch
from replication.commands import Noop

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
