"""The plan of ``bench core``."""

from __future__ import annotations

import dataclasses

from bench.core import FULL
from node.config import NodeConfig

NODES = 3


def test_the_max_message_phases_measure_the_cluster_not_the_frame_limit() -> None:
    """A node answers a connection's frames beyond ``--frame-rate`` (500/s by
    default) with ``rate-limited``, so the closed-loop max phases can never pass
    senders x 500/s. With 24 senders they stopped at that ceiling on a 2-core AMD
    EPYC (12,036-12,622/s; 5,376-7,706 sends rate-limited per phase): the plan's
    ceiling must stay well above the highest rate measured."""
    default_rate = next(f.default for f in dataclasses.fields(NodeConfig)
                        if f.name == "frame_rate")
    assert isinstance(default_rate, float)
    ceiling = FULL.pairs_per_node * NODES * default_rate
    assert ceiling >= 1.4 * 12_622
