"""Group commit: many commands ride in one Raft log entry.

A batch is ``cbor2([origin, inc, seq, [[rid, command], ...]])``: the proposing
node's id and incarnation, its batch counter, and each command with the
proposer's request id, so that the proposer can match results to waiters.
``BatchApplier`` applies a batch to a ``SessionTable`` and never raises: a
replicated method that raises would freeze the whole pysyncobj cluster.

Pure: no clock, no I/O, no threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cbor2

from .commands import Command, CommandError, from_wire
from .table import Effect, Result, SessionTable, error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """One applied command: the proposer's request id, its result and local effects."""

    rid: int
    result: Result
    effects: list[Effect]


@dataclass(slots=True)
class AppliedBatch:
    origin: str
    inc: int
    seq: int
    outcomes: list[Outcome]


def encode_batch(origin: str, inc: int, seq: int, items: list[tuple[int, Command]]) -> bytes:
    return cbor2.dumps([origin, inc, seq, [[rid, cmd.to_wire()] for rid, cmd in items]])


def decode_batch(blob: bytes) -> tuple[str, int, int, list[Any]]:
    """Decode a batch's envelope; raise ``CommandError`` if it is malformed."""
    try:
        origin, inc, seq, items = cbor2.loads(blob)
    except Exception as e:  # cbor2 raises several types; any of them means malformed
        raise CommandError(f"malformed batch: {e}") from None
    if not (isinstance(origin, str) and isinstance(inc, int) and isinstance(seq, int)
            and isinstance(items, list)):
        raise CommandError("malformed batch envelope")
    return origin, inc, seq, items


class BatchApplier:
    """Applies batches to a table; results for every command, never an exception."""

    def __init__(self, table: SessionTable):
        self.table = table
        self.batches = 0
        self.commands = 0
        self.rejected = 0

    def apply(self, blob: bytes) -> AppliedBatch:
        try:
            origin, inc, seq, items = decode_batch(blob)
        except CommandError as e:
            log.error("dropping a malformed log entry: %s", e)
            self.rejected += 1
            return AppliedBatch("", 0, 0, [])
        self.batches += 1
        outcomes: list[Outcome] = []
        table = self.table
        for item in items:
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
            outcomes.append(Outcome(rid, result, effects))
        return AppliedBatch(origin, inc, seq, outcomes)
