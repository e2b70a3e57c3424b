"""A node whose disk fills up stops at once (fail-stop), and nothing it
acknowledged is lost: three real node processes, one with its Raft directory on
a small tmpfs of its own, real clients."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

import client
from chaos.checker import check_messages, check_order
from chaos.history import History
from chaos.workload import WorkloadClient, WorkloadConfig
from replication.raft import STORAGE_FAILURE_EXIT
from tests.conftest import IN_CI, Cluster, workload_running

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[Path, str], None]]:
    """``mount(path, size)``: a tmpfs of ``size`` at ``path``, unmounted at teardown."""
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "switchboard-test",
                            str(probe)], capture_output=True, text=True, timeout=30)
    if tried.returncode != 0:
        why = f"cannot mount a tmpfs (root with CAP_SYS_ADMIN): {tried.stderr.strip()}"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    subprocess.run(["umount", str(probe)], check=True, timeout=30)
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        opts = f"size={size}" if path not in mounted else f"remount,size={size}"
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "switchboard-test", str(path)],
                       check=True, timeout=30)
        if path not in mounted:
            mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


async def test_a_node_whose_disk_fills_stops_and_loses_nothing_acknowledged(
        make_cluster: Callable[..., Cluster], small_disk: Callable[[Path, str], None]) -> None:
    """n3's Raft journal lives on a 1 MiB tmpfs. Under load the journal needs more
    room than that: n3 logs a critical line and exits with status 74 rather
    than acknowledging entries it could not store; the other two carry on and
    the clients it held move to them. With room again, n3 restarts, catches up
    and ends identical to the others; no acknowledged message is lost,
    duplicated or reordered."""
    c = make_cluster(start=False)
    small_disk(c.spec("n3").data_dir / "raft", "1m")
    c.start(timeout=60)
    t0 = time.monotonic()
    history = History(clock=lambda: time.monotonic() - t0)
    nodes = c.client_addresses()
    clients = [WorkloadClient(k, WorkloadConfig(users=4, rate=10), nodes[k % 3:] + nodes[:k % 3],
                              c.token(f"u{k}"), history, k) for k in range(4)]
    n3 = c.procs["n3"]

    async def fill(k: int) -> None:
        # Presence texts of the longest kind, as fast as the node takes them:
        # the journal grows by about 300 bytes each.
        async with client.connect([nodes[k % 2]], user=f"filler{k}",
                                  token=c.token(f"filler{k}")) as s:
            for i in range(2_000):  # 4 x 2,000 x ~300 bytes: twice the disk
                if not n3.alive():
                    return
                await s.set_presence("online", f"{k}:{i} ".ljust(256, "x"))

    with trio.fail_after(180):
        async with workload_running(clients):
            async with trio.open_nursery() as fillers:
                for k in range(4):
                    fillers.start_soon(fill, k)
            with trio.fail_after(30):
                while n3.alive():
                    await trio.sleep(0.05)
            assert n3.proc.returncode == STORAGE_FAILURE_EXIT
            log = (c.spec("n3").data_dir / "node.log").read_text(errors="replace")
            assert "the Raft journal could not" in log and "this node stops now" in log
            await trio.sleep(3)  # the survivors serve n3's clients meanwhile
            small_disk(c.spec("n3").data_dir / "raft", "64m")
            await trio.to_thread.run_sync(c.restart, "n3")
            await trio.to_thread.run_sync(c.wait_ready)
            await trio.sleep(3)
    messages = check_messages(history)
    order = check_order(history)
    assert messages.acked > 50
    assert messages.valid, messages.anomalies
    assert order.valid, order.anomalies
    assert len(await trio.to_thread.run_sync(c.digests)) == 1
