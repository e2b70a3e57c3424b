"""The snapshot-install guard in ``replication.raft`` against pysyncobj's own
compaction child, exercised on pysyncobj's real ``Serializer`` and a real forked
compaction (no cluster needed)."""

from __future__ import annotations

import gzip
import pickle
import time
from pathlib import Path

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

import replication.raft as raft


class _SlowToPickle:
    """Makes the forked compaction child take a while, as a big table does."""

    def __reduce__(self) -> tuple[type[int], tuple[int]]:
        time.sleep(1.5)
        return (int, (0,))


def test_an_installed_snapshot_is_not_overwritten_by_an_older_compaction(
        tmp_path: Path) -> None:
    dump = tmp_path / "raft.dump"
    s = Serializer(str(dump), 64 * 1024, True, None, None, None)
    s.serialize(("old state", _SlowToPickle()), 41)  # forks; the child is still pickling
    state, _ = s.checkSerializing()
    assert state == SERIALIZER_STATE.SERIALIZING
    before = getattr(raft, "stale_compactions", 0)

    leader_dump = gzip.compress(pickle.dumps(("leader's state", 99)))
    assert s.setTransmissionData((leader_dump, True, False)) is False
    assert s.setTransmissionData((b"", False, True)) is True

    time.sleep(2.0)  # long enough for an unkilled child to finish and replace the file
    assert dump.read_bytes() == leader_dump
    assert s.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    assert raft.stale_compactions == before + 1


def test_a_snapshot_without_a_compaction_running_is_installed_as_before(
        tmp_path: Path) -> None:
    dump = tmp_path / "raft.dump"
    s = Serializer(str(dump), 64 * 1024, True, None, None, None)
    before = getattr(raft, "stale_compactions", 0)
    assert s.setTransmissionData((b"abc", True, False)) is False
    assert s.setTransmissionData((b"", False, True)) is True
    assert dump.read_bytes() == b"abc"
    assert raft.stale_compactions == before
