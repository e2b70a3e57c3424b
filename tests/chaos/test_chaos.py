"""The chaos suite: short seeded schedules of every fault kind against a real cluster
in network namespaces, judged by the checkers. Needs root, iproute2 and nftables."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from chaos.netns import available
from chaos.runner import ChaosOptions, run_chaos
from tests.conftest import IN_CI

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

WHY = available()
if WHY is not None:
    if IN_CI:
        pytest.fail(f"CI=true and the chaos suite cannot run: {WHY}", pytrace=False)
    pytest.skip(WHY, allow_module_level=True)


def _verdict(report: dict) -> str:
    keys = ("valid", "faults", "ops", "lost", "duplicated", "reordered", "failover_p50_s")
    summary = {k: report.get(k) for k in keys}
    return f"{summary}\nfolder: {report['out']}\nreplay: {report['replay']}"


@pytest.mark.parametrize(("faults", "seed", "duration"), [
    ("kill", 11, 24),
    ("pause", 12, 24),
    ("partition", 13, 24),
    ("loss", 14, 24),
    ("clock", 15, 24),
    ("member", 5, 30),
])
async def test_fault_kind(tmp_path: Path, faults: str, seed: int, duration: float) -> None:
    opts = ChaosOptions(nodes=3, duration=duration, faults=[faults], seed=seed,
                        out=tmp_path / "run", converge_bound=12)
    with trio.fail_after(240):
        report = await run_chaos(opts)
    assert report["faults"].get(faults, 0) >= 2, _verdict(report)
    assert report["valid"], _verdict(report)
    assert (tmp_path / "run" / "timeline.png").stat().st_size > 10_000


async def test_five_nodes_all_faults(tmp_path: Path) -> None:
    opts = ChaosOptions(nodes=5, duration=40, faults=["kill", "pause", "partition", "loss",
                                                      "clock", "member"], seed=21,
                        out=tmp_path / "run", converge_bound=12)
    with trio.fail_after(300):
        report = await run_chaos(opts)
    assert report["valid"], _verdict(report)
