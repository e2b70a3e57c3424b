"""The history of a chaos run, Jepsen-style, and its JSON Lines form.

Every client operation is recorded twice: an ``invoke`` when it starts and a
completion when it ends: ``ok`` (it happened), ``fail`` (it certainly did not
happen) or ``info`` (unknown: it timed out or the connection broke, it may or
may not have happened). Observations a client makes without asking (a message
delivered to it, a presence event, a reconnect) are single ``ok`` entries with
no invoke. Nemesis faults are an ``invoke`` when the fault starts and an
``info`` when it is healed.

Client operations (process ``c<k>``, one process per user ``u<k>``):

=================  ======================================================================
f                  value
=================  ======================================================================
``login``          invoke {user}; ok {user, session, node}; fail/info {user, error}
``send``           invoke {to, body}; ok {to, body, id}; fail/info {to, body, error}
``presence``       invoke {status, text}; ok/fail/info {status, text[, error]}
``allow``          invoke/ok/fail/info {user}
``subscribe``      invoke/ok/fail/info {user}
``deliver``        ok {id, from, to, body, seq, node, epoch}   (observation)
``presence-event`` ok {viewer, user, status, text}              (observation)
``reconnect``      ok {user, session, node, resumed, epoch}     (observation)
=================  ======================================================================

Nemesis operations (process ``nemesis``): ``f`` is the fault kind (``kill``,
``pause``, ``partition``, ``loss``, ``clock``, ``member``); invoke value
describes it (``{"nodes": [...], "detail": ...}``), the info that ends it
carries ``{"healed": true}`` and the same ``fault`` number as the invoke.

This module is pure (no I/O apart from the explicit ``dump``/``load``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OP_TYPES = ("invoke", "ok", "fail", "info")
OBSERVATIONS = ("deliver", "presence-event", "reconnect")
FAULT_KINDS = ("kill", "pause", "partition", "loss", "clock", "member")


@dataclass(frozen=True, slots=True)
class Op:
    index: int
    time: float  # seconds since the run started
    process: str
    type: str
    f: str
    value: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        return cls(d["index"], d["time"], d["process"], d["type"], d["f"], d.get("value", {}))


class History:
    """An append-only list of ops; ``record`` stamps index and time."""

    def __init__(self, clock: Any = None):
        self.ops: list[Op] = []
        self._clock = clock

    def record(self, process: str, type_: str, f: str, value: dict[str, Any] | None = None,
               time: float | None = None) -> Op:
        assert type_ in OP_TYPES, type_
        if time is None:
            time = self._clock() if self._clock is not None else 0.0
        op = Op(len(self.ops), float(time), process, type_, f, dict(value or {}))
        self.ops.append(op)
        return op

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def dump(self, path: Path) -> None:
        with open(path, "w") as f:
            for op in self.ops:
                f.write(op.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        h = cls()
        with open(path) as f:
            h.ops = [Op.from_dict(json.loads(line)) for line in f if line.strip()]
        return h

    @classmethod
    def of(cls, ops: Iterable[Op]) -> History:
        h = cls()
        h.ops = list(ops)
        return h
