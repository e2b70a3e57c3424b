"""Commands of the replicated session table, and their CBOR wire form.

A command is what a node proposes to the Raft log. It carries everything the
state machine needs to apply it deterministically, including time (``now``,
stamped by the proposer) and the proposing node's identity. On the log a
command is a CBOR array ``[op, field1, field2, ...]`` in the field order of
its dataclass.

This module is pure: no clock, no I/O, no threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, ClassVar

STATUSES = ("online", "away", "busy")
"""Presence statuses a session may set. ``offline`` is derived, never set."""


class CommandError(ValueError):
    """A command on the log is malformed (wrong op, arity or field type)."""


@dataclass(slots=True)
class Command:
    """Base of every command: ``op`` names it on the wire.

    Commands are values: never changed once built. They are not ``frozen``
    dataclasses only because a frozen dataclass is about 4x slower to build,
    and every replica builds every command it applies.
    """

    op: ClassVar[str] = ""
    types: ClassVar[tuple[Any, ...]] = ()

    def to_wire(self) -> list[Any]:
        return [self.op, *_FIELDS_OF[type(self)](self)]


# --- sessions ---------------------------------------------------------------


@dataclass(slots=True)
class Login(Command):
    """Open a new session for ``user`` owned by ``node`` (incarnation ``inc``)."""

    op: ClassVar[str] = "login"
    types: ClassVar[tuple[Any, ...]] = (str, str, str, int, bytes, str, (str, type(None)), float)
    session: str
    user: str
    node: str
    inc: int
    resume_hash: bytes
    status: str
    text: str | None
    now: float


@dataclass(slots=True)
class Resume(Command):
    """Claim an existing session for ``node``: its owner and epoch change.

    ``last_seq`` is the highest message sequence number the client has already
    handed to its application; only later messages are redelivered. ``attempt``
    orders one client's attempts: an attempt not above the last applied one is
    refused as ``stale``.
    """

    op: ClassVar[str] = "resume"
    types: ClassVar[tuple[Any, ...]] = (str, bytes, str, int, int, str, float, int)
    session: str
    resume_hash: bytes
    node: str
    inc: int
    last_seq: int
    claim: str  # unique per resume attempt: a retried proposal is recognised
    now: float
    # The client's resume attempt number, growing with each attempt (0: not given).
    # A resume whose commit was delayed (its client gave up and resumed elsewhere)
    # must not take the session back from a later attempt.
    attempt: int = 0


@dataclass(slots=True)
class Detach(Command):
    """The client's connection was lost: the session waits for a resume."""

    op: ClassVar[str] = "detach"
    types: ClassVar[tuple[Any, ...]] = (str, int, str)
    session: str
    epoch: int
    node: str


@dataclass(slots=True)
class Logout(Command):
    """End a session now (the client said bye)."""

    op: ClassVar[str] = "logout"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, float)
    session: str
    epoch: int
    node: str
    now: float


# --- presence and visibility -----------------------------------------------


@dataclass(slots=True)
class SetPresence(Command):
    op: ClassVar[str] = "presence"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, str, (str, type(None)), float)
    session: str
    epoch: int
    node: str
    status: str
    text: str | None
    now: float


@dataclass(slots=True)
class Allow(Command):
    """The session's user lets ``other`` see their presence."""

    op: ClassVar[str] = "allow"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, str)
    session: str
    epoch: int
    node: str
    other: str


@dataclass(slots=True)
class Revoke(Command):
    """The session's user stops letting ``other`` see their presence."""

    op: ClassVar[str] = "revoke"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, str)
    session: str
    epoch: int
    node: str
    other: str


@dataclass(slots=True)
class Subscribe(Command):
    """The session's user wants presence events of ``other``."""

    op: ClassVar[str] = "subscribe"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, str)
    session: str
    epoch: int
    node: str
    other: str


@dataclass(slots=True)
class Unsubscribe(Command):
    op: ClassVar[str] = "unsubscribe"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, str)
    session: str
    epoch: int
    node: str
    other: str


# --- messages ---------------------------------------------------------------


@dataclass(slots=True)
class Send(Command):
    """Send ``body`` to user ``to``. ``cmid`` (client message id, increasing per
    session) makes the send idempotent: a resent duplicate is dropped."""

    op: ClassVar[str] = "send"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, int, str, (str, bytes), float)
    session: str
    epoch: int
    node: str
    cmid: int
    to: str
    body: str | bytes
    now: float


@dataclass(slots=True)
class Ack(Command):
    """The session's user has processed the messages with these sequence numbers."""

    op: ClassVar[str] = "ack"
    types: ClassVar[tuple[Any, ...]] = (str, int, str, list)
    session: str
    epoch: int
    node: str
    seqs: list[int]


# --- cluster housekeeping --------------------------------------------------


@dataclass(slots=True)
class NodeUp(Command):
    """Node ``node`` started as incarnation ``inc``: sessions of its earlier
    incarnations have no connection any more and are orphaned. ``raft`` is its
    Raft address (``""`` in logs written before the field), so that an operator
    can remove a dead node by that address and still have its sessions orphaned."""

    op: ClassVar[str] = "node-up"
    types: ClassVar[tuple[Any, ...]] = (str, int, str)
    node: str
    inc: int
    raft: str = ""


@dataclass(slots=True)
class NodeDown(Command):
    """Node ``node`` (incarnation ``inc``) is shutting down cleanly."""

    op: ClassVar[str] = "node-down"
    types: ClassVar[tuple[Any, ...]] = (str, int)
    node: str
    inc: int


@dataclass(slots=True)
class Heartbeat(Command):
    """Node ``node`` is alive and can commit; ``beat`` increases per heartbeat."""

    op: ClassVar[str] = "heartbeat"
    types: ClassVar[tuple[Any, ...]] = (str, int, int)
    node: str
    inc: int
    beat: int


@dataclass(slots=True)
class Tick(Command):
    """The leader's clock: advances the table's clock by ``elapsed`` (measured by
    the leader's monotonic clock since its previous tick, capped, so a jump of
    one node's clock cannot expire every session at once), orphans the sessions
    of silent nodes and expires sessions not resumed within the grace window.
    ``now`` is the leader's wall clock, used only for last-seen times.

    The timeouts ride in the command so that the leader alone decides them, and so
    does ``max_sessions``: at most that many sessions expire in this tick, and at
    most that many are orphaned or re-attached because their node fell silent or
    spoke again (0: no bound, as in logs written before the field existed). One
    tick must not hold every member's apply thread longer than an election
    timeout, as the 200,000 sessions of one node did; later ticks do the rest.
    """

    op: ClassVar[str] = "tick"
    types: ClassVar[tuple[Any, ...]] = (float, float, float, float, int)
    now: float
    elapsed: float
    grace: float
    node_timeout: float
    max_sessions: int = 0


@dataclass(slots=True)
class Configure(Command):
    """Set the table's per-user limits (the leader proposes its configured values,
    so every replica enforces the same ones)."""

    op: ClassVar[str] = "configure"
    types: ClassVar[tuple[Any, ...]] = (int, int, int, int)
    sessions_per_user: int
    allow_list: int
    subscriptions: int
    mailbox: int


@dataclass(slots=True)
class Join(Command):
    """Node ``node`` was added to the Raft cluster by an operator: a node started
    with ``--join`` serves clients only once this is in its log."""

    op: ClassVar[str] = "join"
    types: ClassVar[tuple[Any, ...]] = (str,)
    node: str


@dataclass(slots=True)
class Leave(Command):
    """Node ``node`` was removed from the Raft cluster: its sessions are orphaned.

    ``bounded`` (1 from the admin shell; 0 in logs written before the field):
    ``node`` may also be the Raft address the node's ``NodeUp`` named (a dead
    member is known to the operator by that address only); the node's current
    incarnation is retired (its heartbeats are refused); and while the leader's
    ticks are bounded, its sessions are orphaned by the next ticks, a bounded
    number each, as after ``NodeDown``, not all in this entry (one entry
    orphaning a node's 200,000 sessions would hold every member's apply thread
    past an election timeout)."""

    op: ClassVar[str] = "leave"
    types: ClassVar[tuple[Any, ...]] = (str, int)
    node: str
    bounded: int = 0


@dataclass(slots=True)
class Checkpoint(Command):
    """Every node records the table's digest after the log entry holding this
    command, under ``tag``: comparing them proves the replicas identical (chaos
    checker, admin). The table only notes the tag (``checkpoints_due``): the
    replication shell computes the digest off its apply thread."""

    op: ClassVar[str] = "checkpoint"
    types: ClassVar[tuple[Any, ...]] = (str,)
    tag: str


@dataclass(slots=True)
class Noop(Command):
    """Does nothing; committing one proves this node can reach a quorum."""

    op: ClassVar[str] = "noop"
    types: ClassVar[tuple[Any, ...]] = ()


COMMANDS: dict[str, type[Command]] = {
    c.op: c
    for c in (
        Login,
        Resume,
        Detach,
        Logout,
        SetPresence,
        Allow,
        Revoke,
        Subscribe,
        Unsubscribe,
        Send,
        Ack,
        NodeUp,
        NodeDown,
        Heartbeat,
        Tick,
        Configure,
        Join,
        Leave,
        Checkpoint,
        Noop,
    )
}


def _coerce(value: Any, expected: Any) -> Any:
    """Check one field's type; ints are accepted where floats are expected."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # a CBOR bignum; an OverflowError would escape BatchApplier
            raise CommandError("integer too large for a float field") from None
    if isinstance(value, bool) or not isinstance(value, expected):
        raise CommandError(f"field has type {type(value).__name__}")
    return value


def _getter(cls: type[Command]) -> Callable[[Command], tuple[Any, ...]]:
    """A function returning the command's field values, in wire order."""
    names = [f.name for f in fields(cls)]
    if len(names) >= 2:
        return attrgetter(*names)
    if names:
        get = attrgetter(names[0])
        return lambda c: (get(c),)
    return lambda _c: ()


def _exact_check(cls: type[Command]) -> Callable[[Sequence[Any]], bool]:
    """A function telling whether field values (in wire order) are exactly of the
    types cbor2 decodes them as, so that they need no conversion: generated per
    class (one ``type(v) is T`` test per field), as every replica checks every
    command it decodes."""
    names: dict[str, Any] = {}
    tests = [f"len(a) == {len(cls.types)}"]
    for i, t in enumerate(cls.types):
        alts = []
        for j, typ in enumerate(t if isinstance(t, tuple) else (t,)):
            names[f"t{i}_{j}"] = typ
            alts.append(f"type(a[{i}]) is t{i}_{j}")
        tests.append(alts[0] if len(alts) == 1 else f"({' or '.join(alts)})")
    if cls is Ack:
        tests.append("all(type(s) is int for s in a[3])")
    exec(f"def exact(a):\n    return {' and '.join(tests)}\n", names)
    check: Callable[[Sequence[Any]], bool] = names["exact"]
    return check


_FIELDS_OF: dict[type[Command], Callable[[Command], tuple[Any, ...]]] = {
    cls: _getter(cls) for cls in COMMANDS.values()
}
_FAST: dict[str, tuple[type[Command], Callable[[Sequence[Any]], bool]]] = {
    op: (cls, _exact_check(cls)) for op, cls in COMMANDS.items()
}
"""Per op: the class and the check of the exact field types (as cbor2 decodes
them) accepted without the full check."""


def from_wire(item: Any) -> Command:
    """Decode one command from its wire form; raise ``CommandError`` if malformed.

    Every replica decodes every command, so the common case is checked first by
    exact type (what cbor2 produces); anything else (an int in a float field, a
    malformed command) takes the full check, which converts or says what is wrong.
    """
    if type(item) is list and item and type(item[0]) is str:
        spec = _FAST.get(item[0])
        if spec is not None:
            cls, exact = spec
            args = item[1:]
            if exact(args):
                return cls(*args)
    return _from_wire_checked(item)


def wire_items(items: Iterable[tuple[int, Command]]) -> tuple[list[list[Any]], bool]:
    """A batch's ``[[rid, wire], ...]``, and whether every rid is an int and every
    command decodes as itself: ``from_wire`` of its wire form takes the fast
    path and gives back an equal command (every field of exactly a plain type
    that a codec decodes unchanged: no int in a float field, no bool, no
    subclass; the class a registered one). A replica may then apply such
    commands as they are instead of decoding them."""
    out: list[list[Any]] = []
    exact = True
    for rid, cmd in items:
        cls = type(cmd)
        args = _FIELDS_OF[cls](cmd)
        out.append([rid, [cls.op, *args]])
        if exact:
            spec = _FAST.get(cls.op)
            exact = (spec is not None and spec[0] is cls and spec[1](args)
                     and type(rid) is int)
    return out, exact


LEGACY_ARITY: dict[str, tuple[int, Any]] = {
    "resume": (7, 0), "tick": (4, 0), "leave": (1, 0), "node-up": (2, "")}
"""Ops whose older wire form had one field fewer: (that many fields, the new
trailing one's value). A log written before ``Resume.attempt``,
``Tick.max_sessions``, ``Leave.bounded`` or ``NodeUp.raft`` existed still
replays the same way."""


def _from_wire_checked(item: Any) -> Command:
    if isinstance(item, list) and item and isinstance(item[0], str):
        legacy = LEGACY_ARITY.get(item[0])
        if legacy is not None and legacy[0] == len(item) - 1:
            item = [*item, legacy[1]]
    if not isinstance(item, list) or not item or not isinstance(item[0], str):
        raise CommandError("a command is a non-empty array starting with its op")
    cls = COMMANDS.get(item[0])
    if cls is None:
        raise CommandError(f"unknown op {item[0]!r}")
    args = item[1:]
    if len(args) != len(cls.types):
        raise CommandError(f"{cls.op}: expected {len(cls.types)} fields, got {len(args)}")
    try:
        values = [_coerce(v, t) for v, t in zip(args, cls.types, strict=True)]
    except CommandError as e:
        raise CommandError(f"{cls.op}: {e}") from None
    if cls is Ack and not all(isinstance(s, int) and not isinstance(s, bool) for s in values[3]):
        raise CommandError("ack: seqs must be integers")
    return cls(*values)
