"""``bench.replication.stalls``: the leader's slow batches grouped into bursts,
each beside the members' compaction holds and long collections (pure)."""

from __future__ import annotations

from bench.replication import stalls


def test_slow_batches_group_into_bursts_with_the_events_near_them() -> None:
    run = {
        "5000": {"t0_monotonic": 100.0,
                 "slow_batches": [(1.00, 12.0, 5), (1.05, 40.0, 9), (1.12, 15.0, 4),
                                  (3.00, 11.0, 2)]},
        "stats": {"r1": {"events": [(100.7, "fork", 3.0), (101.06, "gc2", 30.0)]},
                  "r2": {"events": [(99.0, "cut", 2.0), (103.5, "cut-finish", 1.0)]}},
    }
    got = stalls(run, [5000.0, 10000.0])
    assert [(b["at_s"], b["worst_ms"], b["commands"]) for b in got] == [
        (1.0, 40.0, 18), (3.0, 11.0, 2)]
    assert got[0]["near"] == [
        {"member": "r1", "kind": "fork", "ms": 3.0, "at_ms": -300},
        {"member": "r1", "kind": "gc2", "ms": 30.0, "at_ms": 60}]
    assert got[1]["near"] == []  # the cut-finish began after the burst
