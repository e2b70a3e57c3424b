"""Three real ``ReplicatedLog`` members in this process, on loopback: for the
tests of the Raft layer alone, without nodes around it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.ports import free_base_port
from replication.batch import AppliedBatch, encode_batch
from replication.commands import Command, Noop
from replication.raft import OnCheckpoint, RaftConfig, ReplicatedLog
from replication.table import SessionTable

OnApplied = Callable[[int, AppliedBatch], None]


@contextmanager
def raft_group(tmp_path: Path, on_applied: Callable[[int], OnApplied] | None = None,
               local: bool = False, on_checkpoint: Callable[[int], OnCheckpoint] | None = None,
               **config: Any) -> Iterator[list[ReplicatedLog]]:
    """Start three members (``on_applied(k)`` and ``on_checkpoint(k)`` give member
    k's callbacks; ``config`` goes to every ``RaftConfig``), wait for a leader,
    close them all at the end. With ``local``, member k's table holds the sessions
    of node "m{k}" (incarnation 1) as its own, as a node's does."""
    base = free_base_port(3)
    addrs = [f"127.0.0.1:{base + k}" for k in range(3)]
    logs: list[ReplicatedLog] = []
    try:
        for k, addr in enumerate(addrs):
            cfg = RaftConfig(self_addr=addr, peers=tuple(a for a in addrs if a != addr),
                             data_dir=tmp_path / f"m{k}", password="test-secret", **config)
            callback = on_applied(k) if on_applied else (lambda _i, _b: None)
            table = SessionTable(local=(f"m{k}", 1)) if local else SessionTable()
            checkpoint = on_checkpoint(k) if on_checkpoint else (lambda _t, _i, _d: None)
            logs.append(ReplicatedLog(cfg, table, callback, on_checkpoint=checkpoint))
        leader_of(logs)
        yield logs
    finally:
        for lg in logs:
            lg.close()


def leader_of(logs: list[ReplicatedLog], timeout: float = 20.0,
              among: Iterable[int] | None = None) -> int:
    """The index of the member that is leader (waits for one), of those in
    ``among`` if given (a closed member's last status may still say leader)."""
    deadline = time.monotonic() + timeout
    while True:
        for k in range(len(logs)) if among is None else among:
            if logs[k].status().role == "leader":
                return k
        assert time.monotonic() < deadline, "no leader"
        time.sleep(0.05)


def propose_noop(log: ReplicatedLog, seq: int) -> None:
    """Propose a one-command batch (a ``Noop``) whose outcome nobody awaits."""
    propose(log, seq, Noop())


def propose(log: ReplicatedLog, seq: int, cmd: Command, origin: str = "t") -> None:
    """Propose a one-command batch (``seq``: the next of ``origin``'s) whose
    outcome nobody awaits."""
    log.propose(encode_batch(origin, 1, seq, [(0, cmd)]), lambda _r, _m: None)
