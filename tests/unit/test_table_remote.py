"""``SessionTable.track_remote``: the leader learns which other nodes hold
sessions that the commands it applied have effects for, so that it tells only
those of a commit at once. Not replicated state: the snapshot and digest do not
change with it."""

from __future__ import annotations

from replication.commands import (
    Allow,
    Login,
    Logout,
    Noop,
    Resume,
    Send,
    SetPresence,
    Subscribe,
)
from replication.table import SessionTable

H = b"resume-hash"


def _table() -> SessionTable:
    """Leader n1; alice on n1, bob on n2 (subscribed to alice, allowed), carol on n3."""
    t = SessionTable(local=("n1", 1))
    t.apply(Login("a1", "alice", "n1", 1, H, "online", None, 1.0))
    t.apply(Login("b1", "bob", "n2", 1, H, "online", None, 1.0))
    t.apply(Login("c1", "carol", "n3", 1, H, "online", None, 1.0))
    t.apply(Allow("a1", 1, "n1", "bob"))
    t.apply(Subscribe("b1", 1, "n2", "alice"))
    t.track_remote = True
    t.remote_nodes.clear()
    return t


def test_a_message_marks_the_recipients_node() -> None:
    t = _table()
    t.apply(Send("a1", 1, "n1", 1, "bob", "hi", 2.0))
    assert t.remote_nodes == {"n2"}


def test_a_presence_change_marks_the_watchers_nodes() -> None:
    t = _table()
    t.apply(SetPresence("a1", 1, "n1", "away", None, 2.0))
    assert t.remote_nodes == {"n2"}


def test_a_session_closed_elsewhere_marks_its_node() -> None:
    t = _table()
    t.apply(Logout("c1", 1, "n3", 2.0))  # carol's own node proposed it: no watchers
    assert t.remote_nodes == {"n3"}
    t.remote_nodes.clear()
    res, _ = t.apply(Resume("b1", H, "n1", 1, 1, "claim", 3.0, 1))  # bob moves to n1
    assert res.ok, res
    assert "n2" in t.remote_nodes  # n2 closes bob's old connection


def test_commands_for_this_node_alone_mark_nothing() -> None:
    t = _table()
    t.apply(Noop())
    t.apply(Send("c1", 1, "n3", 1, "alice", "hi", 2.0))  # alice is on n1, the leader
    t.apply(SetPresence("c1", 1, "n3", "away", None, 2.0))  # nobody watches carol
    assert t.remote_nodes == set()


def test_without_tracking_nothing_is_marked_and_effects_are_the_same() -> None:
    tracked, plain = _table(), _table()
    plain.track_remote = False
    cmd = Send("a1", 1, "n1", 1, "bob", "hi", 2.0)
    assert tracked.apply(cmd) == plain.apply(cmd)
    assert plain.remote_nodes == set()
    assert tracked.snapshot() == plain.snapshot()
    assert tracked.digest() == plain.digest()
