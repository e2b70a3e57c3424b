"""The membership nemesis: remove a member (a follower, or the leader) and add it
back with an empty data dir, through the same admin workflows an operator uses,
while the workload runs."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import trio

from cluster.launcher import LocalCluster
from cluster.membership import ClusterAdmin

from .generator import Fault
from .history import History
from .netns import Network


class MembershipNemesis:
    def __init__(self, cluster: LocalCluster, net: Network, history: History,
                 clock_files: dict[str, Path]):
        self.c = cluster
        self.net = net
        self.h = history
        self.clock_files = clock_files

    def _admin(self) -> ClusterAdmin:
        return ClusterAdmin([s.admin for s in self.c.members()], self.c.keys)

    async def run(self, f: Fault, rng: random.Random) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self._cycle, f, rng)

    def _cycle(self, f: Fault, rng: random.Random) -> dict[str, Any]:
        ca = self._admin()
        leader = ca.leader(wait=15)
        members = [s.id for s in self.c.members()]
        if f.variant == "remove-leader":
            victim = leader["id"]
        else:
            victim = rng.choice([m for m in members if m != leader["id"]])
        spec = self.c.spec(victim)
        ca.remove(victim)
        self.c.removed.add(victim)
        np = self.c.procs.get(victim)
        if np is not None:
            try:
                np.proc.wait(10)
            except Exception:
                self.c.kill(victim)
        shutil.rmtree(spec.data_dir / "raft", ignore_errors=True)
        self.c.removed.discard(victim)
        proc = self.c.start_node(victim, ["--join"])
        self.c.wait_announced(proc)
        ClusterAdmin([s.admin for s in self.c.members()], self.c.keys).add(spec.admin,
                                                                           wait=180)
        return {"nodes": [victim], "removed": victim, "re_added": victim,
                "was_leader": victim == leader["id"]}
