"""The plan and node settings of ``bench core``."""

from __future__ import annotations

from bench.core import FULL, NODE_ARGS

NODES = 3
HIGHEST_MEASURED = 17_803  # max phase, 36 senders, the default limit still binding


def test_the_max_message_phases_measure_the_cluster_not_the_frame_limit() -> None:
    """A node answers a connection's frames beyond ``--frame-rate`` (500/s by
    default) with ``rate-limited``, so the closed-loop max phases could never
    pass senders x that rate: with the default they stopped at that ceiling on a
    2-core AMD EPYC (12,036-12,622/s with 24 senders, 17,153-17,803/s with 36).
    The bench's nodes must allow far more than any rate measured."""
    rate = float(NODE_ARGS[NODE_ARGS.index("--frame-rate") + 1])
    ceiling = FULL.pairs_per_node * NODES * rate
    assert ceiling >= 10 * HIGHEST_MEASURED
    assert rate >= 10 * 1_000  # one sequential presence client: ~550 updates/s measured
