"""A Hypothesis state machine drives the session table with random commands across
three nodes and checks it against a simple model after every step.

Several replicas take every command: no local identity, ``n1`` and ``n2`` at
incarnation 1, ``n1`` at incarnation 2 (after a restart), and a twin that is now
and then replaced by a restore of a snapshot. They must agree on every result and
digest; each one's effects must only target its own sessions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from replication.commands import (
    STATUSES,
    Ack,
    Allow,
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
    Resume,
    Revoke,
    Send,
    SetPresence,
    Subscribe,
    Tick,
    Unsubscribe,
)
from replication.table import (
    MAX_TICK_STEP,
    NODE_PARTS,
    RANK,
    RETIRED_INCARNATIONS,
    Deliver,
    Effect,
    PresenceNotice,
    Result,
    SessionClosed,
    SessionTable,
)

NODES = ["n1", "n2", "n3"]
RAFT = {"n1": "10.0.0.1:7200", "n2": "10.0.0.2:7200", "n3": "10.0.0.3:7200"}  # NodeUp's
USERS = ["alice", "bob", "carol"]
SIDS = ["s0", "s1", "s2", "s3", "s4", "s5"]
H = b"token"
LOCALS: list[tuple[str, int] | None] = [None, ("n1", 1), ("n2", 1), ("n1", 2)]

sids = st.sampled_from(SIDS)
picks = st.integers(0, 99)  # mostly a live session, see TableMachine.pick
live = precondition(lambda self: bool(self.sessions))
users = st.sampled_from(USERS)
nodes = st.sampled_from(NODES)
statuses = st.sampled_from(STATUSES)
texts = st.sampled_from([None, "t1", "t2"])
times = st.sampled_from([1.0, 2.0, 3.0, 4.0])  # few values: ties on purpose
routes = st.sampled_from(["ok"] * 6 + ["old-epoch", "other-node"])


@dataclass
class MSession:
    user: str
    node: str
    inc: int
    epoch: int
    status: str
    text: str | None
    updated: float
    attached: bool = True
    orphaned_at: float | None = None
    reason: str | None = None
    claim: str = ""


@dataclass
class MNode:
    inc: int
    seen: float
    down: bool = False
    retired: list[int] = field(default_factory=list)
    gone: bool = False
    raft: str = ""


def norm(effects: list[Effect]) -> list[Any]:
    """Effects with session lists sorted: their order comes from set iteration."""
    out: list[Any] = []
    for e in effects:
        if isinstance(e, Deliver):
            out.append(("deliver", sorted(e.sessions), e.message))
        elif isinstance(e, PresenceNotice):
            out.append(("notice", sorted(e.sessions), e.user, e.status, e.text, e.last_seen))
        else:
            out.append(e)
    return out


class TableMachine(RuleBasedStateMachine):
    """Random commands against several replicas and a model of what they must do."""

    def __init__(self) -> None:
        super().__init__()
        self.replicas = [SessionTable(local=loc) for loc in LOCALS]
        self.main = self.replicas[1]
        self.twin = SessionTable(local=LOCALS[1])
        # the model
        self.sessions: dict[str, MSession] = {}
        self.nodes: dict[str, MNode] = {}
        self.incs = dict.fromkeys(NODES, 1)  # the incarnation each node runs now
        self.allowed: dict[str, set[str]] = {}
        self.subs: dict[str, set[str]] = {}
        self.mailbox: dict[str, dict[int, int]] = {}  # user -> seq -> message id
        self.sent_by: dict[str, dict[int, int]] = {}  # user -> cmid -> message id
        self.cmids = 0
        self.joined: set[str] = set()
        self.limits = (16, 5000, 5000, 10_000)  # UserLimits' defaults
        self.next_seq: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.next_id = 1
        self.clock = 0.0
        self.wall = 0.0
        self.sent = self.acked = self.logins = self.resumed = self.expired = 0
        self.claims = 0
        self.queue: list[str] = []  # sessions due to expire, left by a bounded tick
        self.sync: list[tuple[str, int]] = []  # parts of nodes that fell silent or spoke
        self.tick_bound = 0  # the latest tick's max_sessions
        for node in ("n1", "n2"):  # n3 is unknown until it speaks
            self.heartbeat(node, 1, 0)

    # --- applying, and checking effects ------------------------------------------------

    def apply(self, cmd: Command) -> tuple[Result, list[list[Effect]]]:
        """Apply to every replica; they must agree. Check each replica's effects."""
        pre = {sid: (s.node, s.inc, s.epoch, s.user) for sid, s in self.main.sessions.items()}
        outs = [r.apply(cmd) for r in self.replicas]
        twin_result, twin_effects = self.twin.apply(cmd)
        result = outs[0][0]
        assert all(o[0] == result for o in outs), cmd
        assert twin_result == result, cmd
        assert norm(twin_effects) == norm(outs[1][1]), cmd
        assert outs[0][1] == [], "a table without local identity has no effects"
        for loc, (_, effects) in zip(LOCALS[1:], outs[1:], strict=True):
            assert loc is not None
            self.check_effects(loc, pre, effects)
        return result, [o[1] for o in outs]

    def check_effects(self, loc: tuple[str, int], pre: dict[str, tuple[str, int, int, str]],
                      effects: list[Effect]) -> None:
        """Effects target only sessions this replica owns; a real status reaches only
        allowed viewers; the last notice about a user tells their current presence."""
        t = self.replicas[LOCALS.index(loc)]
        last_notice: dict[str, PresenceNotice] = {}
        for e in effects:
            if isinstance(e, Deliver):
                assert len(set(e.sessions)) == len(e.sessions)
                for sid in e.sessions:
                    s = t.sessions[sid]
                    assert (s.node, s.inc) == loc, "Deliver to a session not owned here"
                    assert s.user == e.message.to, "Deliver to a session of another user"
            elif isinstance(e, PresenceNotice):
                assert e.sessions and len(set(e.sessions)) == len(e.sessions)
                for sid in e.sessions:
                    s = t.sessions.get(sid)  # gone if it expired later in the same tick
                    owner, viewer = ((s.node, s.inc), s.user) if s else (pre[sid][:2],
                                                                          pre[sid][3])
                    assert owner == loc, "PresenceNotice to a session not owned here"
                    if e.status != "unknown":  # the table's allowed set equals the model's
                        assert viewer in t.users[e.user].allowed, (
                            f"{viewer} told about {e.user} without permission")
                if e.status != "unknown":
                    last_notice[e.user] = e
            else:
                assert isinstance(e, SessionClosed)
                assert e.session in pre, "SessionClosed for an unknown session"
                node, inc, epoch, _ = pre[e.session]
                assert (node, inc) == loc and epoch == e.epoch
        for subject, notice in last_notice.items():
            status, text, last_seen = t.presence_of(subject)
            assert (notice.status, notice.text, notice.last_seen) == (status, text, last_seen)

    # --- model helpers ----------------------------------------------------------------

    def aggregate(self, user: str) -> tuple[str, str | None]:
        """The model's presence: best rank, then latest update, then session id."""
        mine = [(RANK[s.status], s.updated, sid, s) for sid, s in self.sessions.items()
                if s.user == user]
        if not mine:
            return ("offline", None)
        best = max(mine, key=lambda x: x[:3])[3]
        return (best.status, best.text)

    def pick(self, i: int) -> str:
        """A live session nine times in ten (when there is one), else any id."""
        live = sorted(self.sessions)
        return live[i % len(live)] if live and i < 90 else SIDS[i % len(SIDS)]

    def route(self, sid: str, how: str) -> tuple[int, str]:
        """Epoch and node for a session command: right, or deliberately stale."""
        s = self.sessions.get(sid)
        epoch, node = (s.epoch, s.node) if s else (1, "n1")
        if how == "old-epoch":
            epoch -= 1
        elif how == "other-node":
            node = NODES[(NODES.index(node) + 1) % len(NODES)]
        return epoch, node

    def expect_owned(self, sid: str, epoch: int, node: str, result: Result) -> bool:
        """Check the ownership error a session command must give; True if it is ok."""
        s = self.sessions.get(sid)
        if s is None:
            assert result.code == "no-session"
            return False
        if s.epoch != epoch or s.node != node:
            assert result.code == "moved"
            return False
        return True

    def orphan(self, s: MSession, reason: str) -> None:
        s.attached, s.orphaned_at, s.reason = False, self.clock, reason

    def sync_session(self, s: MSession) -> bool:
        """A queued session: orphaned if attached to another incarnation ("conn")
        or to a down node ("conn" if it said so, else "node"); re-attached if only
        its node's silence orphaned it and the node is up again."""
        info = self.nodes.get(s.node)
        if info is None:
            return False
        if info.inc != s.inc or info.down:
            if not s.attached:
                return False
            self.orphan(s, "node" if info.inc == s.inc and not info.gone else "conn")
            return True
        if not s.attached and s.reason == "node":
            s.attached, s.orphaned_at, s.reason = True, None, None
            return True
        return False

    def queue_node(self, node: str) -> None:
        """Bounded ticks: the node's NODE_PARTS parts (by the CRC-32 of the id) are
        queued for the next ticks, but not those still queued."""
        self.sync += [(node, part) for part in range(NODE_PARTS)
                      if (node, part) not in self.sync]

    def awaits_reattach(self, s: MSession) -> bool:
        info = self.nodes.get(s.node)
        return (s.reason == "node" and info is not None and not info.down
                and info.inc == s.inc)

    def remove(self, sid: str, now: float) -> None:
        s = self.sessions.pop(sid)
        if not any(o.user == s.user for o in self.sessions.values()):
            self.last_seen[s.user] = now

    def watchers_local(self, subject: str, loc: tuple[str, int]) -> list[str]:
        """Sessions at ``loc`` of users subscribed to and allowed by ``subject``."""
        return sorted(sid for sid, s in self.sessions.items()
                      if subject in self.subs.get(s.user, set())
                      and s.user in self.allowed.get(subject, set())
                      and (s.node, s.inc) == loc)

    def check_announce(self, subject: str, before: tuple[str, str | None],
                       effects: list[list[Effect]]) -> None:
        """If the subject's aggregate changed, every local session of each watcher
        (subscribed and allowed) is told, on every replica; otherwise nobody is."""
        if subject in self.subs.get(subject, set()):
            return  # self-watchers also get the session view: not worth modelling
        changed = self.aggregate(subject) != before
        for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
            assert loc is not None
            about = [e for e in eff if isinstance(e, PresenceNotice) and e.user == subject]
            expected = self.watchers_local(subject, loc) if changed else []
            got = sorted(about[0].sessions) if about else []
            assert got == expected, (subject, loc, got, expected)

    # --- sessions ---------------------------------------------------------------------

    @rule(sid=sids, user=users, node=nodes, status=statuses, text=texts, now=times,
          stale_inc=st.booleans())
    def login(self, sid: str, user: str, node: str, status: str, text: str | None, now: float,
              stale_inc: bool) -> None:
        """A new session (or a retried/conflicting login); its owner gets the mailbox."""
        info = self.nodes.get(node)
        inc = info.retired[-1] if stale_inc and info and info.retired else self.incs[node]
        before = self.aggregate(user)
        result, effects = self.apply(Login(sid, user, node, inc, H, status, text, now))
        existing = self.sessions.get(sid)
        if existing is not None:
            if existing.user == user:
                assert result == Result(True, {"epoch": existing.epoch, "user": user})
                assert effects == [[]] * len(LOCALS)
            else:
                assert result.code == "conflict"
            return
        cap = self.limits[0]
        if cap and sum(m.user == user for m in self.sessions.values()) >= cap:
            assert result.code == "limit" and effects == [[]] * len(LOCALS)
            return
        assert result == Result(True, {"epoch": 1, "user": user})
        self.sessions[sid] = MSession(user, node, inc, 1, status, text, now)
        self.logins += 1
        self.check_announce(user, before, effects)
        for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
            got = [e.message.id for e in eff if isinstance(e, Deliver)]
            expected = list(self.mailbox.get(user, {}).values()) if (node, inc) == loc else []
            assert got == expected

    @live
    @rule(pick=picks, node=nodes, token_ok=st.integers(0, 9), claim=st.sampled_from(
        ["same", "new", "new", "empty"]), last_seq=st.integers(0, 4), now=times)
    def resume(self, pick: int, node: str, token_ok: int, claim: str, last_seq: int,
               now: float) -> None:
        """Claim a session (bad token, retried claim, or a real move)."""
        sid = self.pick(pick)
        s = self.sessions.get(sid)
        if claim == "same" and s is not None:
            claim_str = s.claim
        elif claim == "empty":
            claim_str = ""
        else:
            self.claims += 1
            claim_str = f"claim{self.claims}"
        token = H if token_ok else b"wrong"
        inc = self.incs[node]
        result, effects = self.apply(Resume(sid, token, node, inc, last_seq, claim_str, now))
        if s is None:
            assert result.code == "no-session"
            return
        if not token_ok:
            assert result.code == "bad-token"
            return
        if claim_str and claim_str == s.claim:
            assert result == Result(True, {"epoch": s.epoch, "user": s.user})
            assert effects == [[]] * len(LOCALS)
            return
        old = (s.node, s.inc, s.epoch)
        s.claim, s.node, s.inc, s.epoch = claim_str, node, inc, s.epoch + 1
        s.attached, s.orphaned_at, s.reason = True, None, None
        self.resumed += 1
        assert result == Result(True, {"epoch": s.epoch, "user": s.user})
        for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
            closed = [e for e in eff if isinstance(e, SessionClosed)]
            if old[:2] == loc:
                assert closed == [SessionClosed(sid, old[2], "moved")]
                assert eff[0] == closed[0]
            else:
                assert closed == []
            got = [e.message.seq for e in eff if isinstance(e, Deliver)]
            box = self.mailbox.get(s.user, {})
            expected = [q for q in box if q > last_seq] if (node, inc) == loc else []
            assert got == expected

    @live
    @rule(pick=picks, how=routes)
    def detach(self, pick: int, how: str) -> None:
        """Lose a connection: the session is orphaned, nobody is told."""
        sid = self.pick(pick)
        epoch, node = self.route(sid, how)
        before = {u: self.aggregate(u) for u in USERS}
        result, effects = self.apply(Detach(sid, epoch, node))
        assert effects == [[]] * len(LOCALS), "detach has no effects (no presence flap)"
        if self.expect_owned(sid, epoch, node, result):
            assert result == Result(True, {})
            s = self.sessions[sid]
            if s.attached:
                self.orphan(s, "conn")
            elif s.reason == "node":
                s.reason = "conn"
        assert {u: self.aggregate(u) for u in USERS} == before

    @live
    @rule(pick=picks, how=routes, now=times)
    def logout(self, pick: int, how: str, now: float) -> None:
        """End a session; the last one takes the user offline."""
        sid = self.pick(pick)
        epoch, node = self.route(sid, how)
        user = self.sessions[sid].user if sid in self.sessions else None
        before = self.aggregate(user) if user else ("offline", None)
        pre = self.sessions.get(sid)
        result, effects = self.apply(Logout(sid, epoch, node, now))
        if self.expect_owned(sid, epoch, node, result):
            assert user is not None and pre is not None
            self.remove(sid, now)
            self.check_announce(user, before, effects)
            for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
                closed = [e for e in eff if isinstance(e, SessionClosed)]
                mine = (pre.node, pre.inc) == loc
                assert closed == ([SessionClosed(sid, epoch, "logout")] if mine else [])

    # --- presence and visibility ------------------------------------------------------

    @live
    @rule(pick=picks, how=routes, status=statuses, text=texts, now=times)
    def set_presence(self, pick: int, how: str, status: str, text: str | None,
                     now: float) -> None:
        """Change one session's status; watchers hear of aggregate changes."""
        sid = self.pick(pick)
        epoch, node = self.route(sid, how)
        user = self.sessions[sid].user if sid in self.sessions else None
        before = self.aggregate(user) if user else ("offline", None)
        result, effects = self.apply(SetPresence(sid, epoch, node, status, text, now))
        if self.expect_owned(sid, epoch, node, result):
            assert user is not None
            s = self.sessions[sid]
            s.status, s.text, s.updated = status, text, now
            self.check_announce(user, before, effects)

    def visibility(self, cls: type[Command], sid: str, how: str, other: str) -> Result | None:
        """Allow, revoke, subscribe or unsubscribe, and check who is told."""
        epoch, node = self.route(sid, how)
        result, effects = self.apply(cls(sid, epoch, node, other))  # type: ignore[call-arg]
        if not self.expect_owned(sid, epoch, node, result):
            return None
        me = self.sessions[sid].user
        told_before = other in self.allowed.get(me, set())
        if cls in (Allow, Subscribe):
            cap = self.limits[1 if cls is Allow else 2]
            have = (self.allowed if cls is Allow else self.subs).get(me, set())
            if cap and other not in have and len(have) >= cap:
                assert result.code == "limit" and effects == [[]] * len(LOCALS)
                return None
        if cls is Allow:
            self.allowed.setdefault(me, set()).add(other)
        elif cls is Revoke:
            self.allowed.get(me, set()).discard(other)
        elif cls is Subscribe:
            self.subs.setdefault(me, set()).add(other)
        else:
            self.subs.get(me, set()).discard(other)
        mine = {loc: sorted(x for x, s in self.sessions.items()
                            if s.user == me and (s.node, s.inc) == loc) for loc in LOCALS[1:]}
        if cls is Subscribe:
            visible = me in self.allowed.get(other, set())
            for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
                if mine[loc]:
                    (e,) = eff
                    assert isinstance(e, PresenceNotice)
                    assert (sorted(e.sessions), e.user) == (mine[loc], other)
                    assert (e.status != "unknown") == visible
                else:
                    assert eff == []
        elif cls is Unsubscribe:
            assert effects == [[]] * len(LOCALS)
        else:
            changed = told_before != (other in self.allowed.get(me, set()))
            subscribed = me in self.subs.get(other, set())
            for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
                assert loc is not None
                expected = sorted(x for x, s in self.sessions.items()
                                  if s.user == other and (s.node, s.inc) == loc)
                if changed and subscribed and expected:
                    (e,) = eff
                    assert isinstance(e, PresenceNotice)
                    assert sorted(e.sessions) == expected
                    assert (e.status == "unknown") == (cls is Revoke)
                else:
                    assert eff == []
        return result

    @live
    @rule(pick=picks, how=routes, other=users)
    def allow(self, pick: int, how: str, other: str) -> None:
        """Let another user see my presence."""
        sid = self.pick(pick)
        self.visibility(Allow, sid, how, other)

    @live
    @rule(pick=picks, how=routes, other=users)
    def revoke(self, pick: int, how: str, other: str) -> None:
        """Stop letting another user see my presence."""
        sid = self.pick(pick)
        self.visibility(Revoke, sid, how, other)

    @live
    @rule(pick=picks, how=routes, other=users)
    def subscribe(self, pick: int, how: str, other: str) -> None:
        """Ask for another user's presence."""
        sid = self.pick(pick)
        result = self.visibility(Subscribe, sid, how, other)
        if result is not None:
            me = self.sessions[sid].user
            assert result.value == {"visible": me in self.allowed.get(other, set())}

    @live
    @rule(pick=picks, how=routes, other=users)
    def unsubscribe(self, pick: int, how: str, other: str) -> None:
        """Stop asking for another user's presence."""
        sid = self.pick(pick)
        self.visibility(Unsubscribe, sid, how, other)

    # --- messages ---------------------------------------------------------------------

    @live
    @rule(pick=picks, how=routes, to=st.sampled_from([*USERS, "zed"]), dup=st.integers(0, 4),
          now=times)
    def send(self, pick: int, how: str, to: str, dup: int, now: float) -> None:
        """Send a new message; or resend a cmid the sender used (from any of their
        sessions: a duplicate), one another user used (not one), or cmid 0 (invalid)."""
        sid = self.pick(pick)
        epoch, node = self.route(sid, how)
        s = self.sessions.get(sid)
        mine = self.sent_by.get(s.user, {}) if s else {}
        others = sorted(c for u, d in self.sent_by.items() if s and u != s.user for c in d)
        if dup == 0 and mine:
            cmid = sorted(mine)[-1]
        elif dup == 1 and others:
            cmid = others[0] if others[0] not in mine else 0
        elif dup == 2:
            cmid = 0
        else:
            self.cmids += 1
            cmid = self.cmids
        result, effects = self.apply(Send(sid, epoch, node, cmid, to, f"b{cmid}", now))
        if not self.expect_owned(sid, epoch, node, result):
            return
        assert s is not None
        if cmid in mine:
            assert result == Result(True, {"id": mine[cmid], "duplicate": True})
            assert effects == [[]] * len(LOCALS)
            return
        if cmid < 1:
            assert result.code == "invalid"
            assert effects == [[]] * len(LOCALS)
            return
        cap = self.limits[3]
        if cap and len(self.mailbox.get(to, {})) >= cap:
            assert result.code == "mailbox-full" and effects == [[]] * len(LOCALS)
            return
        seq = self.next_seq.get(to, 1)
        assert result == Result(True, {"id": self.next_id, "seq": seq})
        self.mailbox.setdefault(to, {})[seq] = self.next_id
        self.sent_by.setdefault(s.user, {})[cmid] = self.next_id
        self.next_seq[to] = seq + 1
        self.next_id += 1
        self.sent += 1
        for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
            expected = sorted(x for x, o in self.sessions.items()
                              if o.user == to and (o.node, o.inc) == loc)
            if expected:
                (d,) = eff
                assert isinstance(d, Deliver)
                assert sorted(d.sessions) == expected
                assert (d.message.seq, d.message.sender, d.message.to) == (seq, s.user, to)
            else:
                assert eff == []

    @live
    @rule(pick=picks, how=routes, data=st.data())
    def ack(self, pick: int, how: str, data: st.DataObject) -> None:
        """Acknowledge some mailbox seqs (and some that do not exist)."""
        sid = self.pick(pick)
        epoch, node = self.route(sid, how)
        s = self.sessions.get(sid)
        box = self.mailbox.get(s.user, {}) if s else {}
        seqs = data.draw(st.lists(st.sampled_from(sorted(box)) if box else st.integers(1, 5),
                                  max_size=4))
        seqs += data.draw(st.lists(st.integers(0, 9), max_size=2))
        result, effects = self.apply(Ack(sid, epoch, node, seqs))
        assert effects == [[]] * len(LOCALS)
        if self.expect_owned(sid, epoch, node, result):
            removed = len(set(seqs) & set(box))
            assert result == Result(True, {"acked": removed})
            for q in seqs:
                box.pop(q, None)
            self.acked += removed

    # --- cluster housekeeping ---------------------------------------------------------

    def node_up_model(self, node: str, inc: int, raft: str = "") -> None:
        """The model's NodeUp: a new incarnation orphans the older one's sessions."""
        info = self.nodes.get(node)
        if info is not None and (info.inc == inc or inc in info.retired):
            if info.inc == inc and raft:
                info.raft = raft
            return
        retired = [*info.retired, info.inc][-RETIRED_INCARNATIONS:] if info else []
        self.nodes[node] = MNode(inc, self.clock, retired=retired,
                                 raft=raft or (info.raft if info else ""))
        if self.tick_bound > 0:
            self.queue_node(node)
            return
        for s in self.sessions.values():
            if s.node == node and s.inc != inc and s.attached:
                self.orphan(s, "conn")

    @rule(kind=st.sampled_from(["beat"] * 3 + ["revive"] * 2
                               + ["up", "down", "down-other", "join", "leave", "leave-old",
                                  "leave-raft"]),
          node=st.sampled_from(["n1", "n1", "n2", "n3"]), retired=st.integers(0, 4),
          beat=st.integers(0, 100))
    def node_event(self, kind: str, node: str, retired: int, beat: int) -> None:
        """A heartbeat (sometimes from a retired incarnation, or from a node thought
        silent: "revive"), a restart, or a shutdown."""
        if kind == "revive":
            node = next((n for n in sorted(self.nodes) if self.nodes[n].down), node)
        if kind in ("beat", "revive"):
            self.heartbeat(node, retired, beat)
        elif kind in ("join", "leave", "leave-old", "leave-raft"):
            self.join_or_leave(node, kind == "join", bounded=kind != "leave-old",
                               by_raft=kind == "leave-raft")
        elif kind == "up":
            self.node_up(node)
        else:
            self.node_down(node, kind == "down")

    def join_or_leave(self, node: str, join: bool, bounded: bool, by_raft: bool) -> None:
        """An operator adds a node, or removes one (a dead one by the Raft address
        its NodeUp named, if any did): its sessions are orphaned (by the next
        ticks if they are bounded, unless the Leave predates the field)."""
        name = RAFT[node] if by_raft else node
        result, effects = self.apply(Join(node) if join else Leave(name, int(bounded)))
        if by_raft:
            found = [(i.seen, n) for n, i in self.nodes.items() if i.raft == name]
            node = max(found)[1] if found else name
        assert result == Result(True, {"joined" if join else "left": node})
        assert effects == [[]] * len(LOCALS)
        if join:
            self.joined.add(node)
            return
        self.joined.discard(node)
        info = self.nodes.get(node)
        if info is not None:
            info.down = info.gone = True
            if bounded:  # its incarnation retired: its heartbeats are refused
                info.retired = [*info.retired, info.inc][-RETIRED_INCARNATIONS:]
                info.inc = 0
                if self.tick_bound > 0:
                    self.queue_node(node)
                    return
        for s in self.sessions.values():
            if s.node == node and s.attached:
                self.orphan(s, "conn")

    def node_up(self, node: str) -> None:
        """Node restarts with a new incarnation (n1 may reach incarnation 2, 3, ...)."""
        self.incs[node] += 1
        result, effects = self.apply(NodeUp(node, self.incs[node], RAFT[node]))
        assert result == Result(True, {}) and effects == [[]] * len(LOCALS)
        self.node_up_model(node, self.incs[node], RAFT[node])

    def node_down(self, node: str, current: bool) -> None:
        """A clean shutdown of the current (or of another) incarnation."""
        inc = self.incs[node] if current else self.incs[node] + 7
        result, effects = self.apply(NodeDown(node, inc))
        assert result == Result(True, {}) and effects == [[]] * len(LOCALS)
        info = self.nodes.get(node)
        if info is None or info.inc != inc:
            return
        info.down = info.gone = True
        if self.tick_bound > 0:
            self.queue_node(node)
            return
        for s in self.sessions.values():
            if s.node == node and s.inc == inc and s.attached:
                self.orphan(s, "conn")

    def heartbeat(self, node: str, retired: int, beat: int) -> None:
        """A node's heartbeat; re-attaches what its silence orphaned."""
        info = self.nodes.get(node)
        inc = self.incs[node]
        if retired == 0 and info and info.retired:
            inc = info.retired[-1]
        result, effects = self.apply(Heartbeat(node, inc, beat))
        assert effects == [[]] * len(LOCALS)
        if info is None or info.inc != inc:
            if info is not None and inc in info.retired:
                assert result.code == "retired"
                return
            self.node_up_model(node, inc)
            info = self.nodes[node]
        assert result == Result(True, {})
        info.seen = self.clock
        if info.down:
            info.down = info.gone = False
            if self.tick_bound > 0:
                self.queue_node(node)
                return
            for s in self.sessions.values():
                if s.node == node and s.inc == inc and not s.attached and s.reason == "node":
                    s.attached, s.orphaned_at, s.reason = True, None, None

    @rule(elapsed=st.sampled_from([5.0, 2.5, 60.0, 1.0, 0.0, -1.0]),
          grace=st.sampled_from([2.0, 6.0, 15.0]), node_timeout=st.sampled_from([3.0, 8.0]),
          now=st.floats(0.0, 100.0), max_sessions=st.sampled_from([0, 0, 1, 2]))
    def tick(self, elapsed: float, grace: float, node_timeout: float, now: float,
             max_sessions: int) -> None:
        """The leader's clock: silent nodes' sessions are orphaned, old orphans expire
        (bounded ticks: at most ``max_sessions`` orphaned or re-attached, from a
        queue, and as many expired, oldest first by (orphaned_at, id), the ties of
        the last one queued; a session whose re-attach is queued does not expire)."""
        result, effects = self.apply(Tick(now, elapsed, grace, node_timeout, max_sessions))
        self.clock += min(elapsed if elapsed > 0 else 0.0, MAX_TICK_STEP)
        self.wall = max(self.wall, now)
        self.tick_bound = max(max_sessions, 0)
        for name in sorted(self.nodes):
            info = self.nodes[name]
            if not info.down and self.clock - info.seen > node_timeout:
                info.down = True
                if self.tick_bound > 0:
                    self.queue_node(name)
                    continue
                for s in self.sessions.values():
                    if s.node == name and s.inc == info.inc and s.attached:
                        self.orphan(s, "node")
        if self.sync:
            room = max_sessions if max_sessions > 0 else len(self.sessions) + 1
            taken = done = looked = 0
            while taken < len(self.sync) and done < room and looked < 4 * room:
                node, index = self.sync[taken]
                taken += 1
                part = [sid for sid, s in self.sessions.items() if s.node == node
                        and zlib.crc32(sid.encode()) % NODE_PARTS == index]
                looked += len(part)
                for sid in part:
                    if self.sync_session(self.sessions[sid]):
                        done += 1
            del self.sync[:taken]

        def is_due(s: MSession) -> bool:
            return (not s.attached and s.orphaned_at is not None
                    and self.clock - s.orphaned_at >= grace)

        room = max_sessions if max_sessions > 0 else len(self.sessions) + len(self.queue)
        due: list[str] = []
        taken = 0
        while taken < len(self.queue) and len(due) < room and taken < 4 * room:
            sid = self.queue[taken]
            taken += 1
            s = self.sessions.get(sid)
            if s is not None and is_due(s) and not self.awaits_reattach(s):
                due.append(sid)
        del self.queue[:taken]
        if not self.queue and len(due) < room:
            left = room - len(due)
            oldest = sorted((s.orphaned_at, sid) for sid, s in self.sessions.items()
                            if is_due(s) and sid not in due)
            if len(oldest) > left:
                self.queue = [sid for at, sid in oldest[left:] if at == oldest[left - 1][0]]
            due += [sid for _, sid in oldest[:left]
                    if not self.awaits_reattach(self.sessions[sid])]
        assert result == Result(True, {"expired": len(due)})
        pre = {sid: (self.sessions[sid].node, self.sessions[sid].inc) for sid in due}
        for sid in due:
            self.remove(sid, self.wall)
        self.expired += len(due)
        for loc, eff in zip(LOCALS[1:], effects[1:], strict=True):
            closed = sorted(e.session for e in eff if isinstance(e, SessionClosed))
            assert closed == sorted(sid for sid in due if pre[sid] == loc)
            assert all(e.reason == "expired" for e in eff if isinstance(e, SessionClosed))

    @rule(limits=st.sampled_from([(2, 1, 2, 3), (1, 2, 1, 2), (0, 0, 0, 0),
                                  (16, 5000, 5000, 10_000)]))
    def configure(self, limits: tuple[int, int, int, int]) -> None:
        """Tighten, lift (0) or restore the per-user limits."""
        assert self.apply(Configure(*limits)) == (Result(True, {}), [[]] * len(LOCALS))
        self.limits = limits

    @rule()
    def restore_twin(self) -> None:
        """Replace the twin by a restore of the main replica's snapshot."""
        self.twin = SessionTable(local=LOCALS[1])
        self.twin.restore(self.main.snapshot())

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def replicas_agree(self) -> None:
        """Every replica, and the restored twin, has the same digest."""
        digests = {r.digest() for r in self.replicas}
        assert len(digests) == 1
        assert self.twin.digest() in digests

    @invariant()
    def snapshot_round_trips(self) -> None:
        """snapshot → restore → snapshot gives the same bytes and statistics."""
        fresh = SessionTable()
        data = self.main.snapshot()
        fresh.restore(data)
        assert fresh.snapshot() == data
        assert fresh.digest() == self.main.digest()
        assert fresh.statistics() == self.main.statistics()

    @invariant()
    def mailbox_accounting(self) -> None:
        """Mailbox counters are exact and mailboxes match the model."""
        st_ = self.main.statistics()
        in_boxes = sum(len(u.mailbox) for u in self.main.users.values())
        assert st_.mailbox_messages == in_boxes == self.sent - self.acked
        for user, box in self.mailbox.items():
            u = self.main.users.get(user)
            got = {q: m.id for q, m in u.mailbox.items()} if u else {}
            assert got == box
        assert (st_.messages_sent, st_.messages_acked) == (self.sent, self.acked)

    @invariant()
    def sessions_match_the_model(self) -> None:
        """Sessions, orphans, counters and local sessions match the model."""
        t = self.main
        assert set(t.sessions) == set(self.sessions)
        for sid, m in self.sessions.items():
            s = t.sessions[sid]
            assert (s.user, s.node, s.inc, s.epoch, s.attached, s.orphan_reason) == (
                m.user, m.node, m.inc, m.epoch, m.attached, m.reason)
        st_ = t.statistics()
        assert st_.orphaned == sum(not m.attached for m in self.sessions.values())
        assert set(t.orphans) == {sid for sid, m in self.sessions.items() if not m.attached}
        assert t.expiring == self.queue
        assert t.node_sync == self.sync
        assert (st_.logins, st_.resumed, st_.expired) == (self.logins, self.resumed,
                                                          self.expired)
        for loc, r in zip(LOCALS, self.replicas, strict=True):
            expected = sorted((sid, m.epoch) for sid, m in self.sessions.items()
                              if loc is not None and (m.node, m.inc) == loc
                              and (m.attached or m.reason == "node"))
            assert sorted(r.local_sessions()) == expected
        for user, sent in self.sent_by.items():
            assert t.users[user].sent == sent
        assert t.joined == self.joined

    @invariant()
    def node_index_matches_the_sessions(self) -> None:
        """Every replica's node index holds exactly its sessions, each in its part,
        with the right count per node, and no node without sessions."""
        for r in (*self.replicas, self.twin):
            want: dict[str, list[set[str]]] = {}
            for sid, s in r.sessions.items():
                parts = want.setdefault(s.node, [set() for _ in range(NODE_PARTS)])
                parts[zlib.crc32(sid.encode()) % NODE_PARTS].add(sid)
            assert r.node_parts == want
            assert r.node_sessions == {n: sum(map(len, p)) for n, p in want.items()}

    @invariant()
    def nodes_match_the_model(self) -> None:
        """What the table knows of each node (incarnation, retired ones, down, gone,
        Raft address) is what the model says."""
        got = {n: (i.inc, i.retired, i.down, i.gone, i.raft)
               for n, i in self.main.nodes.items()}
        assert got == {n: (i.inc, i.retired, i.down, i.gone, i.raft)
                       for n, i in self.nodes.items()}

    @invariant()
    def presence_is_consistent(self) -> None:
        """Each user shows the aggregate of their sessions (offline iff none)."""
        t = self.main
        for user in {*USERS, *t.users}:
            status, text, last_seen = t.presence_of(user)
            has_sessions = any(m.user == user for m in self.sessions.values())
            assert (status == "offline") == (not has_sessions)
            assert (status, text) == self.aggregate(user)
            assert last_seen == self.last_seen.get(user)
            u = t.users.get(user)
            if u is not None:
                assert u.shown == (status, text), "a presence change was not announced"

    @invariant()
    def visibility_matches_the_model(self) -> None:
        """allowed/subs/subscribers match the model."""
        for name, u in self.main.users.items():
            assert u.allowed == self.allowed.get(name, set())
            assert u.subs == self.subs.get(name, set())
            assert u.subscribers == {w for w, s in self.subs.items() if name in s}


TableMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, derandomize=False,
)
TestTableMachine = TableMachine.TestCase
