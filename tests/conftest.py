"""Shared fixtures: real clusters of node processes on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from chaos.workload import WorkloadClient
from cluster.adminclient import admin_call
from cluster.launcher import LocalCluster
from cluster.membership import ClusterAdmin
from cluster.ports import free_base_port
from node.auth import issue_token

IN_CI = os.environ.get("CI") == "true"

# Fast failure handling for tests; production defaults are in node/config.py.
TEST_NODE_ARGS = ["--client-heartbeat", "2", "--log-level", "info"]


class Cluster(LocalCluster):
    def token(self, user: str, ttl: float = 3600) -> str:
        return issue_token(self.keys.token, user, ttl)

    def digests(self) -> set[str]:
        """Every member's table digest at one checkpoint (one element: replicas agree)."""
        leader = ClusterAdmin([s.admin for s in self.members()], self.keys).leader()
        cp = admin_call(leader["admin"], self.keys, "checkpoint", timeout=15)
        digests = set()
        for s in self.members():
            d = admin_call(s.admin, self.keys, "digest", {"tag": cp["tag"], "timeout": 30},
                           timeout=35)
            assert d["index"] == cp["index"]
            digests.add(d["digest"])
        return digests


@asynccontextmanager
async def workload_running(clients: list[WorkloadClient]) -> AsyncIterator[None]:
    """The clients logged in and at work inside; at the end they stop, and have 2 s
    to receive what was sent last before they are cancelled."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for wc in clients:
            nursery.start_soon(wc.run, stop)
        for wc in clients:
            await wc.ready.wait()
        yield
        stop.set()
        await trio.sleep(2)
        nursery.cancel_scope.cancel()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start clusters of real node processes; every one is stopped at teardown."""
    made: list[Cluster] = []

    def make(nodes: int = 3, node_args: list[str] | None = None, start: bool = True,
             name: str = "c") -> Cluster:
        base = free_base_port(nodes)
        c = Cluster(tmp_path / f"{name}{len(made)}", nodes, "127.0.0.1", base,
                    [*TEST_NODE_ARGS, *(node_args or [])])
        made.append(c)
        if start:
            c.start(timeout=60)
        return c

    yield make
    for c in made:
        c.stop()
