"""Large log entries through three real ``ReplicatedLog`` members on loopback.

pysyncobj sends an entry of ``appendEntriesBatchSizeBytes`` or more in chunks;
under load that path failed here ("pickle data was truncated" on the followers,
on every re-send, and the cluster stopped committing: seen in the capacity
bench). ``ReplicatedLog`` sets the limit above any entry it can propose, so
entries are never chunked; this test proposes entries around pysyncobj's
default chunk size and a 700 KiB one and waits until every member applied them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from replication.batch import AppliedBatch

from .raftgroup import leader_of, raft_group

pytestmark = [pytest.mark.integration]

CHUNK = 2**16  # pysyncobj's default appendEntriesBatchSizeBytes


def test_entries_across_pysyncobj_chunk_boundaries_commit_everywhere(tmp_path: Path) -> None:
    applied: list[set[int]] = [set() for _ in range(3)]
    lock = threading.Lock()

    def on_applied(member: int) -> Any:
        def record(_index: int, batch: AppliedBatch) -> None:
            with lock:
                applied[member].add(batch.seq)
        return record

    with raft_group(tmp_path, on_applied, fsync=False) as logs:
        leader = logs[leader_of(logs)]
        failures: list[str] = []
        # Raw blobs: the appliers reject them as malformed batches, but they are
        # replicated, committed and applied (as rejected) like any other entry.
        # Every offset below a boundary up to 400 bytes (pysyncobj's pickling adds
        # a few dozen bytes to a command, and a few more to an entry), then a big one.
        sizes = [2 * CHUNK - d for d in range(0, 401, 2)] + [700 * 1024]
        for seq, size in enumerate(sizes, start=1):
            head = cbor2.dumps(["origin", 1, seq, []])
            blob = head + b"x" * (size - len(head))
            leader.propose(blob, lambda reason, _maybe: failures.append(reason))
            deadline = time.monotonic() + 15
            while True:
                with lock:
                    counts = [lg.applier.batches + lg.applier.rejected for lg in logs]
                if min(counts) >= seq:
                    break
                assert time.monotonic() < deadline, (
                    f"entry {seq} ({size} bytes) not applied everywhere: {counts}, "
                    f"failures {failures}")
                time.sleep(0.05)
        assert not failures
        assert leader._sync._getConf().appendEntriesBatchSizeBytes > max(sizes) + 1024
