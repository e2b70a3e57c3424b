"""The node's fsyncing journal (``replication.raft._DurableFileJournal``) on a real
file: compaction's cut and the start-up load of the dump (no cluster needed)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pysyncobj.journal as pjournal
import pytest

import replication.raft as raft


def _journal(path: Path, entries: int = 0, fsync: bool = True) -> raft._DurableFileJournal:
    j = raft._DurableFileJournal(str(path), fsync)
    for i in range(1, entries + 1):
        j.add(f"command {i} ".encode() * (i % 7 + 1), i, 1 + i // 50)
    return j


def _entries(j: pjournal.FileJournal) -> list[tuple[bytes, int, int]]:
    return [(bytes(c), i, t) for c, i, t in (j[k] for k in range(len(j)))]


def test_a_cut_keeps_the_rest_in_one_fsynced_write(tmp_path: Path) -> None:
    """pysyncobj re-appends every remaining entry one by one (one fsync each here:
    0.8 s on the tick thread after a compaction under load); the cut copies them
    in one write with one fsync, and the journal reloads the same."""
    path = tmp_path / "raft.journal"
    j = _journal(path, 300)
    want = _entries(j)[120:]
    fsyncs = raft._DurableFileJournal.fsync_count
    j.deleteEntriesTo(120)
    assert raft._DurableFileJournal.fsync_count - fsyncs <= 2  # the new file (and its dir)
    assert _entries(j) == want
    j.add(b"after the cut", 301, 7)  # appends after the copied records
    j._destroy()

    again = _journal(path)
    assert _entries(again) == [*want, (b"after the cut", 301, 7)]
    again._destroy()
    assert not (tmp_path / "raft.journal.cut").exists()


def test_a_cut_to_nothing_and_a_cut_of_nothing(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    j = _journal(path, 10, fsync=False)
    j.deleteEntriesTo(0)
    assert len(j) == 10
    j.deleteEntriesTo(10)
    assert len(j) == 0
    j.add(b"x", 11, 1)
    j._destroy()
    assert _entries(_journal(path)) == [(b"x", 11, 1)]


def _load(j: raft._DurableFileJournal, last_two: list[tuple[bytes, int, int]]) -> None:
    """What pysyncobj's start-up load does when the journal does not begin with
    the dump's last two entries: clear, then add those two."""
    with j.loading_dump():
        j.clear()
        for e in last_two:
            j.add(*e)


def test_loading_a_dump_keeps_the_entries_after_it(tmp_path: Path) -> None:
    """A crash after the compaction child renamed the dump and before the log was
    cut leaves a journal that begins before the dump; pysyncobj then clears it and
    loses every entry after the dump, which this node may have acknowledged."""
    path = tmp_path / "raft.journal"
    j = _journal(path, 200)
    everything = _entries(j)
    _load(j, everything[99:101])  # the dump holds up to index 101
    assert _entries(j) == everything[99:]
    j._destroy()
    assert _entries(_journal(path)) == everything[99:]


@pytest.mark.parametrize("case", ["other term", "beyond the end", "before the start"])
def test_loading_a_dump_the_journal_does_not_hold_clears_it(tmp_path: Path, case: str) -> None:
    path = tmp_path / "raft.journal"
    j = _journal(path, 50)
    everything = _entries(j)
    if case == "other term":
        c, i, t = everything[11]
        last_two = [everything[10], (c, i, t + 1)]
    elif case == "beyond the end":
        last_two = [(b"a", 60, 3), (b"b", 61, 3)]
    else:
        j.deleteEntriesTo(20)
        last_two = everything[5:7]
    _load(j, last_two)
    assert _entries(j) == last_two
    j._destroy()
    assert _entries(_journal(path)) == last_two


def test_the_compaction_child_collects_no_garbage() -> None:
    """The forked compaction child runs with the collector off (a collection there
    walks, and so copies, the whole inherited heap) and dies with its node."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, whatever happens
        try:
            raft._compaction_child()
            os.write(write, b"1" if not gc.isenabled() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert gc.isenabled()
