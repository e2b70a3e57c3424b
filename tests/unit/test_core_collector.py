"""The node process's garbage collector: its thresholds, and ``gc.freeze()``
once the session table has grown (so full collections never walk it)."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node import collector as node_collector
from node.config import NodeConfig
from node.core import COLLECTOR_PERIOD, FREEZE_GROWTH, Core


@pytest.fixture
def collector() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*saved)


def _core(tmp_path: Path) -> Core:
    cfg = NodeConfig(id="n1", listen=("127.0.0.1", 0), raft="127.0.0.1:1", peers=(),
                     data_dir=tmp_path, secret_file=None, insecure=True)
    return Core(cfg, None)


def test_tune_sets_the_thresholds(collector: None) -> None:
    node_collector.tune(node_collector.CORE_THRESHOLDS)
    assert gc.get_threshold() == node_collector.CORE_THRESHOLDS


async def test_freezes_once_the_table_grew(tmp_path: Path, collector: None,
                                           autojump_clock: trio.testing.MockClock) -> None:
    core = _core(tmp_path)
    sessions: dict[str, Any] = core.table.sessions  # only its size matters here
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(core._collector)
            sessions.update(dict.fromkeys(f"s{i}" for i in range(FREEZE_GROWTH - 1)))
            await trio.sleep(3 * COLLECTOR_PERIOD)
            assert gc.get_freeze_count() == 0, "froze before the table grew enough"
            sessions["one-more"] = None
            await trio.sleep(1.5 * COLLECTOR_PERIOD)
            frozen = gc.get_freeze_count()
            assert frozen > 0
            # Growth is counted from the last freeze: no second freeze without more.
            gc.unfreeze()
            await trio.sleep(3 * COLLECTOR_PERIOD)
            assert gc.get_freeze_count() == 0
            sessions.update(dict.fromkeys(f"t{i}" for i in range(FREEZE_GROWTH)))
            await trio.sleep(1.5 * COLLECTOR_PERIOD)
            assert gc.get_freeze_count() > 0
            nursery.cancel_scope.cancel()


def test_the_pause_meter_times_every_collection() -> None:
    meter = node_collector.pause_meter()
    assert node_collector.pause_meter() is meter  # one per process
    before = meter.statistics()
    garbage: list[list[object]] = [[] for _ in range(10_000)]
    for a, b in itertools.pairwise(garbage):
        a.append(b)
        b.append(a)
    del garbage, a, b
    gc.collect(2)
    gc.collect(0)
    after = meter.statistics()
    assert after[2].count == before[2].count + 1
    assert after[0].count >= before[0].count + 1
    assert after[2].seconds > before[2].seconds
    assert after[2].longest >= after[2].seconds - before[2].seconds > 0
