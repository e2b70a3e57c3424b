"""The node's fsyncing journal (``replication.raft._DurableFileJournal``) on a real
file: compaction's cut and the start-up load of the dump (no cluster needed)."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pysyncobj.journal as pjournal
import pytest

import replication.raft as raft
from replication.batch import AppliedBatch, BatchApplier, encode_batch
from replication.commands import Noop
from replication.table import SessionTable


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


class _Gate:
    """Holds every background copy until opened: the copy's timing, chosen by the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        copy = raft._BackgroundCut._copy

        def gated(cut: raft._BackgroundCut, header: bytes, fsync: bool) -> None:
            self.open.wait(10)
            copy(cut, header, fsync)

        monkeypatch.setattr(raft._BackgroundCut, "_copy", gated)


def _on_disk(path: Path) -> list[tuple[bytes, int, int]]:
    """The records a restart would load (a plain pysyncobj journal on a copy)."""
    copy = path.with_name("copy.journal")
    shutil.copyfile(path, copy)
    j = pjournal.FileJournal(str(copy))
    try:
        return _entries(j)
    finally:
        j._destroy()
        copy.unlink()


def test_a_cut_leaves_the_copy_to_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cut held the tick thread for 33-107 ms under load (the kept records' copy
    and fsync); now the entries leave memory at once, the file stays whole (a crash
    leaves the old journal, which the start-up load cuts) and a thread copies."""
    gate = _Gate(monkeypatch)
    path = tmp_path / "raft.journal"
    j = _journal(path, 300)
    everything = _entries(j)
    fsyncs = raft._DurableFileJournal.fsync_count
    j.deleteEntriesTo(120)
    assert raft._DurableFileJournal.fsync_count == fsyncs  # nothing synced on this thread
    assert _entries(j) == everything[120:]
    j.add(b"while copying", 301, 7)  # synced in the old file
    assert _on_disk(path) == [*everything, (b"while copying", 301, 7)]
    gate.open.set()
    assert j._bg is not None
    j._bg.done.wait(10)
    j.add(b"after the copy", 302, 7)  # finishes the cut: the copy replaces the file
    assert j._bg is None
    want = [*everything[120:], (b"while copying", 301, 7), (b"after the copy", 302, 7)]
    assert _on_disk(path) == want
    j._destroy()
    assert _entries(_journal(path)) == want
    assert not (tmp_path / "raft.journal.cut").exists()


@pytest.mark.parametrize("meanwhile", ["truncated into the copy", "cleared", "cut again"])
def test_a_cut_copy_made_void_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        meanwhile: str) -> None:
    """What changes the copied records while they are copied voids the copy: the
    file on disk always holds the log in memory, before and after the rename."""
    gate = _Gate(monkeypatch)
    path = tmp_path / "raft.journal"
    j = _journal(path, 200)
    j.deleteEntriesTo(50)
    if meanwhile == "truncated into the copy":
        j.deleteEntriesFrom(100)  # a follower's conflicting suffix
        j.add(b"other", 151, 9)
    elif meanwhile == "cleared":
        j.clear()  # a snapshot installed from the leader
        j.add(b"a", 300, 9)
        j.add(b"b", 301, 9)
    else:
        j.add(b"more", 201, 9)
        j.deleteEntriesTo(100)  # a second compaction before the first cut was done
    gate.open.set()
    for _ in range(3):  # a voided copy may be started again, once
        if j._bg is None:
            break
        j._bg.done.wait(10)
        j.onOneSecondTimer()
    assert j._bg is None
    want = _entries(j)
    assert _on_disk(path) == want  # copied again where needed: nothing dead is left
    j._destroy()
    assert _entries(_journal(path)) == want


@pytest.mark.parametrize("seed", range(12))
def test_the_file_always_holds_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       seed: int) -> None:
    """Random appends, truncations, cuts, clears and copies finishing at random
    points: after every step the file a restart would load ends with exactly the
    log in memory (anything before it is older than it), and the final reload
    holds the log."""
    gate = _Gate(monkeypatch)
    rnd = random.Random(seed)
    path = tmp_path / "raft.journal"
    j = _journal(path, 40)
    nxt, term = 41, 2
    for _ in range(80):
        op = rnd.choice(["add", "add", "add", "truncate", "cut", "clear", "copy", "timer"])
        n = len(j)
        if op == "add":
            for _ in range(rnd.randint(1, 20)):
                j.add(rnd.randbytes(rnd.randint(1, 300)), nxt, term)
                nxt += 1
        elif op == "truncate" and n > 2:
            keep = rnd.randint(1, n - 1)
            j.deleteEntriesFrom(keep)
            nxt, term = j[keep - 1][1] + 1, term + 1
        elif op == "cut" and n > 2:
            j.deleteEntriesTo(rnd.randint(1, n - 2))
        elif op == "clear":
            j.clear()
            j.add(b"snapshot-1", nxt, term)
            j.add(b"snapshot", nxt + 1, term)
            nxt += 2
        elif op == "copy" and j._bg is not None:
            gate.open.set()
            j._bg.done.wait(10)
            gate.open.clear()
        elif op == "timer":
            j.onOneSecondTimer()
        mem = _entries(j)
        disk = _on_disk(path)
        assert disk[len(disk) - len(mem):] == mem, (seed, op)
        assert all(e[1] < mem[0][1] for e in disk[:len(disk) - len(mem)]), (seed, op)
    gate.open.set()
    want = _entries(j)
    j._destroy()
    assert _entries(_journal(path)) == want


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


def test_records_are_written_with_pwrite_not_through_the_mapping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record (and the header's end offset) goes to the file by pwrite, which
    made each fsync cheaper than stores through pysyncobj's mapping, also in the
    file that replaces the journal after a cut; the journal reads back the same."""
    writes: list[int] = []
    pwrite = os.pwrite

    def counting(fd: int, data: bytes, offset: int) -> int:
        writes.append(offset)
        return pwrite(fd, data, offset)

    monkeypatch.setattr(raft.os, "pwrite", counting)
    path = tmp_path / "raft.journal"
    j = _journal(path, 40)
    # The record, then the header's last-record offset; a write that grows the file
    # (a few, as it doubles) goes through the mapping once it is resized.
    assert len(writes) >= 2 * 40 - 4
    j.deleteEntriesTo(30)
    j.wait_cut()
    before = len(writes)
    j.add(b"after the cut", 41, 9)
    assert len(writes) - before == 2
    want = _entries(j)
    j._destroy()
    again = _journal(path)
    assert _entries(again) == want and want[-1] == (b"after the cut", 41, 9)
    again._destroy()


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


def test_a_replaced_journal_is_retired_in_steps(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The replaced file's last close freed all its blocks at once (19 ms for
    64 MiB here) on the tick thread; ``_retire``, on a thread of its own, empties
    it a few MiB at a time, then closes it."""
    path = tmp_path / "old.journal"
    path.write_bytes(b"\0" * (10 << 20))
    f = open(path, "r+b")  # noqa: SIM115 - _retire closes it
    mm = mmap.mmap(f.fileno(), 0)
    sizes: list[int] = []
    truncate = os.ftruncate

    def recording(fd: int, size: int) -> None:
        sizes.append(size)
        truncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", recording)
    path.unlink()  # renamed over, as by the cut
    raft._retire(mm, f)
    assert mm.closed and f.closed
    assert sizes == [6 << 20, 2 << 20, 0]


def test_a_slow_fsync_is_noted_among_the_holds(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal fsync of ``SLOW_FSYNC`` or more shows in ``recent_holds`` (kind
    "fsync", with when it began and how long it took), beside forks and cuts, so
    a latency spike can be set beside it; quick ones do not."""
    fdatasync = os.fdatasync
    slow = {"on": False}

    def disk(fd: int) -> None:  # a disk that takes 30 ms to flush while "on"
        if slow["on"]:
            time.sleep(0.03)
        fdatasync(fd)

    monkeypatch.setattr(raft.os, "fdatasync", disk)
    monkeypatch.setattr(raft, "_events", deque(maxlen=1024))
    j = _journal(tmp_path / "raft.journal", 5)
    assert [k for _, k, _ in raft.ReplicatedLog.recent_holds()] == []
    slow["on"] = True
    t0 = time.monotonic()
    j.add(b"slow", 6, 1)
    holds = raft.ReplicatedLog.recent_holds()
    assert [k for _, k, _ in holds] == ["fsync"]
    began, _kind, seconds = holds[0]
    assert t0 <= began <= t0 + 0.01 and 0.03 <= seconds < 1.0
    j._destroy()


def test_a_slow_entry_is_noted_among_the_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry whose application holds the tick thread ``SLOW_APPLY`` or more shows
    in ``recent_holds`` (kind "apply"), one per entry, a merged entry of several
    batches as one; quick entries do not."""
    monkeypatch.setattr(raft, "_events", deque(maxlen=1024))
    slow = {"on": False}

    def on_applied(_index: int, _applied: AppliedBatch) -> None:
        if slow["on"]:  # a table that takes 15 ms per batch
            time.sleep(0.015)

    consumer = raft._TableConsumer(BatchApplier(SessionTable()), on_applied, lambda: None,
                                   lambda _tag, _index, _digest: None)
    blobs = [encode_batch("n1", 1, seq, [(seq, Noop())]) for seq in range(1, 4)]
    consumer.apply_batch(blobs[0], _doApply=True)
    assert raft.ReplicatedLog.recent_holds() == []
    slow["on"] = True
    t0 = time.monotonic()
    consumer.apply_batches(blobs[1:], _doApply=True)  # 2 x 15 ms in one entry
    holds = raft.ReplicatedLog.recent_holds()
    assert [k for _, k, _ in holds] == ["apply"]
    began, _kind, seconds = holds[0]
    assert t0 <= began <= t0 + 0.01 and 0.03 <= seconds < 1.0


def test_the_journal_grows_by_written_zeros_and_syncs_records_data_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pysyncobj grew the file by resizing its mapping: a hole, so that every
    record synced later allocated blocks and waited for the file system's own
    journal commit. The file now grows by zeros written and synced once (no
    hole: its blocks cover its size, also after a cut replaced it), and a
    record is synced with ``fdatasync``; the journal reads back the same."""
    calls: list[str] = []
    fsync, fdatasync = os.fsync, os.fdatasync

    def full(fd: int) -> None:
        calls.append("fsync")
        fsync(fd)

    def data(fd: int) -> None:
        calls.append("fdatasync")
        fdatasync(fd)

    monkeypatch.setattr(raft.os, "fsync", full)
    monkeypatch.setattr(raft.os, "fdatasync", data)
    path = tmp_path / "raft.journal"

    def no_hole() -> bool:
        st = os.stat(path)
        return st.st_blocks * 512 >= st.st_size

    j = _journal(path, 400)
    assert os.stat(path).st_size > 16_384 and no_hole()
    assert calls.count("fdatasync") == 400
    assert 0 < calls.count("fsync") < 20  # one per growth (doubling), none per record
    j.deleteEntriesTo(390)
    j.wait_cut()
    for i in range(401, 601):
        j.add(b"after the cut " * 20, i, 9)
    assert no_hole()
    want = _entries(j)
    j._destroy()
    again = _journal(path)
    assert _entries(again) == want and len(want) == 210
    again._destroy()


def test_a_growth_that_fails_halfway_leaves_every_record_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk in the middle of extending the file: the write that needed the
    room fails, but the mapping still covers every byte the file holds, so the
    records written after the disk has room again read back whole (the mapping
    had stayed short of the zeros already written, and reads through it were cut)."""
    monkeypatch.setattr(raft._JournalFile, "_ZEROS", bytes(1024))
    pwrite = os.pwrite
    zero_writes = {"n": 0}

    def disk(fd: int, data: bytes, offset: int) -> int:
        if data == bytes(len(data)) and len(data) == 1024:
            zero_writes["n"] += 1
            if zero_writes["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(raft.os, "pwrite", disk)
    f = raft._JournalFile(str(tmp_path / "raft.journal"), defaultContent=bytes(16))
    f.write(0, b"a" * 1000)
    with pytest.raises(OSError):
        f.write(1000, b"b" * 1000)  # grows by 4 KiB in 1 KiB writes; the second fails
    assert len(f._ResizableFile__mm) == os.stat(tmp_path / "raft.journal").st_size
    f.write(1000, b"b" * 1000)  # room again: fits in the zeros already written
    assert f.read(1000, 1000) == b"b" * 1000
    f.write(2000, b"c" * 6000)  # and a growth after them
    assert f.read(0, 8000) == b"a" * 1000 + b"b" * 1000 + b"c" * 6000
    f._destroy()


class _Stopped(Exception):
    """What the test's ``storage_failed`` raises instead of ending the process."""


def test_a_journal_write_or_sync_that_fails_stops_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk or an I/O error on the journal is a fail-stop
    (``raft.storage_failed``, which exits the process), never an ``OSError``
    left to pysyncobj: it catches it on its tick thread and carries on with the
    entry already in its log in memory, so a follower would acknowledge entries
    it never stored, and after a restart its journal would have a hole. What was
    synced before the failure reads back whole."""
    stops: list[tuple[str, int | None]] = []

    def stop(what: str, error: OSError) -> None:
        stops.append((what, error.errno))
        raise _Stopped

    monkeypatch.setattr(raft, "storage_failed", stop)
    path = tmp_path / "raft.journal"
    j = _journal(path, 40)
    synced = _entries(j)
    pwrite = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        if data == bytes(len(data)):  # the zeros of a growth
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(raft.os, "pwrite", full_disk)
    with pytest.raises(_Stopped):
        for i in range(41, 2000):
            j.add(b"x" * 200, i, 2)
            synced.append((b"x" * 200, i, 2))
    assert stops == [("append an entry", errno.ENOSPC)]
    monkeypatch.setattr(raft.os, "pwrite", pwrite)

    def failed_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    fdatasync = os.fdatasync
    monkeypatch.setattr(raft.os, "fdatasync", failed_sync)
    with pytest.raises(_Stopped):
        j.add(b"never synced", 5000, 3)
    assert stops[-1] == ("sync its records", errno.EIO)
    monkeypatch.setattr(raft.os, "fdatasync", fdatasync)
    again = raft._DurableFileJournal(str(path), True)
    # Written, not synced: here the page cache still has it; after a power loss
    # it may be gone, and nobody was told it was stored.
    assert _entries(again) == [*synced, (b"never synced", 5000, 3)]
    again._destroy()
    j._destroy()


def test_a_cut_whose_copy_cannot_be_finished_is_abandoned_and_one_not_renamed_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finishing a cut's copy can fail while the old journal is still whole and
    synced: the cut is abandoned and the node goes on with the old file. Once
    the copy is being renamed over the journal, a failure leaves the outcome
    unknown: the node stops."""
    stops: list[str] = []

    def stop(what: str, error: OSError) -> None:
        stops.append(what)
        raise _Stopped

    monkeypatch.setattr(raft, "storage_failed", stop)
    path = tmp_path / "raft.journal"
    j = _journal(path, 300)
    whole = _entries(j)
    j.deleteEntriesTo(120)
    assert j._bg is not None
    j._bg.done.wait(10)
    fsync = os.fsync

    def failed_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(raft.os, "fsync", failed_fsync)
    j.add(b"after the abandoned cut", 301, 7)  # its sync finishes the cut first
    monkeypatch.setattr(raft.os, "fsync", fsync)
    assert stops == [] and j._bg is None and not (tmp_path / "raft.journal.cut").exists()
    assert _entries(j) == [*whole[120:], (b"after the abandoned cut", 301, 7)]
    j._destroy()
    again = _journal(path)  # the old file, whole, and the entry after it
    assert _entries(again) == [*whole, (b"after the abandoned cut", 301, 7)]

    again.deleteEntriesTo(150)
    assert again._bg is not None
    again._bg.done.wait(10)

    def failed_replace(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(raft, "_durable_replace", failed_replace)
    with pytest.raises(_Stopped):
        again.add(b"after the failed rename", 302, 7)
    assert stops == ["finish a cut"]


def test_the_term_and_vote_not_stored_stop_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A term or vote that cannot be made durable must not be acted on (Raft
    §5.1): the node stops instead of voting on."""
    stops: list[str] = []

    def stop(what: str, error: OSError) -> None:
        stops.append(what)
        raise _Stopped

    monkeypatch.setattr(raft, "storage_failed", stop)
    meta = raft._DurableMetaStorer(str(tmp_path / "raft.journal.meta"))
    meta.storeMeta({"currentTerm": 3, "votedForNodeId": "a"})

    def failed_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(raft.os, "fsync", failed_fsync)
    with pytest.raises(_Stopped):
        meta.storeMeta({"currentTerm": 4, "votedForNodeId": "b"})
    assert stops == ["store the term and vote"]


def test_the_default_on_a_storage_failure_is_to_exit_at_once() -> None:
    """The real ``storage_failed``: one critical line, then exit status 74
    (``EX_IOERR``) without unwinding (no ``finally``, no ``atexit``)."""
    code = ("import atexit, errno, logging, sys\n"
            "import replication.raft as raft\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "try:\n"
            "    raft.storage_failed('append an entry', OSError(errno.ENOSPC, 'full'))\n"
            "finally:\n"
            "    print('finally ran')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == raft.STORAGE_FAILURE_EXIT == 74
    assert "ran" not in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("CRITICAL:replication.raft:")
    assert "could not append an entry" in lines[0] and "stops now" in lines[0]
