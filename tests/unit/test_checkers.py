"""Unit tests for chaos.checker on small hand-built histories."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chaos.checker import (
    check_all,
    check_digests,
    check_messages,
    check_order,
    check_presence,
    check_sessions,
    client_ops,
    failover_times,
    faults,
    ops_summary,
    percentile,
    user_of,
)
from chaos.history import History, Op


class H:
    """A readable history builder; time advances 0.1 s per op unless ``at`` is given."""

    def __init__(self) -> None:
        self.h = History()
        self.t = 0.0
        self.fault_no = 0
        self.next_id = 100
        self.bodies: dict[str, int] = {}  # body -> id of its acked send

    def op(self, process: str, type_: str, f: str, value: dict[str, Any] | None = None,
           at: float | None = None) -> Op:
        if at is not None:
            self.t = at
        else:
            self.t = round(self.t + 0.1, 6)
        return self.h.record(process, type_, f, value, time=self.t)

    @property
    def ops(self) -> list[Op]:
        return self.h.ops

    # client ops
    def login(self, p: str, session: str = "s", node: str = "n1") -> H:
        user = user_of(p)
        self.op(p, "invoke", "login", {"user": user})
        self.op(p, "ok", "login", {"user": user, "session": f"{session}-{p}", "node": node})
        return self

    def send(self, p: str, to: str, body: str, result: str = "ok",
             mid: int | None = None) -> int | None:
        """Invoke and complete a send; returns the id for an ok send."""
        self.send_invoke(p, to, body)
        return self.send_complete(p, to, body, result, mid)

    def send_invoke(self, p: str, to: str, body: str) -> None:
        self.op(p, "invoke", "send", {"to": to, "body": body})

    def send_complete(self, p: str, to: str, body: str, result: str = "ok",
                      mid: int | None = None) -> int | None:
        if result == "ok":
            if mid is None:
                mid = self.next_id
                self.next_id += 1
            self.bodies[body] = mid
            self.op(p, "ok", "send", {"to": to, "body": body, "id": mid})
            return mid
        self.op(p, result, "send", {"to": to, "body": body, "error": "timeout"})
        return None

    def deliver(self, p: str, frm: str, body: str, mid: int | None = None,
                node: str = "n1", epoch: int = 1, to: str | None = None) -> H:
        if mid is None:
            mid = self.bodies.get(body, 999)
        self.op(p, "ok", "deliver", {"id": mid, "from": frm, "to": to or user_of(p),
                                     "body": body, "seq": mid, "node": node, "epoch": epoch})
        return self

    def presence(self, p: str, status: str, result: str = "ok") -> H:
        self.op(p, "invoke", "presence", {"status": status, "text": None})
        if result != "pending":
            self.op(p, result, "presence", {"status": status, "text": None})
        return self

    def allow(self, p: str, user: str, result: str = "ok") -> H:
        self.op(p, "invoke", "allow", {"user": user})
        self.op(p, result, "allow", {"user": user})
        return self

    def event(self, viewer_p: str, user: str, status: str, at: float | None = None) -> H:
        self.op(viewer_p, "ok", "presence-event",
                {"viewer": user_of(viewer_p), "user": user, "status": status, "text": None},
                at=at)
        return self

    def reconnect(self, p: str, session: str, node: str = "n2", resumed: bool = True,
                  epoch: int = 2, at: float | None = None) -> H:
        self.op(p, "ok", "reconnect", {"user": user_of(p), "session": session, "node": node,
                                       "resumed": resumed, "epoch": epoch}, at=at)
        return self

    # nemesis
    def fault(self, kind: str, at: float | None = None) -> int:
        self.fault_no += 1
        self.op("nemesis", "invoke", kind, {"nodes": ["n1"], "detail": None,
                                            "fault": self.fault_no}, at=at)
        return self.fault_no

    def heal(self, kind: str, number: int, at: float | None = None) -> H:
        self.op("nemesis", "info", kind, {"healed": True, "fault": number}, at=at)
        return self


def two_clients() -> H:
    b = H()
    b.login("c1").login("c2")
    return b


# --- helpers --------------------------------------------------------------------------------


def test_user_of() -> None:
    assert user_of("c3") == "u3"
    assert user_of("u3") == "u3"
    assert user_of("nemesis") == "nemesis"


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50.0
    assert percentile(xs, 99) == 99.0
    assert percentile(xs, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0


def test_client_ops_pairs_and_pending() -> None:
    b = two_clients()
    b.send_invoke("c1", "u2", "a")
    b.presence("c2", "away")
    b.send_complete("c1", "u2", "a")
    b.send_invoke("c1", "u2", "b")  # never completed
    ops = client_ops(b.ops)
    sends = [c for c in ops if c.f == "send"]
    assert [c.type for c in sends] == ["ok", "info"]
    assert sends[1].pending
    assert sends[0].value["id"] == 100


# --- 1. messages --------------------------------------------------------------------------


def test_messages_valid() -> None:
    b = two_clients()
    b.send("c1", "u2", "hello")
    b.send("c2", "u1", "back")
    b.deliver("c2", "u1", "hello").deliver("c1", "u2", "back")
    r = check_messages(b.ops)
    assert r.valid, r.anomalies
    assert (r.sends, r.acked, r.delivered) == (2, 2, 2)
    assert r.lost == r.duplicated == r.phantom == r.failed_but_delivered == 0
    assert r.anomalies == []


def test_messages_lost_acked_message() -> None:
    b = two_clients()
    b.send("c1", "u2", "hello")
    b.send("c1", "u2", "gone")
    b.deliver("c2", "u1", "hello")
    r = check_messages(b.ops)
    assert not r.valid
    assert r.lost == 1
    assert any("lost" in a and "101" in a for a in r.anomalies)


def test_messages_delivered_to_wrong_process_is_lost_and_misrouted() -> None:
    b = H()
    for p in ("c1", "c2", "c3"):
        b.login(p)
    b.send("c1", "u2", "hello")
    b.deliver("c3", "u1", "hello", to="u2")
    r = check_messages(b.ops)
    assert not r.valid
    assert r.lost == 1
    assert r.misrouted == 1


def test_messages_duplicated_delivery() -> None:
    b = two_clients()
    b.send("c1", "u2", "hello")
    b.deliver("c2", "u1", "hello").deliver("c2", "u1", "hello").deliver("c2", "u1", "hello")
    r = check_messages(b.ops)
    assert not r.valid
    assert r.duplicated == 1  # one message, delivered three times
    assert r.lost == 0
    assert any(a.startswith("duplicated") for a in r.anomalies)


def test_messages_phantom() -> None:
    b = two_clients()
    b.deliver("c2", "u1", "never sent", mid=555)
    r = check_messages(b.ops)
    assert not r.valid
    assert r.phantom == 1
    assert any("phantom" in a and "#" in a for a in r.anomalies)


def test_messages_failed_send_delivered() -> None:
    b = two_clients()
    b.send("c1", "u2", "nope", result="fail")
    b.deliver("c2", "u1", "nope", mid=123)
    r = check_messages(b.ops)
    assert not r.valid
    assert r.failed_sends == 1
    assert r.failed_but_delivered == 1
    assert r.phantom == 0


def test_messages_failed_send_not_delivered_is_fine() -> None:
    b = two_clients()
    b.send("c1", "u2", "nope", result="fail")
    r = check_messages(b.ops)
    assert r.valid
    assert r.failed_sends == 1 and r.failed_but_delivered == 0


def test_messages_info_sends_took_effect_or_not() -> None:
    b = two_clients()
    b.send("c1", "u2", "maybe-1", result="info")
    b.send("c1", "u2", "maybe-2", result="info")
    b.send_invoke("c1", "u2", "maybe-3")  # never completed: counts as info
    b.deliver("c2", "u1", "maybe-1", mid=200)
    b.deliver("c2", "u1", "maybe-3", mid=201)
    r = check_messages(b.ops)
    assert r.valid, r.anomalies
    assert r.info_sends == 3
    assert r.info_delivered == 2
    assert r.info_not_delivered == 1


def test_messages_info_body_to_other_recipient_does_not_count() -> None:
    b = H()
    for p in ("c1", "c2", "c3"):
        b.login(p)
    b.send("c1", "u2", "maybe", result="info")
    r = check_messages(b.ops)
    assert r.info_not_delivered == 1


def test_messages_corrupted_body() -> None:
    b = two_clients()
    mid = b.send("c1", "u2", "hello")
    b.deliver("c2", "u1", "HELLO", mid=mid)
    r = check_messages(b.ops)
    assert not r.valid
    assert r.corrupted == 1


def test_messages_anomalies_are_capped() -> None:
    b = two_clients()
    for i in range(30):
        b.send("c1", "u2", f"m{i}")
    r = check_messages(b.ops)
    assert r.lost == 30
    assert len(r.anomalies) == 21  # 20 examples and a note


# --- 2. order --------------------------------------------------------------------------------


def test_order_valid() -> None:
    b = two_clients()
    for body in ("a", "b", "c"):
        b.send("c1", "u2", body)
    b.send("c2", "u1", "x")
    for body in ("a", "b", "c"):
        b.deliver("c2", "u1", body)
    b.deliver("c1", "u2", "x")
    r = check_order(b.ops)
    assert r.valid
    assert r.pairs == 2 and r.checked == 4 and r.reordered == 0


def test_order_reordered_pair() -> None:
    b = two_clients()
    for body in ("a", "b", "c", "d"):
        b.send("c1", "u2", body)
    for body in ("b", "a", "c", "d"):
        b.deliver("c2", "u1", body)
    r = check_order(b.ops)
    assert not r.valid
    assert r.reordered == 1
    assert any("u1 -> u2" in a for a in r.anomalies)


def test_order_counts_each_inversion_once() -> None:
    b = two_clients()
    for body in ("a", "b", "c", "d"):
        b.send("c1", "u2", body)
    for body in ("d", "a", "b", "c"):
        b.deliver("c2", "u1", body)
    assert check_order(b.ops).reordered == 3


def test_order_ignores_unacked_and_other_senders() -> None:
    b = H()
    for p in ("c1", "c2", "c3"):
        b.login(p)
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "maybe", result="info")
    b.send("c1", "u2", "b")
    b.send("c3", "u2", "z")
    # the info send shows up late and c3's message is interleaved: all fine
    b.deliver("c2", "u3", "z").deliver("c2", "u1", "a").deliver("c2", "u1", "b")
    b.deliver("c2", "u1", "maybe", mid=300)
    r = check_order(b.ops)
    assert r.valid
    assert r.pairs == 2


def test_order_ignores_redeliveries() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b")
    b.deliver("c2", "u1", "a").deliver("c2", "u1", "b").deliver("c2", "u1", "a")
    assert check_order(b.ops).valid


# --- 3. presence -------------------------------------------------------------------------


def presence_base() -> H:
    b = two_clients()
    b.allow("c1", "u2")
    b.allow("c2", "u1")
    return b


def test_presence_valid_converged() -> None:
    b = presence_base()
    b.presence("c1", "away")
    b.presence("c1", "busy")
    b.event("c2", "u1", "away", at=5.0)
    b.event("c2", "u1", "offline", at=10.0)
    b.event("c2", "u1", "busy", at=21.0)
    b.event("c1", "u2", "online", at=21.5)  # c2 never set a status: online
    r = check_presence(b.ops, last_heal=20.0, bound=5.0)
    assert r.valid, r.anomalies
    assert r.pairs == 2
    assert r.mismatched == r.late == 0
    assert r.convergence_s == pytest.approx(1.5)


def test_presence_not_converged() -> None:
    b = presence_base()
    b.presence("c1", "away")
    b.presence("c1", "busy")
    b.event("c2", "u1", "away", at=21.0)
    r = check_presence(b.ops, last_heal=20.0, bound=5.0)
    assert not r.valid
    assert r.mismatched == 1 and r.late == 0
    assert any("mismatch" in a and "'away'" in a for a in r.anomalies)


def test_presence_offline_after_heal_is_a_mismatch() -> None:
    b = presence_base()
    b.event("c2", "u1", "offline", at=21.0)
    r = check_presence(b.ops, last_heal=20.0, bound=5.0)
    assert not r.valid and r.mismatched == 1


def test_presence_converged_too_late() -> None:
    b = presence_base()
    b.presence("c1", "away")
    b.event("c2", "u1", "away", at=30.0)
    r = check_presence(b.ops, last_heal=20.0, bound=5.0)
    assert not r.valid
    assert r.mismatched == 0 and r.late == 1
    assert r.convergence_s == pytest.approx(10.0)


def test_presence_info_op_status_is_acceptable() -> None:
    for status in ("away", "busy"):
        b = presence_base()
        b.presence("c1", "away")
        b.presence("c1", "busy", result="info")
        b.event("c2", "u1", status, at=21.0)
        assert check_presence(b.ops, last_heal=20.0, bound=5.0).valid, status


def test_presence_failed_op_status_is_not_acceptable() -> None:
    b = presence_base()
    b.presence("c1", "away")
    b.presence("c1", "busy", result="fail")
    b.event("c2", "u1", "busy", at=21.0)
    assert not check_presence(b.ops, last_heal=20.0, bound=5.0).valid


def test_presence_new_session_resets_to_online() -> None:
    b = presence_base()
    b.presence("c1", "away")
    b.reconnect("c1", "s-new", resumed=False, at=15.0)
    b.event("c2", "u1", "online", at=21.0)
    assert check_presence(b.ops, last_heal=20.0, bound=5.0).valid


def test_presence_login_after_lost_session_is_online() -> None:
    # the workload's shape: login ok, later an info login (the session was lost),
    # then a new login: the new session is online whatever the old status was
    b = presence_base()
    b.presence("c1", "away")
    b.op("c1", "info", "login", {"user": "u1", "error": "failed"})
    b.event("c2", "u1", "away", at=21.0)
    assert check_presence(b.ops, last_heal=20.0, bound=5.0).valid  # maybe still there
    b2 = presence_base()
    b2.presence("c1", "away")
    b2.op("c1", "info", "login", {"user": "u1", "error": "failed"})
    b2.event("c2", "u1", "offline", at=21.0)
    assert check_presence(b2.ops, last_heal=20.0, bound=5.0).valid  # or gone
    b2.login("c1")
    b2.event("c2", "u1", "away", at=22.0)
    r = check_presence(b2.ops, last_heal=20.0, bound=5.0)
    assert not r.valid and r.mismatched == 1  # logged in again: online


def test_presence_pending_login_may_be_online_or_offline() -> None:
    for status in ("online", "offline"):
        b = H()
        b.login("c2")
        b.op("c1", "invoke", "login", {"user": "u1"})
        b.event("c2", "u1", status, at=21.0)
        assert check_presence(b.ops, last_heal=20.0, bound=5.0).valid, status


def test_presence_unknown_only_when_not_allowed() -> None:
    b = two_clients()
    b.event("c2", "u1", "unknown", at=21.0)
    assert check_presence(b.ops, last_heal=20.0, bound=5.0).valid
    b = presence_base()
    b.event("c2", "u1", "unknown", at=21.0)
    assert not check_presence(b.ops, last_heal=20.0, bound=5.0).valid


def test_presence_change_after_heal_moves_the_deadline() -> None:
    b = presence_base()
    b.op("c1", "invoke", "presence", {"status": "away", "text": None}, at=40.0)
    b.op("c1", "ok", "presence", {"status": "away", "text": None}, at=40.1)
    b.event("c2", "u1", "away", at=41.0)
    r = check_presence(b.ops, last_heal=20.0, bound=5.0)
    assert r.valid, r.anomalies


def test_presence_no_events_is_vacuous() -> None:
    r = check_presence(presence_base().ops, last_heal=0.0, bound=1.0)
    assert r.valid and r.pairs == 0 and r.convergence_s == 0.0


# --- 4. sessions -------------------------------------------------------------------------


def test_sessions_valid() -> None:
    b = two_clients()
    for body in ("a", "b", "c", "d"):
        b.send("c1", "u2", body)
    b.deliver("c2", "u1", "a", node="n1", epoch=1)
    b.deliver("c2", "u1", "b", node="n1", epoch=1)
    b.reconnect("c2", "s-c2", node="n2", epoch=2)
    b.deliver("c2", "u1", "c", node="n2", epoch=2)
    b.reconnect("c2", "s-c2", node="n3", epoch=3)
    b.deliver("c2", "u1", "d", node="n3", epoch=3)
    r = check_sessions(b.ops)
    assert r.valid, r.anomalies
    assert r.deliveries == 4 and r.sessions == 1 and r.lost == 0


def test_sessions_a_new_session_after_a_fault_is_a_lost_session() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b")
    b.deliver("c2", "u1", "a", node="n1", epoch=1)
    b.reconnect("c2", "s2-c2", node="n3", resumed=False, epoch=1)  # the old one expired
    b.deliver("c2", "u1", "b", node="n3", epoch=1)
    r = check_sessions(b.ops)
    assert not r.valid and r.lost == 1 and r.sessions == 2
    assert any("new session" in a for a in r.anomalies)


def test_sessions_logging_in_again_or_an_ended_session_is_lost() -> None:
    b = two_clients()
    b.op("c2", "info", "session-lost", {"session": "s-c2", "error": "moved: taken over"})
    b.login("c2", session="s2")
    r = check_sessions(b.ops)
    assert not r.valid and r.lost == 2
    assert any("moved" in a for a in r.anomalies)
    assert any("logged in again" in a for a in r.anomalies)


def test_sessions_epoch_going_backwards() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b")
    b.deliver("c2", "u1", "a", node="n2", epoch=2)
    b.deliver("c2", "u1", "b", node="n1", epoch=1)
    r = check_sessions(b.ops)
    assert not r.valid
    assert r.epoch_regressions == 1 and r.split_epochs == 0


def test_sessions_one_epoch_two_nodes() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b")
    b.send("c1", "u2", "c")
    b.deliver("c2", "u1", "a", node="n1", epoch=3)
    b.deliver("c2", "u1", "b", node="n2", epoch=3)
    b.deliver("c2", "u1", "c", node="n1", epoch=3)
    r = check_sessions(b.ops)
    assert not r.valid
    assert r.split_epochs == 1 and r.epoch_regressions == 0
    assert any("n1" in a and "n2" in a for a in r.anomalies)


# --- 5. digests --------------------------------------------------------------------------


def test_digests() -> None:
    assert check_digests({"n1": "abc", "n2": "abc", "n3": "abc"}).valid
    r = check_digests({"n1": "abc", "n2": "abd", "n3": "abc"})
    assert not r.valid and r.distinct == 2
    r = check_digests({"n1": "abc", "n2": None})
    assert not r.valid and r.missing == ["n2"]
    assert not check_digests({}).valid
    assert not check_digests({"n1": None}).valid


# --- 6. failover -------------------------------------------------------------------------


def test_failover_times() -> None:
    b = two_clients()
    n = b.fault("kill", at=10.0)
    b.reconnect("c1", "s-c1", at=11.0)
    b.reconnect("c1", "s-c1", at=11.5)  # only the first counts
    b.reconnect("c2", "s-c2", at=13.0)
    b.heal("kill", n, at=15.0)
    b.fault("partition", at=20.0)
    b.reconnect("c1", "s-c1", at=22.0)
    b.fault("pause", at=30.0)  # nobody reconnects
    b.fault("loss", at=200.0)
    b.reconnect("c2", "s-c2", at=300.0)  # more than 60 s later: not a sample
    r = failover_times(b.ops)
    assert sorted(r.samples) == pytest.approx([1.0, 2.0, 3.0])
    assert r.count == 3
    assert r.p50_s == pytest.approx(2.0)
    assert r.p99_s == pytest.approx(3.0)
    assert r.max_s == pytest.approx(3.0)
    assert sorted(r.by_kind) == ["kill", "partition"]


def test_failover_times_empty() -> None:
    r = failover_times(two_clients().ops)
    assert r.samples == [] and r.p50_s is None and r.p99_s is None and r.max_s is None


def test_faults_windows() -> None:
    b = H()
    a = b.fault("kill", at=1.0)
    b.fault("partition", at=2.0)
    b.heal("kill", a, at=5.0)
    fs = faults(b.ops)
    assert [(f.kind, f.start, f.end) for f in fs] == [("kill", 1.0, 5.0),
                                                       ("partition", 2.0, None)]


def test_faults_heal_all_ends_open_faults() -> None:
    b = H()
    a = b.fault("kill", at=1.0)
    b.fault("partition", at=2.0)
    b.heal("kill", a, at=3.0)
    b.op("nemesis", "info", "heal-all", {}, at=9.0)
    b.op("nemesis", "info", "end", {}, at=12.0)
    assert [f.end for f in faults(b.ops)] == [3.0, 9.0]
    assert ops_summary(b.ops).faults == {"kill": 1, "partition": 1}


# --- 7. summary --------------------------------------------------------------------------


def test_ops_summary() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b", result="fail")
    b.send("c1", "u2", "c", result="info")
    b.send_invoke("c1", "u2", "d")
    b.deliver("c2", "u1", "a")
    n = b.fault("kill")
    b.heal("kill", n)
    b.fault("kill")
    b.fault("clock")
    s = ops_summary(b.ops)
    assert (s.ok, s.fail, s.info, s.pending) == (3, 1, 1, 1)  # 2 logins + 1 send ok
    assert s.faults == {"clock": 1, "kill": 2}
    assert s.observations == {"deliver": 1}
    assert s.by_f["send"] == {"ok": 1, "fail": 1, "info": 1, "pending": 1}
    assert s.unmatched_completions == 0
    b.op("c1", "info", "login", {"user": "u1", "error": "session lost"})  # no invoke
    s = ops_summary(b.ops)
    assert (s.ok, s.fail, s.info, s.pending) == (3, 1, 2, 1)
    assert s.unmatched_completions == 1


# --- 8. all ------------------------------------------------------------------------------


def test_check_all_valid_and_json() -> None:
    b = presence_base()
    n = b.fault("kill", at=1.0)
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b")
    b.reconnect("c2", "s-c2", at=2.0)
    b.deliver("c2", "u1", "a", node="n2", epoch=2)
    b.deliver("c2", "u1", "b", node="n2", epoch=2)
    b.heal("kill", n, at=3.0)
    b.event("c2", "u1", "online", at=4.0)
    r = check_all(b.ops, {"n1": "d", "n2": "d"}, last_heal=3.0, bound=5.0)
    assert r.valid, r.failures()
    assert r.faults == {"kill": 1}
    assert r.ops["ok"] == 6  # 2 logins, 2 allows, 2 sends
    assert r.lost == r.duplicated == r.reordered == 0
    assert r.failover_p50_s == pytest.approx(1.0)
    assert r.failover_p99_s == pytest.approx(1.0)
    d = r.to_json()
    text = json.dumps(d)
    assert json.loads(text)["valid"] is True
    for key in ("faults", "ops", "lost", "duplicated", "reordered", "failover_p50_s",
                "failover_p99_s", "messages", "order", "presence", "sessions", "digests"):
        assert key in d
    assert d["failed_checks"] == []


def test_check_all_invalid() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.send("c1", "u2", "b")
    b.deliver("c2", "u1", "b")
    r = check_all(b.ops, {"n1": "d", "n2": "e"}, last_heal=0.0, bound=5.0)
    assert not r.valid
    assert r.lost == 1
    assert r.failures() == ["messages", "digests"]
    assert r.failover_p50_s is None


def test_check_all_accepts_history_object() -> None:
    b = two_clients()
    b.send("c1", "u2", "a")
    b.deliver("c2", "u1", "a")
    r = check_all(b.h, {"n1": "d"}, last_heal=0.0, bound=5.0)
    assert r.valid
