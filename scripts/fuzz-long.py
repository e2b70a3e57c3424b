#!/usr/bin/env python3
"""A long fuzz run (not part of the test suite): the client frame decoder, the
command/batch decoder and random command sequences on the state machine, with
many more examples than CI runs. Prints the counts recorded in docs/security.md.

    .venv/bin/python scripts/fuzz-long.py [--examples N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.protocol import CLIENT_FRAMES, FrameDecoder, RemoteProtocolError
from replication.batch import BatchApplier
from replication.table import SessionTable


def main() -> int:
    import logging

    logging.disable(logging.CRITICAL)
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=100_000)
    n = ap.parse_args().examples
    opts = settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    counts: dict[str, int] = {}

    @opts
    @given(st.binary(max_size=2048), st.lists(st.integers(1, 512), max_size=8))
    def frames(data: bytes, cuts: list[int]) -> None:
        counts["frames"] = counts.get("frames", 0) + 1
        dec = FrameDecoder(CLIENT_FRAMES)
        pos = 0
        try:
            for cut in [*cuts, len(data)]:
                dec.feed(data[pos:pos + cut])
                pos += cut
                list(dec.frames())
        except RemoteProtocolError:
            pass

    applier = BatchApplier(SessionTable(local=("n1", 1)))

    @opts
    @given(st.binary(max_size=2048))
    def batches(blob: bytes) -> None:
        counts["batches"] = counts.get("batches", 0) + 1
        applier.apply(blob)

    t0 = time.monotonic()
    frames()
    batches()
    from tests.unit.test_table_stateful import TableMachine

    machine_settings = settings(max_examples=max(100, n // 50), stateful_step_count=60,
                                deadline=None, database=None,
                                suppress_health_check=list(HealthCheck))
    TableMachine.TestCase.settings = machine_settings
    TableMachine.TestCase().runTest()
    took = time.monotonic() - t0
    print(f"frame decoder: {counts['frames']} inputs; batch/command decoder: "
          f"{counts['batches']} inputs; state machine: {machine_settings.max_examples} "
          f"sequences of up to 60 commands; {took:.0f} s; no unexpected exception")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
