"""The nemesis: carries out the scheduled faults on real processes and networks.

Each fault is recorded as a nemesis ``invoke`` (what, on which nodes) when it
starts and an ``info`` with ``healed: true`` when it is undone. ``heal_all``
undoes everything whatever state the run is in (used at the end and on errors).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from cluster.launcher import LocalCluster

from .generator import Fault
from .history import History
from .netns import Network

Membership = Callable[[Fault, random.Random], Awaitable[dict[str, Any]]]


class Nemesis:
    def __init__(self, cluster: LocalCluster, net: Network, history: History,
                 clock_files: dict[str, Path], membership: Membership | None = None):
        self.c = cluster
        self.net = net
        self.h = history
        self.clock_files = clock_files
        self.membership = membership
        self.killed: set[str] = set()
        self.paused: set[str] = set()
        self.counts: dict[str, int] = {}

    def nodes(self) -> list[str]:
        return [s.id for s in self.c.members()]

    async def leader(self) -> str | None:
        return await trio.to_thread.run_sync(self.c.leader)

    async def _pick_leader_or(self, rng: random.Random) -> str:
        leader = await self.leader()
        live = [n for n in self.nodes() if n not in self.killed]
        return leader if leader is not None else rng.choice(live)

    async def run(self, f: Fault) -> None:
        rng = random.Random(f.pick)
        detail: dict[str, Any] = {"fault": f.number, "variant": f.variant}
        undo: Callable[[], Awaitable[None]]
        if f.kind == "kill":
            targets = await self._kill_targets(f, rng)
            detail["nodes"] = targets
            self.h.record("nemesis", "invoke", "kill", detail)
            for n in targets:
                await trio.to_thread.run_sync(self.c.kill, n, signal.SIGKILL)
                self.killed.add(n)

            async def undo() -> None:
                for n in targets:
                    await self._restart(n)
        elif f.kind == "pause":
            target = (await self._pick_leader_or(rng) if f.variant == "leader"
                      else rng.choice(self.nodes()))
            detail["nodes"] = [target]
            self.h.record("nemesis", "invoke", "pause", detail)
            self.c.kill(target, signal.SIGSTOP)
            self.paused.add(target)

            async def undo() -> None:
                self.c.kill(target, signal.SIGCONT)
                self.paused.discard(target)
        elif f.kind == "partition":
            detail.update(await self._partition(f, rng))
            self.h.record("nemesis", "invoke", "partition", detail)

            async def undo() -> None:
                await trio.to_thread.run_sync(self.net.heal)
        elif f.kind == "loss":
            targets = self.nodes() if f.variant == "all" else [rng.choice(self.nodes())]
            detail.update({"nodes": targets, "percent": int(f.amount)})
            self.h.record("nemesis", "invoke", "loss", detail)
            await trio.to_thread.run_sync(self.net.loss, targets, int(f.amount))

            async def undo() -> None:
                await trio.to_thread.run_sync(self.net.heal)
        elif f.kind == "clock":
            target = rng.choice(self.nodes())
            detail.update({"nodes": [target], "offset_s": f.amount})
            self.h.record("nemesis", "invoke", "clock", detail)
            self.clock_files[target].write_text(f"{f.amount:+.3f}\n")

            async def undo() -> None:
                self.clock_files[target].write_text("+0\n")
        elif f.kind == "member":
            if self.membership is None:
                raise RuntimeError("membership faults need the admin membership commands")
            self.h.record("nemesis", "invoke", "member", detail)
            result = await self.membership(f, rng)
            detail.update(result)

            async def undo() -> None:
                return None
        else:
            raise ValueError(f"unknown fault kind {f.kind}")
        self.counts[f.kind] = self.counts.get(f.kind, 0) + 1
        await trio.sleep(f.duration)
        with trio.CancelScope(shield=True):
            await undo()
        self.h.record("nemesis", "info", f.kind, {"fault": f.number, "healed": True,
                                                   **{k: v for k, v in detail.items()
                                                      if k == "nodes"}})

    async def _kill_targets(self, f: Fault, rng: random.Random) -> list[str]:
        nodes = self.nodes()
        if f.variant == "leader":
            return [await self._pick_leader_or(rng)]
        if f.variant == "minority":
            return rng.sample(nodes, max(1, (len(nodes) - 1) // 2))
        return [rng.choice(nodes)]

    async def _partition(self, f: Fault, rng: random.Random) -> dict[str, Any]:
        nodes = self.nodes()
        if f.variant == "isolate-leader":
            leader = await self._pick_leader_or(rng)
            groups = [[leader], [n for n in nodes if n != leader]]
            await trio.to_thread.run_sync(self.net.partition, groups)
            return {"nodes": [leader], "groups": groups}
        if f.variant == "halves":
            shuffled = rng.sample(nodes, len(nodes))
            k = len(nodes) // 2
            groups = [shuffled[:k], shuffled[k:]]
            await trio.to_thread.run_sync(self.net.partition, groups)
            return {"nodes": groups[0], "groups": groups}
        if f.variant == "bridge":
            shuffled = rng.sample(nodes, len(nodes))
            mid, rest = shuffled[0], shuffled[1:]
            left, right = rest[: len(rest) // 2], rest[len(rest) // 2:]
            pairs = [(a, b) for a in left for b in right]
            await trio.to_thread.run_sync(self.net.cut, pairs)
            return {"nodes": [mid], "bridge": mid, "left": left, "right": right}
        if f.variant == "ring":
            ring = rng.sample(nodes, len(nodes))
            adjacent = {frozenset((ring[i], ring[(i + 1) % len(ring)]))
                        for i in range(len(ring))}
            pairs = [(a, b) for i, a in enumerate(ring) for b in ring[i + 1:]
                     if frozenset((a, b)) not in adjacent]
            await trio.to_thread.run_sync(self.net.cut, pairs)
            return {"nodes": ring, "ring": ring}
        if f.variant == "one-way":
            leader = await self._pick_leader_or(rng)
            pairs = [(leader, n) for n in nodes if n != leader]
            await trio.to_thread.run_sync(lambda: self.net.cut(pairs, one_way=True))
            return {"nodes": [leader], "one_way_from": leader}
        raise ValueError(f"unknown partition {f.variant}")

    async def _restart(self, node: str) -> None:
        try:
            await trio.to_thread.run_sync(self.c.restart, node)
        finally:
            self.killed.discard(node)

    async def heal_all(self) -> None:
        """Undo every fault: network, paused and killed nodes, clocks."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.net.heal)
            for n in list(self.paused):
                self.c.kill(n, signal.SIGCONT)
            self.paused.clear()
            for path in self.clock_files.values():
                path.write_text("+0\n")
            for spec in self.c.members():
                np = self.c.procs.get(spec.id)
                if np is None or not np.alive():
                    await self._restart(spec.id)
