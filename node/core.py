"""The node's core: group commit into the Raft log; results and effects back out.

Commands go up, effects come down. The gateway (connection side) calls
``submit(command, on_done)``; the core packs queued commands into batches and
proposes them to the log, up to ``batches_in_flight`` at a time (the leader
puts every batch queued meanwhile into its next log entry, so a second batch
in flight is sent the moment the first commits, not after this node has
applied it). Batches are *ordered* (``replication.batch``): each applies once,
in this node's order, so any of them may be proposed again after a failure
or a silence; after a loss, every batch from the lost one on is proposed
again, in order. When a batch is applied the core calls, on the Trio thread
and in log order, each command's ``on_done(result)`` followed by its effects
through ``effect_sink``. A command's result and its effects are handed over
together, so a login's ``login-ok`` is always queued before the messages it
delivers.

The replication thread enters Trio only through ``_from_raft_thread``, which
queues the event and schedules ``_drain`` with ``TrioToken.run_sync_soon``.

Housekeeping also lives here: the node's heartbeats, the leader's ticks, and
fencing (a node whose own entries have not committed for ``fence_after``
seconds cannot reach a majority and must stop serving).
"""

from __future__ import annotations

import heapq
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from replication.batch import AppliedBatch
from replication.commands import Command, Configure, Heartbeat, NodeDown, NodeUp, Tick
from replication.raft import RaftConfig, RaftStatus, ReplicatedLog
from replication.table import (
    BATCH_APPLY,
    BATCH_GAP,
    Effect,
    Result,
    SessionTable,
    UserLimits,
    error,
)

from . import collector
from .clock import wall
from .config import NodeConfig
from .limits import FailedLogins

log = structlog.get_logger("switchboard.core")

UNAVAILABLE = error("unavailable", "not committed in time; the outcome is unknown")
SHUTDOWN = error("shutdown", "the node is shutting down")
RETRY_LOST_AFTER = 1.5  # re-propose a batch nobody answered for this long
WATCHDOG_PERIOD = 0.02
FREEZE_GROWTH = 20_000  # freeze once the table gained this many sessions since the last
COLLECTOR_PERIOD = 1.0


@dataclass(slots=True)
class _Pending:
    on_done: Callable[[Result], None]
    deadline: float
    submitted: float
    keep: bool  # still propose it after answering 'unavailable' (keeps per-session order)
    answered: bool = False


@dataclass(slots=True)
class _Inflight:
    seq: int
    items: list[tuple[int, Command]]
    first_proposed: float
    proposed: float
    attempt: int = 0


@dataclass(slots=True)
class CoreStats:
    queued: int = 0
    pending: int = 0
    inflight_commands: int = 0
    inflight_batches: int = 0
    batches_proposed: int = 0
    batches_committed: int = 0
    commands_committed: int = 0
    retries: int = 0
    batches_skipped: int = 0  # our re-proposals of batches that had applied
    batches_gapped: int = 0  # our batches refused because an earlier one was lost
    timeouts: int = 0
    applied_index: int = 0
    fenced: bool = True
    last_confirmed_age: float = math.inf
    fsyncs: int = 0
    fsync_seconds: float = 0.0
    rewrites: tuple[int, int, int] = (0, 0, 0)
    cuts: tuple[int, float, float, float] = (0, 0.0, 0.0, 0.0)
    compaction_starts: tuple[int, float, float] = (0, 0.0, 0.0)
    append_sends: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    links: tuple[int, int, int] = (0, 0, 0)
    gc: list[collector.Pauses] = field(default_factory=list)
    raft: RaftStatus = field(default_factory=RaftStatus)


class Core:
    """See the module docstring."""

    def __init__(self, config: NodeConfig, raft_password: str | None):
        self.config = config
        self.node_id = config.id
        self.inc = secrets.randbits(62) | 1
        self.table = SessionTable(local=(self.node_id, self.inc))
        self._raft_password = raft_password
        self.log: ReplicatedLog | None = None
        # Sinks the gateway sets; all are called on the Trio thread.
        self.effect_sink: Callable[[list[Effect]], None] = lambda effects: None
        self.restore_sink: Callable[[list[tuple[str, int]]], None] = lambda sessions: None
        self.fence_sink: Callable[[bool], None] = lambda fenced: None
        # Called after every batch of replication events and fence change: whoever
        # mirrors serving()/member/fenced elsewhere (gateway workers) compares here.
        self.state_sink: Callable[[], None] = lambda: None
        # batch_sink(True) before a run of results and effects, (False) after: the
        # gateway holds its writes meanwhile, so each connection gets one write.
        self.batch_sink: Callable[[bool], None] = lambda start: None
        self.failed_logins = FailedLogins(config.failed_logins)
        self.observe_commit: Callable[[float], None] | None = None
        self._queue: deque[tuple[int, Command]] = deque()
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []  # a heap: deadlines differ
        self._next_rid = 1
        self._batch_seq = 0
        self._inflight: deque[_Inflight] = deque()  # proposed, not yet applied; by seq
        # After a failure or a gap: every batch in flight from this seq on is
        # proposed again, in order, at ``_resend_at``.
        self._resend_from: int | None = None
        self._resend_at = math.inf
        self._handoff: deque[tuple[str, Any]] = deque()
        self._handoff_lock = threading.Lock()
        self._drain_scheduled = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self.last_confirmed = -math.inf  # proposal time of our latest committed batch
        self.last_progress = -math.inf  # when we last applied any committed entry
        self.fenced = True
        self._fence_changed = trio.Event()
        self.stats = CoreStats()
        self.ready = trio.Event()  # set when this node's NodeUp has committed
        self.checkpoints: dict[str, tuple[int, str]] = {}  # tag -> (log index, digest)
        self._checkpoint_seen = trio.Event()

    # --- submitting commands (Trio thread) --------------------------------------

    def submit(self, cmd: Command, on_done: Callable[[Result], None],
               timeout: float | None = None, keep: bool = True,
               source: str | None = None) -> None:
        """Queue ``cmd`` for the log; ``on_done(result)`` is called exactly once.

        If it is not committed within ``timeout``, ``on_done`` gets 'unavailable'
        (the outcome is unknown) and, with ``keep``, the command still goes to the
        log in its turn: dropping it would let a later command of the same session
        overtake it. (``source`` is for gateway workers; an in-process gateway checks
        the client's address itself.)
        """
        if self._closing:
            on_done(SHUTDOWN)
            return
        rid = self._next_rid
        self._next_rid += 1
        now = time.monotonic()
        deadline = now + (self.config.commit_timeout if timeout is None else timeout)
        self._pending[rid] = _Pending(on_done, deadline, now, keep)
        if deadline != math.inf:
            heapq.heappush(self._deadlines, (deadline, rid))
        self._queue.append((rid, cmd))
        self._fill()

    async def request(self, cmd: Command, timeout: float | None = None) -> Result:
        """Submit ``cmd`` and wait for its result (a checkpoint)."""
        done = trio.Event()
        box: list[Result] = []

        def on_done(result: Result) -> None:
            box.append(result)
            done.set()

        self.submit(cmd, on_done, timeout)
        await done.wait()
        return box[0]

    def _fill(self) -> None:
        """Propose queued commands while fewer than ``batches_in_flight`` are out."""
        limit = self.config.batches_in_flight
        while self._queue and len(self._inflight) < limit and self._resend_from is None:
            if not self._propose_next():
                return

    def _propose_next(self) -> bool:
        """Propose the next batch from the queue; False if nothing was proposed."""
        if self.log is None or not self._queue:
            return False
        items: list[tuple[int, Command]] = []
        size = 0
        cfg = self.config
        while self._queue and len(items) < cfg.batch_max_commands and size < cfg.batch_max_bytes:
            rid, cmd = self._queue.popleft()
            if rid not in self._pending:  # timed out while queued
                continue
            items.append((rid, cmd))
            body = getattr(cmd, "body", None)
            size += 64 + (len(body) if body is not None else 0)
        if not items:
            return False
        self._batch_seq += 1
        now = time.monotonic()
        batch = _Inflight(self._batch_seq, items, now, now)
        self._inflight.append(batch)
        self._send(batch)
        return True

    def _send(self, inflight: _Inflight) -> None:
        assert self.log is not None
        blob = self.log.encode_batch(self.node_id, self.inc, inflight.seq, inflight.items,
                                     ordered=True)
        seq, attempt = inflight.seq, inflight.attempt
        self.stats.batches_proposed += 1

        def on_fail(reason: str, maybe_applied: bool) -> None:
            self._from_raft_thread("failed", (seq, attempt, reason, maybe_applied))

        self.log.propose(blob, on_fail)

    def _schedule_resend(self, seq: int, at: float) -> None:
        """Propose every batch in flight from ``seq`` on again, at ``at`` (or sooner,
        if one is already due sooner)."""
        self._resend_from = seq if self._resend_from is None else min(self._resend_from, seq)
        self._resend_at = min(self._resend_at, at)

    def _resend(self) -> None:
        """Propose the batches in flight from ``_resend_from`` on again, in order.

        Commands nobody waits for any more (answered 'unavailable' without
        ``keep``) are left out; a batch left empty still goes, so that its
        sequence number is not skipped (the table would refuse every later one).
        """
        start, self._resend_from, self._resend_at = self._resend_from, None, math.inf
        now = time.monotonic()
        for batch in self._inflight:
            if start is None or batch.seq < start:
                continue
            batch.items = [(rid, cmd) for rid, cmd in batch.items if rid in self._pending]
            batch.attempt += 1
            batch.proposed = now
            self.stats.retries += 1
            self._send(batch)
        self._fill()

    # --- the bridge from the replication thread ----------------------------------

    def _from_raft_thread(self, kind: str, payload: Any) -> None:
        """Called on the replication thread (or any thread): hand over to Trio."""
        with self._handoff_lock:
            self._handoff.append((kind, payload))
            if self._drain_scheduled or self._token is None:
                return
            self._drain_scheduled = True
        try:
            self._token.run_sync_soon(self._drain)
        except trio.RunFinishedError:
            pass

    def _on_applied(self, index: int, batch: AppliedBatch) -> None:
        self._from_raft_thread("applied", (index, batch))

    def _on_checkpoint(self, tag: str, index: int, digest: str) -> None:
        self._from_raft_thread("checkpoint", (tag, index, digest))

    def _on_restored(self) -> None:
        # Still on the replication thread, which owns the table.
        applied = self.table.applied_batch(self.node_id, self.inc)
        self._from_raft_thread("restored", (self.table.local_sessions(),
                                            self.table.restore_view(), applied))

    def _drain(self) -> None:
        with self._handoff_lock:
            items = list(self._handoff)
            self._handoff.clear()
            self._drain_scheduled = False
        self.batch_sink(True)
        try:
            self._handle_events(items)
        finally:
            self.batch_sink(False)
        try:
            self.state_sink()
        except Exception:
            log.exception("state_sink failed")

    def _handle_events(self, items: list[tuple[str, Any]]) -> None:
        for kind, payload in items:
            try:
                if kind == "applied":
                    self._handle_applied(*payload)
                elif kind == "failed":
                    self._handle_failed(*payload)
                elif kind == "restored":
                    self._handle_restored(*payload)
                elif kind == "checkpoint":
                    self._record_checkpoint(*payload)
                elif kind == "call":
                    event, box, err = payload
                    box.append(err)
                    event.set()
            except Exception:  # a bug here must not take the Trio loop down
                log.exception("handling a replication event failed", kind=kind)

    def _handle_restored(self, local: list[tuple[str, int]], view: list[Effect],
                         applied: int) -> None:
        """A snapshot replaced the table: connections whose session is no longer
        here go, then the others get what the skipped entries would have given
        them (their mailboxes, their contacts' presence). Our batches up to
        ``applied`` are in it: their commands' outcomes are unknown here (their
        waiters time out), and they must not be proposed again."""
        log.info("snapshot installed", local_sessions=len(local), effects=len(view))
        self._forget_through(applied)
        self._fill()
        self.restore_sink(local)
        if view:
            self.effect_sink(view)

    def _handle_applied(self, index: int, batch: AppliedBatch) -> None:
        self.stats.applied_index = index
        self.last_progress = time.monotonic()
        mine = batch.origin == self.node_id and batch.inc == self.inc
        pending = self._pending
        sink = self.effect_sink
        now = time.monotonic()
        for outcome in batch.outcomes:
            if mine:
                p = pending.pop(outcome.rid, None)
                if p is not None and not p.answered:
                    if self.observe_commit is not None:
                        self.observe_commit(now - p.submitted)
                    try:
                        p.on_done(outcome.result)
                    except Exception:
                        log.exception("on_done failed", rid=outcome.rid)
            if outcome.effects:
                try:
                    sink(outcome.effects)
                except Exception:
                    log.exception("carrying out effects failed")
        if not mine:
            return
        if batch.status == BATCH_GAP:
            # An earlier batch of ours was lost: it and every later one go again.
            self.stats.batches_gapped += 1
            if self._inflight:
                self._schedule_resend(self._inflight[0].seq, now)
            return
        if batch.status != BATCH_APPLY:  # a copy of a batch that had applied
            self.stats.batches_skipped += 1
        else:
            self.stats.commands_committed += len(batch.outcomes)
            self.stats.batches_committed += 1
        head = self._inflight[0] if self._inflight else None
        if head is not None and head.seq <= batch.seq:
            self.last_confirmed = max(self.last_confirmed, head.first_proposed)
        self._forget_through(batch.seq)
        self._update_fence(now)
        self._fill()

    def _forget_through(self, seq: int) -> None:
        """Batches up to ``seq`` have applied: they are no longer in flight."""
        inflight = self._inflight
        while inflight and inflight[0].seq <= seq:
            inflight.popleft()
        if not inflight:  # nothing left to propose again; new batches may go
            self._resend_from, self._resend_at = None, math.inf

    def _record_checkpoint(self, tag: str, index: int, digest: str) -> None:
        self.checkpoints[tag] = (index, digest)
        while len(self.checkpoints) > 256:
            del self.checkpoints[next(iter(self.checkpoints))]
        self._checkpoint_seen.set()
        self._checkpoint_seen = trio.Event()

    async def wait_checkpoint(self, tag: str) -> tuple[int, str]:
        """(log index, table digest) recorded when this node applied checkpoint ``tag``."""
        while tag not in self.checkpoints:
            await self._checkpoint_seen.wait()
        return self.checkpoints[tag]

    def _handle_failed(self, seq: int, attempt: int, reason: str, maybe_applied: bool) -> None:
        batch = next((b for b in self._inflight if b.seq == seq), None)
        if batch is None or batch.attempt != attempt:
            return  # applied meanwhile, or an earlier attempt's news
        backoff = min(0.01 * (2 ** min(batch.attempt, 5)), 0.25)
        self._schedule_resend(seq, time.monotonic() + backoff)
        log.debug("proposal refused", reason=reason, maybe_applied=maybe_applied,
                  attempt=attempt)

    # --- fencing -------------------------------------------------------------------

    def _update_fence(self, now: float) -> None:
        # Cut off: nothing committed reaches us (no leader with a majority talks to
        # us), or our own entries stop committing (the leader cannot hear us). The
        # second, looser bound keeps a merely overloaded node serving.
        after = self.config.fence_after
        fenced = (now - self.last_progress > after
                  or now - self.last_confirmed > 3 * after)
        if fenced != self.fenced:
            self.fenced = fenced
            self.stats.fenced = fenced
            (log.warning if fenced else log.info)(
                "fenced" if fenced else "unfenced",
                last_commit_age=round(now - self.last_confirmed, 3))
            self._fence_changed.set()
            self._fence_changed = trio.Event()
            try:
                self.fence_sink(fenced)
                self.state_sink()
            except Exception:
                log.exception("fence_sink failed")

    async def raft_call(self, start: Callable[[Callable[[str | None], None]], None]
                        ) -> str | None:
        """Run a pysyncobj call that reports through a callback (membership changes);
        returns None on success or pysyncobj's failure reason."""
        done = trio.Event()
        box: list[str | None] = []

        def on_done(err: str | None) -> None:
            self._from_raft_thread("call", (done, box, err))

        start(on_done)
        await done.wait()
        return box[0]

    @property
    def member(self) -> bool:
        """False while a node started with ``--join`` waits to be added."""
        return not self.config.join or self.node_id in self.table.joined

    @property
    def wanted_limits(self) -> UserLimits:
        """The per-user limits this node's flags ask for; the leader's flags win."""
        cfg = self.config
        return UserLimits(cfg.sessions_per_user, cfg.allow_list, cfg.subscriptions, cfg.mailbox)

    def limits_pending(self) -> bool:
        """True while this node leads and the limits in force are not its flags' yet."""
        return (self.log is not None and self.log.status().role == "leader"
                and self.table.user_limits != self.wanted_limits)

    def serving(self) -> bool:
        return self.ready.is_set() and not self.fenced and self.member

    # --- the rest of node.interfaces.CoreLike (the in-process gateway's view) ---------------

    def login_blocked(self, ip: str) -> bool:
        return self.failed_logins.blocked(ip)

    def login_failed(self, ip: str) -> None:
        self.failed_logins.failed(ip)

    def reserve_connection(self) -> bool:
        return True  # one gateway process: it counts its own connections

    def release_connection(self) -> None:
        pass

    async def wait_fence_changed(self) -> None:
        await self._fence_changed.wait()

    # --- background services -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start replication (the SyncObj is built here, on the main thread) and the
        housekeeping tasks; ``started()`` once the Raft port is bound."""
        self._token = trio.lowlevel.current_trio_token()
        cfg = self.config
        raft_cfg = RaftConfig(
            self_addr=cfg.raft, peers=cfg.peers, data_dir=cfg.data_dir / "raft",
            password=self._raft_password, timings=cfg.timings, fsync=cfg.fsync,
            compaction_entries=cfg.compaction_entries,
        )
        self.log = ReplicatedLog(raft_cfg, self.table, self._on_applied, self._on_restored,
                                 self._on_checkpoint)
        try:
            await trio.to_thread.run_sync(self.log.wait_bound)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._ticks)
                nursery.start_soon(self._collector)
                self.submit(NodeUp(self.node_id, self.inc, self.config.raft), self._on_node_up,
                            timeout=math.inf)
                task_status.started()
        finally:
            self._closing = True
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.log.close)

    def _on_node_up(self, result: Result) -> None:
        log.info("joined", incarnation=self.inc, ok=result.ok)
        self.ready.set()

    async def _watchdog(self) -> None:
        while True:
            await trio.sleep(WATCHDOG_PERIOD)
            now = time.monotonic()
            inflight = self._inflight
            if inflight and self._resend_from is None and (
                    now - inflight[0].proposed > RETRY_LOST_AFTER):
                self._schedule_resend(inflight[0].seq, now)  # nobody answered: lost?
            if self._resend_from is not None and now >= self._resend_at:
                self._resend()
            else:
                self._fill()
            deadlines = self._deadlines
            while deadlines and deadlines[0][0] <= now:
                _, rid = heapq.heappop(deadlines)
                p = self._pending.get(rid)
                if p is not None and not p.answered:
                    if p.keep:
                        p.answered = True
                    else:
                        del self._pending[rid]
                    self.stats.timeouts += 1
                    try:
                        p.on_done(UNAVAILABLE)
                    except Exception:
                        log.exception("on_done failed", rid=rid)
            self._update_fence(now)

    async def _collector(self) -> None:
        """Freeze the heap after the table grew by ``FREEZE_GROWTH`` sessions (see
        ``node.collector``)."""
        frozen_at = 0
        while True:
            await trio.sleep(COLLECTOR_PERIOD)
            held = len(self.table.sessions)  # one atomic read of the applier's dict
            frozen_at = min(frozen_at, held)
            if held - frozen_at >= FREEZE_GROWTH:
                frozen_at = held
                collector.freeze_long_lived()

    async def _heartbeats(self) -> None:
        beat = 0
        in_flight = False

        def done(_r: Result) -> None:
            nonlocal in_flight
            in_flight = False

        while True:
            await trio.sleep(self.config.heartbeat_interval)
            if not in_flight and self.ready.is_set():
                beat += 1
                in_flight = True
                self.submit(Heartbeat(self.node_id, self.inc, beat), done,
                            timeout=self.config.fence_after, keep=False)

    async def _ticks(self) -> None:
        assert self.log is not None
        interval = self.config.tick_interval
        last: float | None = None
        in_flight = False

        def done(_r: Result) -> None:
            nonlocal in_flight
            in_flight = False

        configuring = False

        def configured(_r: Result) -> None:
            nonlocal configuring
            configuring = False

        # The first pass does not wait: limits set by flags take force as soon as
        # this node leads, before the cluster reports itself ready.
        delay = 0.0
        while True:
            await trio.sleep(delay)
            delay = interval
            if self.log.status().role != "leader":
                last = None
                continue
            if self.limits_pending() and not configuring:
                configuring = True
                want = self.wanted_limits
                self.submit(Configure(want.sessions_per_user, want.allow_list,
                                      want.subscriptions, want.mailbox), configured,
                            timeout=5, keep=False)
            now = time.monotonic()
            if last is None:
                last = now
            if in_flight:
                continue
            elapsed = min(now - last, 2 * interval)
            last = now
            in_flight = True
            self.submit(Tick(wall(), elapsed, self.config.grace, self.config.node_timeout,
                             self.config.sessions_per_tick),
                        done, timeout=2 * interval + 1.0, keep=False)

    async def leave(self, timeout: float = 1.0) -> None:
        """Tell the cluster this node is going away, so its sessions are orphaned
        at once and its clients can resume elsewhere without waiting."""
        with trio.move_on_after(timeout):
            await self.request(NodeDown(self.node_id, self.inc), timeout=timeout)

    # --- introspection ------------------------------------------------------------------

    @staticmethod
    def recent_stalls() -> list[tuple[float, str, float]]:
        """This process's latest holds of the replication thread (compaction fork,
        journal cut, journal fsyncs of 5 ms or more) and collections of 5 ms or
        more: (time.monotonic() at the start, kind, seconds), oldest first; to set
        beside latency spikes."""
        gcs = [(t, f"gc{gen}", sec) for t, gen, sec in collector.pause_meter().long_pauses()]
        return sorted([*ReplicatedLog.recent_holds(), *gcs])

    def statistics(self) -> CoreStats:
        st = self.stats
        st.queued = len(self._queue)
        st.pending = len(self._pending)
        st.inflight_commands = sum(len(b.items) for b in self._inflight)
        st.inflight_batches = len(self._inflight)
        st.fenced = self.fenced
        st.last_confirmed_age = time.monotonic() - self.last_confirmed
        st.fsyncs, st.fsync_seconds = ReplicatedLog.fsync_statistics()
        st.rewrites = ReplicatedLog.rewrite_statistics()
        st.cuts = ReplicatedLog.cut_statistics()
        st.compaction_starts = ReplicatedLog.compaction_statistics()
        st.append_sends = ReplicatedLog.send_statistics()
        st.links = ReplicatedLog.link_statistics()
        st.gc = collector.pause_meter().statistics()
        if self.log is not None:
            st.raft = self.log.status()
        return st
