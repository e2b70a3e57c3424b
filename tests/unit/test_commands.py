"""Wire form of the replicated commands: round-trips and rejection of malformed arrays."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.commands import (
    COMMANDS,
    LEGACY_ARITY,
    Ack,
    Allow,
    Command,
    CommandError,
    Detach,
    Heartbeat,
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
    _from_wire_checked,
    from_wire,
)

EXAMPLES: list[Command] = [
    Login("s1", "alice", "n1", 3, b"\x00hash", "online", "at lunch", 1700000000.25),
    Login("s2", "bob", "n2", 1, b"", "away", None, 0.0),
    Resume("s1", b"\x00hash", "n2", 4, 17, "claim-1", 1700000001.5),
    Detach("s1", 2, "n2"),
    Logout("s1", 2, "n2", 1700000002.0),
    SetPresence("s1", 2, "n2", "busy", "in a call", 3.5),
    SetPresence("s1", 2, "n2", "online", None, 3.5),
    Allow("s1", 2, "n2", "bob"),
    Revoke("s1", 2, "n2", "bob"),
    Subscribe("s1", 2, "n2", "bob"),
    Unsubscribe("s1", 2, "n2", "bob"),
    Send("s1", 2, "n2", 5, "bob", "hello ✉", 4.0),
    Send("s1", 2, "n2", 6, "bob", b"\x00\x01binary", 4.0),
    Ack("s1", 2, "n2", [1, 2, 3]),
    Ack("s1", 2, "n2", []),
    NodeUp("n1", 4),
    NodeDown("n1", 4),
    Heartbeat("n1", 4, 99),
    Tick(1700000003.0, 0.5, 30.0, 10.0, 10_000),
    Noop(),
]

# A value of the right type, and values of wrong types, for each field type.
GOOD: dict[Any, Any] = {str: "x", int: 7, float: 1.5, bytes: b"b", list: [1, 2],
                        (str, type(None)): None, (str, bytes): b"body"}
WRONG: dict[Any, list[Any]] = {
    str: [1, 1.5, b"x", None, ["x"], True],
    int: ["7", 7.0, b"7", None, [7], True, False],
    float: ["1.5", b"1", None, [1.0], True, False],
    bytes: ["b", 1, None, [98], bytearray(b"b"), True],
    list: ["1", 1, None, {1: 2}, (1, 2), True],
    (str, type(None)): [1, 1.5, b"x", ["x"], True],
    (str, bytes): [1, 1.5, None, ["x"], True],
}


def sample(cls: type[Command]) -> Command:
    """An instance of ``cls`` built from its declared field types."""
    return cls(*(GOOD[t] for t in cls.types))


def test_examples_cover_every_command() -> None:
    """The explicit examples name every command of the registry except newer ones."""
    covered = {type(c).op for c in EXAMPLES}
    assert covered <= set(COMMANDS)
    assert len(covered) >= 16


@pytest.mark.parametrize("cmd", EXAMPLES, ids=lambda c: type(c).op)
def test_wire_round_trip(cmd: Command) -> None:
    """to_wire/from_wire restore an equal command, directly and through CBOR."""
    wire = cmd.to_wire()
    assert wire[0] == type(cmd).op
    assert len(wire) == 1 + len(fields(cmd))
    assert from_wire(wire) == cmd
    again = from_wire(cbor2.loads(cbor2.dumps(wire)))
    assert again == cmd
    assert type(again) is type(cmd)


@pytest.mark.parametrize("cls", list(COMMANDS.values()), ids=list(COMMANDS))
def test_every_registered_command_round_trips(cls: type[Command]) -> None:
    """Every command in the registry has as many types as fields and round-trips."""
    assert COMMANDS[cls.op] is cls
    assert len(cls.types) == len(fields(cls))
    cmd = sample(cls)
    assert from_wire(cbor2.loads(cbor2.dumps(cmd.to_wire()))) == cmd


def test_ints_are_accepted_where_floats_are_expected() -> None:
    """An integral time on the wire (CBOR may shrink it) decodes as a float."""
    cmd = from_wire(["tick", 10, 1, 30, 5, 7])
    assert cmd == Tick(10.0, 1.0, 30.0, 5.0, 7)
    assert isinstance(cmd, Tick)
    assert all(isinstance(getattr(cmd, f.name), float) for f in fields(cmd)[:4])


def test_ack_seqs_keep_their_order_and_duplicates() -> None:
    """Ack sequence numbers decode as given."""
    assert from_wire(["ack", "s", 1, "n", [3, 1, 3]]) == Ack("s", 1, "n", [3, 1, 3])


@pytest.mark.parametrize(
    "item",
    [None, 1, "login", b"login", {"op": "noop"}, ("noop",), [], [1], [None], [b"noop"],
     [["noop"]], [True]],
    ids=repr,
)
def test_not_a_command_array(item: Any) -> None:
    """Anything but a non-empty list starting with a string is rejected."""
    with pytest.raises(CommandError):
        from_wire(item)


@pytest.mark.parametrize("op", ["nope", "LOGIN", "Login", "", "login ", "no-op"])
def test_unknown_op(op: str) -> None:
    """An op not in the registry is rejected."""
    with pytest.raises(CommandError, match="unknown op"):
        from_wire([op, "s1", 1, "n1"])


@pytest.mark.parametrize("cls", list(COMMANDS.values()), ids=list(COMMANDS))
def test_wrong_arity(cls: type[Command]) -> None:
    """One field too few or too many is rejected for every command (one too few is
    the older form of a command in ``LEGACY_ARITY``: its last field defaults)."""
    wire = sample(cls).to_wire()
    with pytest.raises(CommandError, match="expected"):
        from_wire([*wire, "extra"])
    if cls.op in LEGACY_ARITY:
        default = LEGACY_ARITY[cls.op][1]
        assert from_wire(wire[:-1]) == cls(*wire[1:-1], default)  # type: ignore[call-arg]
        with pytest.raises(CommandError, match="expected"):
            from_wire(wire[:-2])
    elif len(wire) > 1:
        with pytest.raises(CommandError, match="expected"):
            from_wire(wire[:-1])
        with pytest.raises(CommandError, match="expected"):
            from_wire(wire[:1])


def _wrong_field_cases() -> list[Any]:
    cases = []
    for op, cls in COMMANDS.items():
        for i, t in enumerate(cls.types):
            for bad in WRONG[t]:
                cases.append(pytest.param(cls, i, bad, id=f"{op}-{i}-{bad!r}"))
    return cases


@pytest.mark.parametrize(("cls", "index", "bad"), _wrong_field_cases())
def test_wrong_field_type(cls: type[Command], index: int, bad: Any) -> None:
    """Each field of each command rejects values of other types (bools included)."""
    wire = sample(cls).to_wire()
    wire[1 + index] = bad
    with pytest.raises(CommandError, match=cls.op):
        from_wire(wire)


@pytest.mark.parametrize(
    "wire",
    [
        ["login", "s", "u", "n", True, b"h", "online", None, 1.0],
        ["resume", "s", b"h", "n", 1, False, "c", 1.0],
        ["detach", "s", True, "n"],
        ["send", "s", 1, "n", True, "bob", "hi", 1.0],
        ["heartbeat", "n", 1, True],
        ["node-up", "n", False],
        ["tick", True, 1.0, 1.0, 1.0],
    ],
    ids=lambda w: w[0],
)
def test_bools_are_not_ints(wire: list[Any]) -> None:
    """True/False are rejected where an int (or a float) is expected."""
    with pytest.raises(CommandError):
        from_wire(wire)


@pytest.mark.parametrize("seqs", [["1"], [1.0], [True], [1, False], [None], [[1]], [1, 2, "3"]],
                         ids=repr)
def test_ack_seqs_must_be_ints(seqs: list[Any]) -> None:
    """Every element of an Ack's seqs must be a (non-bool) int."""
    with pytest.raises(CommandError, match="ack"):
        from_wire(["ack", "s", 1, "n", seqs])


def test_huge_int_in_float_field_is_a_command_error() -> None:
    """A CBOR bignum where a float is expected is a CommandError, not an OverflowError."""
    big = 10**400
    with pytest.raises(CommandError):
        from_wire(["tick", big, 1.0, 1.0, 1.0])
    with pytest.raises(CommandError):
        from_wire(cbor2.loads(cbor2.dumps(["login", "s", "u", "n", 1, b"h", "online", None,
                                           big])))


def test_huge_int_in_int_field_is_kept() -> None:
    """Int fields take arbitrary-precision integers (CBOR bignums)."""
    big = 2**80
    assert from_wire(["heartbeat", "n", big, big]) == Heartbeat("n", big, big)


def test_command_error_is_a_value_error() -> None:
    """Callers catching ValueError also catch malformed commands."""
    assert issubclass(CommandError, ValueError)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=4), st.binary(max_size=4),
                    st.lists(st.one_of(st.integers(), st.booleans(), st.text(max_size=2)),
                             max_size=3))


def _typed(expected: Any) -> st.SearchStrategy[Any]:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    good = {str: st.text(max_size=3), int: st.integers(), float: st.floats(allow_nan=False),
            bytes: st.binary(max_size=3), type(None): st.none(),
            list: st.lists(st.one_of(st.integers(), st.booleans()), max_size=3)}
    return st.one_of(*(good[k] for k in kinds), _VALUES)


@st.composite
def _wire_items(draw: st.DrawFn) -> list[Any]:
    op = draw(st.sampled_from(sorted(COMMANDS)))
    if draw(st.booleans()):  # the right arity, values mostly of the right types
        return [op, *(draw(_typed(t)) for t in COMMANDS[op].types)]
    return [op, *draw(st.lists(_VALUES, max_size=9))]


@given(item=_wire_items())
def test_fast_path_agrees_with_full_check(item: list[Any]) -> None:
    """``from_wire``'s exact-type fast path accepts exactly what the full check
    accepts, and builds the same command."""
    try:
        want: Command | str = _from_wire_checked(item)
    except CommandError:
        want = "error"
    try:
        got: Command | str = from_wire(item)
    except CommandError:
        got = "error"
    assert got == want


@pytest.mark.parametrize("cmd", EXAMPLES, ids=lambda c: c.op)
def test_fast_path_agrees_on_examples(cmd: Command) -> None:
    wire = cbor2.loads(cbor2.dumps(cmd.to_wire()))
    assert from_wire(wire) == _from_wire_checked(wire) == cmd


def test_a_resume_without_attempt_from_an_older_log_still_decodes() -> None:
    """Logs written before ``Resume.attempt`` existed replay unchanged (attempt 0);
    one field fewer than that is still refused."""
    old = ["resume", "s1", b"h", "n2", 4, 17, "claim-1", 1700000001.5]
    assert from_wire(old) == Resume("s1", b"h", "n2", 4, 17, "claim-1", 1700000001.5, 0)
    with pytest.raises(CommandError, match="expected"):
        from_wire(old[:-1])
