"""The replicated session and presence table: a pure, deterministic state machine.

Every node applies the same commands in the same (log) order and reaches the
same state. ``apply`` returns the command's result and the *effects* it has on
this node's own client connections (messages to deliver, presence events to
push, sessions to close); the Trio shell carries the effects out. Effects never
change the state, so a table built with another ``local`` identity, or with
none, reaches the same state.

Threading: the table is not thread-safe. In a node it is touched only by the
replication thread (apply, snapshot, restore); readers on other threads see
only ``statistics()``.

Time: the table has no clock of its own. Commands carry the proposer's time;
the table's ``clock`` advances only with the leader's ``Tick`` commands, so
expiry is decided once, through the log, by the leader's clock.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain, islice
from operator import itemgetter
from typing import Any

import cbor2

from .commands import (
    STATUSES,
    Ack,
    Allow,
    Checkpoint,
    Command,
    Configure,
    Detach,
    Heartbeat,
    Join,
    Leave,
    Login,
    Logout,
    NodeDown,
    NodeUp,
    Noop,
    Resume,
    Revoke,
    Send,
    SetPresence,
    Subscribe,
    Tick,
    Unsubscribe,
)

SNAPSHOT_VERSION = 5
READABLE_SNAPSHOTS = (2, 3, 4, 5)  # v2 sessions have no resume attempt (read as 0); v2
# and v3 have no batch sequence numbers (read as none applied); v2-v4 have no
# expiry or node queues, tick bound or NodeInfo.gone (read as empty, 0, False)
RANK = {"online": 3, "busy": 2, "away": 1}
"""Which session's status a user shows when several sessions differ."""

NODE_PARTS = 64
"""A node's sessions are split into this many parts (``node_parts``) by a hash of
their id, for bounded ticks to orphan or re-attach them a part at a time."""


def _attached_of(inc: int) -> Callable[[Session], bool]:
    """Picks the sessions attached to incarnation ``inc``."""
    return lambda s: s.inc == inc and s.attached


def _part_of(sid: str) -> int:
    return zlib.crc32(sid.encode()) % NODE_PARTS


SKIPS_PER_CHANGE = 4
"""A bounded tick looks at most this many queued sessions per change it may make
(the others may have been resumed, re-attached or removed since they queued)."""

_first = itemgetter(0)
_second = itemgetter(1)

MAX_TICK_STEP = 5.0
"""The table's clock advances at most this much per tick, whatever a leader says."""

RECENT_SENDS = 1024
"""How many of a user's latest client message ids (over all their sessions) are
at least remembered for deduplication; the client library keeps at most 256 in
flight. Up to ``RECENT_SENDS_MAX`` are kept: the oldest are dropped in one go
when there are more, because dropping the oldest entry of a dict one at a time
costs a scan over the dict's deleted slots on every send."""
RECENT_SENDS_MAX = RECENT_SENDS + RECENT_SENDS // 4


@dataclass(frozen=True, slots=True)
class Limits:
    """Structural limits the table enforces (the same on every node)."""

    max_name: int = 64
    max_text: int = 256
    max_body: int = 64 * 1024  # bytes (UTF-8 for text bodies)
    max_acks: int = 1024


@dataclass(frozen=True, slots=True)
class UserLimits:
    """Per-user limits, set through the log by ``Configure`` (0 = unlimited)."""

    sessions_per_user: int = 16
    allow_list: int = 5000
    subscriptions: int = 5000
    mailbox: int = 10_000


# --- state ------------------------------------------------------------------


@dataclass(slots=True)
class Session:
    id: str
    user: str
    node: str
    inc: int
    epoch: int
    resume_hash: bytes
    status: str
    text: str | None
    created: float
    updated: float
    attached: bool = True
    orphaned_at: float | None = None
    orphan_reason: str | None = None  # "conn" (connection lost) or "node" (node silent)
    claim: str = ""  # the last resume attempt that claimed this session
    attempt: int = 0  # the highest client resume attempt number applied


@dataclass(slots=True)
class Message:
    id: int
    seq: int
    sender: str
    to: str
    body: str | bytes
    ts: float


@dataclass(slots=True)
class User:
    name: str
    sessions: dict[str, None] = field(default_factory=dict)  # ordered set
    allowed: set[str] = field(default_factory=set)  # who may see my presence
    subs: set[str] = field(default_factory=set)  # whose presence I want
    subscribers: set[str] = field(default_factory=set)  # who wants mine (derived)
    mailbox: dict[int, Message] = field(default_factory=dict)  # seq -> message
    next_seq: int = 1
    last_seen: float | None = None
    shown: tuple[str, str | None] = ("offline", None)  # last presence announced
    sent: dict[int, int] = field(default_factory=dict)  # recent cmid -> message id

    def is_empty(self) -> bool:
        return not (
            self.sessions or self.allowed or self.subs or self.subscribers or self.mailbox
            or self.sent
        ) and self.last_seen is None and self.next_seq == 1


@dataclass(slots=True)
class NodeInfo:
    inc: int
    seen: float
    beat: int = 0
    down: bool = False
    retired: list[int] = field(default_factory=list)  # earlier incarnations, newest last
    gone: bool = False  # down because it said so (NodeDown): its sessions orphan as "conn"
    raft: str = ""  # its Raft address, from its latest NodeUp that named one


RETIRED_INCARNATIONS = 16

BATCH_APPLY = "applied"
BATCH_DUPLICATE = "duplicate"
BATCH_GAP = "gap"
BATCH_INCARNATIONS = RETIRED_INCARNATIONS + 1
"""How many incarnations of one proposer keep their last batch number; an older
one's batches then count as a new incarnation's (only the first applies)."""


# --- results and effects ----------------------------------------------------


@dataclass(slots=True)
class Result:
    """A command's outcome: ``ok`` with a value, or an error ``code`` + ``reason``."""

    ok: bool
    value: dict[str, Any] | None = None
    code: str | None = None
    reason: str | None = None


OK = Result(True, {})


def error(code: str, reason: str) -> Result:
    return Result(False, None, code, reason)


@dataclass(slots=True)
class Deliver:
    """Push ``message`` to these local sessions."""

    sessions: list[str]
    message: Message


@dataclass(slots=True)
class PresenceNotice:
    """Tell these local sessions that ``user``'s presence is now this."""

    sessions: list[str]
    user: str
    status: str
    text: str | None
    last_seen: float | None


@dataclass(slots=True)
class SessionClosed:
    """Close the local connection of session ``session`` at ``epoch``: it moved
    to another connection, expired, or ended."""

    session: str
    epoch: int
    reason: str


Effect = Deliver | PresenceNotice | SessionClosed


@dataclass(slots=True)
class TableStats:
    sessions: int = 0
    attached: int = 0
    orphaned: int = 0
    users: int = 0
    mailbox_messages: int = 0
    messages_sent: int = 0
    messages_acked: int = 0
    expired: int = 0
    resumed: int = 0
    logins: int = 0
    presence_updates: int = 0
    clock: float = 0.0


class SessionTable:
    """Sessions, presence, visibility and mailboxes; see the module docstring."""

    def __init__(self, local: tuple[str, int] | None = None, limits: Limits | None = None):
        self.local = local
        self.limits = limits or Limits()
        self.clock = 0.0  # decides timeouts: advanced only by the leader's ticks
        self.wall = 0.0  # the latest leader wall-clock time, for last-seen only
        self.next_msg_id = 1
        self.sessions: dict[str, Session] = {}
        self.users: dict[str, User] = {}
        self.nodes: dict[str, NodeInfo] = {}
        # Each node's sessions, split into NODE_PARTS parts by a hash of the id so
        # that a bounded tick can take them a part at a time; and how many.
        self.node_parts: dict[str, list[set[str]]] = {}
        self.node_sessions: dict[str, int] = {}
        # Detached sessions -> their orphaned_at, in order of orphaned_at.
        self.orphans: dict[str, float] = {}
        # Sessions whose grace ran out, oldest first in canonical order, left for
        # later ticks by a tick bounded by ``max_sessions`` (stale ones skipped).
        self.expiring: list[str] = []
        # Parts of nodes that fell silent or spoke again, (node, part): their
        # sessions to orphan or re-attach by the next ticks (``_sync_session``);
        # and the latest tick's bound (0: none, so a heartbeat re-attaches its
        # node's sessions at once).
        self.node_sync: list[tuple[str, int]] = []
        self.tick_bound = 0
        self.joined: set[str] = set()  # nodes added by an operator (admin add)
        self.user_limits = UserLimits()
        # proposer -> {incarnation: the last ordered batch applied}, in first-seen order
        self.batch_seqs: dict[str, dict[int, int]] = {}
        self.stats = TableStats()
        # Not replicated state (never in a snapshot or digest): with track_remote
        # on, the other nodes whose sessions the commands applied since the
        # caller last cleared remote_nodes have effects for (a push, a close).
        # The Raft leader sends those nodes a commit at once; a commit that
        # concerns no other node rides the next entry or heartbeat instead.
        self.track_remote = False
        self.remote_nodes: set[str] = set()
        # Also not replicated: the checkpoints applied since the caller last took
        # them. The caller computes their digest after the whole log entry (the
        # same state on every replica), off its apply thread: a digest of 200,000
        # sessions takes seconds.
        self.checkpoints_due: list[str] = []
        self._dispatch: dict[type[Command], Callable[[Any], tuple[Result, list[Effect]]]] = {
            Login: self._login,
            Resume: self._resume,
            Detach: self._detach,
            Logout: self._logout,
            SetPresence: self._set_presence,
            Allow: self._allow,
            Revoke: self._revoke,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            Send: self._send,
            Ack: self._ack,
            NodeUp: self._node_up,
            NodeDown: self._node_down,
            Heartbeat: self._heartbeat,
            Tick: self._tick,
            Configure: self._configure,
            Join: self._join,
            Leave: self._leave,
            Checkpoint: self._checkpoint,
            Noop: self._noop,
        }

    # --- the FSM interface ---------------------------------------------------

    def apply(self, cmd: Command) -> tuple[Result, list[Effect]]:
        """Apply one command; return its result and its effects on local sessions."""
        handler = self._dispatch.get(type(cmd))
        if handler is None:
            return error("invalid", f"unknown command {cmd.op!r}"), []
        return handler(cmd)

    def applied_batch(self, origin: str, inc: int) -> int:
        """The last ordered batch of ``origin``'s incarnation ``inc`` applied (0: none)."""
        seqs = self.batch_seqs.get(origin)
        return seqs.get(inc, 0) if seqs is not None else 0

    def admit_batch(self, origin: str, inc: int, seq: int) -> str:
        """Decide whether an ordered batch applies, and if so record it: the next
        one of its proposer's incarnation applies (``BATCH_APPLY``), one already
        applied is skipped (``BATCH_DUPLICATE``) and one beyond the next is
        refused (``BATCH_GAP``): an earlier one was lost, and its proposer sends
        it again, then this one."""
        last = self.applied_batch(origin, inc)
        if seq <= last:
            return BATCH_DUPLICATE
        if seq != last + 1:
            return BATCH_GAP
        seqs = self.batch_seqs.get(origin)
        if seqs is None:
            seqs = self.batch_seqs[origin] = {}
        elif last == 0 and len(seqs) >= BATCH_INCARNATIONS:
            del seqs[next(iter(seqs))]
        seqs[inc] = seq
        return BATCH_APPLY

    def snapshot(self) -> bytes:
        """The whole state as canonical CBOR (equal states give equal bytes)."""
        sessions = [
            [
                s.id, s.user, s.node, s.inc, s.epoch, s.resume_hash, s.status, s.text,
                s.created, s.updated, s.attached, s.orphaned_at, s.orphan_reason,
                s.claim, s.attempt,
            ]
            for s in sorted(self.sessions.values(), key=lambda s: s.id)
        ]
        users = [
            [
                u.name, u.last_seen, sorted(u.allowed), sorted(u.subs), u.next_seq,
                [[m.seq, m.id, m.sender, m.body, m.ts] for m in u.mailbox.values()],
                [u.shown[0], u.shown[1]],
                [[c, m] for c, m in u.sent.items()],
            ]
            for u in sorted(self.users.values(), key=lambda u: u.name)
        ]
        nodes = [[n, i.inc, i.seen, i.beat, i.down, i.retired, i.gone, i.raft]
                 for n, i in sorted(self.nodes.items())]
        orphans = sorted(
            self.orphans, key=lambda sid: (self.orphans[sid], sid)
        )
        state = {
            "v": SNAPSHOT_VERSION,
            "clock": self.clock,
            "wall": self.wall,
            "next_msg_id": self.next_msg_id,
            "sessions": sessions,
            "users": users,
            "nodes": nodes,
            "orphans": orphans,
            "expiring": self.expiring,
            "node_sync": [[node, part] for node, part in self.node_sync],
            "tick_bound": self.tick_bound,
            "joined": sorted(self.joined),
            "batches": [[o, [[i, n] for i, n in seqs.items()]]
                        for o, seqs in sorted(self.batch_seqs.items())],
            "user_limits": [self.user_limits.sessions_per_user, self.user_limits.allow_list,
                            self.user_limits.subscriptions, self.user_limits.mailbox],
            "counters": [self.stats.messages_sent, self.stats.messages_acked,
                         self.stats.expired, self.stats.resumed, self.stats.logins,
                         self.stats.presence_updates],
        }
        return cbor2.dumps(state, canonical=True)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot taken by ``snapshot``."""
        state = cbor2.loads(data)
        if state.get("v") not in READABLE_SNAPSHOTS:
            raise ValueError(f"unsupported snapshot version {state.get('v')!r}")
        self.clock = state["clock"]
        self.wall = state["wall"]
        self.next_msg_id = state["next_msg_id"]
        self.sessions = {}
        self.users = {}
        self.node_parts = {}
        self.node_sessions = {}
        for row in state["users"]:
            name, last_seen, allowed, subs, next_seq, mailbox, shown, sent = row
            u = User(name, allowed=set(allowed), subs=set(subs), next_seq=next_seq,
                     last_seen=last_seen, shown=(shown[0], shown[1]),
                     sent={c: m for c, m in sent})
            for seq, mid, sender, body, ts in mailbox:
                u.mailbox[seq] = Message(mid, seq, sender, name, body, ts)
            self.users[name] = u
        for u in self.users.values():
            for other in u.subs:
                self._user(other).subscribers.add(u.name)
        for row in state["sessions"]:
            (sid, user, node, inc, epoch, rh, status, text, created, updated, attached,
             orphaned_at, reason, claim, *rest) = row
            s = Session(sid, user, node, inc, epoch, rh, status, text, created, updated,
                        attached, orphaned_at, reason, claim, rest[0] if rest else 0)
            self.sessions[sid] = s
            self._user(user).sessions[sid] = None
            self._index_node(s)
        self.nodes = {row[0]: NodeInfo(row[1], row[2], row[3], row[4], list(row[5]),
                                       bool(row[6]) if len(row) > 6 else False,
                                       row[7] if len(row) > 7 else "")
                      for row in state["nodes"]}
        self.orphans = {}
        for sid in state["orphans"]:
            at = self.sessions[sid].orphaned_at
            assert at is not None, "an orphan without an orphaned_at"
            self.orphans[sid] = at
        self.expiring = list(state.get("expiring", []))
        self.node_sync = [(node, part) for node, part in state.get("node_sync", [])]
        self.tick_bound = state.get("tick_bound", 0)
        self.joined = set(state["joined"])
        self.batch_seqs = {o: {i: n for i, n in seqs} for o, seqs in state.get("batches", [])}
        self.user_limits = UserLimits(*state["user_limits"])
        st = TableStats()
        (st.messages_sent, st.messages_acked, st.expired, st.resumed, st.logins,
         st.presence_updates) = state["counters"]
        self.stats = st
        self._recount()

    def digest(self) -> str:
        """A short fingerprint of the state, equal on every node at the same log index."""
        return hashlib.sha256(self.snapshot()).hexdigest()[:16]

    def statistics(self) -> TableStats:
        self.stats.sessions = len(self.sessions)
        self.stats.orphaned = len(self.orphans)
        self.stats.attached = self.stats.sessions - self.stats.orphaned
        self.stats.users = len(self.users)
        self.stats.clock = self.clock
        return self.stats

    # --- reads (for the shell's diagnostics and tests) -------------------------

    def presence_of(self, user: str) -> tuple[str, str | None, float | None]:
        u = self.users.get(user)
        if u is None:
            return ("offline", None, None)
        status, text = self._aggregate(u)
        return (status, text, u.last_seen)

    def local_sessions(self) -> list[tuple[str, int]]:
        """(session id, epoch) of the sessions this table's ``local`` node owns
        (attached, or orphaned only because the node looked silent)."""
        if self.local is None:
            return []
        node, inc = self.local
        out = []
        for sid in chain.from_iterable(self.node_parts.get(node, ())):
            s = self.sessions[sid]
            if s.inc == inc and (s.attached or s.orphan_reason == "node"):
                out.append((sid, s.epoch))
        return out

    def restore_view(self) -> list[Effect]:
        """After a snapshot replaced the table: what this node's attached sessions
        must be shown, i.e. every message in their mailboxes and their contacts'
        presence. A node that installs a snapshot never applied the entries it
        covers, so it never produced their deliveries or presence events; the
        shell skips the messages a connection already has (by sequence number)."""
        effects: list[Effect] = []
        for sid, _epoch in sorted(self.local_sessions()):
            self._session_view(self.sessions[sid], 0, effects)
        return effects

    # --- helpers ----------------------------------------------------------------

    def _recount(self) -> None:
        self.stats.mailbox_messages = sum(len(u.mailbox) for u in self.users.values())

    def _user(self, name: str) -> User:
        u = self.users.get(name)
        if u is None:
            u = self.users[name] = User(name)
        return u

    def _gc_user(self, u: User) -> None:
        if u.is_empty():
            del self.users[u.name]

    def _is_local(self, s: Session) -> bool:
        """The session is attached to a connection of this node."""
        return s.attached and self._owned_here(s)

    def _owned_here(self, s: Session) -> bool:
        """This node (this incarnation) owns the session, attached or not."""
        return self.local is not None and s.node == self.local[0] and s.inc == self.local[1]

    def _local_of(self, u: User) -> list[str]:
        """``u``'s sessions that this node (this incarnation) owns; with
        ``track_remote``, the nodes of its other sessions go to ``remote_nodes``."""
        if self.local is None:
            return []
        node, inc = self.local
        sessions = self.sessions
        if not self.track_remote:
            # _owned_here, inlined: every replica runs this for each watcher of a change.
            return [sid for sid in u.sessions
                    if (s := sessions[sid]).node == node and s.inc == inc]
        out: list[str] = []
        remote = self.remote_nodes
        for sid in u.sessions:
            s = sessions[sid]
            if s.node != node:
                remote.add(s.node)
            elif s.inc == inc:
                out.append(sid)
        return out

    def _mark_remote(self, s: Session) -> None:
        """With ``track_remote``: ``s``'s node has an effect to carry out."""
        if self.track_remote and self.local is not None and s.node != self.local[0]:
            self.remote_nodes.add(s.node)

    def _has_local(self) -> bool:
        """Some session is owned by this node (by any of its incarnations)."""
        return self.local is not None and self.local[0] in self.node_sessions

    def _aggregate(self, u: User) -> tuple[str, str | None]:
        best: Session | None = None
        for sid in u.sessions:
            s = self.sessions[sid]
            # The session id breaks full ties: the order of ``u.sessions`` is not
            # part of a snapshot, so it must not decide what a restored replica shows.
            if best is None or ((RANK[s.status], s.updated, s.id)
                                > (RANK[best.status], best.updated, best.id)):
                best = s
        if best is None:
            return ("offline", None)
        return (best.status, best.text)

    def _watchers(self, u: User) -> Iterable[str]:
        return u.subscribers & u.allowed

    def _announce(self, u: User, effects: list[Effect]) -> None:
        """If ``u``'s aggregate presence changed, tell the local sessions of its watchers."""
        shown = self._aggregate(u)
        if shown == u.shown:
            return
        u.shown = shown
        self.stats.presence_updates += 1
        if not self.track_remote and not self._has_local():
            return
        targets: list[str] = []
        for w in self._watchers(u):
            wu = self.users.get(w)
            if wu is not None:
                targets.extend(self._local_of(wu))
        if targets:
            effects.append(PresenceNotice(targets, u.name, shown[0], shown[1], u.last_seen))

    def _notice_to(self, viewer: User, sessions: list[str], subject: str,
                   effects: list[Effect]) -> None:
        """Tell ``sessions`` of ``viewer`` what they may see of ``subject`` now."""
        if not sessions:
            return
        su = self.users.get(subject)
        if su is not None and viewer.name in su.allowed:
            status, text = self._aggregate(su)
            effects.append(PresenceNotice(sessions, subject, status, text, su.last_seen))
        else:
            effects.append(PresenceNotice(sessions, subject, "unknown", None, None))

    def _session_view(self, s: Session, last_seq: int, effects: list[Effect]) -> None:
        """A freshly (re)attached local session gets its mailbox and its contacts' presence."""
        if not self._is_local(s):
            self._mark_remote(s)
            return
        u = self.users[s.user]
        for seq, m in u.mailbox.items():
            if seq > last_seq:
                effects.append(Deliver([s.id], m))
        for other in sorted(u.subs):
            ou = self.users.get(other)
            if ou is not None and u.name in ou.allowed:
                status, text = self._aggregate(ou)
                effects.append(PresenceNotice([s.id], other, status, text, ou.last_seen))

    def _owned(self, sid: str, epoch: int, node: str) -> Session | Result:
        """The session if ``node`` holds it at ``epoch``, else the error to return."""
        s = self.sessions.get(sid)
        if s is None:
            return error("no-session", "the session does not exist (expired or ended)")
        if s.epoch != epoch or s.node != node:
            return error("moved", "the session was resumed on another connection")
        return s

    def _valid_name(self, name: str) -> bool:
        return 0 < len(name) <= self.limits.max_name and name.isprintable()

    def _orphan(self, s: Session, reason: str) -> None:
        s.attached = False
        s.orphaned_at = self.clock
        s.orphan_reason = reason
        self.orphans.pop(s.id, None)
        self.orphans[s.id] = self.clock

    def _attach(self, s: Session) -> None:
        s.attached = True
        s.orphaned_at = None
        s.orphan_reason = None
        self.orphans.pop(s.id, None)

    def _index_node(self, s: Session) -> None:
        """Enter ``s`` in its node's index (``node_parts``, ``node_sessions``)."""
        parts = self.node_parts.get(s.node)
        if parts is None:
            parts = self.node_parts[s.node] = [set() for _ in range(NODE_PARTS)]
            self.node_sessions[s.node] = 0
        parts[_part_of(s.id)].add(s.id)  # never indexed yet (login, restore, resume)
        self.node_sessions[s.node] += 1

    def _unindex_node(self, s: Session) -> None:
        parts = self.node_parts.get(s.node)
        if parts is None:
            return
        parts[_part_of(s.id)].remove(s.id)
        left = self.node_sessions[s.node] - 1
        if left:
            self.node_sessions[s.node] = left
        else:
            del self.node_parts[s.node]
            del self.node_sessions[s.node]

    def _node_session_ids(self, node: str) -> list[str]:
        """``node``'s session ids, sorted (the order of the unbounded loops)."""
        parts = self.node_parts.get(node)
        return sorted(chain.from_iterable(parts)) if parts else []

    def _remove_session(self, s: Session, now: float, reason: str,
                        effects: list[Effect]) -> None:
        del self.sessions[s.id]
        self.orphans.pop(s.id, None)
        self._unindex_node(s)
        if self._owned_here(s):
            effects.append(SessionClosed(s.id, s.epoch, reason))
        else:
            self._mark_remote(s)
        u = self.users[s.user]
        del u.sessions[s.id]
        if not u.sessions:
            u.last_seen = now
        self._announce(u, effects)

    # --- sessions -----------------------------------------------------------------

    def _login(self, c: Login) -> tuple[Result, list[Effect]]:
        existing = self.sessions.get(c.session)
        if existing is not None:
            # A retried proposal of a login already applied: same answer, no effects.
            if existing.user == c.user and existing.resume_hash == c.resume_hash:
                return Result(True, {"epoch": existing.epoch, "user": existing.user}), []
            return error("conflict", "session id already in use"), []
        if not self._valid_name(c.user):
            return error("invalid", "bad user name"), []
        if c.status not in STATUSES:
            return error("invalid", f"status must be one of {', '.join(STATUSES)}"), []
        if c.text is not None and len(c.text) > self.limits.max_text:
            return error("invalid", "status text too long"), []
        cap = self.user_limits.sessions_per_user
        known = self.users.get(c.user)
        if cap and known is not None and len(known.sessions) >= cap:
            return error("limit", f"{c.user} already has {cap} sessions (the limit)"), []
        s = Session(c.session, c.user, c.node, c.inc, 1, c.resume_hash, c.status, c.text,
                    c.now, c.now)
        self.sessions[s.id] = s
        self._index_node(s)
        u = self._user(c.user)
        u.sessions[s.id] = None
        self.stats.logins += 1
        effects: list[Effect] = []
        self._announce(u, effects)
        self._session_view(s, 0, effects)
        return Result(True, {"epoch": s.epoch, "user": s.user}), effects

    def _resume(self, c: Resume) -> tuple[Result, list[Effect]]:
        s = self.sessions.get(c.session)
        if s is None:
            return error("no-session", "the session does not exist (expired or ended)"), []
        if not hmac.compare_digest(s.resume_hash, c.resume_hash):
            return error("bad-token", "wrong resume token"), []
        if c.claim and s.claim == c.claim:
            # A retried proposal of a resume already applied: same answer, no effects.
            return Result(True, {"epoch": s.epoch, "user": s.user}), []
        if c.attempt and c.attempt <= s.attempt:
            # Committed late: its client has since resumed with a later attempt.
            return error("stale", "a later resume of this session was applied first"), []
        s.claim = c.claim
        s.attempt = max(s.attempt, c.attempt)
        effects: list[Effect] = []
        if self._owned_here(s):
            effects.append(SessionClosed(s.id, s.epoch, "moved"))
        else:
            self._mark_remote(s)
        self._unindex_node(s)
        s.node, s.inc = c.node, c.inc
        s.epoch += 1
        self._index_node(s)
        self._attach(s)
        self.stats.resumed += 1
        self._session_view(s, c.last_seq, effects)
        return Result(True, {"epoch": s.epoch, "user": s.user}), effects

    def _detach(self, c: Detach) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        if s.attached:
            self._orphan(s, "conn")
        elif s.orphan_reason == "node":
            # The connection is gone now: the node's next heartbeat must not re-attach it.
            s.orphan_reason = "conn"
        return OK, []

    def _logout(self, c: Logout) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        effects: list[Effect] = []
        self._remove_session(s, c.now, "logout", effects)
        return OK, effects

    # --- presence ------------------------------------------------------------------

    def _set_presence(self, c: SetPresence) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        if c.status not in STATUSES:
            return error("invalid", f"status must be one of {', '.join(STATUSES)}"), []
        if c.text is not None and len(c.text) > self.limits.max_text:
            return error("invalid", "status text too long"), []
        s.status, s.text, s.updated = c.status, c.text, c.now
        effects: list[Effect] = []
        self._announce(self.users[s.user], effects)
        return OK, effects

    def _allow(self, c: Allow) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        if not self._valid_name(c.other):
            return error("invalid", "bad user name"), []
        me = self.users[s.user]
        effects: list[Effect] = []
        cap = self.user_limits.allow_list
        if cap and c.other not in me.allowed and len(me.allowed) >= cap:
            return error("limit", f"the allow list is full ({cap} users)"), []
        if c.other not in me.allowed:
            me.allowed.add(c.other)
            if c.other in me.subscribers:
                viewer = self.users[c.other]
                self._notice_to(viewer, self._local_of(viewer), me.name, effects)
        return OK, effects

    def _revoke(self, c: Revoke) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        me = self.users[s.user]
        effects: list[Effect] = []
        if c.other in me.allowed:
            me.allowed.discard(c.other)
            if c.other in me.subscribers:
                viewer = self.users[c.other]
                self._notice_to(viewer, self._local_of(viewer), me.name, effects)
        return OK, effects

    def _subscribe(self, c: Subscribe) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        if not self._valid_name(c.other):
            return error("invalid", "bad user name"), []
        me = self.users[s.user]
        cap = self.user_limits.subscriptions
        if cap and c.other not in me.subs and len(me.subs) >= cap:
            return error("limit", f"too many subscriptions ({cap})"), []
        other = self._user(c.other)
        me.subs.add(c.other)
        other.subscribers.add(me.name)
        visible = me.name in other.allowed
        effects: list[Effect] = []
        self._notice_to(me, self._local_of(me), c.other, effects)
        return Result(True, {"visible": visible}), effects

    def _unsubscribe(self, c: Unsubscribe) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        me = self.users[s.user]
        me.subs.discard(c.other)
        other = self.users.get(c.other)
        if other is not None:
            other.subscribers.discard(me.name)
            self._gc_user(other)
        return OK, []

    # --- messages --------------------------------------------------------------------

    def _send(self, c: Send) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        sender = self.users[s.user]
        if c.cmid in sender.sent:
            # A re-sent send (after a failover, or a retried proposal): same id, no effect.
            return Result(True, {"id": sender.sent[c.cmid], "duplicate": True}), []
        if c.cmid < 1:
            return error("invalid", "cmid must be a positive integer"), []
        if not self._valid_name(c.to):
            return error("invalid", "bad recipient name"), []
        size = len(c.body.encode()) if isinstance(c.body, str) else len(c.body)
        if size > self.limits.max_body:
            return error("too-large-body",
                         f"message body over {self.limits.max_body} bytes"), []
        to = self._user(c.to)
        cap = self.user_limits.mailbox
        if cap and len(to.mailbox) >= cap:
            self._gc_user(to)
            return error("mailbox-full", f"{c.to}'s mailbox is full ({cap} unacknowledged "
                         "messages); try later"), []
        m = Message(self.next_msg_id, to.next_seq, s.user, c.to, c.body, c.now)
        self.next_msg_id += 1
        to.next_seq += 1
        to.mailbox[m.seq] = m
        sender.sent[c.cmid] = m.id
        if len(sender.sent) > RECENT_SENDS_MAX:
            sender.sent = dict(islice(sender.sent.items(), len(sender.sent) - RECENT_SENDS, None))
        self.stats.messages_sent += 1
        self.stats.mailbox_messages += 1
        effects: list[Effect] = []
        if self.track_remote or self._has_local():
            targets = self._local_of(to)
            if targets:
                effects.append(Deliver(targets, m))
        return Result(True, {"id": m.id, "seq": m.seq}), effects

    def _ack(self, c: Ack) -> tuple[Result, list[Effect]]:
        s = self._owned(c.session, c.epoch, c.node)
        if isinstance(s, Result):
            return s, []
        if len(c.seqs) > self.limits.max_acks:
            return error("invalid", f"at most {self.limits.max_acks} acks at once"), []
        u = self.users[s.user]
        removed = 0
        for seq in c.seqs:
            if u.mailbox.pop(seq, None) is not None:
                removed += 1
        self.stats.mailbox_messages -= removed
        self.stats.messages_acked += removed
        return Result(True, {"acked": removed}), []

    # --- cluster housekeeping ---------------------------------------------------------

    def _node_up(self, c: NodeUp) -> tuple[Result, list[Effect]]:
        info = self.nodes.get(c.node)
        if info is not None and (info.inc == c.inc or c.inc in info.retired):
            if info.inc == c.inc and c.raft:  # its heartbeat came first
                info.raft = c.raft
            return OK, []
        retired = [*info.retired, info.inc][-RETIRED_INCARNATIONS:] if info else []
        raft = c.raft or (info.raft if info else "")
        self.nodes[c.node] = NodeInfo(c.inc, self.clock, retired=retired, raft=raft)
        self._sync_or_sweep(c.node, lambda s: s.inc != c.inc and s.attached, self._orphan_conn)
        return OK, []

    def _node_down(self, c: NodeDown) -> tuple[Result, list[Effect]]:
        info = self.nodes.get(c.node)
        if info is None or info.inc != c.inc:
            return OK, []
        info.down = info.gone = True
        self._sync_or_sweep(c.node, _attached_of(c.inc), self._orphan_conn)
        return OK, []

    def _heartbeat(self, c: Heartbeat) -> tuple[Result, list[Effect]]:
        info = self.nodes.get(c.node)
        if info is None or info.inc != c.inc:
            if info is not None and c.inc in info.retired:
                return error("retired", "a heartbeat from an earlier incarnation"), []
            self._node_up(NodeUp(c.node, c.inc))
            info = self.nodes[c.node]
        info.seen = self.clock
        info.beat = max(info.beat, c.beat)
        if info.down:
            info.down = info.gone = False
            self._sync_or_sweep(
                c.node, lambda s: s.inc == c.inc and not s.attached and s.orphan_reason == "node",
                self._attach)
        return OK, []

    def _sync_or_sweep(self, name: str, stale: Callable[[Session], bool],
                       change: Callable[[Session], None], queue: bool = True) -> None:
        """Node ``name``'s sessions must follow a change of the node: with bounded
        ticks (and ``queue``), queue its parts for the next ticks (``_sync_node``);
        otherwise, as logs written before the bound replay, ``change`` at once
        every session ``stale`` picks, in id order (these rules are not quite
        ``_sync_session``'s: see its docstring)."""
        if queue and self.tick_bound > 0:
            self._sync_node(name)
            return
        for sid in self._node_session_ids(name):
            s = self.sessions[sid]
            if stale(s):
                change(s)

    def _orphan_conn(self, s: Session) -> None:
        self._orphan(s, "conn")

    def _orphan_node(self, s: Session) -> None:
        self._orphan(s, "node")

    def _sync_node(self, name: str) -> None:
        """Node ``name`` fell silent, spoke again, restarted, said it is going or
        was removed (ticks bounded): queue its parts, for the next ticks to bring
        its sessions in line (``_sync_session``), without touching a session here
        (in a node process, a tick that sorted the 200,000 ids of a node and
        orphaned 10,000 held the apply thread for 1.6 s, its pages shared with a
        compaction child). A part is the same set
        on every replica; the order in which its sessions change changes nothing.
        A part still queued is not queued again: its turn will see the node as it
        is then (a flapping node does not grow the queue)."""
        queued = set(self.node_sync)  # at most NODE_PARTS per node
        self.node_sync.extend(item for item in ((name, part) for part in range(NODE_PARTS))
                              if item not in queued)

    def _sync_session(self, s: Session) -> bool:
        """Bring ``s`` in line with its node, as the unbounded NodeUp, NodeDown,
        Tick and Heartbeat do at once: orphan it if it is attached to another
        incarnation than the node's current one ("conn"), or to a node that is
        down ("conn" if it said so, "node" if it fell silent); re-attach it if
        only its node's silence orphaned it and the node speaks again. Say if it
        changed."""
        info = self.nodes.get(s.node)
        if info is None:
            return False
        if info.inc != s.inc or info.down:
            if not s.attached:
                return False
            self._orphan(s, "node" if info.inc == s.inc and not info.gone else "conn")
            return True
        if not s.attached and s.orphan_reason == "node":
            self._attach(s)
            return True
        return False

    def _awaits_reattach(self, s: Session) -> bool:
        """``s`` was orphaned by its node's silence, and the node spoke again (its
        re-attach is queued): it does not expire."""
        if s.orphan_reason != "node":
            return False
        info = self.nodes.get(s.node)
        return info is not None and not info.down and info.inc == s.inc

    def _tick(self, c: Tick) -> tuple[Result, list[Effect]]:
        step = c.elapsed if c.elapsed > 0.0 else 0.0  # also NaN: it would poison the clock
        self.clock += min(step, MAX_TICK_STEP)
        if c.now > self.wall:
            self.wall = c.now
        effects: list[Effect] = []
        self.tick_bound = max(c.max_sessions, 0)
        for name in sorted(self.nodes):
            info = self.nodes[name]
            if not info.down and self.clock - info.seen > c.node_timeout:
                info.down = True
                self._sync_or_sweep(name, _attached_of(info.inc), self._orphan_node)
        if self.node_sync:
            self._sync_queued(c.max_sessions if c.max_sessions > 0 else len(self.sessions) + 1)
        room = c.max_sessions if c.max_sessions > 0 else len(self.sessions) + len(self.expiring)
        expired = self._expire_queued(c.grace, room, effects)
        if not self.expiring and expired < room:
            expired += self._expire_due(c.grace, room - expired, effects)
        self.stats.expired += expired
        return Result(True, {"expired": expired}), effects

    def _sync_queued(self, room: int) -> None:
        """Orphan or re-attach the sessions of the parts ``_sync_node`` queued,
        whole parts, until ``room`` changed (or many more were looked at)."""
        queue = self.node_sync
        taken = done = looked = 0
        while taken < len(queue) and done < room and looked < SKIPS_PER_CHANGE * room:
            node, index = queue[taken]
            taken += 1
            parts = self.node_parts.get(node)
            if parts is None:
                continue
            part = parts[index]
            looked += len(part)
            for sid in part:  # changes nothing in ``part``
                if self._sync_session(self.sessions[sid]):
                    done += 1
        del queue[:taken]

    def _expire_queued(self, grace: float, room: int, effects: list[Effect]) -> int:
        """Expire up to ``room`` sessions from the queue an earlier bounded tick
        left, skipping those resumed since (or orphaned again, not yet due)."""
        queue = self.expiring
        taken = done = 0
        while taken < len(queue) and done < room and taken < SKIPS_PER_CHANGE * room:
            s = self.sessions.get(queue[taken])
            taken += 1
            if (s is not None and s.orphaned_at is not None
                    and self.clock - s.orphaned_at >= grace and not self._awaits_reattach(s)):
                self._remove_session(s, self.wall, "expired", effects)
                done += 1
        del queue[:taken]
        return done

    def _expire_due(self, grace: float, room: int, effects: list[Effect]) -> int:
        """Expire the ``room`` oldest orphans past their grace, in canonical order;
        queue the rest of the due ones (all ties of the last taken included) for
        later ticks in that order, so that no later tick has to sort them."""
        due: list[tuple[str, float]] = []
        for item in self.orphans.items():  # ordered by orphaned_at
            if self.clock - item[1] < grace:
                break
            if len(due) >= room and item[1] != due[-1][1]:
                break
            due.append(item)
        # Canonical order, (orphaned_at, id): a restored replica's orphans are
        # ordered so, a live one's by insertion, and the order changes the state.
        due.sort(key=_first)
        due.sort(key=_second)
        if len(due) > room:
            self.expiring = [sid for sid, _ in due[room:]]
            del due[room:]
        done = 0
        for sid, _ in due:
            s = self.sessions[sid]
            if not self._awaits_reattach(s):
                self._remove_session(s, self.wall, "expired", effects)
                done += 1
        return done

    def _configure(self, c: Configure) -> tuple[Result, list[Effect]]:
        values = (c.sessions_per_user, c.allow_list, c.subscriptions, c.mailbox)
        if any(v < 0 for v in values):
            return error("invalid", "limits must not be negative"), []
        self.user_limits = UserLimits(*values)
        return OK, []

    def _join(self, c: Join) -> tuple[Result, list[Effect]]:
        self.joined.add(c.node)
        return Result(True, {"joined": c.node}), []

    def _leave(self, c: Leave) -> tuple[Result, list[Effect]]:
        name = c.node
        if c.bounded and name not in self.nodes:
            # A dead member, named by its Raft address: the node whose NodeUp
            # named it (the latest seen, if several did).
            found = [(info.seen, n) for n, info in self.nodes.items() if info.raft == name]
            name = max(found)[1] if found else name
        self.joined.discard(name)
        info = self.nodes.get(name)
        if info is not None:
            info.down = info.gone = True
            if c.bounded:
                # For good: heartbeats of this incarnation are refused from now on,
                # so one still in flight cannot bring the node's sessions back.
                info.retired = [*info.retired, info.inc][-RETIRED_INCARNATIONS:]
                info.inc = 0  # never an incarnation: they are odd
        self._sync_or_sweep(name, lambda s: s.attached, self._orphan_conn,
                            queue=info is not None and c.bounded != 0)
        return Result(True, {"left": name}), []

    def _checkpoint(self, c: Checkpoint) -> tuple[Result, list[Effect]]:
        self.checkpoints_due.append(c.tag)
        return Result(True, {"checkpoint": c.tag, "sessions": len(self.sessions)}), []

    def _noop(self, c: Noop) -> tuple[Result, list[Effect]]:
        return OK, []
