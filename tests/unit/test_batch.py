"""Group-commit batches: envelope encoding, and an applier that never raises."""

from __future__ import annotations

import pickle
import pickletools
from collections import OrderedDict
from fractions import Fraction
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.batch import (
    OWN_BATCHES,
    AppliedBatch,
    BatchApplier,
    decode_batch,
    encode_batch,
)
from replication.commands import (
    Ack,
    Checkpoint,
    Command,
    CommandError,
    Login,
    Logout,
    Noop,
    Send,
    SetPresence,
)
from replication.table import BATCH_DUPLICATE, Deliver, PresenceNotice, SessionTable

H = b"token-hash"


def test_encode_decode_round_trip() -> None:
    """decode_batch returns the envelope and the items as [rid, wire] pairs."""
    items: list[tuple[int, Command]] = [
        (1, Login("s1", "alice", "n1", 1, H, "online", None, 1.0)),
        (2, Send("s1", 1, "n1", 1, "bob", b"\x00hi", 2.0)),
        (7, Noop()),
    ]
    origin, inc, seq, decoded, ordered = decode_batch(encode_batch("n1", 5, 42, items))
    assert (origin, inc, seq, ordered) == ("n1", 5, 42, False)
    assert decoded == [[rid, cmd.to_wire()] for rid, cmd in items]
    assert decode_batch(encode_batch("n1", 5, 42, items, ordered=True))[4] is True


def test_empty_batch_round_trip() -> None:
    """A batch without commands is valid and applies to nothing."""
    blob = encode_batch("n2", 1, 0, [])
    assert decode_batch(blob) == ("n2", 1, 0, [], False)
    applier = BatchApplier(SessionTable())
    assert applier.apply(blob) == AppliedBatch("n2", 1, 0, [])
    assert applier.batches == 1


MALFORMED_BLOBS: list[bytes] = [
    b"",
    b"\xff",
    b"\x1f",  # reserved additional info
    cbor2.dumps(["n1", 1, 1, [[1, ["noop"]]]])[:-3],  # truncated
    cbor2.dumps(None),
    cbor2.dumps(7),
    cbor2.dumps("n1"),
    cbor2.dumps({"origin": "n1"}),
    cbor2.dumps(["n1", 1, 1]),
    cbor2.dumps(["n1", 1, 1, [], "extra"]),
    cbor2.dumps(["n1", 1, 1, [], 1]),  # the ordered flag is exactly true
    cbor2.dumps(["n1", 1, 0, [], True]),  # ordered batches count from 1
    cbor2.dumps(["n1", 1, 1, [], True, True]),
    cbor2.dumps([1, 1, 1, []]),
    cbor2.dumps(["n1", "1", 1, []]),
    cbor2.dumps(["n1", 1, 1.5, []]),
    cbor2.dumps(["n1", 1, 1, {"a": 1}]),
    cbor2.dumps(["n1", 1, 1, None]),
    cbor2.dumps("abcd"),  # four characters unpack into four fields
    cbor2.dumps(b"abcd"),
    # pickled envelopes: the same checks, and no global may be named
    pickle.dumps(["n1", 1, 1, [[1, ["noop"]]]], 5)[:-3],  # truncated
    pickle.dumps(("n1", 1, 1, []), 5),
    pickle.dumps(["n1", 1, 0, [], True], 5),
    pickle.dumps(["n1", 1, 1, [], OrderedDict()], 5),
    pickle.dumps(["n1", 1, 1, [[1, ["noop"]]], Fraction(1, 3)], 5),
    b"\x80\x05",
]


@pytest.mark.parametrize("blob", MALFORMED_BLOBS, ids=repr)
def test_decode_batch_rejects_malformed(blob: bytes) -> None:
    """A malformed envelope is a CommandError, whatever the decoder raised."""
    with pytest.raises(CommandError):
        decode_batch(blob)


@pytest.mark.parametrize("blob", MALFORMED_BLOBS, ids=repr)
def test_applier_drops_malformed_blob(blob: bytes) -> None:
    """A malformed log entry yields an empty AppliedBatch and leaves the table alone."""
    table = SessionTable()
    before = table.digest()
    applier = BatchApplier(table)
    assert applier.apply(blob) == AppliedBatch("", 0, 0, [])
    assert applier.rejected == 1
    assert applier.batches == 0
    assert table.digest() == before


def test_applier_applies_in_order_with_results_and_effects() -> None:
    """Each command gets an outcome with its rid, its result and the local effects."""
    table = SessionTable(local=("n1", 1))
    applier = BatchApplier(table)
    blob = encode_batch("n1", 1, 1, [
        (10, Login("b1", "bob", "n1", 1, H, "online", None, 1.0)),
        (11, Login("a1", "alice", "n2", 1, H, "online", None, 1.0)),
        (12, Send("a1", 1, "n2", 1, "bob", "hi", 2.0)),
        (13, Ack("b1", 1, "n1", [1])),
    ])
    applied = applier.apply(blob)
    assert (applied.origin, applied.inc, applied.seq) == ("n1", 1, 1)
    assert [o.rid for o in applied.outcomes] == [10, 11, 12, 13]
    assert all(o.result.ok for o in applied.outcomes)
    send = applied.outcomes[2]
    assert send.result.value == {"id": 1, "seq": 1}
    assert len(send.effects) == 1
    deliver = send.effects[0]
    assert isinstance(deliver, Deliver)
    assert deliver.sessions == ["b1"]
    assert deliver.message.body == "hi"
    assert applied.outcomes[3].result.value == {"acked": 1}
    assert (applier.batches, applier.commands, applier.rejected) == (1, 4, 0)


def test_applier_reports_malformed_items_and_applies_the_rest() -> None:
    """Malformed items get an "invalid" outcome; the valid ones around them apply."""
    table = SessionTable()
    applier = BatchApplier(table)
    good = Login("s1", "alice", "n1", 1, H, "online", None, 1.0).to_wire()
    items: list[Any] = [
        [1, ["nope", 1]],  # unknown op
        [2, ["logout", "s1", 1]],  # wrong arity
        [3, ["logout", "s1", "1", "n1", 1.0]],  # wrong type
        [4, ["logout", "s1", True, "n1", 1.0]],  # bool for an int
        [5, ["ack", "s1", 1, "n1", ["1"]]],  # non-int seq
        [6, ["tick", 10**400, 1.0, 1.0, 1.0]],  # bignum for a float
        [7, good],
        "not-a-pair",
        [8],
        [9, good, "extra"],
        42,
        None,
        ["rid", ["noop", "x"]],  # a non-int rid is reported as -1
        [10, ["noop"]],
    ]
    applied = applier.apply(cbor2.dumps(["n1", 1, 9, items]))
    outcomes = applied.outcomes
    assert len(outcomes) == len(items)
    assert [o.rid for o in outcomes[:7]] == [1, 2, 3, 4, 5, 6, 7]
    for o in outcomes[:6]:
        assert not o.result.ok
        assert o.result.code == "invalid"
        assert o.effects == []
    assert outcomes[6].result.ok
    for o in outcomes[7:13]:
        assert o.result.code == "invalid"
        assert o.rid == -1
    assert outcomes[13].rid == 10
    assert outcomes[13].result.ok
    assert applier.rejected == 12
    assert applier.commands == 2
    assert table.presence_of("alice")[0] == "online"


def test_applier_turns_a_table_exception_into_an_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler that raises yields an "internal" outcome; later commands still apply."""
    table = SessionTable(local=("n1", 1))

    def boom(cmd: SetPresence) -> Any:
        raise KeyError("broken handler")

    monkeypatch.setitem(table._dispatch, SetPresence, boom)
    applier = BatchApplier(table)
    blob = encode_batch("n1", 1, 3, [
        (1, Login("s1", "alice", "n1", 1, H, "online", None, 1.0)),
        (2, SetPresence("s1", 1, "n1", "away", None, 2.0)),
        (3, Login("s2", "bob", "n1", 1, H, "online", None, 2.0)),
        (4, Logout("s1", 1, "n1", 3.0)),
    ])
    outcomes = applier.apply(blob).outcomes
    assert [o.rid for o in outcomes] == [1, 2, 3, 4]
    failed = outcomes[1]
    assert not failed.result.ok
    assert failed.result.code == "internal"
    assert failed.result.reason is not None and "KeyError" in failed.result.reason
    assert failed.effects == []
    assert outcomes[2].result.ok and outcomes[3].result.ok
    assert table.presence_of("alice")[0] == "offline"
    assert table.presence_of("bob")[0] == "online"
    assert applier.commands == 4
    assert applier.rejected == 0


def test_applier_survives_a_class_level_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patching the handler on the class before the table is built also yields "internal"."""

    def boom(self: SessionTable, cmd: Noop) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(SessionTable, "_noop", boom)
    applier = BatchApplier(SessionTable())
    outcomes = applier.apply(encode_batch("n1", 1, 1, [(1, Noop()), (2, Noop())])).outcomes
    assert [o.result.code for o in outcomes] == ["internal", "internal"]


def test_applier_counts_batches() -> None:
    """Counters accumulate across batches."""
    applier = BatchApplier(SessionTable())
    for seq in range(3):
        applier.apply(encode_batch("n1", 1, seq, [(seq, Noop())]))
    applier.apply(b"\xff")
    assert (applier.batches, applier.commands, applier.rejected) == (3, 3, 1)


def test_effects_follow_the_local_identity() -> None:
    """The same batch applied to another node's table gives other effects, same state."""
    blob = encode_batch("n1", 1, 1, [
        (1, Login("b1", "bob", "n1", 1, H, "online", None, 1.0)),
        (2, Login("a1", "alice", "n2", 1, H, "online", None, 1.0)),
        (3, Send("a1", 1, "n2", 1, "bob", "hi", 2.0)),
    ])
    t1, t2, t0 = SessionTable(("n1", 1)), SessionTable(("n2", 1)), SessionTable()
    o1 = BatchApplier(t1).apply(blob).outcomes
    o2 = BatchApplier(t2).apply(blob).outcomes
    o0 = BatchApplier(t0).apply(blob).outcomes
    assert [o.result for o in o1] == [o.result for o in o0]
    assert len(o1[2].effects) == 1
    assert o0[2].effects == []
    assert o2 == []  # another node's batch: no result matters here, no effect is for n2
    assert t1.digest() == t2.digest() == t0.digest()
    assert not any(isinstance(e, PresenceNotice) for o in o0 for e in o.effects)


def test_another_proposers_batch_keeps_only_the_outcomes_that_matter_here() -> None:
    """On a replica that did not propose the batch, an outcome is kept only if it
    has effects for this node's sessions; the proposer's own replica keeps every
    outcome, in order. Both note the checkpoint for their shell to digest."""
    setup = encode_batch("n1", 1, 1, [
        (1, Login("b1", "bob", "n1", 1, H, "online", None, 1.0)),
        (2, Login("a1", "alice", "n2", 1, H, "online", None, 1.0)),
    ])
    blob = encode_batch("n2", 1, 1, [
        (7, SetPresence("a1", 1, "n2", "away", None, 2.0)),
        (8, Send("a1", 1, "n2", 1, "bob", "hi", 2.0)),
        (9, Checkpoint("c1")),
        (10, Send("a1", 1, "n2", 2, "nobody", "hi", 2.0)),
    ])
    here, proposer = BatchApplier(SessionTable(("n1", 1))), BatchApplier(SessionTable(("n2", 1)))
    for a in (here, proposer):
        a.apply(setup)
    kept = here.apply(blob).outcomes
    every = proposer.apply(blob).outcomes
    assert [o.rid for o in every] == [7, 8, 9, 10]
    assert [o.rid for o in kept] == [8]
    assert isinstance(kept[0].effects[0], Deliver)
    assert here.table.checkpoints_due == proposer.table.checkpoints_due == ["c1"]
    assert here.commands == proposer.commands == 6
    assert here.table.digest() == proposer.table.digest()


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
    | st.sampled_from(["login", "resume", "send", "ack", "tick", "noop", "logout"]),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(cbor_values, max_size=6), envelope=st.booleans())
def test_applier_never_raises_on_random_items(items: list[Any], envelope: bool) -> None:
    """Random CBOR items (or random envelopes) give outcomes, never exceptions."""
    applier = BatchApplier(SessionTable(local=("n1", 1)))
    blob = cbor2.dumps(["n1", 1, 1, items] if envelope else items)
    applied = applier.apply(blob)
    if envelope:
        assert len(applied.outcomes) == len(items)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: b"\x80\x05" + b))
def test_applier_never_raises_on_random_bytes(blob: bytes) -> None:
    """Arbitrary bytes (also behind a pickle's mark) never make the applier raise."""
    BatchApplier(SessionTable()).apply(blob)


class _Canary:
    """Records its construction: a batch that names it must not build it."""

    built = 0

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Canary, ())

    def __init__(self) -> None:
        _Canary.built += 1


def test_a_batch_of_plain_values_is_a_pickle_that_names_nothing() -> None:
    """A batch of commands that decode as themselves is pickled (cheaper than
    CBOR both ways); unpickling it needs no global, and one that names a global
    (here a class whose construction would be recorded) is refused as malformed,
    without building anything."""
    items = _traffic()
    blob = encode_batch("n1", 1, 1, items, ordered=True)
    assert blob[:1] == b"\x80"
    assert not any(op.name in {"GLOBAL", "STACK_GLOBAL", "REDUCE"}
                   for op, _arg, _pos in pickletools.genops(blob))
    assert decode_batch(blob) == ("n1", 1, 1, [[r, c.to_wire()] for r, c in items], True)
    _Canary.built = 0
    rogue = pickle.dumps(["n1", 1, 1, [[1, ["noop"]]], _Canary.__new__(_Canary)], 5)
    with pytest.raises(CommandError, match="may not name"):
        decode_batch(rogue)
    assert BatchApplier(SessionTable()).apply(rogue) == AppliedBatch("", 0, 0, [])
    assert _Canary.built == 0


def test_a_batch_with_a_value_to_convert_stays_cbor_and_old_cbor_batches_apply() -> None:
    """A command with an int where a float is due is encoded as CBOR, as every
    batch was before: decoding converts it the same way on every replica; a
    CBOR batch from an older log applies as a pickled one does."""
    odd: list[tuple[int, Command]] = [
        (1, Login("s1", "alice", "n1", 1, H, "online", None, 10)),  # type: ignore[arg-type]
    ]
    blob = encode_batch("n1", 1, 1, odd)
    assert blob[:1] == b"\x84"
    assert decode_batch(blob)[3] == [[1, ["login", "s1", "alice", "n1", 1, H, "online", None, 10]]]
    old = cbor2.dumps(["n1", 1, 1, [[r, c.to_wire()] for r, c in _traffic()], True])
    new = encode_batch("n1", 1, 1, _traffic(), ordered=True)
    a, b = BatchApplier(SessionTable(("n1", 1))), BatchApplier(SessionTable(("n1", 1)))
    assert a.apply(old) == b.apply(new)
    assert a.table.digest() == b.table.digest()


# --- ordered batches: exactly once, in the proposer's order ------------------------


def _presence(seq: int, status: str) -> bytes:
    return encode_batch("n1", 7, seq, [(seq, SetPresence("s1", 1, "n1", status, None, 2.0))],
                        ordered=True)


def _logged_in() -> tuple[SessionTable, BatchApplier]:
    table = SessionTable()
    applier = BatchApplier(table)
    applier.apply(encode_batch("n1", 7, 1, [(0, Login("s1", "alice", "n1", 7, H, "online",
                                                        None, 1.0))], ordered=True))
    return table, applier


def test_an_ordered_batch_applies_once() -> None:
    """A re-proposed copy of an ordered batch that applied is skipped: no second
    result, no second effect, the table as after the first."""
    table, applier = _logged_in()
    assert applier.apply(_presence(2, "away")).status == "applied"
    digest = table.digest()
    again = applier.apply(_presence(2, "away"))
    assert again == AppliedBatch("n1", 7, 2, [], "duplicate")
    assert table.digest() == digest
    assert (applier.batches, applier.skipped) == (2, 1)


def test_an_ordered_batch_after_a_lost_one_is_refused_until_the_lost_one_applies() -> None:
    """Batch 3 arriving when 2 never did is refused (the proposer sends 2 again,
    then 3): a later presence never lands before an earlier one."""
    table, applier = _logged_in()
    assert applier.apply(_presence(3, "busy")).status == "gap"
    assert table.presence_of("alice")[0] == "online"
    assert applier.apply(_presence(2, "away")).status == "applied"
    assert applier.apply(_presence(3, "busy")).status == "applied"
    assert table.presence_of("alice")[0] == "busy"
    assert applier.apply(_presence(2, "away")).status == "duplicate"  # late copy of 2
    assert table.presence_of("alice")[0] == "busy"


def test_ordered_batches_count_per_incarnation_and_survive_a_snapshot() -> None:
    """Each proposer incarnation counts from 1; the numbers are part of the state
    (a snapshot carries them); an unordered batch applies whatever its number."""
    table, applier = _logged_in()
    blob = encode_batch("n1", 8, 1, [(1, Noop())], ordered=True)  # a restarted n1
    assert applier.apply(blob).status == "applied"
    copy = SessionTable()
    copy.restore(table.snapshot())
    assert copy.digest() == table.digest()
    assert BatchApplier(copy).apply(blob).status == "duplicate"
    assert BatchApplier(copy).apply(encode_batch("n1", 8, 1, [(1, Noop())])).status == "applied"


def test_old_incarnations_numbers_are_dropped_beyond_a_bound() -> None:
    """A proposer's numbers are kept for its latest BATCH_INCARNATIONS incarnations."""
    from replication.table import BATCH_INCARNATIONS

    table = SessionTable()
    for inc in range(1, BATCH_INCARNATIONS + 3):
        assert table.admit_batch("n1", inc, 1) == "applied"
    assert list(table.batch_seqs["n1"]) == list(range(3, BATCH_INCARNATIONS + 3))
    assert table.admit_batch("n1", BATCH_INCARNATIONS + 2, 1) == "duplicate"


@settings(max_examples=200, deadline=None)
@given(order=st.lists(st.integers(min_value=1, max_value=8), max_size=40))
def test_ordered_batches_apply_each_number_once_in_order(order: list[int]) -> None:
    """Whatever copies arrive in whatever order, the batches applied are 1, 2, 3...
    each once, and a batch applies only right after its predecessor."""
    table = SessionTable()
    applied = [seq for seq in order if table.admit_batch("n1", 1, seq) == "applied"]
    assert applied == list(range(1, len(applied) + 1))


# --- a process's own batches apply without decoding ---------------------------------

def _traffic(now: float = 10.0) -> list[tuple[int, Command]]:
    """Logins, presence, messages and acks among two users of node n1."""
    return [
        (1, Login("s1", "alice", "n1", 1, H, "online", None, now)),
        (2, Login("s2", "bob", "n1", 1, H, "online", "hi", now)),
        (3, SetPresence("s1", 1, "n1", "away", "lunch", now + 1)),
        (4, Send("s1", 1, "n1", 1, "bob", "hello", now + 2)),
        (5, Send("s2", 1, "n1", 1, "alice", b"\x00bin", now + 3)),
        (6, Ack("s2", 1, "n1", [1])),
        (7, Logout("s1", 1, "n1", now + 4)),
    ]


def test_an_own_batch_applies_its_commands_as_a_decoding_replica_would() -> None:
    """The proposer's replica applies the commands it encoded (no decoding) and
    ends with the same results, effects and table as one that decodes the entry."""
    own = BatchApplier(SessionTable(local=("n1", 1)))
    other = BatchApplier(SessionTable(local=("n1", 1)))
    blob = own.encode("n1", 1, 1, _traffic(), ordered=True)
    assert blob == encode_batch("n1", 1, 1, _traffic(), ordered=True)
    mine, theirs = own.apply(bytes(blob)), other.apply(bytes(blob))
    assert (own.own_applied, other.own_applied) == (1, 0)
    assert mine == theirs
    assert [o.result.ok for o in mine.outcomes] == [True] * 7
    assert any(isinstance(e, Deliver) for o in mine.outcomes for e in o.effects)
    assert own.table.digest() == other.table.digest()
    # Applied once, forgotten: the same bytes again (a re-proposal) are decoded.
    again = own.apply(blob)
    assert again.status == BATCH_DUPLICATE and own.own_applied == 1


def test_a_command_that_would_decode_differently_is_decoded() -> None:
    """An int in a float field becomes a float on the other replicas: a batch
    holding one is applied from its bytes here too, so the tables agree."""
    own = BatchApplier(SessionTable(local=("n1", 1)))
    other = BatchApplier(SessionTable(local=("n1", 1)))
    items: list[tuple[int, Command]] = [
        (1, Login("s1", "alice", "n1", 1, H, "online", None, 10)),  # type: ignore[arg-type]
        (2, Send("s1", 1, "n1", 1, "alice", "x", 11.0)),
    ]
    blob = own.encode("n1", 1, 1, items)
    assert own.apply(blob) == other.apply(blob)
    assert own.own_applied == 0
    assert own.table.digest() == other.table.digest()


def test_own_batches_that_never_commit_are_forgotten() -> None:
    """Only the latest OWN_BATCHES encodings are kept; older ones decode."""
    applier = BatchApplier(SessionTable(local=("n1", 1)))
    blobs = [applier.encode("n1", 1, i, [(0, Noop())]) for i in range(OWN_BATCHES + 5)]
    assert len(applier._own) == len(applier._own_order) == OWN_BATCHES
    applier.apply(blobs[0])
    applier.apply(blobs[-1])
    assert applier.own_applied == 1
