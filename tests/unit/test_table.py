"""Behaviour of the replicated session table: sessions, presence, visibility,
messages, resume, expiry, node liveness, and determinism across replicas."""

from __future__ import annotations

import math
import random
from typing import Any

import cbor2
import pytest

from replication.commands import (
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
    Noop,
    Resume,
    Revoke,
    Send,
    SetPresence,
    Subscribe,
    Tick,
    Unsubscribe,
    from_wire,
)
from replication.table import (
    MAX_TICK_STEP,
    NODE_PARTS,
    RECENT_SENDS,
    RECENT_SENDS_MAX,
    Deliver,
    Effect,
    Limits,
    PresenceNotice,
    Result,
    SessionClosed,
    SessionTable,
)

H = b"resume-hash"
LOCAL = ("n1", 1)
Applied = tuple[Result, list[Effect]]


def login(t: SessionTable, sid: str, user: str, node: str = "n1", inc: int = 1,
          status: str = "online", text: str | None = None, now: float = 1.0) -> Applied:
    return t.apply(Login(sid, user, node, inc, H, status, text, now))


def presence(t: SessionTable, sid: str, status: str, text: str | None = None,
             now: float = 2.0) -> Applied:
    s = t.sessions[sid]
    return t.apply(SetPresence(sid, s.epoch, s.node, status, text, now))


def on(t: SessionTable, cls: type[Command], sid: str, *args: Any) -> Applied:
    """Apply a session command with the session's current epoch and node."""
    s = t.sessions[sid]
    return t.apply(cls(sid, s.epoch, s.node, *args))


def send(t: SessionTable, sid: str, cmid: int, to: str, body: str | bytes = "hi",
         now: float = 3.0) -> Applied:
    return on(t, Send, sid, cmid, to, body, now)


def tick(t: SessionTable, elapsed: float, now: float = 100.0, grace: float = 30.0,
         node_timeout: float = 10.0) -> Applied:
    return t.apply(Tick(now, elapsed, grace, node_timeout))


def notices(effects: list[Effect]) -> list[PresenceNotice]:
    return [e for e in effects if isinstance(e, PresenceNotice)]


def delivers(effects: list[Effect]) -> list[Deliver]:
    return [e for e in effects if isinstance(e, Deliver)]


@pytest.fixture
def t() -> SessionTable:
    return SessionTable(local=LOCAL)


@pytest.fixture
def watched(t: SessionTable) -> SessionTable:
    """alice (a1 on n2) is watched by bob (n1: subscribed and allowed), carol (n1:
    subscribed, not allowed), dave (n2: subscribed and allowed), erin (n1: allowed only)."""
    login(t, "a1", "alice", node="n2", text="hello")
    for sid, user, node in [("b1", "bob", "n1"), ("c1", "carol", "n1"),
                            ("d1", "dave", "n2"), ("e1", "erin", "n1")]:
        login(t, sid, user, node=node)
    for viewer in ("bob", "dave", "erin"):
        assert on(t, Allow, "a1", viewer)[0].ok
    for sid in ("b1", "c1", "d1"):
        assert on(t, Subscribe, sid, "alice")[0].ok
    return t


# --- login and presence -------------------------------------------------------


def test_login_creates_a_session_and_the_user_goes_online(t: SessionTable) -> None:
    """A login opens an attached local session at epoch 1 and shows the user online."""
    assert t.presence_of("alice") == ("offline", None, None)
    result, effects = login(t, "s1", "alice", status="busy", text="coding")
    assert result == Result(True, {"epoch": 1, "user": "alice"})
    assert effects == []
    assert t.presence_of("alice") == ("busy", "coding", None)
    assert t.local_sessions() == [("s1", 1)]
    st = t.statistics()
    assert (st.sessions, st.attached, st.orphaned, st.users, st.logins) == (1, 1, 0, 1, 1)


def test_login_retry_is_idempotent(t: SessionTable) -> None:
    """A retried login of the same session gives the same answer and no effects."""
    first = login(t, "s1", "alice")
    digest = t.digest()
    assert login(t, "s1", "alice", now=9.0) == (first[0], [])
    assert t.digest() == digest


def test_login_with_a_taken_session_id_conflicts(t: SessionTable) -> None:
    """Another user (or token) cannot take an existing session id."""
    login(t, "s1", "alice")
    assert login(t, "s1", "bob")[0].code == "conflict"
    other = t.apply(Login("s1", "alice", "n1", 1, b"other", "online", None, 1.0))[0]
    assert other.code == "conflict"


@pytest.mark.parametrize(
    ("user", "status", "text"),
    [("", "online", None), ("x" * 65, "online", None), ("bad\nname", "online", None),
     ("alice", "offline", None), ("alice", "unknown", None), ("alice", "online", "t" * 257)],
)
def test_login_rejects_invalid_fields(t: SessionTable, user: str, status: str,
                                      text: str | None) -> None:
    """Bad user names, statuses and over-long texts are refused without a trace."""
    before = t.digest()
    result, effects = login(t, "s1", user, status=status, text=text)
    assert result.code == "invalid" and effects == []
    assert t.digest() == before


def test_login_notifies_allowed_subscribers_on_this_node_only(watched: SessionTable) -> None:
    """Watchers that are subscribed AND allowed, on the local node, get a notice."""
    t = watched
    on(t, Logout, "a1", 5.0)
    _, effects = login(t, "a2", "alice", node="n2", status="away", text="back", now=6.0)
    assert effects == [PresenceNotice(["b1"], "alice", "away", "back", 5.0)]


def test_presence_change_reaches_only_allowed_local_subscribers(watched: SessionTable) -> None:
    """carol (not allowed), dave (remote) and erin (not subscribed) get nothing."""
    t = watched
    _, effects = presence(t, "a1", "busy", "call")
    assert effects == [PresenceNotice(["b1"], "alice", "busy", "call", None)]


def test_every_local_session_of_a_watcher_is_notified(watched: SessionTable) -> None:
    """A watcher user with several sessions on this node has all of them notified."""
    t = watched
    login(t, "b2", "bob", node="n1")
    login(t, "b3", "bob", node="n2")
    _, effects = presence(t, "a1", "away")
    (notice,) = notices(effects)
    assert sorted(notice.sessions) == ["b1", "b2"]


def test_a_table_without_local_identity_has_no_effects(watched: SessionTable) -> None:
    """local=None: the same state, never an effect."""
    t0 = SessionTable()
    t0.restore(watched.snapshot())
    assert presence(t0, "a1", "busy") == (Result(True, {}), [])
    presence(watched, "a1", "busy")
    assert t0.digest() == watched.digest()


def test_aggregate_rank_online_over_busy_over_away(t: SessionTable) -> None:
    """The user shows the best status among their sessions: online > busy > away."""
    login(t, "s1", "alice", status="away", text="a", now=10.0)
    assert t.presence_of("alice")[:2] == ("away", "a")
    login(t, "s2", "alice", status="busy", text="b", now=1.0)
    assert t.presence_of("alice")[:2] == ("busy", "b")
    login(t, "s3", "alice", status="online", text="o", now=0.5)
    assert t.presence_of("alice")[:2] == ("online", "o")
    presence(t, "s3", "away", "a3", now=20.0)
    assert t.presence_of("alice")[:2] == ("busy", "b")


def test_aggregate_tie_goes_to_the_most_recent_update(t: SessionTable) -> None:
    """Among sessions of equal rank the latest update wins, and its text with it."""
    login(t, "s1", "alice", text="one", now=1.0)
    login(t, "s2", "alice", text="two", now=2.0)
    assert t.presence_of("alice")[:2] == ("online", "two")
    presence(t, "s1", "online", "uno", now=3.0)
    assert t.presence_of("alice")[:2] == ("online", "uno")
    presence(t, "s1", "online", None, now=4.0)
    assert t.presence_of("alice")[:2] == ("online", None)


def test_aggregate_full_tie_survives_snapshot_restore(t: SessionTable) -> None:
    """Equal rank and update time: a restored replica shows the same, and stays equal."""
    login(t, "s2", "alice", text="first", now=1.0)
    login(t, "s1", "alice", text="second", now=1.0)
    r = SessionTable(local=LOCAL)
    r.restore(t.snapshot())
    assert r.presence_of("alice") == t.presence_of("alice")
    for cmd in [Login("s3", "alice", "n1", 1, H, "away", None, 0.5),
                SetPresence("s3", 1, "n1", "busy", "x", 0.7),
                Logout("s3", 1, "n1", 0.9)]:
        assert r.apply(cmd)[0] == t.apply(cmd)[0]
        assert r.digest() == t.digest()


def test_unchanged_aggregate_announces_nothing(watched: SessionTable) -> None:
    """A lower status on a second session does not change what watchers see."""
    t = watched
    login(t, "a2", "alice", node="n2", status="away", now=5.0)
    updates = t.statistics().presence_updates
    _, effects = presence(t, "a2", "busy", now=6.0)
    assert effects == []
    assert t.statistics().presence_updates == updates


def test_set_presence_validates(t: SessionTable) -> None:
    """Statuses outside STATUSES and over-long texts are refused."""
    login(t, "s1", "alice")
    assert presence(t, "s1", "offline")[0].code == "invalid"
    assert presence(t, "s1", "online", "x" * 257)[0].code == "invalid"
    assert t.presence_of("alice")[:2] == ("online", None)


def test_limits_are_configurable() -> None:
    """Limits decide name and text lengths."""
    t = SessionTable(limits=Limits(max_name=3, max_text=2))
    assert login(t, "s1", "abcd")[0].code == "invalid"
    assert login(t, "s1", "abc", text="xyz")[0].code == "invalid"
    assert login(t, "s1", "abc", text="xy")[0].ok


# --- visibility ------------------------------------------------------------------


def test_subscribe_reports_visibility(t: SessionTable) -> None:
    """subscribe's result says whether the other user lets us see them."""
    login(t, "a1", "alice", node="n2")
    login(t, "b1", "bob")
    result, effects = on(t, Subscribe, "b1", "alice")
    assert result == Result(True, {"visible": False})
    assert effects == [PresenceNotice(["b1"], "alice", "unknown", None, None)]
    on(t, Allow, "a1", "carol")
    login(t, "c1", "carol")
    result, effects = on(t, Subscribe, "c1", "alice")
    assert result == Result(True, {"visible": True})
    assert effects == [PresenceNotice(["c1"], "alice", "online", None, None)]


def test_subscribe_to_an_offline_user_shows_last_seen(t: SessionTable) -> None:
    """An allowed viewer subscribing to an offline user sees offline and last_seen."""
    login(t, "a1", "alice", node="n2")
    on(t, Allow, "a1", "bob")
    on(t, Logout, "a1", 42.0)
    login(t, "b1", "bob")
    _, effects = on(t, Subscribe, "b1", "alice")
    assert effects == [PresenceNotice(["b1"], "alice", "offline", None, 42.0)]


def test_subscribe_to_an_unknown_user(t: SessionTable) -> None:
    """Subscribing to a never-seen user works, invisible; unsubscribing forgets them."""
    login(t, "b1", "bob")
    result, _ = on(t, Subscribe, "b1", "ghost")
    assert result.value == {"visible": False}
    assert "ghost" in t.users
    on(t, Unsubscribe, "b1", "ghost")
    assert "ghost" not in t.users


def test_allow_after_subscribe_sends_current_presence(t: SessionTable) -> None:
    """Allowing an existing subscriber shows them the current presence at once."""
    login(t, "a1", "alice", node="n2", status="busy", text="call")
    login(t, "b1", "bob")
    login(t, "b2", "bob")
    on(t, Subscribe, "b1", "alice")
    result, effects = on(t, Allow, "a1", "bob")
    assert result.ok
    (notice,) = effects
    assert isinstance(notice, PresenceNotice)
    assert sorted(notice.sessions) == ["b1", "b2"]
    assert (notice.user, notice.status, notice.text) == ("alice", "busy", "call")
    assert on(t, Allow, "a1", "bob") == (Result(True, {}), [])  # already allowed


def test_allow_without_subscription_sends_nothing(t: SessionTable) -> None:
    """Allowing someone who does not subscribe has no effect to deliver."""
    login(t, "a1", "alice")
    login(t, "b1", "bob")
    assert on(t, Allow, "a1", "bob") == (Result(True, {}), [])
    assert on(t, Allow, "a1", "")[0].code == "invalid"


def test_revoke_sends_unknown_and_stops_notices(watched: SessionTable) -> None:
    """Revoking a subscriber tells them "unknown"; later changes no longer reach them."""
    t = watched
    result, effects = on(t, Revoke, "a1", "bob")
    assert result.ok
    assert effects == [PresenceNotice(["b1"], "alice", "unknown", None, None)]
    assert presence(t, "a1", "away")[1] == []
    assert on(t, Revoke, "a1", "bob") == (Result(True, {}), [])  # no longer allowed


def test_unsubscribe_stops_notices(watched: SessionTable) -> None:
    """An unsubscribed viewer is no longer told."""
    t = watched
    assert on(t, Unsubscribe, "b1", "alice") == (Result(True, {}), [])
    assert presence(t, "a1", "away")[1] == []


def test_visibility_is_per_user_not_per_session(watched: SessionTable) -> None:
    """bob's subscription made in b1 also covers his later sessions."""
    t = watched
    _, effects = login(t, "b9", "bob")
    assert effects == [PresenceNotice(["b9"], "alice", "online", "hello", None)]


# --- messages ----------------------------------------------------------------------


def test_send_assigns_per_recipient_seq_and_global_ids(t: SessionTable) -> None:
    """Sequence numbers count per recipient, ids across the table."""
    for sid, user in [("a1", "alice"), ("c1", "carol")]:
        login(t, sid, user, node="n2")
    assert send(t, "a1", 1, "bob")[0].value == {"id": 1, "seq": 1}
    assert send(t, "c1", 1, "bob")[0].value == {"id": 2, "seq": 2}
    assert send(t, "a1", 2, "carol")[0].value == {"id": 3, "seq": 1}
    assert send(t, "a1", 3, "bob")[0].value == {"id": 4, "seq": 3}
    st = t.statistics()
    assert (st.messages_sent, st.mailbox_messages) == (4, 4)


def test_send_delivers_to_every_local_session_of_the_recipient(t: SessionTable) -> None:
    """All of the recipient's sessions on this node get the message, remote ones not."""
    login(t, "a1", "alice", node="n2")
    for sid, node in [("b1", "n1"), ("b2", "n1"), ("b3", "n2")]:
        login(t, sid, "bob", node=node)
    _, effects = send(t, "a1", 1, "bob", b"\x00bin", now=7.5)
    (d,) = effects
    assert isinstance(d, Deliver)
    assert sorted(d.sessions) == ["b1", "b2"]
    m = d.message
    assert (m.id, m.seq, m.sender, m.to, m.body, m.ts) == (1, 1, "alice", "bob", b"\x00bin", 7.5)


def test_send_without_local_recipient_session_has_no_effect(t: SessionTable) -> None:
    """A recipient connected elsewhere (or nowhere) gets nothing from this node."""
    login(t, "a1", "alice")
    login(t, "b1", "bob", node="n2")
    assert send(t, "a1", 1, "bob")[1] == []
    assert send(t, "a1", 2, "nobody")[1] == []


def test_mailbox_is_delivered_in_order_at_next_login(t: SessionTable) -> None:
    """Messages sent while the recipient was offline arrive when they log in."""
    login(t, "a1", "alice", node="n2")
    for cmid, body in enumerate(["one", "two", "three"], start=1):
        send(t, "a1", cmid, "bob", body)
    _, effects = login(t, "b1", "bob")
    got = delivers(effects)
    assert [d.sessions for d in got] == [["b1"]] * 3
    assert [(d.message.seq, d.message.body) for d in got] == [(1, "one"), (2, "two"),
                                                              (3, "three")]


def test_ack_removes_from_the_mailbox(t: SessionTable) -> None:
    """Acked messages are gone; unknown or repeated seqs count nothing."""
    login(t, "a1", "alice", node="n2")
    login(t, "b1", "bob")
    for cmid in (1, 2, 3):
        send(t, "a1", cmid, "bob", f"m{cmid}")
    assert on(t, Ack, "b1", [1, 3, 3, 99])[0].value == {"acked": 2}
    assert on(t, Ack, "b1", [1])[0].value == {"acked": 0}
    st = t.statistics()
    assert (st.mailbox_messages, st.messages_acked, st.messages_sent) == (1, 2, 3)
    assert list(t.users["bob"].mailbox) == [2]
    _, effects = login(t, "b2", "bob")
    assert [d.message.body for d in delivers(effects)] == ["m2"]


def test_ack_of_too_many_seqs_is_refused(t: SessionTable) -> None:
    """At most Limits.max_acks seqs per ack."""
    login(t, "b1", "bob")
    assert on(t, Ack, "b1", list(range(1025)))[0].code == "invalid"
    assert on(t, Ack, "b1", list(range(1024)))[0].ok


def test_messages_from_one_sender_keep_their_order(t: SessionTable) -> None:
    """Per sender→recipient, deliveries follow the send order, with increasing seqs."""
    login(t, "a1", "alice", node="n2")
    login(t, "c1", "carol", node="n2")
    login(t, "b1", "bob")
    got: list[Deliver] = []
    for i in range(1, 11):
        got += delivers(send(t, "a1", i, "bob", f"a{i}")[1])
        got += delivers(send(t, "c1", i, "bob", f"c{i}")[1])
    from_alice = [d.message for d in got if d.message.sender == "alice"]
    assert [m.body for m in from_alice] == [f"a{i}" for i in range(1, 11)]
    seqs = [m.seq for m in from_alice]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10


def test_send_dedupe_by_cmid(t: SessionTable) -> None:
    """A resent cmid returns the first id with duplicate=True and changes nothing."""
    login(t, "a1", "alice", node="n2")
    login(t, "b1", "bob")
    first, effects = send(t, "a1", 5, "bob")
    assert first.value == {"id": 1, "seq": 1} and len(effects) == 1
    digest = t.digest()
    assert send(t, "a1", 5, "bob", "other body") == (
        Result(True, {"id": 1, "duplicate": True}), [])
    assert send(t, "a1", 5, "carol") == (Result(True, {"id": 1, "duplicate": True}), [])
    assert t.digest() == digest
    assert t.statistics().mailbox_messages == 1
    # A cmid never used is a new message, below the highest one or not.
    assert send(t, "a1", 3, "bob")[0].value == {"id": 2, "seq": 2}
    assert send(t, "a1", 6, "bob")[0].value == {"id": 3, "seq": 3}


def test_send_dedupe_is_per_user_across_sessions(t: SessionTable) -> None:
    """The same cmid from another session of the sender is a duplicate (a re-send
    after failover); from another user it is a new message."""
    login(t, "a1", "alice")
    login(t, "a2", "alice", node="n2")
    login(t, "c1", "carol")
    assert send(t, "a1", 7, "bob")[0].value == {"id": 1, "seq": 1}
    assert send(t, "a2", 7, "bob")[0].value == {"id": 1, "duplicate": True}
    assert send(t, "c1", 7, "bob")[0].value == {"id": 2, "seq": 2}


def test_send_dedupe_survives_resume_and_logout(t: SessionTable) -> None:
    """The dedupe memory belongs to the user: it survives a resume and a new login."""
    login(t, "a1", "alice")
    assert send(t, "a1", 1, "bob")[0].value == {"id": 1, "seq": 1}
    t.apply(Resume("a1", H, "n2", 1, 0, "c1", 2.0))
    assert send(t, "a1", 1, "bob")[0].value == {"id": 1, "duplicate": True}
    on(t, Logout, "a1", 3.0)
    login(t, "a9", "alice")
    assert send(t, "a9", 1, "bob")[0].value == {"id": 1, "duplicate": True}


def test_send_dedupe_remembers_recent_sends_only(t: SessionTable) -> None:
    """At least the user's latest RECENT_SENDS cmids are remembered, at most
    RECENT_SENDS_MAX: the oldest are dropped in one go."""
    login(t, "a1", "alice")
    for cmid in range(1, RECENT_SENDS_MAX + 1):
        send(t, "a1", cmid, "bob")
    assert len(t.users["alice"].sent) == RECENT_SENDS_MAX
    assert send(t, "a1", 1, "bob")[0].value == {"id": 1, "duplicate": True}
    n = RECENT_SENDS_MAX + 1
    assert send(t, "a1", n, "bob")[0].value == {"id": n, "seq": n}
    assert list(t.users["alice"].sent) == list(range(n - RECENT_SENDS + 1, n + 1))
    first = n - RECENT_SENDS + 1
    assert send(t, "a1", first, "bob")[0].value == {"id": first, "duplicate": True}
    assert send(t, "a1", first - 1, "bob")[0].value == {"id": n + 1, "seq": n + 1}


@pytest.mark.parametrize("cmid", [0, -1])
def test_send_cmid_must_be_positive(t: SessionTable, cmid: int) -> None:
    """cmid 0 or below is refused."""
    login(t, "a1", "alice")
    assert send(t, "a1", cmid, "bob")[0].code == "invalid"
    assert t.statistics().messages_sent == 0


def test_refused_send_does_not_consume_the_cmid(t: SessionTable) -> None:
    """A too-large or misaddressed send can be retried with the same cmid; the body
    limit counts UTF-8 bytes."""
    t = SessionTable(local=LOCAL, limits=Limits(max_body=4))
    login(t, "a1", "alice")
    assert send(t, "a1", 1, "bob", "12345")[0].code == "too-large-body"
    assert send(t, "a1", 1, "bob", "ééé")[0].code == "too-large-body"  # 6 bytes
    assert send(t, "a1", 1, "bob", b"12345")[0].code == "too-large-body"
    assert send(t, "a1", 1, "")[0].code == "invalid"
    assert send(t, "a1", 1, "bob", "éé")[0].value == {"id": 1, "seq": 1}


def test_send_to_self_is_delivered_locally(t: SessionTable) -> None:
    """A user may message themselves; their own local sessions get it."""
    login(t, "a1", "alice")
    login(t, "a2", "alice")
    (d,) = send(t, "a1", 1, "alice")[1]
    assert isinstance(d, Deliver) and sorted(d.sessions) == ["a1", "a2"]


# --- resume, ownership --------------------------------------------------------------


def test_resume_errors(t: SessionTable) -> None:
    """A wrong token is "bad-token", an unknown session "no-session"; nothing changes."""
    login(t, "s1", "alice")
    digest = t.digest()
    assert t.apply(Resume("s1", b"wrong", "n2", 1, 0, "c", 2.0)) == (
        Result(False, None, "bad-token", "wrong resume token"), [])
    assert t.apply(Resume("zz", H, "n2", 1, 0, "c", 2.0))[0].code == "no-session"
    assert t.digest() == digest


def test_resume_moves_the_session_and_closes_the_old_owner(t: SessionTable) -> None:
    """Resume bumps the epoch, changes the owner; the old local owner is closed at
    the OLD epoch and the new owner's table gets the session's view."""
    login(t, "s1", "alice")
    t2 = SessionTable(local=("n2", 1))
    t2.restore(t.snapshot())
    cmd = Resume("s1", H, "n2", 1, 0, "claim-1", 2.0)
    result, effects = t.apply(cmd)
    assert result == Result(True, {"epoch": 2, "user": "alice"})
    assert effects == [SessionClosed("s1", 1, "moved")]
    s = t.sessions["s1"]
    assert (s.node, s.inc, s.epoch, s.attached) == ("n2", 1, 2, True)
    assert t.local_sessions() == []
    assert t2.apply(cmd) == (result, [])
    assert t2.local_sessions() == [("s1", 2)]
    assert t.statistics().resumed == 1


def test_resume_redelivers_only_messages_after_last_seq(t: SessionTable) -> None:
    """The resuming node delivers mailbox messages with seq > last_seq, in order."""
    login(t, "a1", "alice", node="n2")
    login(t, "b1", "bob", node="n2")
    for cmid in range(1, 5):
        send(t, "a1", cmid, "bob", f"m{cmid}")
    s = t.sessions["b1"]
    t.apply(Ack("b1", s.epoch, "n2", [1]))
    _, effects = t.apply(Resume("b1", H, "n1", 1, 2, "claim", 3.0))
    got = delivers(effects)
    assert [(d.sessions, d.message.seq) for d in got] == [(["b1"], 3), (["b1"], 4)]


def test_resume_sends_visible_contacts_presence(watched: SessionTable) -> None:
    """The resumed session hears the presence of the contacts it may see."""
    t = watched
    on(t, Subscribe, "b1", "carol")  # carol does not allow bob
    _, effects = t.apply(Resume("b1", H, "n1", 1, 0, "again", 3.0))
    assert effects[0] == SessionClosed("b1", 1, "moved")
    assert notices(effects) == [PresenceNotice(["b1"], "alice", "online", "hello", None)]


def test_retried_resume_with_the_same_claim_is_idempotent(t: SessionTable) -> None:
    """The same claim again returns the same epoch, bumps nothing and has no effects."""
    login(t, "s1", "alice")
    send(t, "s1", 1, "alice")
    cmd = Resume("s1", H, "n1", 1, 0, "claim-1", 2.0)
    first = t.apply(cmd)
    assert first[0].value == {"epoch": 2, "user": "alice"}
    assert first[1]  # SessionClosed + redelivery
    digest = t.digest()
    assert t.apply(cmd) == (first[0], [])
    assert t.digest() == digest
    assert t.statistics().resumed == 1
    assert t.apply(Resume("s1", H, "n1", 1, 0, "claim-2", 3.0))[0].value["epoch"] == 3  # type: ignore[index]
    # An empty claim is never taken as a retry.
    assert t.apply(Resume("s1", H, "n1", 1, 0, "", 3.0))[0].value["epoch"] == 4  # type: ignore[index]
    assert t.apply(Resume("s1", H, "n1", 1, 0, "", 3.0))[0].value["epoch"] == 5  # type: ignore[index]


def test_a_late_resume_attempt_does_not_take_the_session_back(t: SessionTable) -> None:
    """A client resumes on n2 (attempt 1), gives up waiting and resumes on n3
    (attempt 2), which commits first; attempt 1 committing afterwards is refused as
    stale: the session stays with n3's connection, which gets no "moved"."""
    login(t, "s1", "alice")
    assert t.apply(Resume("s1", H, "n3", 1, 0, "claim-b", 2.0, 2))[0].value == {
        "epoch": 2, "user": "alice"}
    digest = t.digest()
    result, effects = t.apply(Resume("s1", H, "n2", 1, 0, "claim-a", 2.5, 1))
    assert (result.ok, result.code, effects) == (False, "stale", [])
    assert t.digest() == digest
    s = t.sessions["s1"]
    assert (s.node, s.epoch, s.attempt) == ("n3", 2, 2)
    # The same attempt number again is stale too; a later one takes over as usual.
    assert t.apply(Resume("s1", H, "n2", 1, 0, "claim-c", 3.0, 2))[0].code == "stale"
    result, _ = t.apply(Resume("s1", H, "n2", 1, 0, "claim-d", 3.0, 3))
    assert result.ok and (t.sessions["s1"].node, t.sessions["s1"].epoch) == ("n2", 3)
    # Unnumbered resumes (attempt 0) are not ordered.
    assert t.apply(Resume("s1", H, "n3", 1, 0, "claim-e", 4.0))[0].ok


def test_snapshot_keeps_resume_attempts_and_reads_v2(t: SessionTable) -> None:
    login(t, "s1", "alice")
    t.apply(Resume("s1", H, "n3", 1, 0, "claim-b", 2.0, 7))
    copy = SessionTable()
    copy.restore(t.snapshot())
    assert copy.sessions["s1"].attempt == 7 and copy.digest() == t.digest()
    state = cbor2.loads(t.snapshot())
    state["v"] = 2
    state["sessions"] = [row[:-1] for row in state["sessions"]]
    old = SessionTable()
    old.restore(cbor2.dumps(state))
    assert old.sessions["s1"].attempt == 0 and old.sessions["s1"].epoch == 2


def test_resume_reattaches_an_orphan_without_presence_change(watched: SessionTable) -> None:
    """Detach then resume: the session is attached again, watchers hear nothing."""
    t = watched
    on(t, Detach, "a1")
    result, effects = t.apply(Resume("a1", H, "n2", 1, 0, "c", 4.0))
    assert result.ok
    assert notices(effects) == []
    assert t.statistics().orphaned == 0 and t.sessions["a1"].attached


def _session_commands(sid: str, epoch: int, node: str) -> list[Command]:
    return [
        Detach(sid, epoch, node),
        Logout(sid, epoch, node, 9.0),
        SetPresence(sid, epoch, node, "away", None, 9.0),
        Allow(sid, epoch, node, "bob"),
        Revoke(sid, epoch, node, "bob"),
        Subscribe(sid, epoch, node, "bob"),
        Unsubscribe(sid, epoch, node, "bob"),
        Send(sid, epoch, node, 1, "bob", "x", 9.0),
        Ack(sid, epoch, node, [1]),
    ]


@pytest.mark.parametrize("index", range(9), ids=lambda i: _session_commands("s", 1, "n")[i].op)
def test_stale_epoch_or_wrong_node_is_moved(t: SessionTable, index: int) -> None:
    """Session commands with an old epoch or from another node get "moved"; unknown
    sessions get "no-session"; none of them changes the state."""
    login(t, "s1", "alice")
    t.apply(Resume("s1", H, "n1", 1, 0, "c", 2.0))  # now epoch 2 on n1
    digest = t.digest()
    for cmd in [_session_commands("s1", 1, "n1")[index],
                _session_commands("s1", 2, "n2")[index],
                _session_commands("s1", 3, "n1")[index]]:
        assert t.apply(cmd) == (Result(False, None, "moved",
                                       "the session was resumed on another connection"), [])
    assert t.apply(_session_commands("nope", 1, "n1")[index])[0].code == "no-session"
    assert t.digest() == digest
    assert t.apply(_session_commands("s1", 2, "n1")[index])[0].ok


# --- detach, logout, expiry ----------------------------------------------------------


def test_detach_orphans_without_presence_flap(watched: SessionTable) -> None:
    """A lost connection keeps the user's presence: no notice, no presence update."""
    t = watched
    updates = t.statistics().presence_updates
    assert on(t, Detach, "b1") == (Result(True, {}), [])
    assert on(t, Detach, "a1") == (Result(True, {}), [])
    assert on(t, Detach, "a1") == (Result(True, {}), [])  # again: no change
    assert t.presence_of("alice")[:2] == ("online", "hello")
    st = t.statistics()
    assert (st.orphaned, st.presence_updates) == (2, updates)
    assert ("b1", 1) not in t.local_sessions()
    assert t.sessions["a1"].orphan_reason == "conn"


def test_logout_ends_the_session(watched: SessionTable) -> None:
    """Logout closes the local session, and the last one takes the user offline."""
    t = watched
    login(t, "b2", "bob")
    result, effects = on(t, Logout, "b2", 7.0)
    assert (result, effects) == (Result(True, {}), [SessionClosed("b2", 1, "logout")])
    _, effects = on(t, Logout, "a1", 8.0)
    assert effects == [PresenceNotice(["b1"], "alice", "offline", None, 8.0)]
    assert t.presence_of("alice") == ("offline", None, 8.0)
    assert "a1" not in t.sessions


def test_tick_expires_orphans_only_after_grace(watched: SessionTable) -> None:
    """Expiry follows the table clock (sum of tick steps), not the wall time in now."""
    t = watched
    on(t, Detach, "a1")
    assert tick(t, 5.0, now=1e9, grace=10.0)[0].value == {"expired": 0}
    assert tick(t, 4.9, now=2e9, grace=10.0)[0].value == {"expired": 0}
    assert "a1" in t.sessions
    result, effects = tick(t, 0.1, now=3e9, grace=10.0)
    assert result.value == {"expired": 1}
    assert effects == [PresenceNotice(["b1"], "alice", "offline", None, 3e9)]
    assert t.presence_of("alice") == ("offline", None, 3e9)
    st = t.statistics()
    assert (st.expired, st.orphaned, st.sessions) == (1, 0, 4)
    assert t.clock == pytest.approx(10.0)


def test_tick_closes_an_expired_local_session(t: SessionTable) -> None:
    """An expiring session owned by this node is closed with reason "expired"."""
    login(t, "s1", "alice")
    on(t, Detach, "s1")
    _, effects = tick(t, 5.0, grace=5.0)
    assert effects == [SessionClosed("s1", 1, "expired")]


def test_tick_step_is_capped(t: SessionTable) -> None:
    """A tick advances the clock at most MAX_TICK_STEP, so a jump expires nothing."""
    login(t, "s1", "alice", node="n2")
    on(t, Detach, "s1")
    tick(t, 1e6, grace=MAX_TICK_STEP * 2)
    assert t.clock == MAX_TICK_STEP
    assert "s1" in t.sessions
    tick(t, 1e6, grace=MAX_TICK_STEP * 2)
    assert "s1" not in t.sessions


@pytest.mark.parametrize("elapsed", [-5.0, -math.inf, math.nan, 0.0])
def test_tick_never_moves_the_clock_back_or_poisons_it(t: SessionTable, elapsed: float) -> None:
    """Negative, zero and NaN steps leave the clock as it was."""
    tick(t, 2.0)
    tick(t, elapsed)
    assert t.clock == 2.0
    login(t, "s1", "alice", node="n2")
    on(t, Detach, "s1")
    assert tick(t, 1.0, grace=5.0)[0].value == {"expired": 0}


def test_last_seen_uses_the_latest_wall_time(t: SessionTable) -> None:
    """A tick whose wall time goes back does not move last-seen times back."""
    login(t, "s1", "alice", node="n2")
    tick(t, 1.0, now=500.0)
    on(t, Detach, "s1")
    tick(t, 5.0, now=400.0, grace=1.0)
    assert t.presence_of("alice") == ("offline", None, 500.0)
    assert t.wall == 500.0


def test_expiry_of_one_of_several_sessions_keeps_the_user_online(watched: SessionTable) -> None:
    """The user stays online while another session lives; watchers hear the new best."""
    t = watched
    login(t, "a2", "alice", node="n2", status="away", text="phone", now=5.0)
    on(t, Detach, "a1")
    _, effects = tick(t, 5.0, grace=1.0)
    assert effects == [PresenceNotice(["b1"], "alice", "away", "phone", None)]


def test_expiry_order_does_not_depend_on_detach_order() -> None:
    """Orphans of the same instant expire in a canonical order: a replica restored
    from a snapshot (orphans sorted) reaches the same state as the original."""
    for order in (["x", "y"], ["y", "x"]):
        t = SessionTable(local=LOCAL)
        login(t, "x", "u", status="away")
        login(t, "y", "u", status="online")
        for sid in order:
            on(t, Detach, sid)
        r = SessionTable(local=LOCAL)
        r.restore(t.snapshot())
        rt, rr = tick(t, 5.0, grace=1.0), tick(r, 5.0, grace=1.0)
        assert rt[0] == rr[0]
        assert t.digest() == r.digest()
        assert t.statistics().presence_updates == r.statistics().presence_updates


def _orphaned_together(order: list[str]) -> SessionTable:
    """Sessions of ``order`` (users u0.., local) detached in that order at one instant."""
    t = SessionTable(local=LOCAL)
    for i, sid in enumerate(sorted(order)):
        login(t, sid, f"u{i}")
    for sid in order:
        on(t, Detach, sid)
    return t


def test_a_bounded_tick_expires_the_oldest_and_queues_their_ties() -> None:
    """``max_sessions`` bounds one tick's expiries: the oldest by (orphaned_at, id)
    go first, the ties of the last one wait in a queue that later ticks drain
    first (skipping a session resumed meanwhile), then orphans are scanned again."""
    t = _orphaned_together(["s3", "s1", "s4", "s0", "s2"])
    tick(t, 2.0)
    login(t, "s5", "u5")
    on(t, Detach, "s5")  # orphaned 2 s after the others
    result, effects = t.apply(Tick(100.0, 2.5, 4.0, 1000.0, 2))
    assert result == Result(True, {"expired": 2})
    assert [(e.session, e.reason) for e in effects if isinstance(e, SessionClosed)] == [
        ("s0", "expired"), ("s1", "expired")]
    assert sorted(t.sessions) == ["s2", "s3", "s4", "s5"]
    assert t.expiring == ["s2", "s3", "s4"]
    assert t.apply(Resume("s3", H, "n1", 1, 0, "c", 4.0))[0].ok
    assert t.apply(Tick(100.0, 0.5, 4.0, 1000.0, 2))[0] == Result(True, {"expired": 2})
    assert sorted(t.sessions) == ["s3", "s5"] and t.expiring == []
    assert t.apply(Tick(100.0, 0.5, 4.0, 1000.0, 2))[0] == Result(True, {"expired": 0})
    assert t.apply(Tick(100.0, 1.0, 4.0, 1000.0, 2))[0] == Result(True, {"expired": 1})
    assert sorted(t.sessions) == ["s3"] and t.statistics().expired == 5


def test_a_legacy_tick_expires_every_due_session_and_drains_the_queue() -> None:
    """A tick from a log written before ``max_sessions`` (four fields on the wire)
    decodes with no bound: everything due expires, queued or not."""
    legacy = from_wire(["tick", 100.0, 0.5, 4.0, 1000.0])
    assert legacy == Tick(100.0, 0.5, 4.0, 1000.0, 0)
    t = _orphaned_together(["s2", "s0", "s1", "s3"])
    assert t.apply(Tick(100.0, 5.0, 4.0, 1000.0, 1))[0].value == {"expired": 1}
    assert t.expiring == ["s1", "s2", "s3"]
    assert t.apply(legacy)[0].value == {"expired": 3}
    assert t.sessions == {} and t.expiring == [] and t.statistics().orphaned == 0


def test_bounded_expiry_is_the_same_on_live_and_restored_replicas() -> None:
    """Orphans detached in different orders (a live replica keeps insertion order, a
    restored one is sorted) expire in the same order, and a replica restored while
    the queue is not empty goes on exactly as the original."""
    detach_orders = (["s4", "s1", "s3", "s0", "s2"], ["s0", "s1", "s2", "s3", "s4"])
    live = [_orphaned_together(order) for order in detach_orders]
    restored = SessionTable(local=LOCAL)
    restored.restore(live[0].snapshot())
    replicas = [*live, restored]
    first = Tick(100.0, 5.0, 4.0, 1000.0, 2)
    assert {r.apply(first)[0].value["expired"] for r in replicas} == {2}
    assert {r.digest() for r in replicas} == {live[0].digest()}
    midway = SessionTable(local=LOCAL)
    midway.restore(live[1].snapshot())
    assert midway.expiring == ["s2", "s3", "s4"]
    replicas.append(midway)
    for _ in range(2):
        results = [r.apply(Tick(100.0, 0.5, 4.0, 1000.0, 2)) for r in replicas]
        assert all(out == results[0] for out in results)
        assert results[0][1], "the sessions are local: their closes are effects"
        assert len({r.digest() for r in replicas}) == 1
    assert all(r.sessions == {} for r in replicas)


def _node_with_sessions(n: int) -> SessionTable:
    """n2 (incarnation 1), the only node the table knows, holds sessions s0..s{n-1}."""
    t = SessionTable(local=LOCAL)
    t.apply(Heartbeat("n2", 1, 1))
    for i in range(n):
        login(t, f"s{i}", f"u{i}", node="n2")
    return t


def _bounded_tick(t: SessionTable, elapsed: float, bound: int = 2, grace: float = 4.0) -> int:
    result = t.apply(Tick(100.0, elapsed, grace, 3.0, bound))[0]
    assert result.ok
    return int(result.value["expired"])


def _orphaned(t: SessionTable) -> list[str]:
    return sorted(sid for sid, s in t.sessions.items() if not s.attached)


def test_a_bounded_tick_orphans_a_silent_node_sessions_a_few_at_a_time() -> None:
    """The tick that finds a node silent queues the node's NODE_PARTS parts (by the
    CRC-32 of the id: s2 in part 10, s3 28, s0 38, s1 48, s4 63) and takes whole
    parts until ``max_sessions`` sessions changed; the next ticks go on. When the
    node speaks again, its orphaned sessions are re-attached the same way, and
    those still queued to be orphaned are left alone."""
    t = _node_with_sessions(5)
    _bounded_tick(t, 4.0)  # n2 silent for 4 s > 3
    assert t.nodes["n2"].down and _orphaned(t) == ["s2", "s3"]
    assert t.node_sync == [("n2", part) for part in range(29, NODE_PARTS)]
    _bounded_tick(t, 0.5)
    assert _orphaned(t) == ["s0", "s1", "s2", "s3"]
    assert {t.sessions[sid].orphan_reason for sid in _orphaned(t)} == {"node"}
    assert t.apply(Heartbeat("n2", 1, 2))[0].ok  # before s4's turn: it stays attached
    assert not t.nodes["n2"].down and _orphaned(t) == ["s0", "s1", "s2", "s3"]
    assert t.node_sync == [("n2", p) for p in [*range(49, NODE_PARTS), *range(49)]]
    _bounded_tick(t, 0.5)  # s4 needs nothing; s2 and s3 are re-attached
    assert _orphaned(t) == ["s0", "s1"]
    _bounded_tick(t, 0.5)
    assert _orphaned(t) == [] and t.node_sync == [] and t.statistics().orphaned == 0


def test_a_session_waiting_for_its_re_attach_does_not_expire() -> None:
    """A node that speaks again just before its sessions' grace runs out: those whose
    re-attach is still queued do not expire meanwhile."""
    t = _node_with_sessions(8)  # one session per part
    _bounded_tick(t, 4.0, bound=10)  # clock 4: all eight orphaned at once
    assert len(_orphaned(t)) == 8 and t.node_sync == []
    _bounded_tick(t, 0.5, bound=1)
    assert t.apply(Heartbeat("n2", 1, 2))[0].ok  # re-attach queued
    assert len(t.node_sync) == NODE_PARTS
    assert _bounded_tick(t, 2.5, bound=1) == 0
    t.apply(Heartbeat("n2", 1, 3))
    assert _bounded_tick(t, 1.5, bound=1) == 0  # clock 8.5: six past their grace
    assert len(_orphaned(t)) == 6 and t.statistics().expired == 0
    for beat in range(4, 10):
        t.apply(Heartbeat("n2", 1, beat))
        assert _bounded_tick(t, 0.5, bound=1) == 0
    assert _orphaned(t) == [] and len(t.sessions) == 8


def test_node_sync_is_the_same_on_live_and_restored_replicas() -> None:
    """A replica restored while sessions wait to be orphaned goes on exactly as the
    original; the queue is in snapshots."""
    t = _node_with_sessions(5)
    _bounded_tick(t, 4.0)
    copy = SessionTable(local=LOCAL)
    copy.restore(t.snapshot())
    assert copy.node_sync == t.node_sync != [] and copy.digest() == t.digest()
    for r in (t, copy):
        _bounded_tick(r, 0.5)
        r.apply(Heartbeat("n2", 1, 2))
        _bounded_tick(r, 0.5)
        assert _orphaned(r) == ["s0", "s1"]
    assert copy.digest() == t.digest() and copy.node_sync == t.node_sync


def test_a_restart_a_shutdown_and_a_removal_orphan_a_node_sessions_a_part_at_a_time(
) -> None:
    """Once ticks are bounded, a node's new incarnation (NodeUp), its clean
    shutdown (NodeDown) and its removal by an operator (Leave from the admin
    shell) queue its parts too: later ticks orphan its sessions, as "conn" (no
    re-attach by a heartbeat), a few at a time."""
    for event in (NodeUp("n2", 2), NodeDown("n2", 1), Leave("n2", bounded=1)):
        t = _node_with_sessions(5)
        _bounded_tick(t, 0.5)  # the bound is known from now on
        assert t.apply(event)[0].ok
        assert _orphaned(t) == [] and len(t.node_sync) == NODE_PARTS
        _bounded_tick(t, 0.5)
        assert _orphaned(t) == ["s2", "s3"]
        _bounded_tick(t, 0.5)
        _bounded_tick(t, 0.5)
        assert _orphaned(t) == ["s0", "s1", "s2", "s3", "s4"]
        assert {s.orphan_reason for s in t.sessions.values()} == {"conn"}


def test_unbounded_ticks_and_heartbeats_act_at_once_as_before() -> None:
    """Without a bound (a log written before ``max_sessions``), a silent node's
    sessions are all orphaned in the tick that finds it, and all re-attached by
    its next heartbeat."""
    t = _node_with_sessions(5)
    t.apply(from_wire(["tick", 100.0, 4.0, 4.0, 3.0]))
    assert len(_orphaned(t)) == 5 and t.node_sync == []
    t.apply(Heartbeat("n2", 1, 2))
    assert _orphaned(t) == [] and t.node_sync == []
    t.apply(NodeDown("n2", 1))
    assert len(_orphaned(t)) == 5 and t.node_sync == []


def test_a_leave_from_an_older_log_orphans_at_once_even_with_bounded_ticks() -> None:
    """A one-field Leave (written before ``Leave.bounded``) orphans every session
    of the node in its own entry, as the build that wrote it did, so a replica
    that replays it computes the same table as one that applied it then."""
    t = _node_with_sessions(5)
    _bounded_tick(t, 0.5)
    assert t.tick_bound > 0
    t.apply(from_wire(["leave", "n2"]))
    assert len(_orphaned(t)) == 5 and t.node_sync == []
    assert {s.orphan_reason for s in t.sessions.values()} == {"conn"}


def test_snapshots_keep_the_expiry_queue_and_read_v4(t: SessionTable) -> None:
    """The queues and the tick bound are in snapshots (v5); a v4 snapshot, which has
    none of them, reads as empty queues and no bound."""
    t = _orphaned_together(["s0", "s1", "s2"])
    t.apply(Tick(100.0, 5.0, 4.0, 1000.0, 1))
    state = cbor2.loads(t.snapshot())
    assert state["v"] == 5 and state["expiring"] == ["s1", "s2"]
    assert state["node_sync"] == [] and state["tick_bound"] == 1
    for key in ("expiring", "node_sync", "tick_bound"):
        del state[key]
    state["v"] = 4
    old = SessionTable()
    old.restore(cbor2.dumps(state))
    assert old.expiring == [] and sorted(old.orphans) == ["s1", "s2"]
    assert old.node_sync == [] and old.tick_bound == 0


# --- node liveness ---------------------------------------------------------------------


def test_silent_node_sessions_are_orphaned_then_reattached(watched: SessionTable) -> None:
    """No heartbeat for node_timeout of table clock orphans the node's sessions with
    reason "node" (no presence change); a later heartbeat re-attaches them."""
    t = watched
    t.apply(Heartbeat("n1", 1, 1))
    t.apply(Heartbeat("n2", 1, 1))
    for _ in range(3):
        tick(t, 5.0, node_timeout=12.0)
        t.apply(Heartbeat("n2", 1, 2))
    n1 = sorted(sid for sid, s in t.sessions.items() if s.node == "n1")
    assert all(not t.sessions[sid].attached for sid in n1)
    assert {t.sessions[sid].orphan_reason for sid in n1} == {"node"}
    assert all(s.attached for s in t.sessions.values() if s.node == "n2")
    assert t.presence_of("bob")[0] == "online"
    assert t.nodes["n1"].down
    assert t.apply(Heartbeat("n1", 1, 2)) == (Result(True, {}), [])
    assert all(t.sessions[sid].attached for sid in n1)
    assert not t.nodes["n1"].down and t.statistics().orphaned == 0


def test_heartbeats_keep_a_node_alive(t: SessionTable) -> None:
    """A node heard from within node_timeout keeps its sessions attached."""
    t.apply(NodeUp("n1", 1))
    login(t, "s1", "alice")
    for beat in range(20):
        tick(t, 5.0, node_timeout=6.0)
        t.apply(Heartbeat("n1", 1, beat))
    assert t.sessions["s1"].attached
    assert t.nodes["n1"].beat == 19


def test_silent_node_sessions_expire_after_grace(t: SessionTable) -> None:
    """Sessions of a node that stays silent expire after the grace window."""
    t.apply(Heartbeat("n2", 1, 1))
    login(t, "s1", "alice", node="n2")
    tick(t, 5.0, grace=9.0, node_timeout=4.0)  # clock 5: silent, orphaned at 5
    assert t.sessions["s1"].orphan_reason == "node"
    tick(t, 5.0, grace=9.0, node_timeout=4.0)  # clock 10: orphaned for 5 < 9
    assert "s1" in t.sessions
    tick(t, 5.0, grace=9.0, node_timeout=4.0)
    assert "s1" not in t.sessions


def test_detach_during_node_silence_prevents_reattach(t: SessionTable) -> None:
    """A session whose connection was lost while its node was silent is not revived
    by the node's next heartbeat: it stays orphaned and expires."""
    t.apply(Heartbeat("n1", 1, 1))
    login(t, "s1", "alice")
    login(t, "s2", "bob")
    tick(t, 5.0, node_timeout=3.0)
    assert t.sessions["s1"].orphan_reason == "node"
    on(t, Detach, "s1")
    t.apply(Heartbeat("n1", 1, 2))
    assert not t.sessions["s1"].attached
    assert t.sessions["s2"].attached
    tick(t, 5.0, grace=5.0, node_timeout=30.0)
    assert "s1" not in t.sessions and "s2" in t.sessions


def test_node_up_with_a_new_incarnation_orphans_the_old_one(t: SessionTable) -> None:
    """A restarted node's earlier sessions lose their connection and are orphaned."""
    t.apply(NodeUp("n1", 1))
    login(t, "old", "alice", inc=1)
    login(t, "other", "bob", node="n2")
    assert t.apply(NodeUp("n1", 2)) == (Result(True, {}), [])
    assert t.sessions["old"].orphan_reason == "conn"
    assert t.sessions["other"].attached
    login(t, "new", "carol", inc=2)
    assert t.apply(NodeUp("n1", 2)) == (Result(True, {}), [])  # the same: no-op
    assert t.apply(NodeUp("n1", 1)) == (Result(True, {}), [])  # retired: no-op
    assert t.nodes["n1"].inc == 2 and t.nodes["n1"].retired == [1]
    assert t.sessions["new"].attached
    t.apply(Heartbeat("n1", 2, 1))
    assert not t.sessions["old"].attached  # a heartbeat of the new one does not revive it


def test_heartbeat_from_a_retired_incarnation_is_refused(t: SessionTable) -> None:
    """Once a node restarted, its earlier incarnation's heartbeats change nothing."""
    t.apply(Heartbeat("n1", 1, 1))
    t.apply(Heartbeat("n1", 2, 1))  # a new incarnation announces itself by heartbeat
    assert t.nodes["n1"].retired == [1]
    digest = t.digest()
    result, effects = t.apply(Heartbeat("n1", 1, 5))
    assert (result.ok, result.code, effects) == (False, "retired", [])
    assert t.digest() == digest


def test_retired_incarnations_are_bounded(t: SessionTable) -> None:
    """Only the latest RETIRED_INCARNATIONS incarnations are remembered."""
    for inc in range(1, 40):
        t.apply(NodeUp("n1", inc))
    assert t.nodes["n1"].retired == list(range(23, 39))


def test_node_down_orphans_and_heartbeat_does_not_revive(t: SessionTable) -> None:
    """A clean shutdown orphans the node's sessions ("conn"); they wait for a resume."""
    t.apply(NodeUp("n1", 1))
    login(t, "s1", "alice")
    assert t.apply(NodeDown("n1", 7)) == (Result(True, {}), [])  # other incarnation
    assert t.sessions["s1"].attached
    assert t.apply(NodeDown("n1", 1)) == (Result(True, {}), [])
    assert t.sessions["s1"].orphan_reason == "conn"
    assert t.presence_of("alice")[0] == "online"
    t.apply(Heartbeat("n1", 1, 1))
    assert not t.sessions["s1"].attached
    assert t.apply(Resume("s1", H, "n2", 1, 0, "c", 5.0))[0].ok
    assert t.sessions["s1"].attached


def test_local_sessions_keep_node_orphans(t: SessionTable) -> None:
    """Sessions orphaned only because their node looked silent still have their
    connection there: they stay in local_sessions; connection orphans do not."""
    t.apply(Heartbeat("n1", 1, 1))
    login(t, "s1", "alice")
    login(t, "s2", "bob")
    on(t, Detach, "s2")
    tick(t, 5.0, node_timeout=3.0)
    assert t.sessions["s1"].orphan_reason == "node"
    assert t.local_sessions() == [("s1", 1)]


def test_leave_orphans_the_nodes_sessions(t: SessionTable) -> None:
    """An operator removing a node orphans all its sessions for good ("conn")."""
    assert t.apply(Join("n2")) == (Result(True, {"joined": "n2"}), [])
    assert t.joined == {"n2"}
    t.apply(Heartbeat("n2", 1, 1))
    login(t, "s1", "alice", node="n2")
    login(t, "s2", "bob", node="n1")
    assert t.apply(Leave("n2")) == (Result(True, {"left": "n2"}), [])
    assert t.joined == set() and t.nodes["n2"].down
    assert t.sessions["s1"].orphan_reason == "conn"
    assert t.sessions["s2"].attached
    assert t.presence_of("alice")[0] == "online"
    t.apply(Heartbeat("n2", 1, 2))
    assert not t.sessions["s1"].attached


def test_a_dead_node_can_be_removed_by_the_raft_address_its_node_up_named(
        t: SessionTable) -> None:
    """NodeUp names the node's Raft address, so that ``admin remove`` of a dead node,
    which the operator can name only by that address, finds its id (the latest seen
    node on that address); a heartbeat that came first, a restart logged without
    the field, snapshots and older snapshots' rows keep it right. A Leave written
    before ``Leave.bounded`` names what it names."""
    t.apply(Heartbeat("n2", 1, 1))
    t.apply(NodeUp("n2", 1, "10.0.0.2:7200"))
    t.apply(from_wire(["node-up", "n2", 3]))  # the older form: the address stays
    assert t.nodes["n2"].inc == 3 and t.nodes["n2"].raft == "10.0.0.2:7200"
    t.apply(NodeUp("n4", 1, "10.0.0.4:7200"))
    t.apply(Tick(1.0, 1.0, 60.0, 60.0))
    t.apply(NodeUp("n3", 1, "10.0.0.4:7200"))  # later, another node on n4's address
    r = SessionTable()
    r.restore(t.snapshot())
    assert r.nodes == t.nodes and r.digest() == t.digest()
    state = cbor2.loads(t.snapshot())
    for row in state["nodes"]:
        del row[7:]
    r.restore(cbor2.dumps(state))
    assert {i.raft for i in r.nodes.values()} == {""} and r.nodes["n2"].inc == 3
    assert t.apply(from_wire(["leave", "10.0.0.2:7200"]))[0].value == {"left": "10.0.0.2:7200"}
    assert not t.nodes["n2"].down
    assert t.apply(Leave("10.0.0.2:7200", bounded=1))[0].value == {"left": "n2"}
    assert t.nodes["n2"].down and t.nodes["n2"].gone
    assert t.apply(Leave("10.0.0.4:7200", bounded=1))[0].value == {"left": "n3"}
    assert t.apply(Leave("10.0.0.9:7200", bounded=1))[0].value == {"left": "10.0.0.9:7200"}


def test_a_removed_node_stays_removed() -> None:
    """After a Leave from the admin shell a heartbeat of the node's incarnation is
    refused (one in flight must not re-attach its sessions or keep those queued
    attached), and the next ticks orphan them all; a node unknown to the table
    (no NodeUp nor heartbeat) has its sessions orphaned at once."""
    t = _node_with_sessions(5)
    _bounded_tick(t, 0.5)
    assert t.apply(Leave("n2", bounded=1))[0].ok
    assert t.apply(Heartbeat("n2", 1, 9))[0].code == "retired"
    assert t.nodes["n2"].down and t.nodes["n2"].gone and 1 in t.nodes["n2"].retired
    for _ in range(4):
        _bounded_tick(t, 0.5)
    assert _orphaned(t) == ["s0", "s1", "s2", "s3", "s4"]
    assert {s.orphan_reason for s in t.sessions.values()} == {"conn"}
    login(t, "x1", "xena", node="n7")
    assert "n7" not in t.nodes
    assert t.apply(Leave("n7", bounded=1))[0].ok
    assert not t.sessions["x1"].attached


def test_joined_nodes_are_in_snapshots(t: SessionTable) -> None:
    """The set of joined nodes survives a snapshot/restore."""
    t.apply(Join("n3"))
    r = SessionTable()
    r.restore(t.snapshot())
    assert r.joined == {"n3"} and r.digest() == t.digest()


def test_configure_sets_per_user_limits(t: SessionTable) -> None:
    """Configure caps sessions per user, allow lists, subscriptions and mailboxes;
    a refused send keeps its cmid for a retry."""
    assert t.apply(Configure(2, 1, 1, 2)) == (Result(True, {}), [])
    login(t, "a1", "alice")
    login(t, "a2", "alice")
    assert login(t, "a3", "alice")[0].code == "limit"
    assert on(t, Allow, "a1", "bob")[0].ok
    assert on(t, Allow, "a1", "bob")[0].ok  # already there: not counted twice
    assert on(t, Allow, "a1", "carol")[0].code == "limit"
    assert on(t, Subscribe, "a1", "bob")[0].ok
    assert on(t, Subscribe, "a1", "carol")[0].code == "limit"
    login(t, "b1", "bob")
    assert send(t, "a1", 1, "bob")[0].ok and send(t, "a1", 2, "bob")[0].ok
    assert send(t, "a1", 3, "bob")[0].code == "mailbox-full"
    assert send(t, "a1", 2, "bob")[0].value == {"id": 2, "duplicate": True}
    on(t, Ack, "b1", [1])
    assert send(t, "a1", 3, "bob")[0].value == {"id": 3, "seq": 3}
    assert t.apply(Configure(0, 0, 0, 0))[0].ok  # 0 lifts a limit
    assert login(t, "a3", "alice")[0].ok


def test_configure_rejects_negative_limits_and_survives_snapshots(t: SessionTable) -> None:
    """Negative limits are invalid; the limits are part of the replicated state."""
    assert t.apply(Configure(1, -1, 1, 1))[0].code == "invalid"
    t.apply(Configure(1, 1, 1, 1))
    r = SessionTable()
    r.restore(t.snapshot())
    assert r.digest() == t.digest()
    login(r, "a1", "alice")
    assert login(r, "a2", "alice")[0].code == "limit"


def test_noop_changes_nothing(t: SessionTable) -> None:
    """Noop succeeds without effects or state change."""
    login(t, "s1", "alice")
    digest = t.digest()
    assert t.apply(Noop()) == (Result(True, {}), [])
    assert t.digest() == digest


# --- snapshots and determinism ------------------------------------------------------------


def test_restore_rejects_an_unknown_version(t: SessionTable) -> None:
    """A snapshot of another format version is refused."""
    with pytest.raises(ValueError, match="version"):
        t.restore(cbor2.dumps({"v": 99}))


def test_snapshot_is_canonical() -> None:
    """The same state reached in another order gives the same snapshot bytes."""
    a, b = SessionTable(), SessionTable(local=LOCAL)
    login(a, "s1", "alice")
    login(b, "s1", "alice")
    for other in ("bob", "carol", "dave"):
        on(a, Allow, "s1", other)
    for other in ("dave", "bob", "carol"):
        on(b, Allow, "s1", other)
    assert a.snapshot() == b.snapshot()
    assert a.digest() == b.digest()


def test_restore_replaces_the_whole_state(t: SessionTable) -> None:
    """Restoring an empty table's snapshot forgets everything."""
    empty = SessionTable().snapshot()
    login(t, "s1", "alice")
    send(t, "s1", 1, "bob")
    t.restore(empty)
    assert t.sessions == {} and t.users == {} and t.statistics().mailbox_messages == 0
    assert t.snapshot() == empty


USERS = ["alice", "bob", "carol", "dave"]
NODES = ["n1", "n2", "n3"]


def random_command(rng: random.Random, ref: SessionTable, step: int) -> Command:
    """A plausible next command given the reference table's state (mostly valid
    epochs, sometimes stale ones, sometimes garbage)."""
    sids = sorted(ref.sessions)
    roll = rng.random()
    now = float(step) + rng.choice([0.0, 0.0, 0.5])

    def incarnation(node: str) -> int:
        info = ref.nodes.get(node)
        return info.inc if info else 1

    if not sids or roll < 0.12:
        node = rng.choice(NODES)
        return Login(f"s{rng.randrange(12)}", rng.choice(USERS), node, incarnation(node), H,
                     rng.choice(["online", "away", "busy"]), rng.choice([None, "t1", "t2"]),
                     now)
    if roll < 0.2:
        return rng.choice([
            Tick(now * 10, rng.choice([0.5, 2.0, 7.0, 100.0]), rng.choice([3.0, 8.0]),
                 rng.choice([4.0, 9.0])),
            Heartbeat(n := rng.choice(NODES), incarnation(n), step),
            NodeUp(n2 := rng.choice(NODES), incarnation(n2) + rng.choice([0, 1])),
            NodeDown(n3 := rng.choice(NODES), incarnation(n3)),
            Join(rng.choice(NODES)),
            Leave(rng.choice(NODES)),
            Noop(),
        ])
    sid = rng.choice(sids)
    s = ref.sessions[sid]
    if roll < 0.28:
        node = rng.choice(NODES)
        token = H if rng.random() < 0.9 else b"bad"
        claim = rng.choice([s.claim, f"c{step}", ""])
        return Resume(sid, token, node, incarnation(node), rng.randrange(4), claim, now)
    epoch, node = s.epoch, s.node
    if rng.random() < 0.1:
        epoch, node = epoch - 1, rng.choice(NODES)
    other = rng.choice(USERS)
    kind = rng.randrange(9)
    if kind == 0:
        return Detach(sid, epoch, node)
    if kind == 1:
        return Logout(sid, epoch, node, now)
    if kind == 2:
        return SetPresence(sid, epoch, node, rng.choice(["online", "away", "busy"]),
                           rng.choice([None, "x", "y"]), rng.choice([now, 1.0]))
    if kind == 3:
        return Allow(sid, epoch, node, other)
    if kind == 4:
        return Revoke(sid, epoch, node, other)
    if kind == 5:
        return Subscribe(sid, epoch, node, other)
    if kind == 6:
        return Unsubscribe(sid, epoch, node, other)
    if kind == 7:
        sent = list(ref.users[s.user].sent)
        cmid = rng.choice(sent) if sent and rng.random() < 0.2 else max(sent, default=0) + 1
        return Send(sid, epoch, node, cmid, other, f"m{step}", now)
    mailbox = list(ref.users[s.user].mailbox)
    return Ack(sid, epoch, node, [*rng.sample(mailbox, min(len(mailbox), 2)), 999])


def normalized(effects: list[Effect]) -> list[Any]:
    """Effects with their session lists sorted (set iteration order is not state)."""
    out: list[Any] = []
    for e in effects:
        if isinstance(e, Deliver):
            out.append(("deliver", sorted(e.sessions), e.message))
        elif isinstance(e, PresenceNotice):
            out.append(("notice", sorted(e.sessions), e.user, e.status, e.text, e.last_seen))
        else:
            out.append(e)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_replicas_with_different_local_identities_agree(seed: int) -> None:
    """Two state machines joined by an in-memory log: the same commands (through
    the wire form) give the same results and digests whatever the local identity."""
    rng = random.Random(seed)
    replicas = [SessionTable(), SessionTable(local=("n1", 1)), SessionTable(local=("n2", 1))]
    log: list[bytes] = []
    for step in range(400):
        cmd = random_command(rng, replicas[0], step)
        log.append(cbor2.dumps(cmd.to_wire()))
        decoded = from_wire(cbor2.loads(log[-1]))
        results = [r.apply(decoded)[0] for r in replicas]
        assert results[0] == results[1] == results[2], (step, cmd)
        digests = {r.digest() for r in replicas}
        assert len(digests) == 1, (step, cmd)
    late = SessionTable(local=("n3", 1))  # a replica that replays the whole log later
    for entry in log:
        late.apply(from_wire(cbor2.loads(entry)))
    assert late.digest() == replicas[0].digest()
    assert replicas[0].statistics().mailbox_messages == sum(
        len(u.mailbox) for u in replicas[0].users.values())


@pytest.mark.parametrize("seed", range(8))
def test_snapshot_restore_gives_the_same_state_and_behaviour(seed: int) -> None:
    """A table restored from a snapshot has the same digest and, fed the same later
    commands, gives the same results, effects and digests as the original."""
    rng = random.Random(1000 + seed)
    original = SessionTable(local=("n1", 1))
    for step in range(200):
        original.apply(random_command(rng, original, step))
    restored = SessionTable(local=("n1", 1))
    restored.restore(original.snapshot())
    assert restored.digest() == original.digest()
    assert restored.snapshot() == original.snapshot()
    assert restored.statistics() == original.statistics()
    for step in range(200, 500):
        cmd = random_command(rng, original, step)
        ro, eo = original.apply(cmd)
        rr, er = restored.apply(cmd)
        assert ro == rr, (step, cmd)
        assert normalized(eo) == normalized(er), (step, cmd)
        assert original.digest() == restored.digest(), (step, cmd)


def test_restore_view_shows_local_sessions_their_mailboxes_and_contacts() -> None:
    """After a snapshot install, the node's attached sessions are shown every
    message in their mailboxes and their visible contacts' presence: the
    entries the snapshot covered were never applied there, so their
    deliveries were never produced."""
    leader = SessionTable(local=("n2", 1))
    login(leader, "b1", "bob", node="n1")  # bob's session lives on n1
    login(leader, "z1", "zoe", node="n2")
    login(leader, "o1", "olga", node="n1", inc=7)  # an older incarnation of n1
    assert on(leader, Allow, "z1", "bob")[0].ok
    assert on(leader, Subscribe, "b1", "zoe")[0].ok
    presence(leader, "z1", "busy", "in a call")
    send(leader, "z1", 1, "bob", "m1")
    send(leader, "z1", 2, "bob", "m2")
    send(leader, "z1", 3, "olga", "not for this incarnation")
    on(leader, Detach, "b1")  # detached sessions get nothing either...
    replica = SessionTable(local=("n1", 1))
    replica.restore(leader.snapshot())
    assert replica.restore_view() == []
    login(leader, "b2", "bob", node="n1")  # ...but bob's new attached session does
    replica.restore(leader.snapshot())
    view = replica.restore_view()
    assert [(d.sessions, d.message.seq, d.message.body) for d in delivers(view)] == [
        (["b2"], 1, "m1"), (["b2"], 2, "m2")]
    assert [(n.sessions, n.user, n.status, n.text) for n in notices(view)] == [
        (["b2"], "zoe", "busy", "in a call")]
    assert replica.digest() == leader.digest()  # a read: the state is unchanged
