"""The replication bench's raw baselines run plain pysyncobj: ``bench.repl_node``
must not load ``replication.raft`` unless its mode asks for it, since importing
that module patches pysyncobj (the node's peer framing, cipher and serializer)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any


def test_loading_the_bench_server_leaves_pysyncobj_unpatched() -> None:
    code = "import sys, bench.repl_node; print('replication.raft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr


class _SlowFirstLog:
    """A fake log that records the sequence numbers in the order they are
    proposed; encoding the first batch takes until another batch has been
    proposed (at most half a second), as a large batch's encoding outlasts a
    small one's."""

    def __init__(self) -> None:
        self.proposed: list[int] = []
        self.another = threading.Event()

    def encode(self, origin: str, inc: int, seq: int, items: list[Any], ordered: bool) -> bytes:
        if seq == 1:
            self.another.wait(0.5)
        return b"%d" % seq

    def propose(self, seq: int, blob: bytes, done: Any) -> None:
        self.proposed.append(seq)
        if seq != 1:
            self.another.set()


def test_batches_reach_the_log_in_sequence_order() -> None:
    """Two threads propose (in the bench: the generator and the commit
    callbacks); an ordered batch that reached the log after its successor was
    refused as a gap, and with it every later batch (the bench does not
    re-propose)."""
    from bench.repl_node import Proposer

    log = _SlowFirstLog()
    p = Proposer(log, "r1", 1, batch=10, k=4)  # type: ignore[arg-type]
    first = threading.Thread(target=p.enqueue, args=([(0.0, None)],))
    first.start()
    time.sleep(0.05)  # the first batch is being encoded
    p.enqueue([(0.0, None)])
    first.join(5)
    assert log.proposed == [1, 2]
