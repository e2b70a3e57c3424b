"""Group commit: many commands ride in one Raft log entry.

A batch is the envelope ``[origin, inc, seq, [[rid, command], ...]]``: the
proposing node's id and incarnation, its batch counter, and each command (its
wire form, ``commands``) with the proposer's request id, so that the proposer
can match results to waiters. ``BatchApplier`` applies a batch to a
``SessionTable`` and never raises: a replicated method that raises would
freeze the whole pysyncobj cluster.

On the log the envelope is a pickle (protocol 5) when every value in it is of
a plain type (every command decodes as itself, ``commands.wire_items``), and
CBOR otherwise (an int in a float field, say: cbor2 converts what it can, as
before). Unpickling is restricted to plain values (``_PlainUnpickler``: no
class or function may be named, so a batch cannot run code), and a batch
starts with its format's mark (a pickle's ``PROTO`` opcode, ``0x80``; a CBOR
envelope, an array of 4 or 5, ``0x84``/``0x85``), so logs written with CBOR
batches only still replay. Pickle because it is the cheaper codec by far for
these lists of strings and numbers (encoding about 4x, decoding about 2x
faster than cbor2 here, and smaller: repeated strings are stored once).

An *ordered* batch (``[origin, inc, seq, items, true]``, what a node
proposes) applies exactly once and in its proposer's order: the table keeps
the last sequence number applied per proposer incarnation, skips a batch at or
below it (a re-proposal of a batch that did commit) and refuses one beyond the
next (an earlier batch was lost: its proposer re-sends from there). That lets a
node keep several batches in flight and re-propose any of them without a
command applying twice or overtaking an earlier one. A batch without the flag
(the older form, and test helpers) applies whatever its sequence number.

A batch this process proposes is encoded with ``BatchApplier.encode``: when
the log hands it back to apply, the applier takes the commands it was built
from instead of decoding it (decoding is a third of a replica's apply time),
and only when each of them decodes as itself (``wire_items``), so every
replica applies equal commands.

Pure: no clock, no I/O, no threads (``encode`` may run on another thread than
``apply``: they share one dict, each step a single dict operation).
"""

from __future__ import annotations

import io
import logging
import pickle
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from .commands import Command, CommandError, from_wire, wire_items
from .table import BATCH_APPLY, Effect, Result, SessionTable, error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """One applied command: the proposer's request id, its result and local effects."""

    rid: int
    result: Result
    effects: list[Effect]


@dataclass(slots=True)
class AppliedBatch:
    """A batch as this replica applied it. ``status`` is ``BATCH_APPLY``, or for
    an ordered batch that did not apply, ``BATCH_DUPLICATE`` or ``BATCH_GAP``
    (``SessionTable.admit_batch``); such a batch has no outcomes.

    ``outcomes``: every command's, in order, for a batch of the table's own
    identity (``SessionTable.local``; every batch when it has none); for
    another proposer's batch only those with effects here: the other results
    matter to their proposer alone (a checkpoint's digest is the replication
    shell's, ``SessionTable.checkpoints_due``)."""

    origin: str
    inc: int
    seq: int
    outcomes: list[Outcome]
    status: str = BATCH_APPLY


PICKLE_PROTOCOL = 5
_PICKLED = b"\x80"  # a pickle's PROTO opcode; no CBOR batch envelope starts so


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain values only (lists, tuples, strings, numbers, bytes, None,
    booleans): a pickle naming any global, a class or a function, is refused, so
    unpickling a batch runs no code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a batch may not name {module}.{name}")


def encode_batch(origin: str, inc: int, seq: int, items: list[tuple[int, Command]],
                 ordered: bool = False) -> bytes:
    """The log entry for ``items``; ``ordered`` (a node's proposals) makes the
    table apply it once and in ``seq`` order (see the module docstring)."""
    wire, plain = wire_items(items)
    return _envelope(origin, inc, seq, wire, ordered, plain)


def _envelope(origin: str, inc: int, seq: int, wire: list[list[Any]], ordered: bool,
              plain: bool) -> bytes:
    envelope = [origin, inc, seq, wire, True] if ordered else [origin, inc, seq, wire]
    if plain and type(origin) is str and type(inc) is int and type(seq) is int:
        return pickle.dumps(envelope, PICKLE_PROTOCOL)
    return cbor2.dumps(envelope)


def decode_batch(blob: bytes) -> tuple[str, int, int, list[Any], bool]:
    """Decode a batch's envelope (origin, inc, seq, items, ordered); raise
    ``CommandError`` if it is malformed."""
    try:
        if blob[:1] == _PICKLED:
            envelope = _PlainUnpickler(io.BytesIO(blob)).load()
        else:
            envelope = cbor2.loads(blob)
    except Exception as e:  # the codecs raise several types; any of them means malformed
        raise CommandError(f"malformed batch: {e}") from None
    if type(envelope) is not list or len(envelope) not in (4, 5):
        raise CommandError("malformed batch envelope")
    origin, inc, seq, items = envelope[:4]
    ordered = len(envelope) == 5
    if not (isinstance(origin, str) and isinstance(inc, int) and isinstance(seq, int)
            and isinstance(items, list)) or (ordered and (envelope[4] is not True or seq < 1)):
        raise CommandError("malformed batch envelope")
    return origin, inc, seq, items, ordered


OWN_BATCHES = 64
"""``BatchApplier.encode`` keeps this many of its latest batches for ``apply``
(a batch that never commits is forgotten once this many newer ones are kept)."""


class BatchApplier:
    """Applies batches to a table; results for every command, never an exception."""

    def __init__(self, table: SessionTable):
        self.table = table
        self.batches = 0
        self.commands = 0
        self.rejected = 0
        self.skipped = 0  # ordered batches not applied: repeats and batches after a gap
        self.own_applied = 0  # batches applied from their commands, not decoded
        self._own: dict[bytes, tuple[str, int, int, tuple[tuple[int, Command], ...], bool]] = {}
        self._own_order: deque[bytes] = deque()

    def encode(self, origin: str, inc: int, seq: int, items: list[tuple[int, Command]],
               ordered: bool = False) -> bytes:
        """``encode_batch``, for a batch this process proposes: once the log hands
        the same bytes to ``apply``, the commands in ``items`` are applied as
        they are, not decoded again. Called by one proposing thread."""
        kept = tuple(items)
        wire, exact = wire_items(kept)
        blob = _envelope(origin, inc, seq, wire, ordered, exact)
        if exact:
            self._own[blob] = (origin, inc, seq, kept, ordered)
            order = self._own_order
            order.append(blob)
            if len(order) > OWN_BATCHES:
                self._own.pop(order.popleft(), None)
        return blob

    def apply(self, blob: bytes) -> AppliedBatch:
        own = self._own.pop(blob, None) if self._own else None
        items: Sequence[Any]
        if own is not None:
            origin, inc, seq, items, ordered = own
        else:
            try:
                origin, inc, seq, items, ordered = decode_batch(blob)
            except CommandError as e:
                log.error("dropping a malformed log entry: %s", e)
                self.rejected += 1
                return AppliedBatch("", 0, 0, [])
        if ordered:
            status = self.table.admit_batch(origin, inc, seq)
            if status != BATCH_APPLY:
                self.skipped += 1
                return AppliedBatch(origin, inc, seq, [], status)
        self.batches += 1
        if own is not None:
            self.own_applied += 1
        outcomes: list[Outcome] = []
        table = self.table
        every = table.local is None or table.local == (origin, inc)
        for item in items:
            if own is not None:
                rid, cmd = item
            else:
                rid = -1
                try:
                    rid, wire = item
                    cmd = from_wire(wire)
                except (CommandError, TypeError, ValueError) as e:
                    self.rejected += 1
                    outcomes.append(Outcome(rid if isinstance(rid, int) else -1,
                                            error("invalid", str(e)), []))
                    continue
            try:
                result, effects = table.apply(cmd)
            except Exception as e:  # a bug in the table must not freeze the cluster
                log.exception("table failed to apply %s", cmd.op)
                result, effects = error("internal", f"{type(e).__name__}: {e}"), []
            self.commands += 1
            if every or effects:
                outcomes.append(Outcome(rid, result, effects))
        return AppliedBatch(origin, inc, seq, outcomes)
