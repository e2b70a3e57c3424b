"""A node's core keeps several ordered batches in flight on a real (one-member)
Raft log, and a batch proposed twice applies once.

The second batch in flight is what lets the leader put it into the log entry
right behind the first; ordering makes that safe: a batch re-proposed after a
silence (here, a real stall of the replication thread, as a long collection
would cause) must not apply a second time, and no batch may overtake an
earlier one of the same node.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

import node.core
from cluster.ports import free_base_port
from node.config import NodeConfig
from node.core import Core
from replication.commands import Login, SetPresence, Tick
from replication.table import Result

pytestmark = pytest.mark.integration

H = b"resume-hash"


def _core(tmp_path: Path, in_flight: int) -> Core:
    cfg = NodeConfig(id="n1", listen=("127.0.0.1", 0), raft=f"127.0.0.1:{free_base_port(1)}",
                     peers=(), data_dir=tmp_path, secret_file=None, insecure=True,
                     tick_interval=3600.0, heartbeat_interval=3600.0,
                     batches_in_flight=in_flight)
    return Core(cfg, None)


async def _ready(core: Core, nursery: trio.Nursery) -> None:
    await nursery.start(core.run)
    await core.ready.wait()


async def test_two_batches_in_flight_apply_in_order(tmp_path: Path) -> None:
    """Commands submitted together go out as two batches at once (the rest
    queue); every command is answered, in submission order, and the table ends
    with the last presence set."""
    core = _core(tmp_path, 2)
    answered: list[int] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await _ready(core, nursery)
            assert await core.request(Login("s1", "alice", "n1", core.inc, H, "online",
                                            None, 1.0))
            statuses = ["away", "busy", "online"] * 20

            def done(i: int) -> object:
                def on_done(r: Result) -> None:
                    assert r.ok, r
                    answered.append(i)
                return on_done

            for i, status in enumerate(statuses):
                core.submit(SetPresence("s1", 1, "n1", status, f"t{i}", 2.0 + i), done(i))
            st = core.statistics()
            assert st.inflight_batches == 2
            assert st.queued == len(statuses) - 2
            while len(answered) < len(statuses):
                await trio.sleep(0.01)
            assert answered == list(range(len(statuses)))
            assert core.table.presence_of("alice")[:2] == ("online", f"t{len(statuses) - 1}")
            st = core.statistics()
            assert (st.queued, st.inflight_batches) == (0, 0)
            nursery.cancel_scope.cancel()


def test_a_node_keeps_four_batches_in_flight_by_default() -> None:
    """Four, not two: a command arriving while batches are in flight forms its
    own batch at once instead of waiting for this node to apply one, so it
    joins the leader's next entry. ``python -m bench replication``'s ``fsm``
    group at 20,000 commands/s, alternating K=2 and K=4 (docs/benchmarks.md,
    seventh session): commit p50 3.11-4.13 against 3.77-5.36 ms in six pairs."""
    from cluster.cli import build_parser

    args = build_parser().parse_args([
        "node", "--id", "n1", "--listen", "127.0.0.1:7000", "--raft", "127.0.0.1:7100",
        "--data-dir", "unused"])
    assert args.batches_in_flight == NodeConfig.batches_in_flight == 4


async def test_a_batch_proposed_again_after_a_stall_applies_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replication thread stalls with batches in flight; the core, hearing
    nothing, proposes them again; the log then holds two copies of each, and
    each applies once: ticks, which move the table's clock by their elapsed
    time, move it exactly once."""
    monkeypatch.setattr(node.core, "RETRY_LOST_AFTER", 0.1)
    core = _core(tmp_path, 2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await _ready(core, nursery)
            assert core.log is not None
            clock0 = core.table.clock
            results: list[Result] = []
            core.log._tick_calls.append(lambda: time.sleep(1.0))  # the tick thread stalls
            await trio.sleep(0.05)
            for _ in range(5):
                core.submit(Tick(1.0, 1.0, 30.0, 2.0), results.append)
            while len(results) < 5:
                await trio.sleep(0.01)
            assert all(r.ok for r in results)
            st = core.statistics()
            assert st.retries >= 1, "nothing was proposed again: the stall was too short"
            assert st.batches_skipped >= 1
            await core.request(Tick(1.0, 0.0, 30.0, 2.0))  # every copy has applied by now
            assert core.table.clock == clock0 + 5.0
            nursery.cancel_scope.cancel()
