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


def _dump(index: int) -> bytes:
    """A dump as pysyncobj writes it: (state, last entry, entry before, members)."""
    return gzip.compress(pickle.dumps(
        (["state"], (b"cmd", index, 3), (b"cmd", index - 1, 3), set())))


def test_a_snapshot_no_newer_than_the_applied_state_is_ignored(tmp_path: Path) -> None:
    """A follower that has applied up to 100 drops a snapshot at 50 (a leader re-sent
    it on a stale reply): its own dump stays, pysyncobj is told nothing arrived."""
    dump = tmp_path / "raft.dump"
    dump.write_bytes(b"my own dump")
    s = Serializer(str(dump), 64 * 1024, True, None, None, None)
    s._sb_applied = lambda: 100  # type: ignore[attr-defined]
    before = getattr(raft, "stale_snapshots", 0)
    old = _dump(50)
    assert s.setTransmissionData((old, True, False)) is False
    assert s.setTransmissionData((b"", False, True)) is False
    assert dump.read_bytes() == b"my own dump"
    assert not (tmp_path / "raft.dump.1.tmp").exists()
    assert raft.stale_snapshots == before + 1
    # A newer one is installed.
    new = _dump(150)
    assert s.setTransmissionData((new, True, False)) is False
    assert s.setTransmissionData((b"", False, True)) is True
    assert dump.read_bytes() == new
    assert raft.stale_snapshots == before + 1


def test_a_compaction_writes_its_dump_at_the_fastest_gzip_level(tmp_path: Path) -> None:
    """pysyncobj gzips the dump at level 9 in the compaction child; level 1 takes a
    fifth of that CPU on a real table's snapshot. The dump reads back the same."""
    dump = tmp_path / "raft.dump"
    s = Serializer(str(dump), 64 * 1024, True, None, None, None)
    state = (["state", b"x" * 10_000], (b"cmd", 7, 1), (b"cmd", 6, 1), set())
    s.serialize(state, 6)  # a real forked child
    deadline = time.monotonic() + 10
    while s.checkSerializing()[0] != SERIALIZER_STATE.SUCCESS:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    blob = dump.read_bytes()
    assert blob[8] == 4  # gzip's XFL byte: 4 = the fastest level, 2 = the best (9)
    assert s.deserialize() == state
