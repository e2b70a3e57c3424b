"""Checkers for a chaos run: pure functions of a history (see ``chaos.history``).

Each checker takes the history (any iterable of ``Op``, e.g. a ``History``) and,
for a few, a small final state, and returns a result dataclass with ``valid``,
counts, and ``anomalies``: human-readable examples that cite op indexes (``#12``),
at most ``MAX_EXAMPLES`` of each kind. ``check_all`` runs them all and builds a
``Report`` whose ``to_json()`` is a plain JSON-able dict.

Conventions (also see the docstrings):

* Process ``c<k>`` is user ``u<k>``; user names found in values are normalised
  the same way, so a value naming ``c3`` means ``u3``.
* Every completion is paired with the oldest pending invoke of the same process
  and ``f`` (for a ``send``: the one with the same ``to`` and ``body`` first).
  An invoke never completed (the run ended first) counts as ``info``: it may or
  may not have happened.
* ``deliver`` observations are attributed to the process that made them: that
  client's application received the message.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

from chaos.history import OBSERVATIONS, Op

MAX_EXAMPLES = 20
NEMESIS = "nemesis"
HEAL_ALL = "heal-all"  # a nemesis info that ends every open fault
FAILOVER_WINDOW_S = 60.0

__all__ = [
    "MAX_EXAMPLES",
    "ClientOp",
    "DigestsResult",
    "FailoverResult",
    "Fault",
    "MessagesResult",
    "OpsSummary",
    "OrderResult",
    "PresencePair",
    "PresenceResult",
    "Report",
    "SessionsResult",
    "check_all",
    "check_digests",
    "check_messages",
    "check_order",
    "check_presence",
    "check_sessions",
    "client_ops",
    "failover_times",
    "faults",
    "ops_summary",
    "percentile",
    "user_of",
]


# --- helpers -------------------------------------------------------------------------------

_CLIENT_RE = re.compile(r"^c(\d+)$")


def user_of(name: Any) -> str:
    """The user a process (``c3`` -> ``u3``) or user name (``u3`` -> ``u3``) stands for."""
    s = str(name)
    m = _CLIENT_RE.match(s)
    return f"u{m.group(1)}" if m else s


def _is_client(op: Op) -> bool:
    return op.process != NEMESIS


class _Anomalies:
    """Collects anomaly examples, at most ``MAX_EXAMPLES`` per kind."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._per_kind: Counter[str] = Counter()

    def add(self, kind: str, text: str) -> None:
        self._per_kind[kind] += 1
        n = self._per_kind[kind]
        if n <= MAX_EXAMPLES:
            self.items.append(f"{kind}: {text}")
        elif n == MAX_EXAMPLES + 1:
            self.items.append(f"{kind}: ... (further examples omitted)")


def percentile(samples: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest sample such that at least ``p`` percent
    of the samples are <= it (``p`` in (0, 100]); None for no samples."""
    xs = sorted(samples)
    if not xs:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(xs)))
    return xs[min(rank, len(xs)) - 1]


@dataclass(frozen=True, slots=True)
class ClientOp:
    """A client operation: its invoke and its completion (None if it never completed)."""

    process: str
    f: str
    invoke: Op
    completion: Op | None

    @property
    def type(self) -> str:
        """``ok``, ``fail`` or ``info``; an op that never completed is ``info``."""
        return self.completion.type if self.completion is not None else "info"

    @property
    def pending(self) -> bool:
        return self.completion is None

    @property
    def value(self) -> dict[str, Any]:
        """The invoke's value updated with the completion's."""
        v = dict(self.invoke.value)
        if self.completion is not None:
            v.update(self.completion.value)
        return v

    @property
    def end_index(self) -> int | None:
        return self.completion.index if self.completion is not None else None


def client_ops(history: Iterable[Op]) -> list[ClientOp]:
    """Pair client invokes with their completions, in invoke order.

    Observations (single ``ok`` entries) and nemesis ops are left out, as are
    completions without an invoke (they are reported by ``ops_summary``)."""
    ops = _ops(history)
    pending: dict[tuple[str, str], list[Op]] = defaultdict(list)
    done: dict[int, Op] = {}
    for op in ops:
        if not _is_client(op) or op.f in OBSERVATIONS:
            continue
        key = (op.process, op.f)
        if op.type == "invoke":
            pending[key].append(op)
            continue
        queue = pending.get(key)
        if not queue:
            continue
        pick = 0
        if op.f == "send":
            for i, inv in enumerate(queue):
                if (inv.value.get("body") == op.value.get("body")
                        and inv.value.get("to") == op.value.get("to")):
                    pick = i
                    break
        done[queue.pop(pick).index] = op
    invokes = [op for op in ops if _is_client(op) and op.type == "invoke"
               and op.f not in OBSERVATIONS]
    return [ClientOp(inv.process, inv.f, inv, done.get(inv.index)) for inv in invokes]


def _ops(history: Iterable[Op]) -> list[Op]:
    return history if isinstance(history, list) else list(history)


def _valid_id(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# --- 1. messages -----------------------------------------------------------------------------


@dataclass
class MessagesResult:
    valid: bool
    sends: int = 0  # send invokes
    acked: int = 0  # sends completed ok
    delivered: int = 0  # distinct (recipient process, message id) deliveries
    lost: int = 0  # acked sends never delivered to the recipient
    duplicated: int = 0  # messages delivered more than once to the same process
    phantom: int = 0  # deliveries of a message nobody sent
    corrupted: int = 0  # deliveries whose id is an acked send's but whose content differs
    misrouted: int = 0  # deliveries observed by a process that is not the addressee
    failed_sends: int = 0
    failed_but_delivered: int = 0  # sends that failed but were delivered anyway
    info_sends: int = 0  # sends with an unknown outcome (info, or never completed)
    info_delivered: int = 0  # ... that took effect
    info_not_delivered: int = 0  # ... that did not (as far as the history shows)
    anomalies: list[str] = field(default_factory=list)


def check_messages(history: Iterable[Op]) -> MessagesResult:
    """Every acknowledged send is delivered exactly once to its recipient.

    * lost: a send completed ``ok`` with an ``id`` and no ``deliver`` of that id was
      observed by the recipient's process (an ``ok`` without a usable id is matched
      by recipient and body instead);
    * duplicated: a message id observed more than once by the same process;
    * phantom: a delivery whose id is no acked send's and whose body no send
      invoke to that recipient carried;
    * corrupted: a delivery carrying an acked send's id but another body, sender or
      recipient (or an id that two acked sends were given);
    * misrouted: a delivery observed by a process other than the one of ``to``;
    * failed_but_delivered: a send completed ``fail`` whose body reached the recipient.

    ``info`` sends (and sends never completed) are matched by recipient and body
    (bodies are unique in the workload) and counted as delivered or not; either
    is acceptable. valid iff lost, duplicated, phantom, corrupted, misrouted and
    failed_but_delivered are all 0.
    """
    ops = _ops(history)
    sends = [c for c in client_ops(ops) if c.f == "send"]
    an = _Anomalies()
    res = MessagesResult(valid=True, sends=len(sends))

    # Acked sends by id; every send (whatever its outcome) by (recipient, body).
    by_id: dict[int, ClientOp] = {}
    by_body: dict[tuple[str, Any], list[ClientOp]] = defaultdict(list)
    conflicting_ids: set[int] = set()
    for s in sends:
        v = s.value
        by_body[(user_of(v.get("to")), _hashable(v.get("body")))].append(s)
        if s.type == "ok":
            res.acked += 1
            mid = v.get("id")
            if _valid_id(mid):
                if mid in by_id:
                    conflicting_ids.add(mid)
                    res.corrupted += 1
                    an.add("corrupted", f"id {mid} given to two acked sends "
                           f"#{by_id[mid].invoke.index} and #{s.invoke.index}")
                else:
                    by_id[mid] = s

    deliveries = [op for op in ops if op.f == "deliver" and op.type == "ok"]
    seen: Counter[tuple[str, Any]] = Counter()  # (process, id) -> deliveries
    first_at: dict[tuple[str, Any], int] = {}
    received_ids: set[tuple[str, Any]] = set()  # (recipient user, id)
    received_bodies: dict[tuple[str, Any], int] = {}  # (recipient user, body) -> op index
    for d in deliveries:
        v = d.value
        mid = v.get("id")
        recipient = user_of(d.process)
        key = (d.process, _hashable(mid))
        seen[key] += 1
        if seen[key] == 1:
            first_at[key] = d.index
        elif seen[key] == 2:
            res.duplicated += 1
            an.add("duplicated", f"message {mid} delivered again to {d.process} at "
                   f"#{d.index} (first at #{first_at[key]})")
        if seen[key] > 1:
            continue
        to = user_of(v.get("to", recipient))
        if to != recipient:
            res.misrouted += 1
            an.add("misrouted", f"message {mid} for {to} delivered to {d.process} at #{d.index}")
        body = _hashable(v.get("body"))
        received_ids.add((recipient, _hashable(mid)))
        received_bodies.setdefault((recipient, body), d.index)
        sent = by_id.get(mid) if _valid_id(mid) else None
        if sent is not None:
            sv = sent.value
            if mid not in conflicting_ids and (
                    _hashable(sv.get("body")) != body or user_of(sv.get("to")) != to
                    or ("from" in v and user_of(v["from"]) != user_of(sent.process))):
                res.corrupted += 1
                an.add("corrupted", f"delivery #{d.index} of id {mid} does not match the "
                       f"acked send #{sent.invoke.index} ({sent.process} -> {sv.get('to')})")
            continue
        if not by_body.get((to, body)):
            res.phantom += 1
            an.add("phantom", f"delivery #{d.index} to {d.process} of id {mid} "
                   f"(body {v.get('body')!r}) that nobody sent")
    res.delivered = len(seen)

    for s in sends:
        v = s.value
        to = user_of(v.get("to"))
        body = _hashable(v.get("body"))
        got_body = received_bodies.get((to, body))
        if s.type == "ok":
            mid = v.get("id")
            if _valid_id(mid):
                delivered = (to, mid) in received_ids
            else:
                delivered = got_body is not None
            if not delivered:
                res.lost += 1
                an.add("lost", f"send #{s.invoke.index} by {s.process} to {v.get('to')} "
                       f"acked at #{s.end_index} with id {mid} never delivered")
        elif s.type == "fail":
            res.failed_sends += 1
            if got_body is not None:
                res.failed_but_delivered += 1
                an.add("failed-but-delivered", f"send #{s.invoke.index} by {s.process} "
                       f"failed at #{s.end_index} but was delivered at #{got_body}")
        else:
            res.info_sends += 1
            if got_body is not None:
                res.info_delivered += 1
            else:
                res.info_not_delivered += 1

    res.anomalies = an.items
    res.valid = (res.lost == res.duplicated == res.phantom == res.corrupted == res.misrouted
                 == res.failed_but_delivered == 0)
    return res


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


# --- 2. order --------------------------------------------------------------------------------


@dataclass
class OrderResult:
    valid: bool
    pairs: int = 0  # sender -> recipient pairs with at least one checked delivery
    checked: int = 0  # deliveries of acked sends considered
    reordered: int = 0
    anomalies: list[str] = field(default_factory=list)


def check_order(history: Iterable[Op]) -> OrderResult:
    """Per sender -> recipient pair, acked messages are delivered in send order.

    Only the first delivery of each id to a process counts, and only messages whose
    send completed ``ok`` with an id. Walking the recipient's deliveries in
    history order, a message whose send was invoked before the latest-invoked
    message already delivered for the pair is one inversion (``reordered``).
    valid iff reordered == 0.
    """
    ops = _ops(history)
    acked: dict[int, ClientOp] = {}
    for s in client_ops(ops):
        if s.f == "send" and s.type == "ok":
            mid = s.value.get("id")
            if _valid_id(mid):
                acked.setdefault(mid, s)
    an = _Anomalies()
    res = OrderResult(valid=True)
    latest: dict[tuple[str, str], tuple[int, int, Any]] = {}  # pair -> (invoke, deliver, id)
    seen: set[tuple[str, Any]] = set()
    for d in ops:
        if d.f != "deliver" or d.type != "ok":
            continue
        mid = d.value.get("id")
        if (d.process, mid) in seen or not _valid_id(mid) or mid not in acked:
            continue
        seen.add((d.process, mid))
        s = acked[mid]
        pair = (user_of(s.process), user_of(d.process))
        res.checked += 1
        pos = s.invoke.index
        prev = latest.get(pair)
        if prev is None or pos > prev[0]:
            latest[pair] = (pos, d.index, mid)
        elif pos < prev[0]:
            res.reordered += 1
            an.add("reordered", f"{pair[0]} -> {pair[1]}: message {mid} (sent #{pos}) "
                   f"delivered at #{d.index} after message {prev[2]} (sent #{prev[0]}, "
                   f"delivered #{prev[1]})")
    res.pairs = len(latest)
    res.anomalies = an.items
    res.valid = res.reordered == 0
    return res


# --- 3. presence -----------------------------------------------------------------------------


@dataclass
class PresencePair:
    viewer: str
    user: str
    status: Any  # the viewer's last presence-event status about user
    acceptable: list[str]
    index: int  # op index of that event
    time: float
    deadline: float
    converged: bool
    late: bool


@dataclass
class PresenceResult:
    valid: bool
    pairs: int = 0
    mismatched: int = 0
    late: int = 0
    convergence_s: float = 0.0
    bound_s: float = 0.0
    details: list[PresencePair] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)


def _presence_truth(ops: list[Op], cops: list[ClientOp]
                    ) -> tuple[dict[str, set[str]], dict[str, float]]:
    """Acceptable statuses per user, and the time of the user's last own change.

    Definite events (position, status): a ``presence`` op completed ok (position:
    its invoke), a ``login`` ok or a ``reconnect`` that opened a new session (the
    client logs in as online). Uncertain events: a ``presence`` op with an unknown
    outcome (its status), a ``login`` invoke (online, superseded by its ok), a
    ``login`` info (the session was lost: offline). The truth is the last definite
    status plus every uncertain one positioned after it."""
    definite: dict[str, list[tuple[int, str]]] = defaultdict(list)
    maybe: dict[str, list[tuple[int, str]]] = defaultdict(list)
    last_change: dict[str, float] = {}

    def touch(user: str, t: float) -> None:
        last_change[user] = max(last_change.get(user, t), t)

    for c in cops:
        if c.f != "presence":
            continue
        user = user_of(c.process)
        touch(user, c.completion.time if c.completion is not None else c.invoke.time)
        status = str(c.value.get("status"))
        if c.type == "ok":
            definite[user].append((c.invoke.index, status))
        elif c.type == "info":
            maybe[user].append((c.invoke.index, status))
    for op in ops:
        if not _is_client(op) or op.f not in ("login", "reconnect"):
            continue
        user = user_of(op.process)
        touch(user, op.time)
        if op.f == "reconnect":
            if op.type == "ok" and op.value.get("resumed") is False:
                definite[user].append((op.index, "online"))
        elif op.type == "invoke":
            maybe[user].append((op.index, "online"))
        elif op.type == "ok":
            definite[user].append((op.index, "online"))
        elif op.type == "info":
            maybe[user].append((op.index, "offline"))
    truth: dict[str, set[str]] = {}
    for user in set(definite) | set(maybe):
        acceptable: set[str] = set()
        since = -1
        if definite[user]:
            since, status = max(definite[user])
            acceptable.add(status)
        else:
            acceptable.add("offline")  # never (surely) logged in
        acceptable.update(status for pos, status in maybe[user] if pos > since)
        truth[user] = acceptable
    return truth, last_change


def check_presence(history: Iterable[Op], last_heal: float, bound: float) -> PresenceResult:
    """After the last heal, every viewer's view of every user converges to the truth.

    Truth per user: the status of the user's last ``presence`` op that completed
    ``ok``, or that of any later ``presence`` op with an unknown outcome. A
    ``login`` ok, or a ``reconnect`` with ``resumed: false``, counts as a definite
    ``online`` (a new session logs in as online); a ``login`` info (the session was
    lost) makes ``offline`` acceptable too; a user never surely logged in may be
    ``offline`` (or ``online`` if a login is pending or unknown). A viewer sees
    ``unknown`` about a user who did not let it: ``unknown`` is accepted unless the
    user's ``allow`` of the viewer completed ok.

    For each (viewer, user) with at least one ``presence-event``, the last event
    must carry an acceptable status (else ``mismatched``), and must have arrived by
    the deadline ``max(last_heal, t_user) + bound`` (else ``late``), where
    ``t_user`` is the time of the user's last own presence/login op completion or
    reconnect (a change after the heal legitimately produces a later event; with no
    such change the deadline is ``last_heal + bound``). ``convergence_s`` is the
    max over pairs of (last event time - ``last_heal``), floored at 0.
    valid iff no pair is mismatched or late.
    """
    ops = _ops(history)
    cops = client_ops(ops)
    truth, last_change = _presence_truth(ops, cops)
    allowed: set[tuple[str, str]] = set()  # (user, viewer) allowed for sure
    for c in cops:
        if c.f == "allow" and c.type == "ok":
            allowed.add((user_of(c.process), user_of(c.value.get("user"))))
    last_event: dict[tuple[str, str], Op] = {}
    for op in ops:
        if op.f == "presence-event" and op.type == "ok":
            viewer = user_of(op.process)  # the observer; value "viewer" names it too
            last_event[(viewer, user_of(op.value.get("user")))] = op
    an = _Anomalies()
    res = PresenceResult(valid=True, pairs=len(last_event), bound_s=bound)
    for (viewer, user), ev in sorted(last_event.items()):
        acceptable = set(truth.get(user, {"offline"}))
        if (user, viewer) not in allowed:
            acceptable.add("unknown")
        status = ev.value.get("status")
        deadline = max(last_heal, last_change.get(user, last_heal)) + bound
        converged = status in acceptable
        late = ev.time > deadline
        res.convergence_s = max(res.convergence_s, ev.time - last_heal)
        pair = PresencePair(viewer, user, status, sorted(acceptable), ev.index, ev.time,
                            deadline, converged, late)
        res.details.append(pair)
        if not converged:
            res.mismatched += 1
            an.add("mismatch", f"{viewer} last saw {user} {status!r} (#{ev.index}), "
                   f"truth {sorted(acceptable)}")
        if late:
            res.late += 1
            an.add("late", f"{viewer}'s last event about {user} (#{ev.index}) at "
                   f"{ev.time:.3f} s, deadline {deadline:.3f} s")
    res.anomalies = an.items
    res.valid = res.mismatched == 0 and res.late == 0
    return res


# --- 4. sessions -----------------------------------------------------------------------------


@dataclass
class SessionsResult:
    valid: bool
    deliveries: int = 0  # deliveries with an epoch
    sessions: int = 0
    epoch_regressions: int = 0
    split_epochs: int = 0  # (session, epoch) delivered by more than one node
    lost: int = 0  # sessions a client could not resume: it had to log in again
    anomalies: list[str] = field(default_factory=list)


def check_sessions(history: Iterable[Op]) -> SessionsResult:
    """No session is lost, and none is delivered to by two nodes after a claim.

    Lost: after its first login, a client that logs in again (a second ``login``
    ok), reconnects into a new session (``reconnect`` with ``resumed`` false) or
    records a ``session-lost`` info had its session end under it: the users of
    this system never log in again because a node failed.

    For each recipient process, its deliveries in history order are grouped by the
    session of the process's latest ``login`` ok / ``reconnect`` observation before
    them (a delivery before any carries session None). Within a session the
    ``epoch`` of deliveries must never decrease, and each epoch must come from a
    single ``node``. Deliveries without an epoch are skipped.
    valid iff no regression and no split epoch.
    """
    ops = _ops(history)
    an = _Anomalies()
    res = SessionsResult(valid=True)
    session: dict[str, Any] = {}
    last: dict[tuple[str, Any], tuple[int, int]] = {}  # (process, session) -> (epoch, index)
    nodes: dict[tuple[str, Any, int], dict[Any, int]] = defaultdict(dict)  # -> node: index
    logged_in: set[str] = set()
    for op in ops:
        if not _is_client(op):
            continue
        if op.f == "session-lost":
            res.lost += 1
            an.add("session-lost", f"{op.process}: session {op.value.get('session')} ended "
                   f"under the client (#{op.index}): {op.value.get('error')}")
            continue
        if op.type != "ok":
            continue
        if op.f == "login" and "session" in op.value:
            if op.process in logged_in:
                res.lost += 1
                an.add("session-lost", f"{op.process}: logged in again (#{op.index})")
            logged_in.add(op.process)
        if op.f == "reconnect" and op.value.get("resumed") is False:
            res.lost += 1
            an.add("session-lost", f"{op.process}: reconnected into a new session "
                   f"{op.value.get('session')} (#{op.index}): the old one had expired")
        if op.f in ("login", "reconnect") and "session" in op.value:
            session[op.process] = op.value["session"]
            continue
        if op.f != "deliver":
            continue
        epoch = op.value.get("epoch")
        if not isinstance(epoch, int | float) or isinstance(epoch, bool):
            continue
        res.deliveries += 1
        sid = session.get(op.process)
        key = (op.process, sid)
        prev = last.get(key)
        if prev is not None and epoch < prev[0]:
            res.epoch_regressions += 1
            an.add("epoch-regression", f"{op.process} session {sid}: delivery #{op.index} "
                   f"with epoch {epoch} after epoch {prev[0]} (#{prev[1]})")
        if prev is None or epoch >= prev[0]:
            last[key] = (int(epoch), op.index)
        node = op.value.get("node")
        if node is None:
            continue
        seen = nodes[(op.process, sid, int(epoch))]
        if node not in seen:
            seen[node] = op.index
            if len(seen) == 2:
                res.split_epochs += 1
                n1, i1 = next((n, i) for n, i in seen.items() if n != node)
                an.add("split-epoch", f"{op.process} session {sid} epoch {epoch}: delivered "
                       f"by {n1} (#{i1}) and {node} (#{op.index})")
    res.sessions = len(last)
    res.anomalies = an.items
    res.valid = res.epoch_regressions == 0 and res.split_epochs == 0 and res.lost == 0
    return res


# --- 5. digests ------------------------------------------------------------------------------


@dataclass
class DigestsResult:
    valid: bool
    digests: dict[str, str | None] = field(default_factory=dict)
    distinct: int = 0
    missing: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)


def check_digests(digests: Mapping[str, str | None]) -> DigestsResult:
    """All nodes report the same state digest after healing.

    valid iff there is at least one node, none reported None, and all are equal."""
    an = _Anomalies()
    missing = sorted(n for n, d in digests.items() if d is None)
    present = {d for d in digests.values() if d is not None}
    for n in missing:
        an.add("missing", f"node {n} reported no digest")
    if not digests:
        an.add("missing", "no node reported a digest")
    if len(present) > 1:
        groups: dict[str, list[str]] = defaultdict(list)
        for n, d in sorted(digests.items()):
            if d is not None:
                groups[d].append(n)
        desc = "; ".join(f"{d[:16]}: {', '.join(ns)}" for d, ns in sorted(groups.items()))
        an.add("diverged", f"{len(present)} distinct digests ({desc})")
    return DigestsResult(valid=bool(digests) and not missing and len(present) == 1,
                         digests=dict(digests), distinct=len(present), missing=missing,
                         anomalies=an.items)


# --- 6. failover -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """A nemesis fault: from its invoke to its healing info (None: never healed)."""

    number: Any
    kind: str
    start: float
    end: float | None
    invoke_index: int
    value: dict[str, Any]


def faults(history: Iterable[Op]) -> list[Fault]:
    """Nemesis fault windows, in start order. The heal is the nemesis ``info`` with the
    invoke's ``fault`` number (or, without numbers, the next ``info`` of that kind);
    a nemesis ``info`` with f ``heal-all`` ends every fault still open."""
    opened: list[Op] = []
    healed: dict[int, float] = {}
    by_number: dict[Any, int] = {}
    for op in history:
        if op.process != NEMESIS:
            continue
        if op.type == "invoke":
            opened.append(op)
            if "fault" in op.value:
                by_number[_hashable(op.value["fault"])] = op.index
        elif op.type == "info" and op.f == HEAL_ALL:
            for o in opened:
                healed.setdefault(o.index, op.time)
        elif op.type == "info":
            num = op.value.get("fault")
            idx = by_number.get(_hashable(num)) if num is not None else None
            if idx is None:  # fall back: oldest open fault of that kind
                idx = next((o.index for o in opened if o.index not in healed and o.f == op.f
                            and "fault" not in o.value), None)
            if idx is not None and idx not in healed:
                healed[idx] = op.time
    return [Fault(o.value.get("fault"), o.f, o.time, healed.get(o.index), o.index,
                  dict(o.value)) for o in opened]


@dataclass
class FailoverResult:
    samples: list[float] = field(default_factory=list)  # seconds, fault start -> reconnect
    count: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None
    by_kind: dict[str, list[float]] = field(default_factory=dict)


def failover_times(history: Iterable[Op], window: float = FAILOVER_WINDOW_S) -> FailoverResult:
    """How long clients took to reconnect after each fault.

    For each nemesis invoke at ``t_f`` and each client process, the first
    ``reconnect`` observation of that process strictly after ``t_f`` yields a
    sample ``t_reconnect - t_f`` if it happened before the next nemesis invoke
    and within ``window`` seconds of ``t_f``. Percentiles are nearest-rank (see
    ``percentile``); all None when there are no samples.
    """
    ops = _ops(history)
    starts = [op for op in ops if op.process == NEMESIS and op.type == "invoke"]
    reconnects: dict[str, list[float]] = defaultdict(list)
    for op in ops:
        if op.f == "reconnect" and op.type == "ok" and _is_client(op):
            reconnects[op.process].append(op.time)
    res = FailoverResult()
    for i, f in enumerate(starts):
        end = f.time + window
        if i + 1 < len(starts):
            end = min(end, starts[i + 1].time)
        for times in reconnects.values():
            t = next((t for t in times if t > f.time), None)
            if t is not None and t < end:
                res.samples.append(t - f.time)
                res.by_kind.setdefault(f.f, []).append(t - f.time)
    res.count = len(res.samples)
    res.p50_s = percentile(res.samples, 50)
    res.p99_s = percentile(res.samples, 99)
    res.max_s = max(res.samples) if res.samples else None
    return res


# --- 7. summary ------------------------------------------------------------------------------


@dataclass
class OpsSummary:
    ok: int = 0
    fail: int = 0
    info: int = 0
    pending: int = 0  # invokes never completed (not included in info)
    by_f: dict[str, dict[str, int]] = field(default_factory=dict)
    observations: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    unmatched_completions: int = 0


def ops_summary(history: Iterable[Op]) -> OpsSummary:
    """Client op completions by type (``ok``/``fail``/``info`` entries that are not
    observations; a completion without a matching invoke, such as the workload's
    ``info`` login when a session is lost, counts too), invokes never completed
    (``pending``, not in ``info``), observations by f, faults (nemesis invokes) by
    kind."""
    ops = _ops(history)
    res = OpsSummary()
    by_f: dict[str, Counter[str]] = defaultdict(Counter)
    obs: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    completions = 0
    for op in ops:
        if op.process == NEMESIS:
            if op.type == "invoke":
                kinds[op.f] += 1
        elif op.f in OBSERVATIONS:
            obs[op.f] += 1
        elif op.type != "invoke":
            completions += 1
            by_f[op.f][op.type] += 1
            if op.type == "ok":
                res.ok += 1
            elif op.type == "fail":
                res.fail += 1
            elif op.type == "info":
                res.info += 1
    paired = client_ops(ops)
    for c in paired:
        if c.pending:
            res.pending += 1
            by_f[c.f]["pending"] += 1
    res.unmatched_completions = completions - sum(1 for c in paired if not c.pending)
    res.by_f = {f: dict(c) for f, c in sorted(by_f.items())}
    res.observations = dict(sorted(obs.items()))
    res.faults = dict(sorted(kinds.items()))
    return res


# --- 8. everything -------------------------------------------------------------------------


@dataclass
class Report:
    valid: bool
    faults: dict[str, int]
    ops: dict[str, int]
    lost: int
    duplicated: int
    reordered: int
    failover_p50_s: float | None
    failover_p99_s: float | None
    messages: MessagesResult
    order: OrderResult
    presence: PresenceResult
    sessions: SessionsResult
    digests: DigestsResult
    failover: FailoverResult
    summary: OpsSummary

    def failures(self) -> list[str]:
        """Names of the checkers that found the history invalid."""
        checks = {"messages": self.messages.valid, "order": self.order.valid,
                  "presence": self.presence.valid, "sessions": self.sessions.valid,
                  "digests": self.digests.valid}
        return [name for name, ok in checks.items() if not ok]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed_checks"] = self.failures()
        return d


def check_all(history: Iterable[Op], digests: Mapping[str, str | None], last_heal: float,
              bound: float) -> Report:
    """Run every checker; valid iff messages, order, presence, sessions and digests are."""
    ops = _ops(history)
    messages = check_messages(ops)
    order = check_order(ops)
    presence = check_presence(ops, last_heal, bound)
    sessions = check_sessions(ops)
    dig = check_digests(digests)
    failover = failover_times(ops)
    summary = ops_summary(ops)
    valid = messages.valid and order.valid and presence.valid and sessions.valid and dig.valid
    return Report(
        valid=valid,
        faults=dict(summary.faults),
        ops={"ok": summary.ok, "fail": summary.fail, "info": summary.info,
             "pending": summary.pending},
        lost=messages.lost,
        duplicated=messages.duplicated,
        reordered=order.reordered,
        failover_p50_s=failover.p50_s,
        failover_p99_s=failover.p99_s,
        messages=messages,
        order=order,
        presence=presence,
        sessions=sessions,
        digests=dig,
        failover=failover,
        summary=summary,
    )
