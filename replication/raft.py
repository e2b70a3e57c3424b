"""The Raft log behind the session table: the only module that imports pysyncobj.

``ReplicatedLog`` owns one ``SyncObj`` and its tick thread. Threads:

- ``propose`` may be called from any thread (in a node: the Trio thread).
- Committed batches are applied to the ``SessionTable`` on the tick thread,
  which then calls ``on_applied(index, AppliedBatch)``; snapshot installs call
  ``on_restored()``; a checkpoint's digest, computed in a forked child after
  its entry applied, calls ``on_checkpoint(tag, index, digest)`` on a thread of
  its own; a proposal pysyncobj refuses calls its ``on_fail(reason)``
  (on the tick thread, or in the caller's thread for a full queue). These
  callbacks must only hand work over to another thread, never block.
- ``status()`` returns a copy refreshed on the tick thread, safe to read anywhere.
- Membership changes may be requested from any thread (pysyncobj queues them);
  ``transfer_leadership`` is carried out on the tick thread, the only thread
  that writes to peer links.

Designed around the pysyncobj 0.3.17 facts in ../shared/notes/pysyncobj.md:
replicated methods never raise (``BatchApplier``), nothing unpicklable lives on
the SyncObj or consumer (runtime attributes are set before the base
constructor records its property list), journal *and* dump file are both used,
the bind address is explicit with bounded retries, the journal can be fsynced
per entry, the snapshot is the table's own CBOR, encoded in the forked
compaction child, and peer frames are sealed with AES-GCM per link direction
instead of zlib + Fernet (``PeerCipher``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import gzip
import logging
import os
import random
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pysyncobj.journal as _pjournal
import pysyncobj.poller as _ppoller
import pysyncobj.serializer as _pserializer
import pysyncobj.syncobj as _psyncobj
import pysyncobj.tcp_connection as _ptcp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from .batch import AppliedBatch, BatchApplier
from .commands import Command
from .table import SessionTable

log = logging.getLogger(__name__)

ROLES = {0: "follower", 1: "candidate", 2: "leader"}
FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper()}
DEFINITELY_NOT_APPLIED = {
    FAIL_REASON.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER,
    FAIL_REASON.DISCARDED,
    FAIL_REASON.NOT_LEADER,
    FAIL_REASON.REQUEST_DENIED,
}
"""pysyncobj failures after which the entry can never commit; the others
(leader changed, unknown outcome) may still commit later."""


APPEND_ENTRIES_BYTES = 2 * 1024 * 1024
"""Above any log entry (a batch is cut at 512 KiB plus one command), so pysyncobj
never sends an entry in chunks: its chunked path marks the last chunk too early
when the pickled entry crosses a chunk boundary that the bare command does not,
and the followers then fail to unpickle it on every re-send (the cluster stops
committing)."""

SLOW_FSYNC = 0.005
"""A journal sync this long or longer is noted among the tick thread's holds
(``recent_holds``, kind "fsync"): on the leader, every commit waits it out. So
is a growth of the journal file that long (kind "grow": zeros written and
synced, ``_JournalFile._grow``)."""


STORAGE_FAILURE_EXIT = 74
"""The exit status of a node whose Raft journal or term/vote file could not be
written or synced (``EX_IOERR``): see ``storage_failed``."""


def _exit_on_storage_failure(what: str, error: OSError) -> NoReturn:
    log.critical("the Raft journal could not %s (%s): this node stops now; its files "
                 "hold what it synced, and a restart replays them", what, error)
    with contextlib.suppress(Exception):
        for handler in logging.getLogger().handlers:
            handler.flush()
    os._exit(STORAGE_FAILURE_EXIT)


storage_failed: Callable[[str, OSError], NoReturn] = _exit_on_storage_failure
"""Called on the thread that failed to write or sync the journal (or the term and
vote), instead of letting the ``OSError`` reach pysyncobj: fail-stop, as etcd's
WAL does. pysyncobj has already put the entry in its log in memory and would
carry on, so a follower would acknowledge entries it never stored (and have a
hole in its journal after a restart), and after a failed sync the page cache no
longer says what is on disk. Exiting at once keeps exactly what was synced,
which is all this node acknowledged. Tests replace it with one that raises."""


@contextlib.contextmanager
def _storing(what: str) -> Iterator[None]:
    """Journal I/O inside may fail only by stopping the node (``storage_failed``)."""
    try:
        yield
    except OSError as e:
        storage_failed(what, e)


@dataclass(frozen=True)
class RaftTimings:
    """Raft timers. The defaults trade a little idle traffic for failover in well
    under a second on a loopback or LAN cluster (see docs/failover.md)."""

    tick: float = 0.02
    append_entries_period: float = 0.05
    election_min: float = 0.35
    election_max: float = 0.7
    # pysyncobj drops a link on its next send when nothing was read on it for this
    # long. Links carry heartbeats or keep-alives (a quarter of this apart), so a
    # link drops when its peer stops answering; TCP keepalive (about 8 s) and
    # elections notice dead peers too.
    connection_timeout: float = 10.0
    connection_retry: float = 0.5
    leader_fallback: float = 1.0
    # While batches keep coming, the leader starts a new entry at most this often.
    # Each entry costs every member a round of messages and an fsync whatever it
    # carries; waiting up to this long after the previous one lets the batches
    # that the proposers form on seeing it applied ride in the next entry instead
    # of the one after (docs/benchmarks.md: p50 at 20,000 commands/s 2.0 ms
    # against 3.0). An idle leader appends at once. 0 turns pacing off.
    entry_interval: float = 0.001
    # A follower whose link to the leader closes checks whether anything still
    # listens at the leader's address. If the connection is refused, or reset
    # within PROBE_HOLD (the leader's process is gone), it campaigns after
    # ``rank * leader_lost_step`` (plus up to a third of a step at random; rank:
    # its place among the other followers, by address) instead of a whole
    # election timeout after the last heartbeat: the followers' bids are
    # staggered so that they do not split the vote. 0 turns it off.
    leader_lost_step: float = 0.15


@dataclass(frozen=True)
class RaftConfig:
    self_addr: str  # host:port, this node's identity in the Raft cluster
    peers: tuple[str, ...]  # the other members' host:port
    data_dir: Path
    password: str | None  # encrypts and authenticates all inter-node traffic
    timings: RaftTimings = field(default_factory=RaftTimings)
    fsync: bool = True  # every log entry durable on disk before it counts
    compaction_entries: int = 20_000
    compaction_seconds: int = 60  # a joining node gets a small snapshot, not hours of log
    max_bind_retries: int = 20
    dynamic_membership: bool = True


@dataclass(frozen=True)
class RaftStatus:
    role: str = "follower"
    leader: str | None = None
    term: int = 0
    commit_index: int = 0
    last_applied: int = 0
    log_len: int = 0
    has_quorum: bool = False
    members: tuple[str, ...] = ()
    connected: tuple[str, ...] = ()
    match_index: dict[str, int] = field(default_factory=dict)
    uptime: int = 0
    compactions: int = 0  # compaction children started
    compaction_index: int = 0  # the log index the last one snapshots
    at: float = 0.0  # time.monotonic() when read


# --- durability: an fsyncing journal --------------------------------------------


def _same_entry(have: Any, entry: tuple[bytes, int, int]) -> bool:
    """Whether a journal entry (command, index, term) is ``entry``."""
    command, idx, term = entry
    return bool(have[1] == idx and have[2] == term and bytes(have[0]) == bytes(command))


def _retire(mm: Any, f: Any) -> None:
    """Close a replaced journal file, freeing its blocks a few MiB at a time: its
    last close would free them all in one go (19 ms for 64 MiB here), holding up
    the live journal's fsyncs on the same file system."""
    with contextlib.suppress(Exception):
        mm.close()
        size = os.fstat(f.fileno()).st_size
        while size > 0:
            size = max(0, size - (4 << 20))
            os.ftruncate(f.fileno(), size)
            time.sleep(0.001)
    with contextlib.suppress(Exception):
        f.close()


class _BackgroundCut:
    """The bulk of a journal cut, off the tick thread: a thread copies the live
    records ``[start, end)`` of the journal file into ``<journal>.cut`` after a
    header and syncs it. The records there never change while the log only
    grows; a truncation into them or a clear marks the copy ``stale``."""

    CHUNK = 4 << 20

    def __init__(self, path: str, header: bytes, start: int, end: int, fsync: bool):
        self.path, self.tmp = path, path + ".cut"
        self.start, self.end = start, end
        self.stale = False
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._copy, args=(header, fsync),
                                       name="journal-cut", daemon=True)

    def _copy(self, header: bytes, fsync: bool) -> None:
        t0 = time.perf_counter()
        try:
            # Read through the page cache, not the tick thread's mmap, which it
            # may resize meanwhile.
            with open(self.path, "rb") as src, open(self.tmp, "wb") as out:
                out.write(header)
                pos = self.start
                while pos < self.end:
                    data = os.pread(src.fileno(), min(self.CHUNK, self.end - pos), pos)
                    if not data:
                        raise OSError(f"journal shorter than {self.end} bytes")
                    out.write(data)
                    pos += len(data)
                out.flush()
                if fsync:
                    os.fsync(out.fileno())
        except Exception as e:  # the cut is abandoned; the old file stays whole
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0
            self.done.set()


class _JournalFile(_pjournal.ResizableFile):
    """pysyncobj's journal file, written with ``pwrite`` instead of through its
    shared mapping (reads still use the mapping: both see the same page cache),
    and grown with written zeros instead of holes.

    An fsync after stores through a shared mapping took longer here than one
    after the same bytes written with pwrite, most of all with every member
    syncing at the same moment, as a Raft group does.

    pysyncobj grows the file by resizing its mapping, which leaves a hole: the
    next records written there allocate blocks, and each sync then waits for
    ext4 to commit that to its own journal (its ``jbd2`` thread, one more
    thread to wake on a busy machine). Here the file is extended with zeros,
    synced once, so that a record's sync is a ``fdatasync`` of data only
    (``_DurableFileJournal._sync``): quicker, most of all on a busy machine,
    and commits with it (docs/benchmarks.md, thirteenth session). It grows by
    doubling, at most ``GROW_MAX`` at a time, so that one growth (zeros
    written and synced: about 2 ms for 2 MiB here) never holds the tick
    thread long.
    """

    GROW_MAX = 2 << 20
    _ZEROS = bytes(1 << 20)
    sync_growth = True  # off with the journal's fsync (--no-fsync)

    def write(self, offset: int, values: bytes) -> None:
        end = offset + len(values)
        if end > len(self._ResizableFile__mm):  # the mapping's length (size() is the file's)
            self._grow(end)
        os.pwrite(self._ResizableFile__f.fileno(), values, offset)

    def _grow(self, end: int) -> None:
        t0 = time.monotonic()
        fd = self._ResizableFile__f.fileno()
        mm = self._ResizableFile__mm
        size = os.fstat(fd).st_size
        new = max(end, size + min(max(size, 4096), self.GROW_MAX))
        pos = size
        try:
            while pos < new:
                wrote = os.pwrite(fd, self._ZEROS[:min(len(self._ZEROS), new - pos)], pos)
                if wrote <= 0:
                    raise OSError(errno.EIO, "journal: a write of zeros wrote nothing")
                pos += wrote
            if self.sync_growth:
                os.fsync(fd)
        finally:
            # Even after a failure (a full disk, say) the mapping covers the whole
            # file, zeros written so far included: records written there later must
            # read back whole.
            mm.resize(max(os.fstat(fd).st_size, len(mm)))
        took = time.monotonic() - t0
        if took >= SLOW_FSYNC:
            _events.append((t0, "grow", took))


class _DurableFileJournal(_pjournal.FileJournal):
    """pysyncobj's FileJournal, fsynced, without pointless rewrites.

    Durability: pysyncobj writes its journal through mmap and never syncs it; an
    entry a follower acknowledged could vanish with a power loss. Here every
    change is synced before pysyncobj acknowledges it (one ``fdatasync`` per
    group-commit entry per node) unless ``fsync`` is off.

    Rewrites: when a leader re-sends entries a follower already has (it does so
    whenever more than one entry is in flight), pysyncobj truncates the follower's
    log at the first re-sent entry and appends them all again. The truncation is
    deferred here: re-appended entries identical to the ones in place are
    skipped, and only the first differing entry (or the next read) performs the
    real truncation, so the log ends exactly where pysyncobj expects while
    identical entries are neither rewritten nor fsynced again.

    Leader's entries: while ``deferring`` (set by ``ReplicatedLog`` around the
    leader's append of new entries and the apply of the committed one) an added
    entry is fsynced when deferring ends, after pysyncobj has sent it to the
    followers, so the leader's fsync overlaps the followers' instead of
    preceding it. It still ends before the tick thread reads the followers'
    answers, so the leader's copy is durable before the leader counts itself
    toward the entry's commit.
    """

    fsync_count = 0
    fsync_seconds = 0.0
    skipped_identical = 0
    replaced = 0
    cuts = 0
    cut_seconds = 0.0
    cut_seconds_max = 0.0
    cut_copy_seconds = 0.0

    def __init__(self, journal_file: str, fsync: bool):
        self._fsync = fsync
        self._cut: int | None = None
        self._rebase: list[tuple[bytes, int, int]] | None = None
        self._rebase_cleared = False
        self._deferring = False
        self._unsynced = False
        self._bg: _BackgroundCut | None = None
        self._live_from = _pjournal.FIRST_RECORD_OFFSET
        super().__init__(journal_file)
        # pysyncobj builds its own file object; ours only changes how it writes.
        self._FileJournal__journalFile.__class__ = _JournalFile  # type: ignore[has-type]
        self._FileJournal__journalFile.sync_growth = fsync  # type: ignore[has-type]

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Entries added inside are fsynced once, at the end of the outermost."""
        outer = not self._deferring
        self._deferring = True
        try:
            yield
        finally:
            if outer:
                self._deferring = False
                if self._unsynced:
                    self._unsynced = False
                    self._sync()

    def _sync(self) -> None:
        if self._poll_cut() or not self._fsync:
            return
        f = self._FileJournal__journalFile._ResizableFile__f
        t0 = time.monotonic()
        # Data only: records go into space _JournalFile._grow wrote and synced (a
        # journal written by an older version keeps its holes until its next cut:
        # still durable, fdatasync then commits the allocation too).
        with _storing("sync its records"):
            os.fdatasync(f.fileno())
        took = time.monotonic() - t0
        _DurableFileJournal.fsync_seconds += took
        _DurableFileJournal.fsync_count += 1
        if took >= SLOW_FSYNC:
            _events.append((t0, "fsync", took))

    def _settle(self) -> None:
        """Carry out a deferred truncation."""
        cut, self._cut = self._cut, None
        if cut is not None and cut < super().__len__():
            with _storing("truncate the log"):
                super().deleteEntriesFrom(cut)
            if self._bg is not None and self._FileJournal__currentOffset < self._bg.end:
                self._bg.stale = True  # the copy holds records no longer in the log
            self._sync()

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._rebase is not None and self._rebase_cleared:
            self._rebased((command, idx, term))
            return
        if self._cut is not None:
            if self._cut < super().__len__():
                have = super().__getitem__(self._cut)
                if _same_entry(have, (command, idx, term)):
                    self._cut += 1
                    _DurableFileJournal.skipped_identical += 1
                    return
                if have[1] == idx:
                    _DurableFileJournal.replaced += 1
                    log.warning("replacing log entry %d (term %d) with one of term %d",
                                idx, have[2], term)
            self._settle()
        with _storing("append an entry"):
            super().add(command, idx, term)
        if self._deferring:
            self._unsynced = True
        else:
            self._sync()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        self._settle()
        self._cut = entryFrom

    def clear(self) -> None:
        self._cut = None
        if self._rebase is not None:
            self._rebase_cleared = True  # decided once both entries are added
            return
        with _storing("clear the log"):
            super().clear()
        self._forget_cut()
        self._sync()

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Compaction: keep the entries from position ``entryTo`` on.

        pysyncobj clears the file and appends every remaining entry again, one
        record at a time (here one fsync each: 0.8 s on the tick thread with a
        few thousand entries left after a compaction under load), and a crash
        halfway loses entries this node acknowledged. Here the entries go from
        memory at once; the file keeps them (its records before them are dead)
        until a thread has copied the live records into a new file and synced
        it (``_BackgroundCut``); the tick thread then adds what was appended
        meanwhile and renames the copy over the journal (``_finish_cut``). A
        crash before the rename leaves the whole old file, which the start-up
        load cuts (``loading_dump``)."""
        self._settle()
        if entryTo <= 0:
            return
        t0 = time.monotonic()
        entries: list[Any] = self._FileJournal__journal  # type: ignore[has-type]
        keep = entries[entryTo:]
        mm = self._FileJournal__journalFile._ResizableFile__mm  # type: ignore[has-type]
        end: int = self._FileJournal__currentOffset  # type: ignore[has-type]
        start = end
        for _ in keep:
            start -= struct.unpack_from("<I", mm, start - 4)[0] + 8
        self._FileJournal__journal = keep
        self._live_from = start
        if self._bg is None:
            self._start_cut()
        _DurableFileJournal.cuts += 1
        self._held(t0, "cut")

    @staticmethod
    def _held(t0: float, kind: str) -> None:
        """Count time a cut held the calling (tick) thread since ``t0``."""
        seconds = _record_hold(t0, kind)
        _DurableFileJournal.cut_seconds += seconds
        _DurableFileJournal.cut_seconds_max = max(_DurableFileJournal.cut_seconds_max, seconds)

    def _start_cut(self) -> None:
        end: int = self._FileJournal__currentOffset
        path: str = self._FileJournal__journalFile._ResizableFile__fileName
        header = self._FileJournal__getDefaultHeader()
        self._bg = _BackgroundCut(path, header, self._live_from, end, self._fsync)
        self._bg.thread.start()

    def _poll_cut(self) -> bool:
        """Finish a copied cut; True if this synced the journal."""
        bg = self._bg
        if bg is None or not bg.done.is_set():
            return False
        return self._finish_cut()

    def _forget_cut(self) -> None:
        """The file was rewritten from its start: a copy in progress is void."""
        self._live_from = _pjournal.FIRST_RECORD_OFFSET
        if self._bg is not None:
            self._bg.stale = True

    def _finish_cut(self) -> bool:
        """On the tick thread, once the copy is done: append the records added since,
        sync, and rename the copy over the journal. True if the journal is synced."""
        bg, self._bg = self._bg, None
        assert bg is not None
        bg.done.wait()
        t0 = time.monotonic()
        end: int = self._FileJournal__currentOffset  # type: ignore[has-type]
        if bg.error is not None or bg.stale or end < bg.end:
            with contextlib.suppress(OSError):
                os.unlink(bg.tmp)
            if bg.error is not None:  # the next compaction's cut tries again
                log.warning("journal cut abandoned: %s", bg.error)
            elif self._live_from > _pjournal.FIRST_RECORD_OFFSET:
                self._start_cut()  # the log was truncated meanwhile: copy again
            return False
        rf: Any = self._FileJournal__journalFile  # type: ignore[has-type]
        mm = rf._ResizableFile__mm
        new_end = _pjournal.FIRST_RECORD_OFFSET + (end - bg.start)
        try:
            with open(bg.tmp, "r+b") as out:
                out.seek(_pjournal.FIRST_RECORD_OFFSET + (bg.end - bg.start))
                out.write(mm[bg.end:end])
                out.seek(_pjournal.LAST_RECORD_OFFSET_OFFSET)
                out.write(struct.pack("<I", new_end))
                out.flush()
                if self._fsync:
                    os.fsync(out.fileno())
        except OSError as e:  # the old file is still whole and synced: keep it
            with contextlib.suppress(OSError):
                os.unlink(bg.tmp)
            log.warning("journal cut abandoned: %s", e)
            return False
        with _storing("finish a cut"):
            if self._fsync:
                _durable_replace(bg.tmp, bg.path)
            else:
                os.replace(bg.tmp, bg.path)
            new_file = _JournalFile(bg.path)
        new_file.sync_growth = self._fsync
        # The old file is gone: its unwritten pages need no flush.
        threading.Thread(target=_retire, args=(mm, rf._ResizableFile__f),
                         name="journal-close", daemon=True).start()
        self._FileJournal__journalFile = new_file
        self._FileJournal__currentOffset = new_end
        self._live_from = _pjournal.FIRST_RECORD_OFFSET + max(0, self._live_from - bg.start)
        _DurableFileJournal.cut_copy_seconds += bg.seconds
        self._held(t0, "cut-finish")
        if self._live_from > _pjournal.FIRST_RECORD_OFFSET:
            self._start_cut()  # cut again while this one was copied
        return True

    def wait_cut(self) -> None:
        """Finish the cuts in progress now (before closing): each may start one more
        (a cut requested or a truncation while it copied), none a third."""
        while self._bg is not None:
            self._finish_cut()

    @contextlib.contextmanager
    def loading_dump(self) -> Iterator[None]:
        """Around pysyncobj's start-up load of the dump: it clears the journal
        unless it begins exactly with the dump's last two entries, and so drops
        the entries after them, which this node may have acknowledged (a crash
        between the dump's rename and the journal's cut leaves just that). Here
        a clear followed by the adding of two entries the journal already holds
        at their index becomes a cut before them."""
        self._rebase, self._rebase_cleared = [], False
        try:
            yield
        finally:
            pending, cleared = self._rebase, self._rebase_cleared
            self._rebase, self._rebase_cleared = None, False
            if pending is not None and cleared:
                # A clear without both entries after it: carry it out after all.
                self._replace_all(pending)

    def _rebased(self, entry: tuple[bytes, int, int]) -> None:
        """During ``loading_dump``, after a clear: hold back the two entries added;
        on the second, cut the journal before the first if both are in place,
        else clear it and add them, as pysyncobj meant."""
        assert self._rebase is not None
        self._rebase.append(entry)
        if len(self._rebase) < 2:
            return
        held, self._rebase = self._rebase, None
        entries = self._FileJournal__journal
        pos = held[0][1] - entries[0][1] if entries else -1
        if pos >= 0 and pos + 1 < len(entries) and all(
                _same_entry(have, e) for have, e in zip(entries[pos:pos + 2], held, strict=True)):
            if pos:
                self.deleteEntriesTo(pos)
                log.warning("kept the %d log entries after the snapshot that pysyncobj "
                            "would have dropped", len(self._FileJournal__journal) - 2)
            return
        self._replace_all(held)

    def _replace_all(self, entries: list[tuple[bytes, int, int]]) -> None:
        """pysyncobj's clear and re-add, as it meant them: the journal is ``entries``."""
        with _storing("rewrite the log"):
            super().clear()
            self._forget_cut()
            for e in entries:
                super().add(*e)
        self._sync()

    def __getitem__(self, item: Any) -> Any:
        self._settle()
        return super().__getitem__(item)

    def __len__(self) -> int:
        self._settle()
        return super().__len__()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._settle()
        super().setRaftCommitIndex(raftCommitIndex)

    def onOneSecondTimer(self) -> None:
        self._poll_cut()  # an idle log finishes its cut too
        super().onOneSecondTimer()

    def _destroy(self) -> None:
        self._settle()
        self.wait_cut()
        super()._destroy()


class _ResentFilter(logging.Filter):
    """pysyncobj logs CRITICAL "truncating already-applied log entries ... may have
    diverged" each time a leader re-sends entries a follower already applied. The
    journal above checks what is actually re-appended (identical entries are kept,
    a different one is logged as a replacement), so the line is counted, not shown."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("truncating already-applied log entries"):
            _ResentFilter.count += 1
            return False
        return True


logging.getLogger("pysyncobj.syncobj").addFilter(_ResentFilter())


class _DurableMetaStorer(_pjournal.MetaStorer):
    """Term and vote must be durable before a vote is sent (Raft §5.1)."""

    def storeMeta(self, meta: dict[str, Any]) -> None:
        path = self.getPath()
        tmp = path + ".tmp"
        with _storing("store the term and vote"):
            with open(tmp, "wb") as f:
                f.write(_pjournal.dumps(meta))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


# --- peer transport: one AEAD per frame, no compression ---------------------------------

MAX_PEER_FRAME = 16 * 1024 * 1024
"""pysyncobj buffers a whole frame (up to 2 GiB, announced by a 4-byte length)
before it authenticates it. No legitimate frame is near this size (entries are
batched up to 512 KiB, snapshots are sent in 64 KiB chunks): a peer announcing a
bigger one is dropped at once."""

PEER_SOCKET_BUFFER = 1 << 20
"""SO_SNDBUF/SO_RCVBUF and the read size of a peer link (pysyncobj: 64 KiB, which
splits a full batch entry into many reads, each copying the whole buffer so far)."""

_KDF_SALT = b"switchboard raft peer v2"
_OPENING = 0  # a side's first frame on a link: the cluster key, a random nonce
_SEALED = 1  # every later frame: the link direction's key, a counter nonce
_OPENING_BYTE = bytes([_OPENING])
_SEALED_BYTE = bytes([_SEALED])
_NONCE_PAD = bytes(4)

rejected_peer_frames = 0
"""Frames dropped (with their link): oversized, unauthenticated, replayed or
out of order, or not a message."""


@dataclass(slots=True)
class _LinkKey:
    """One direction of one link: its key (once both random keys are known) and
    the next frame counter."""

    aead: AESGCM | None = None
    counter: int = 0


class PeerCipher:
    """Authenticated encryption of Raft peer traffic, in place of pysyncobj's Fernet.

    pysyncobj compresses every frame with zlib and then Fernet-encrypts it
    (AES-CBC, HMAC, base64), once per follower, and the receiver base64-decodes
    it twice: for a 1,000-command entry that took 836 µs to send and 437 µs to
    read back (``bench.replication.frame_costs``). Here a frame is pickled and
    sealed with AES-256-GCM, nothing else: 37 and 67 µs.

    Keys and nonces: a cluster key comes from the password (PBKDF2, as
    pysyncobj). pysyncobj opens every link by having each side send a fresh
    32-byte random key (the connecting side first, then the accepting side),
    which the other side then puts in every message. Each side's first frame
    on a link, the one carrying its random key, is sealed under the cluster key
    with a random nonce, and a side accepts such a frame only as the first it
    receives. Every later frame is sealed under a key of its own direction,
    derived (HKDF) from the cluster key and *both* random keys (sender's peer
    key then its own, so the two directions differ), with the frame counter as
    the nonce; the receiver expects exactly the next counter. A frame replayed,
    dropped, reordered, reflected or taken from another link does not open, and
    a replayed opening frame only starts a new link with new keys, so no key
    ever seals two frames under one nonce. Link state is dropped whenever
    pysyncobj connects or disconnects the connection object.
    """

    def __init__(self, password: str | bytes):
        secret = password.encode() if isinstance(password, str) else password
        kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_KDF_SALT,
                         iterations=100_000)
        self._cluster_key = kdf.derive(secret)
        self._opening = AESGCM(self._cluster_key)

    def _aead(self, link: _LinkKey, first: bytes | None, second: bytes | None
              ) -> AESGCM | None:
        """``link``'s key, derived once both random keys are known; else None."""
        if link.aead is None and first and second:
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=first + second,
                       info=_KDF_SALT).derive(self._cluster_key)
            link.aead = AESGCM(key)
        return link.aead

    def seal(self, conn: Any, data: bytes) -> bytes | None:
        """The frame for ``data``; None while this side has sent its first frame
        and does not know the other side's random key yet (nothing can be sealed
        for that link then)."""
        link: _LinkKey | None = getattr(conn, "_sb_tx", None)
        if link is None:
            conn._sb_tx = _LinkKey()
            nonce = os.urandom(12)
            return _OPENING_BYTE + nonce + self._opening.encrypt(nonce, data, _OPENING_BYTE)
        aead = self._aead(link, conn.sendRandKey, conn.recvRandKey)  # peer's, then own
        if aead is None:
            return None
        n = link.counter
        link.counter = n + 1
        return _SEALED_BYTE + aead.encrypt(_NONCE_PAD + n.to_bytes(8, "big"), data,
                                           _SEALED_BYTE)

    def open(self, conn: Any, frame: bytes) -> bytes:
        """The plaintext of ``frame``; raises ``InvalidTag`` or ``ValueError``."""
        kind = frame[0] if frame else -1
        link: _LinkKey | None = getattr(conn, "_sb_rx", None)
        if link is None:
            if kind != _OPENING:
                raise ValueError(f"a link's first peer frame of kind {kind}")
            plain = self._opening.decrypt(frame[1:13], frame[13:], _OPENING_BYTE)
            conn._sb_rx = _LinkKey()
            return plain
        if kind != _SEALED:
            raise ValueError(f"unexpected peer frame kind {kind}")
        aead = self._aead(link, conn.recvRandKey, conn.sendRandKey)  # own, then peer's
        if aead is None:
            raise ValueError("a second frame on a Raft link before its keys are known")
        plain = aead.decrypt(_NONCE_PAD + link.counter.to_bytes(8, "big"), frame[1:],
                             _SEALED_BYTE)
        link.counter += 1
        return plain


sent_peer_frames = 0
"""Messages this process sent to Raft peers (every member in the process)."""

early_peer_frames = 0
"""Messages dropped because their link was still opening: pysyncobj sends on a
connected socket before the link's random keys are exchanged (a vote request,
say). Raft re-sends what it needs; pysyncobj's own framing broke the link."""


def _peer_send(self: Any, message: Any) -> None:
    global early_peer_frames, sent_peer_frames
    if self.sendRandKey:
        message = (self.sendRandKey, message)
    data = _ptcp.pickle.dumps(message)
    cipher = self.encryptor
    if cipher is not None:
        sealed = cipher.seal(self, data)
        if sealed is None:
            early_peer_frames += 1
            return
        data = sealed
    self._TcpConnection__writeBuffer += struct.pack("i", len(data)) + data
    sent_peer_frames += 1
    self._TcpConnection__trySendBuffer()


def _peer_parse(self: Any) -> Any:
    global rejected_peer_frames
    buf = self._TcpConnection__readBuffer
    if len(buf) < 4:
        return None
    (length,) = struct.unpack_from("i", buf)
    if length < 0 or length > MAX_PEER_FRAME:
        rejected_peer_frames += 1
        log.warning("dropping a Raft peer connection announcing a %d-byte frame", length)
        self.disconnect()
        return None
    if len(buf) - 4 < length:
        return None
    data = buf[4:4 + length]
    try:
        cipher = self.encryptor
        if cipher is not None:
            data = cipher.open(self, data)
        message = _ptcp.pickle.loads(data)
        if self.recvRandKey:
            rand_key, message = message
            if rand_key != self.recvRandKey:
                raise ValueError("another link's key")
    except Exception:
        rejected_peer_frames += 1
        log.warning("dropping a Raft peer connection: a frame failed to authenticate or decode")
        self.disconnect()
        return None
    self._TcpConnection__readBuffer = buf[4 + length:]
    return message


_orig_connect = _ptcp.TcpConnection.connect
_orig_disconnect = _ptcp.TcpConnection.disconnect


def _peer_connect(self: Any, host: Any, port: Any) -> Any:
    self._sb_tx = self._sb_rx = None  # a new link: new keys, counters from 0
    return _orig_connect(self, host, port)


def _peer_disconnect(self: Any) -> Any:
    self._sb_tx = self._sb_rx = None
    return _orig_disconnect(self)


_ptcp.TcpConnection.send = _peer_send
_ptcp.TcpConnection._TcpConnection__processParseMessage = _peer_parse
_ptcp.TcpConnection.connect = _peer_connect
_ptcp.TcpConnection.disconnect = _peer_disconnect
_psyncobj.getEncryptor = PeerCipher  # SyncObj builds its encryptor with it


def _durable_replace(src: str, dst: str) -> None:
    """pysyncobj writes the snapshot (raft.dump) and renames it without fsync, then
    trims the journal: sync the file and the directory before the journal is cut."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    dfd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_pserializer.atomicReplace = _durable_replace


SNAPSHOT_GZIP_LEVEL = 1


class _SnapshotGzip:
    """pysyncobj's serializer's ``gzip``, writing at level 1 instead of 9: the
    compaction child spends a fifth of the CPU on it (0.008 s against 0.05 s for a
    1.2 MB table snapshot here) for a file about a tenth bigger; every level reads
    back the same way."""

    @staticmethod
    def GzipFile(*args: Any, **kwargs: Any) -> gzip.GzipFile:
        if "w" in str(kwargs.get("mode", "")):
            kwargs.setdefault("compresslevel", SNAPSHOT_GZIP_LEVEL)
        return gzip.GzipFile(*args, **kwargs)


_pserializer.gzip = _SnapshotGzip

stale_compactions = 0
"""Own compactions abandoned because a leader's snapshot was installed meanwhile."""
_orig_set_transmission = _pserializer.Serializer.setTransmissionData


def _install_over_compaction(self: Any, data: Any) -> Any:
    """pysyncobj installs a leader's snapshot even while this node's own compaction
    child is still writing: that child then replaces the installed dump with the
    older state, and its completion cuts the log at an index taken before the
    install (it can empty the log, or leave a dump older than the log's start,
    which this node then sends as a snapshot that no follower can continue from).
    Before the last chunk of an incoming snapshot is put in place, the running
    compaction is killed and forgotten."""
    global stale_compactions
    if data is None or not data[2]:  # not the last chunk: nothing to decide yet
        return _orig_set_transmission(self, data)
    if _older_than_applied(self, data[0]):
        return False
    pid = self._Serializer__pid
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        self._Serializer__pid = 0
        stale_compactions += 1
        log.warning("abandoning this node's compaction: a leader's snapshot is installed")
    return _orig_set_transmission(self, data)


stale_snapshots = 0
"""Snapshots received that were not newer than what this node had already applied."""


def _older_than_applied(ser: Any, last_chunk: bytes) -> bool:
    """Whether a fully received snapshot is no newer than this node's applied state;
    if so it is dropped. pysyncobj installs whatever a leader sends, even a snapshot
    older than the follower's applied index (a leader re-sends it on stale replies):
    that would take the table back in time and replay committed entries."""
    global stale_snapshots
    applied = getattr(ser, "_sb_applied", None)
    f = ser._Serializer__incomingTransmissionFile
    if applied is None or f is None:
        return False
    f.flush()
    tmp = ser._Serializer__fileName + ".1.tmp"
    try:
        with open(tmp, "rb") as fh:
            blob = fh.read() + bytes(last_chunk)
        index = _pserializer.pickle.loads(gzip.decompress(blob))[1][1]
    except Exception:  # not ours to judge: pysyncobj handles it as before
        return False
    mine = applied()
    if index > mine:
        return False
    f.close()
    ser._Serializer__incomingTransmissionFile = None
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    stale_snapshots += 1
    log.info("ignoring a snapshot at index %d: this node has applied up to %d", index, mine)
    return True


_pserializer.Serializer.setTransmissionData = _install_over_compaction

_orig_delete_to = _psyncobj.SyncObj._SyncObj__deleteEntriesTo


def _delete_entries_to(self: Any, to_idx: int) -> None:
    """Compaction cuts the log before ``to_idx``; one that would leave fewer than two
    entries (a stale cut) would break pysyncobj for good, so it is skipped."""
    raft_log = self._SyncObj__raftLog
    if len(raft_log) < 2 or to_idx >= raft_log[-1][1]:
        log.warning("skipping a log cut at %d: the log ends at %s", to_idx,
                    raft_log[-1][1] if len(raft_log) else "nothing")
        return
    _orig_delete_to(self, to_idx)


_psyncobj.SyncObj._SyncObj__deleteEntriesTo = _delete_entries_to

_fsync_enabled = threading.local()


def _create_journal(journal_file: str | None = None) -> Any:
    if journal_file is not None:
        return _DurableFileJournal(journal_file, getattr(_fsync_enabled, "on", False))
    return _pjournal.createJournal(journal_file)


def _install_durability(on: bool) -> None:
    _fsync_enabled.on = on
    _psyncobj.createJournal = _create_journal  # pysyncobj resolves it at construction
    if on:
        _pjournal.MetaStorer = _DurableMetaStorer


# --- the consumer carrying the table ------------------------------------------------


class _CborSnapshot:
    """Pickles as the table's CBOR snapshot, computed when pickled: pysyncobj
    pickles the dump in its forked compaction child, so the parent never pauses
    to encode the table."""

    def __init__(self, table: SessionTable):
        self.table = table

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (bytes, (self.table.snapshot(),))


class _TableConsumer(SyncObjConsumer):
    def __init__(
        self,
        applier: BatchApplier,
        on_applied: Callable[[int, AppliedBatch], None],
        on_restored: Callable[[], None],
        on_checkpoint: OnCheckpoint,
    ):
        # Set before the base constructor so pysyncobj never pickles them.
        self._applier = applier
        self._on_applied = on_applied
        self._on_restored = on_restored
        self._on_checkpoint = on_checkpoint
        self._digests = _DigestChildren()
        self._index_of: Callable[[], int] = lambda: 0
        super().__init__()

    def _serialize(self) -> dict[str, Any]:
        return {"table": _CborSnapshot(self._applier.table)}

    def _deserialize(self, data: dict[str, Any]) -> None:
        try:
            self._applier.table.restore(data["table"])
        except Exception:
            log.exception("could not restore the table from a snapshot")
            return
        try:
            self._on_restored()
        except Exception:
            log.exception("on_restored failed")

    def _apply(self, index: int, blob: bytes) -> None:
        # Runs on the tick thread. Must never raise (pysyncobj would retry it forever).
        try:
            applied = self._applier.apply(blob)
            self._on_applied(index, applied)
        except Exception:
            log.exception("applying a batch failed")

    def _entry_applied(self, index: int, t0: float) -> None:
        """After the whole entry at ``index`` (begun at ``t0``) applied: note a
        slow one, and digest the table for the checkpoints it holds."""
        if time.monotonic() - t0 >= SLOW_APPLY:
            _record_hold(t0, "apply")
        due = self._applier.table.checkpoints_due
        if due:
            tags = list(due)
            due.clear()
            try:
                _digest_after(self._digests, self._applier.table, index, tags,
                              self._on_checkpoint)
            except Exception:
                log.exception("checkpoint digest failed")

    @replicated
    def apply_batch(self, blob: bytes) -> None:
        t0 = time.monotonic()
        index = self._index_of()
        self._apply(index, blob)
        self._entry_applied(index, t0)

    @replicated
    def apply_batches(self, blobs: list[bytes]) -> None:
        """Several nodes' batches merged into one entry by the leader (``_SyncObj``),
        applied in the order they reached it."""
        t0 = time.monotonic()
        index = self._index_of()
        for blob in blobs:
            self._apply(index, blob)
        self._entry_applied(index, t0)


class _AppendEntriesSends:
    """This process's leader sends: pysyncobj's sends carried out, and those
    skipped because they would have told the followers nothing new."""

    sent = 0
    skipped = 0  # (quiet ones included)
    quiet = 0  # commit-only sends skipped: the commit concerned no follower
    answers_skipped = 0  # as a follower
    kept_ahead = 0  # answers that would have sent a follower's next index back


class _Links:
    """This process's keep-alives and leader probes (``ReplicatedLog.link_statistics``)."""

    alive_sent = 0  # keep-alives on links that carry no heartbeats (``_sb_keep_links_alive``)
    leader_probes = 0  # as follower: the leader's link closed, its address probed
    early_campaigns = 0  # as follower: the probe refused or reset, the election brought forward


class _CompactionStarts:
    """This process's compaction starts: the fork of the child holds the tick thread."""

    count = 0
    seconds = 0.0
    seconds_max = 0.0


_events: deque[tuple[float, str, float]] = deque(maxlen=1024)
"""This process's latest holds of a tick thread by compaction, a slow fsync or
a slow apply: (time.monotonic() at the start, "fork" / "cut" / "cut-finish" /
"fsync" / "grow" / "apply", seconds), to set beside latency spikes."""

SLOW_APPLY = 0.02
"""An entry whose application holds the tick thread this long (seconds) or more
is noted in ``_events`` as an "apply" hold."""


def _record_hold(t0: float, kind: str) -> float:
    """Note in ``_events`` a hold of the tick thread that began at ``t0`` (a
    ``time.monotonic()``) and ends now; its seconds."""
    seconds = time.monotonic() - t0
    _events.append((t0, kind, seconds))
    return seconds


def _compaction_child() -> None:
    """In a forked compaction child: die if the node dies, never outlive it; and
    collect no garbage: a collection walks the whole inherited heap, copying
    every page it touches, and the child lives only to write one snapshot. The
    sooner it is done, the fewer entries the journal cut then copies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    gc.disable()


OnCheckpoint = Callable[[str, int, str], None]
"""``on_checkpoint(tag, log index, digest)``, called on a thread of its own. A
digest that could not be computed is reported as ``"unavailable: <why>"``, never
equal to a real one (which is hexadecimal)."""

MAX_DIGEST_CHILDREN = 2
"""A member's digest children alive at once; a checkpoint beyond that is
reported unavailable rather than digested on the tick thread."""

DIGEST_DEADLINE = 120.0
"""A digest child still running after this many seconds is killed (its digest
unavailable): 200,000 sessions took 3.7 s here."""


class _DigestChildren:
    """A member's checkpoint digest children alive now."""

    def __init__(self) -> None:
        self.alive = 0
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.alive -= 1


def _report_all(report: OnCheckpoint, tags: list[str], index: int, digest: str) -> None:
    for tag in tags:
        try:
            report(tag, index, digest)
        except Exception:
            log.exception("on_checkpoint failed")


def _digest_after(children: _DigestChildren, table: SessionTable, index: int,
                  tags: list[str], report: OnCheckpoint) -> None:
    """The table's digest as it is now (after log entry ``index``), reported for
    each checkpoint tag. On the tick thread: a forked child computes it from its
    copy-on-write image of the table while the tick thread goes on. Done on the
    tick thread, a digest of 200,000 sessions held it 3-4 s here, on every member
    at once: no member sent or answered a message meanwhile, the followers
    elected a new leader and every node fenced itself."""
    with children.lock:
        busy = children.alive >= MAX_DIGEST_CHILDREN
        if not busy:
            children.alive += 1
    if busy:
        log.warning("checkpoint %s at %d: %d digests already running", tags, index,
                    MAX_DIGEST_CHILDREN)
        _report_all(report, tags, index, "unavailable: too many digests at once")
        return

    def give_up(why: BaseException) -> None:
        children.release()
        _report_all(report, tags, index, f"unavailable: {why}")

    t0 = time.monotonic()
    try:
        r, w = os.pipe()
    except OSError as e:
        give_up(e)
        return
    try:
        pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        give_up(e)
        return
    if pid == 0:  # the child (``_compaction_child`` ran: no GC, dies with the node)
        code = 1
        try:
            os.close(r)
            os.write(w, table.digest().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _record_hold(t0, "digest-fork")
    try:
        threading.Thread(target=_await_digest, args=(children, pid, r, index, tags, report),
                         name="checkpoint-digest", daemon=True).start()
    except RuntimeError as e:  # no thread to wait with: give the child up
        os.close(r)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        give_up(e)


def _await_digest(children: _DigestChildren, pid: int, r: int, index: int, tags: list[str],
                  report: OnCheckpoint) -> None:
    """On a thread of its own: read the child's digest (killing it past the
    deadline), reap it, report."""
    data = b""
    try:
        deadline = time.monotonic() + DIGEST_DEADLINE
        with os.fdopen(r, "rb", buffering=0) as f:
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([f], [], [], left)[0]:
                    continue
                chunk = f.read(4096)
                if not chunk:
                    break
                data += chunk
            else:
                data = b""
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        # ReplicatedLog.close() reaps every child: this one may be gone already.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    finally:
        children.release()
    if not data:
        log.warning("checkpoint digest failed (its child died or overran): %s at %d",
                    tags, index)
        _report_all(report, tags, index, "unavailable: the digest child failed")
        return
    _report_all(report, tags, index, data.decode())


_LEADER = _psyncobj._RAFT_STATE.LEADER
_FOLLOWER = _psyncobj._RAFT_STATE.FOLLOWER
_POLL_WRITE = _ppoller.POLL_EVENT_TYPE.WRITE
_POLL_ERROR = _ppoller.POLL_EVENT_TYPE.ERROR
_POLL_READ = _ppoller.POLL_EVENT_TYPE.READ
_GONE = (errno.ECONNREFUSED, errno.ECONNRESET)
"""A leader probe's errors that prove nothing listens at the leader's address."""
PROBE_HOLD = 0.1
"""Seconds a leader probe that connected stays open. A killed process's kernel
closes its files one by one: its listener may still take the probe after its
links closed, and then resets it when it closes, within a millisecond here
(bench/results/ab-20261128-s12/race.py.txt). A live leader keeps it open."""
_apply_log_entries = _psyncobj.SyncObj._SyncObj__applyLogEntries
_load_dump_file = _psyncobj.SyncObj._SyncObj__loadDumpFile
_try_log_compaction = _psyncobj.SyncObj._SyncObj__tryLogCompaction
_send_append_entries = _psyncobj.SyncObj._SyncObj__sendAppendEntries
_send_next_node_idx = _psyncobj.SyncObj._SyncObj__sendNextNodeIdx
_on_node_connected = _psyncobj.SyncObj._SyncObj__onNodeConnected
_on_node_disconnected = _psyncobj.SyncObj._SyncObj__onNodeDisconnected
_on_message_received = _psyncobj.SyncObj._SyncObj__onMessageReceived
_REGULAR = _psyncobj._COMMAND_TYPE.REGULAR
_ALIVE = "sb_alive"
"""The type of the keep-alive a member sends on links that carry no heartbeats;
pysyncobj ignores message types it does not know, so older members do too."""
MERGED_ENTRY_BYTES = 1024 * 1024
"""A leader merges batches into one entry only while the entry stays within this
size (entries must stay under ``APPEND_ENTRIES_BYTES``; a batch alone is at most
512 KiB of CBOR plus a command, which pysyncobj's pickle can double)."""


class _SyncObj(SyncObj):
    """pysyncobj's SyncObj with a group-committing leader.

    - One entry in flight: while its latest entry is uncommitted, the leader
      leaves proposals queued; once it commits, every batch queued meanwhile (its
      own node's and those the followers forwarded) goes into one entry
      (``apply_batches``), up to ``MERGED_ENTRY_BYTES``. pysyncobj appended each
      proposal as its own entry at once, so with every node proposing there
      were up to three entries in flight: each paid the per-entry cost (messages
      to and from both followers, an fsync on every node), and acknowledgements
      of one moved the leader's next index back, re-sending the others.
    - Paced: a new entry starts no sooner than ``RaftTimings.entry_interval``
      after the previous one (the tick's poll is cut short to start it on time),
      so batches proposed meanwhile share it; an idle leader does not wait.
    - The next entry is sent as soon as the previous one commits (and its pacing
      allows), before the leader applies that one, so replication overlaps the
      leader's apply.
    - The leader fsyncs new entries after sending them and after applying the
      committed one, so its fsync overlaps the followers' and does not hold up
      the answers to the committed entry's proposers.
    - No commit-only message right behind an entry that already carried that
      commit index, nor for a commit that concerns no follower (no effect for a
      session of one, none of its proposals: ``_SyncObj__sendAppendEntries``),
      and no repeated answer to a commit-only message (``_SyncObj__sendNextNodeIdx``).
    - A member that has just started (or loaded its snapshot at start) gives the
      leader one connection retry period plus an election timeout to reach it
      before it campaigns (``_start_grace``): its deadline was set before it read
      its journal and snapshot, and the leader may reconnect only at its next
      retry, so a restarted follower used to call an election at once, with a
      higher term, and unseat a healthy leader.
    - A follower's election deadline moves on by the time it spent applying
      entries (``_SyncObj__applyLogEntries``): it read no socket meanwhile. A
      restarted member replays its journal's committed entries in its first
      tick, before any connection (seconds for a node of 200,000 sessions), and
      then campaigned at its first connection, before the leader could reach it.
    - A member that is not the leader keeps its links to the other non-leaders
      alive (``_sb_keep_links_alive``), so that the first vote request after a
      quiet spell goes out instead of closing a stale link.
    - A follower whose link to the leader closes connects to the leader's
      address; if that is refused or reset at once (the leader's process is
      gone: its kernel closed the links), it campaigns in its turn among the followers
      (``_leader_gone``) instead of a whole election timeout after the last
      heartbeat.

    A subclass, not attributes set on the instance: pysyncobj pickles every
    attribute added after its constructor into each snapshot, and a function
    there makes every compaction fail.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # Set before the base constructor, so that pysyncobj does not take it for
        # replicated state and pickle it into snapshots.
        self._sb_told: tuple[int, int, int, frozenset[Any]] | None = None
        self._sb_answered: dict[Any, tuple[int, int, float]] = {}
        self._sb_last_append = 0.0  # time.monotonic() of the leader's latest new entry
        self._sb_wake_at = 0.0  # the tick's poll ends by then: a paced entry is due
        self._sb_interval = float(getattr(kwargs.get("conf"), "sb_entry_interval", 0.0))
        self._sb_forwarded = 0  # the latest entry carrying a follower's forwarded command
        self._sb_quiet = False  # the commit just applied concerns no follower
        self._sb_alive_at = 0.0  # time.monotonic() of the next keep-alive round
        self._sb_lost_step = float(getattr(kwargs.get("conf"), "sb_leader_lost_step", 0.0))
        # (socket, give up at): pysyncobj's clock (CLOCK_MONOTONIC_RAW, not time.monotonic)
        self._sb_probe: tuple[socket.socket, float] | None = None
        super().__init__(*args, **kwargs)
        self._start_grace()
        poller = self._poller
        base_poll = poller.poll

        def poll(timeout: float) -> Any:
            wake = self._sb_wake_at
            if wake:
                self._sb_wake_at = 0.0  # set again by the next tick if still due
                left = wake - time.monotonic()
                if left < timeout:
                    # poll's timeout counts whole milliseconds (rounded up), too
                    # coarse for a paced entry: sleep the rest (nothing is in
                    # flight meanwhile), then take whatever is ready.
                    if left > 0:
                        time.sleep(left)
                    timeout = 0.0
            return base_poll(timeout)

        poller.poll = poll

    def _start_grace(self) -> None:
        """Push the election deadline to a connection retry period plus an
        election timeout from now (never earlier than it is)."""
        conf = self._SyncObj__conf
        grace = conf.connectionRetryTime + conf.raftMinTimeout + (
            conf.raftMaxTimeout - conf.raftMinTimeout) * random.random()
        deadline = _psyncobj.monotonicTime() + grace
        if getattr(self, "_SyncObj__raftElectionDeadline") < deadline:  # noqa: B009 (mypy)
            self._SyncObj__raftElectionDeadline = deadline

    def _SyncObj__onNodeConnected(self, node: Any) -> None:
        self._sb_answered.pop(node, None)  # the last answer may have died with the old link
        _on_node_connected(self, node)

    def _SyncObj__onNodeDisconnected(self, node: Any) -> None:
        # pysyncobj also reports its failed reconnects here: only a link that was
        # up is news.
        was_up = node in self._SyncObj__connectedNodes
        self._sb_answered.pop(node, None)
        _on_node_disconnected(self, node)
        if (was_up and node == self._SyncObj__raftLeader
                and self._SyncObj__raftState == _FOLLOWER and self._sb_lost_step > 0):
            self._probe_leader(node)

    def _probe_leader(self, leader: Any) -> None:
        """The link to ``leader`` closed: connect to its address, without waiting.

        A refusal proves that nothing listens there any more: its process is
        gone (``_leader_gone``); so does a connection that is reset or closed
        within ``PROBE_HOLD`` of being made, by a listener that closed with the
        probe in its backlog (a dying process's). A connection that stays open
        (a live leader whose link merely dropped, or a hung one: its kernel
        still accepts), no answer within an election timeout (a cut-off host),
        or any other error leaves the election timeout to decide, as before.
        """
        self._end_probe()
        term = self._SyncObj__raftCurrentTerm
        ip = leader.ip
        if ip is None:
            return
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        _Links.leader_probes += 1
        try:
            err = sock.connect_ex((ip, leader.port))
        except OSError:
            sock.close()
            return
        if err != errno.EINPROGRESS:
            sock.close()
            if err in _GONE:
                self._leader_gone(leader, term)
            return
        fd = sock.fileno()
        up = False

        def answered(_descr: int, _event: int) -> None:
            nonlocal up
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0 and not up:
                up = True  # accepted: watch it for PROBE_HOLD
                self._sb_probe = (sock, _psyncobj.monotonicTime() + PROBE_HOLD)
                self._poller.subscribe(fd, answered, _POLL_READ | _POLL_ERROR)
                return
            if err == 0:
                try:
                    err = errno.ECONNRESET if sock.recv(1) == b"" else 0
                except BlockingIOError:
                    return
                except OSError as e:
                    err = e.errno or 0
            self._end_probe()
            if err in _GONE:
                self._leader_gone(leader, term)

        self._sb_probe = (sock, _psyncobj.monotonicTime() + self._SyncObj__conf.raftMaxTimeout)
        self._poller.subscribe(fd, answered, _POLL_WRITE | _POLL_ERROR)

    def _end_probe(self) -> None:
        if self._sb_probe is not None:
            sock = self._sb_probe[0]
            self._sb_probe = None
            self._poller.unsubscribe(sock.fileno())
            sock.close()

    def _leader_gone(self, leader: Any, term: int) -> None:
        """Nothing listens at ``leader``'s address any more: if it is still this
        follower's leader in ``term``, bring the election deadline forward to this
        follower's turn (``RaftTimings.leader_lost_step``: its place among the
        other followers, by address), never later than it was."""
        me = self._SyncObj__selfNode
        if (me is None or self._SyncObj__raftState != _FOLLOWER
                or self._SyncObj__raftLeader != leader or self._SyncObj__raftCurrentTerm != term):
            return
        ids = sorted([me.id, *(n.id for n in self._SyncObj__otherNodes if n != leader)])
        step = self._sb_lost_step
        turn = _psyncobj.monotonicTime() + step * (ids.index(me.id) + random.random() / 3)
        if turn < self._SyncObj__raftElectionDeadline:
            self._SyncObj__raftElectionDeadline = turn
            _Links.early_campaigns += 1

    def _doDestroy(self) -> None:
        """pysyncobj's, on the tick thread, but the listening socket closes
        before the links do: a follower that probes this address on seeing its
        link close must be refused, not accepted by a listener about to go."""
        self._end_probe()
        server = self._SyncObj__transport._server
        if server is not None:
            server.unbind()
        super()._doDestroy()

    def _sb_tick(self, now: float) -> None:
        """After each tick, on the tick thread: give up a leader probe that got no
        answer in time, and keep idle links alive."""
        if self._sb_probe is not None and _psyncobj.monotonicTime() > self._sb_probe[1]:
            self._end_probe()
        self._sb_keep_links_alive(now)

    def _sb_keep_links_alive(self, now: float) -> None:
        """Unless leader, send a keep-alive on each connected link but the one to
        the leader, once per quarter of ``connectionTimeout``; tick thread only.

        pysyncobj closes a link on its next send once nothing was read on it for
        ``connectionTimeout``, and followers say nothing to each other between
        elections: after a quiet spell that long, the first vote request after a
        leader loss closed the followers' link instead of going out, so that
        election took two terms and about twice as long. The leader's links
        carry its heartbeats and their answers. A peer that is gone still loses
        its link to the timeout, as before. An older member sends none: its link
        to this one closes about every ``connectionTimeout`` and is made again at
        once (a rolling upgrade's cost).
        """
        if now < self._sb_alive_at or self._SyncObj__raftState == _LEADER:
            return
        self._sb_alive_at = now + self._SyncObj__conf.connectionTimeout / 4
        leader = self._SyncObj__raftLeader
        transport = self._SyncObj__transport
        for node in tuple(self._SyncObj__connectedNodes):  # keys exchanged; a send may close
            if node != leader and transport.send(node, {"type": _ALIVE}):
                _Links.alive_sent += 1

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        """pysyncobj's handler, less one step back: a follower's answer never moves
        its next index below what the leader has already sent it.

        On a successful answer that raises a follower's match index, pysyncobj
        sets its next index to the answer's, even when the leader has sent it
        later entries since (the answer is to an older message): the follower
        outside the quorum lags one entry behind, each of its answers sent the
        leader back, and the leader re-sent every entry from there in one
        message (tens of entries, megabytes under load), which the follower
        decoded, cut its log for and skipped. As in etcd-raft, the next index
        only moves forward on success; a follower that truly lacks entries says
        so (``reset``), and that still moves it back.
        """
        if type(message) is dict and message.get("type") == _ALIVE:
            return  # read: that was its purpose
        if (type(message) is dict and message.get("type") == "next_node_idx"
                and message.get("success") and not message.get("reset")
                and self._SyncObj__raftState == _LEADER):
            next_index = self._SyncObj__raftNextIndex
            sent = next_index.get(node)
            _on_message_received(self, node, message)
            if (sent is not None and self._SyncObj__raftState == _LEADER
                    and next_index.get(node, sent) < sent):
                next_index[node] = sent
                _AppendEntriesSends.kept_ahead += 1
            return
        _on_message_received(self, node, message)

    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False,
                                  nextNodeIdx: int | None = None, success: bool = False) -> None:
        """pysyncobj's answer to the leader, less the answers that tell it nothing new.

        A follower answers every append-entries message; the answer to a
        commit-only message (the leader telling which entries committed) repeats
        the one it sent for the entries a moment before. Such a repeat, in the
        same term and within half an append-entries period of the last answer
        sent, is skipped: the leader already has it, and heartbeats, further
        apart, are still answered (the leader counts them to stay leader).
        """
        if success and not reset and nextNodeIdx is not None:
            now = _psyncobj.monotonicTime()
            term = self._SyncObj__raftCurrentTerm
            last = self._sb_answered.get(node)
            if (last is not None and last[0] == term and last[1] == nextNodeIdx
                    and now - last[2] < self._SyncObj__conf.appendEntriesPeriod / 2):
                _AppendEntriesSends.answers_skipped += 1
                return
            self._sb_answered[node] = (term, nextNodeIdx, now)
        _send_next_node_idx(self, node, reset, nextNodeIdx, success)

    def _SyncObj__sendAppendEntries(self) -> None:
        """pysyncobj's send, less the messages that tell nothing new.

        pysyncobj sends every follower at least one message per call. After an
        entry commits, the leader sends the next entry (which carries the new
        commit index) before applying, and the apply asked for another send: a
        message with no entries and the same commit index, which each follower
        decoded and answered, doubling the messages per entry under load. That
        send is skipped when every connected follower has been sent every entry
        and this commit index in this term, and no heartbeat is due.

        A commit-only message (no entry yet carried the commit: the leader was
        idle, or the next entry waits for its pacing) goes out only when the
        applied commit concerns a follower (``_sb_quiet`` unset, decided in
        ``_SyncObj__applyLogEntries``): then the follower pushes its clients'
        messages and presence events, or answers its proposers, at once, and
        their next batches can still reach the paced entry. Otherwise the
        commit rides the next entry or heartbeat.
        """
        told = self._sb_told
        quiet, self._sb_quiet = self._sb_quiet, False
        if told is not None and _psyncobj.monotonicTime() <= self._SyncObj__newAppendEntriesTime:
            last = self._SyncObj__getCurrentLogIndex()
            connected = self._SyncObj__connectedNodes
            next_index = self._SyncObj__raftNextIndex
            if ((quiet or told[0] == self._SyncObj__raftCommitIndex) and told[1] == last
                    and told[2] == self._SyncObj__raftCurrentTerm and told[3] == connected
                    and all(next_index.get(node, 0) > last
                            for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes
                            if node in connected)):
                _AppendEntriesSends.skipped += 1
                if told[0] != self._SyncObj__raftCommitIndex:
                    _AppendEntriesSends.quiet += 1
                return
        _send_append_entries(self)
        _AppendEntriesSends.sent += 1
        self._sb_told = (self._SyncObj__raftCommitIndex, self._SyncObj__getCurrentLogIndex(),
                         self._SyncObj__raftCurrentTerm,
                         frozenset(self._SyncObj__connectedNodes))

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> Any:
        journal = self._SyncObj__raftLog
        try:
            if clearJournal or not isinstance(journal, _DurableFileJournal):
                return _load_dump_file(self, clearJournal)
            with journal.loading_dump():
                return _load_dump_file(self, clearJournal)
        finally:
            if not clearJournal:  # read at start (not installed from the leader): maybe long
                self._start_grace()

    def _SyncObj__tryLogCompaction(self) -> Any:
        conf = self._SyncObj__conf
        every = conf.sb_compaction_entries
        # Runs at every tick: the turn matters only once the log is half a cycle long.
        conf.logCompactionMinEntries = (
            every if len(self._SyncObj__raftLog) <= every // 2
            else self._compaction_threshold(every))
        ser = self._SyncObj__serializer
        before = ser._Serializer__currentID
        t0 = time.monotonic()
        result = _try_log_compaction(self)
        if ser._Serializer__currentID != before:  # a compaction child was forked
            took = _record_hold(t0, "fork")
            ser._sb_compactions = (ser._sb_compactions[0] + 1, ser._Serializer__currentID)
            _CompactionStarts.count += 1
            _CompactionStarts.seconds += took
            _CompactionStarts.seconds_max = max(_CompactionStarts.seconds_max, took)
        return result

    def _compaction_threshold(self, every: int) -> int:
        """Members take turns to compact: the log's indices run in cycles of
        ``every``, each member's turn is its share of a cycle (by sorted id), and
        a member compacts once per cycle, in its turn. Left to pysyncobj, all
        reached the threshold at the same index and forked their compaction
        children together, and their journal cuts stalled a quorum at once."""
        me = self._SyncObj__selfNode
        if me is None:
            return every
        ids = sorted([me.id, *(n.id for n in self._SyncObj__otherNodes)])
        if len(ids) < 2:
            return every
        turn = self._SyncObj__raftLastApplied * len(ids) // every % len(ids)
        if turn == ids.index(me.id):
            return every // 2  # a cycle since the last: the log is about ``every`` long
        return 2 * every  # missed turns (a snapshot install, say): compact anyway

    def _SyncObj__applyLogEntries(self) -> Any:
        # A leader whose entry just committed sends the next one before applying,
        # so the followers replicate it while the leader applies, and fsyncs it
        # after applying, so the committed entry's proposers do not wait for it.
        table = self._sb_table()
        if (self._SyncObj__raftState == _LEADER
                and self._SyncObj__raftCommitIndex > self._SyncObj__raftLastApplied):
            journal = self._SyncObj__raftLog
            if table is not None:
                table.track_remote = True
            with journal.deferring() if isinstance(journal, _DurableFileJournal) \
                    else contextlib.nullcontext():
                self._checkCommandsToApply()
                result = _apply_log_entries(self)
            if table is not None:
                # A commit-only message (sent after this, by pysyncobj's tick) tells
                # the followers at once; needed only by one that holds a session
                # the applied commands have effects for, or that proposed one of
                # them. Any other commit rides the next entry or heartbeat.
                told = self._sb_told
                told_commit = told[0] if told is not None else 0
                forwarded = told_commit < self._sb_forwarded <= self._SyncObj__raftCommitIndex
                self._sb_quiet = not table.remote_nodes and not forwarded
                table.remote_nodes.clear()
            return result
        if table is not None and table.track_remote:
            table.track_remote = False
            table.remote_nodes.clear()
        t0 = _psyncobj.monotonicTime()
        result = _apply_log_entries(self)
        # The thread read no socket meanwhile: time spent applying is not time the
        # leader was silent. A restarted member replays its journal here before its
        # first connection, and campaigned as soon as it had one.
        self._SyncObj__raftElectionDeadline += _psyncobj.monotonicTime() - t0
        return result

    def _sb_table(self) -> SessionTable | None:
        consumers = self._SyncObj__consumers
        consumer = consumers[0] if consumers else None
        return consumer._applier.table if isinstance(consumer, _TableConsumer) else None

    def _checkCommandsToApply(self) -> None:
        journal = self._SyncObj__raftLog
        with journal.deferring() if isinstance(journal, _DurableFileJournal) \
                else contextlib.nullcontext():
            if self._SyncObj__raftState == _LEADER:
                self._leader_append()
            else:
                super()._checkCommandsToApply()

    def _batch_ids(self) -> tuple[int, int]:
        consumer = self._SyncObj__consumers[0]
        key = id(consumer)
        return (self._methodToID[(key, self._getFuncName((key, "apply_batch")))],
                self._methodToID[(key, self._getFuncName((key, "apply_batches")))])

    def _leader_append(self) -> None:
        if self._SyncObj__raftCommitIndex < self._SyncObj__getCurrentLogIndex():
            return  # an entry in flight: what is queued goes in the next one
        queue = self._SyncObj__commandsQueue
        due = self._sb_last_append + self._sb_interval
        if queue._FastQueue__queue and due > time.monotonic():
            self._sb_wake_at = due  # paced: more batches join this entry meanwhile
            return
        single_id, merged_id = self._batch_ids()
        blobs: list[bytes] = []
        waiters: list[Any] = []
        first = b""
        size = 0
        with queue._FastQueue__lock:
            pending = queue._FastQueue__queue
            while pending:
                command, callback = pending[0]
                if command[0] != _REGULAR or (blobs and size + len(command) > MERGED_ENTRY_BYTES):
                    break
                try:
                    call = _ptcp.pickle.loads(command[1:])
                    blob = call[1][0] if call[0] == single_id and len(call) == 2 else None
                except Exception:  # not ours to merge: pysyncobj's own path takes it
                    blob = None
                if not isinstance(blob, bytes):
                    break
                pending.popleft()
                blobs.append(blob)
                waiters.append(callback)
                first = first or command
                size += len(command)
        if not blobs:
            # Anything else first (a membership change, a version switch): pysyncobj's way;
            # its commit goes to the followers at once (as if forwarded).
            before = self._SyncObj__getCurrentLogIndex()
            super()._checkCommandsToApply()
            after = self._SyncObj__getCurrentLogIndex()
            if after != before:
                self._sb_forwarded = after
            return
        if len(blobs) == 1:
            entry = first
        else:
            entry = bytes([_REGULAR]) + _ptcp.pickle.dumps((merged_id, (blobs,)))
        idx = self._SyncObj__getCurrentLogIndex() + 1
        term = self._SyncObj__raftCurrentTerm
        try:
            self._SyncObj__raftLog.add(entry, idx, term)
            self._sb_last_append = time.monotonic()
        except Exception:
            # A storage failure stops the node before this (``storage_failed``);
            # anything else raised here is a bug: no proposer is left waiting.
            for callback in waiters:
                self._SyncObj__callErrCallback(FAIL_REASON.DISCARDED, callback)
            raise
        transport = self._SyncObj__transport
        waiting = self._SyncObj__commandsWaitingCommit
        for callback in waiters:
            if isinstance(callback, tuple):  # forwarded by a follower: tell it where
                node, request_id = callback
                self._sb_forwarded = idx
                transport.send(node, {"type": "apply_command_response",
                                      "request_id": request_id, "log_idx": idx,
                                      "log_term": term})
            elif callback is not None:
                waiting[idx].append((term, callback))
        self._SyncObj__sendAppendEntries()


class ReplicatedLog:
    """A session table replicated through pysyncobj; see the module docstring."""

    def __init__(
        self,
        config: RaftConfig,
        table: SessionTable,
        on_applied: Callable[[int, AppliedBatch], None],
        on_restored: Callable[[], None] = lambda: None,
        on_checkpoint: OnCheckpoint = lambda _tag, _index, _digest: None,
    ):
        self.config = config
        self.table = table
        self.applier = BatchApplier(table)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        _install_durability(config.fsync)
        os.register_at_fork(after_in_child=_compaction_child)
        t = config.timings
        conf = SyncObjConf(
            password=config.password,
            autoTick=True,
            autoTickPeriod=t.tick,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=APPEND_ENTRIES_BYTES,
            appendEntriesPeriod=t.append_entries_period,
            raftMinTimeout=t.election_min,
            raftMaxTimeout=t.election_max,
            connectionTimeout=t.connection_timeout,
            connectionRetryTime=t.connection_retry,
            leaderFallbackTimeout=t.leader_fallback,
            journalFile=str(config.data_dir / "raft.journal"),
            fullDumpFile=str(config.data_dir / "raft.dump"),
            logCompactionMinEntries=config.compaction_entries,
            logCompactionMinTime=config.compaction_seconds,
            bindAddress=config.self_addr,
            maxBindRetries=config.max_bind_retries,
            bindRetryTime=0.25,
            dynamicMembershipChange=config.dynamic_membership,
            commandsWaitLeader=True,
            tcp_keepalive=(5, 1, 3),
            # A restarted peer (a container) may come back with another address.
            dnsCacheTime=2.0,
            dnsFailCacheTime=1.0,
            sendBufferSize=PEER_SOCKET_BUFFER,
            recvBufferSize=PEER_SOCKET_BUFFER,
        )
        conf.sb_compaction_entries = config.compaction_entries  # _SyncObj's turns
        conf.sb_entry_interval = t.entry_interval  # _SyncObj's pacing
        conf.sb_leader_lost_step = t.leader_lost_step  # _SyncObj's early campaign
        self._consumer = _TableConsumer(self.applier, on_applied, on_restored, on_checkpoint)
        self._status = RaftStatus()
        self._status_lock = threading.Lock()
        self._last_status = 0.0
        self._tick_calls: deque[Callable[[], None]] = deque()  # run by _on_tick
        self._sync = _SyncObj(config.self_addr, list(config.peers), conf=conf,
                              consumers=[self._consumer])
        sync = self._sync
        self._consumer._index_of = lambda: sync.raftLastApplied + 1
        sync._SyncObj__serializer._sb_applied = lambda: sync.raftLastApplied
        sync._SyncObj__serializer._sb_compactions = (0, 0)  # (started, the last one's index)
        sync.addOnTickCallback(self._on_tick)

    # --- commands ---------------------------------------------------------------

    def encode_batch(self, origin: str, inc: int, seq: int, items: list[tuple[int, Command]],
                     ordered: bool = False) -> bytes:
        """The log entry for a batch this node proposes (``batch.encode_batch``);
        when it commits, this node applies ``items`` without decoding the entry
        (``BatchApplier.encode``). Thread-safe for one proposing thread."""
        return self.applier.encode(origin, inc, seq, items, ordered)

    def propose(self, blob: bytes, on_fail: Callable[[str, bool], None]) -> None:
        """Append ``blob`` (an encoded batch) to the log; thread-safe, never blocks.

        Success is seen through ``on_applied``. A refusal calls
        ``on_fail(reason, maybe_applied)``; ``maybe_applied`` is true when the
        entry may still commit later.
        """

        def callback(_res: Any, err: int) -> None:
            if err != FAIL_REASON.SUCCESS:
                on_fail(FAIL_NAMES.get(err, str(err)), err not in DEFINITELY_NOT_APPLIED)

        self._consumer.apply_batch(blob, callback=callback)

    def wait_bound(self) -> None:
        """Block until the Raft port is bound; raise ``OSError`` if it cannot be."""
        try:
            self._sync.waitBinded()
        except Exception as e:
            raise OSError(f"cannot bind the Raft port {self.config.self_addr}") from e

    # --- membership (one change at a time; the caller serializes) ----------------

    def add_member(self, addr: str, on_done: Callable[[str | None], None]) -> None:
        self._sync.addNodeToCluster(addr, callback=self._done(on_done))

    def remove_member(self, addr: str, on_done: Callable[[str | None], None]) -> None:
        self._sync.removeNodeFromCluster(addr, callback=self._done(on_done))

    def transfer_leadership(self, addr: str | None,
                            on_done: Callable[[str | None], None]) -> None:
        """Runs on the tick thread: pysyncobj sends the request to the target
        there, and peer links are only ever written from that thread."""
        callback = self._done(on_done)
        self._tick_calls.append(lambda: self._sync.transferLeadership(addr, callback=callback))

    @staticmethod
    def _done(on_done: Callable[[str | None], None]) -> Callable[[Any, int], None]:
        def callback(_res: Any, err: int) -> None:
            on_done(None if err == FAIL_REASON.SUCCESS else FAIL_NAMES.get(err, str(err)))

        return callback

    # --- status -------------------------------------------------------------------

    def status(self) -> RaftStatus:
        with self._status_lock:
            return self._status

    def _on_tick(self) -> None:
        while self._tick_calls:
            call = self._tick_calls.popleft()
            try:
                call()
            except Exception:  # pysyncobj's own state; never let it kill the tick
                log.exception("a call on the tick thread failed")
        now = time.monotonic()
        self._sync._sb_tick(now)
        if now - self._last_status < 0.02:
            return
        self._last_status = now
        try:
            st = self._sync.getStatus()
        except Exception:  # pysyncobj's own state; never let it kill the tick
            return
        leader = st.get("leader")
        members = [o.address for o in self._sync.otherNodes]
        connected = tuple(
            a for a in members
            if st.get("partner_node_status_server_" + a) == 2
        )
        match = {a: st.get("match_idx_server_" + a, 0) for a in members}
        compactions, compaction_index = self._sync._SyncObj__serializer._sb_compactions
        status = RaftStatus(
            role=ROLES.get(st["state"], "unknown"),
            leader=leader.address if leader is not None else None,
            term=st["raft_term"],
            commit_index=st["commit_idx"],
            last_applied=st["last_applied"],
            log_len=st["log_len"],
            has_quorum=bool(st["has_quorum"]),
            members=tuple(sorted([self.config.self_addr, *members])),
            connected=connected,
            match_index=match,
            uptime=st["uptime"],
            compactions=compactions,
            compaction_index=compaction_index,
            at=now,
        )
        with self._status_lock:
            self._status = status

    @staticmethod
    def fsync_statistics() -> tuple[int, float]:
        """(fsyncs done, seconds spent in them) by this process's journals."""
        return _DurableFileJournal.fsync_count, _DurableFileJournal.fsync_seconds

    @staticmethod
    def cut_statistics() -> tuple[int, float, float, float]:
        """(journal cuts after compactions, seconds they held the tick thread, the
        longest such hold, seconds of copying off the tick thread)."""
        j = _DurableFileJournal
        return j.cuts, j.cut_seconds, j.cut_seconds_max, j.cut_copy_seconds

    @staticmethod
    def compaction_statistics() -> tuple[int, float, float]:
        """(compactions started by this process, seconds their starts, the fork of
        the child above all, held the tick thread, the longest such start)."""
        c = _CompactionStarts
        return c.count, c.seconds, c.seconds_max

    @staticmethod
    def send_statistics() -> tuple[int, int, int, int, int]:
        """(pysyncobj append-entries sends carried out by this process as leader,
        sends skipped as telling the followers nothing new, answers to the
        leader skipped as follower for the same reason, messages sent to peers,
        followers' answers that would have sent their next index back)."""
        a = _AppendEntriesSends
        return a.sent, a.skipped, a.answers_skipped, sent_peer_frames, a.kept_ahead

    @staticmethod
    def link_statistics() -> tuple[int, int, int]:
        """(keep-alives this process sent on links without heartbeats, probes of a
        leader's address after its link closed, elections brought forward because
        the probe was refused or reset)."""
        return _Links.alive_sent, _Links.leader_probes, _Links.early_campaigns

    @staticmethod
    def recent_holds() -> list[tuple[float, str, float]]:
        """This process's latest holds of the tick thread, by compaction or a slow
        fsync or apply: (time.monotonic() at the start, "fork" / "cut" /
        "cut-finish" / "fsync" / "grow" / "apply", seconds)."""
        return list(_events)

    @staticmethod
    def rewrite_statistics() -> tuple[int, int, int]:
        """(re-sent identical entries skipped, entries replaced by different ones,
        pysyncobj 'truncating already-applied' events)."""
        return (_DurableFileJournal.skipped_identical, _DurableFileJournal.replaced,
                _ResentFilter.count)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the tick thread, close sockets and files, reap compaction children."""
        self._sync.destroy()
        deadline = time.monotonic() + timeout
        thread = self._sync._SyncObj__thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
