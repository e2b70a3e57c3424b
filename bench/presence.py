"""The presence workload shared by ``core`` and ``fsync``: C raw-protocol clients,
each with ``window`` ``presence`` requests in flight (1: sequential, each awaiting
its commit), for a fixed time; committed updates per second and latency from
the request's write to its ``ok`` (sent by the node once the update is committed).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from .common import BenchCluster, summarize
from .loadgen import Counters, RawConn, keepalive, login_all, logout_all, spread

STATUSES = ("away", "online")


async def ticker(prog: Any, task: Any, seconds: float) -> None:
    """Advance a progress task with the clock (until cancelled)."""
    t0 = time.monotonic()
    while True:
        prog.update(task, completed=min(seconds, time.monotonic() - t0))
        await trio.sleep(0.25)


async def presence_workload(bc: BenchCluster, prog: Any, *, clients: int, seconds: float,
                            warmup: float, where: str | None = None, window: int = 1,
                            tag: str = "pres", keep_samples: bool = False) -> dict[str, Any]:
    """``where``: "leader" or "follower" puts every client on such a node; None
    spreads them round-robin over all nodes. ``keep_samples`` adds the raw
    latencies (seconds) as ``_samples``, for pooling over runs."""
    addrs = bc.addresses()
    node_id: str | None = None
    if where is not None:
        leader = await trio.to_thread.run_sync(bc.c.wait_ready)
        ids = bc.node_ids()
        node_id = leader if where == "leader" else next(n for n in ids if n != leader)
        addrs = [bc.c.spec(node_id).client]
    counters = Counters()
    tag = f"{tag}{clients}x{window}{where or ''}"
    conns = [RawConn(spread(addrs, i), f"{tag}-{i}", bc.token(f"{tag}-{i}"), counters, i)
             for i in range(clients)]
    lat: list[float] = []
    state = {"measuring": False, "running": True, "done": 0}

    def request(c: RawConn) -> None:
        n = c.next_rid
        c.request({"type": "presence", "status": STATUSES[n & 1], "text": f"t{n}"}, "presence")

    def on_reply(c: RawConn, kind: str, t_sent: float, f: dict[str, Any], now: float) -> None:
        if f["type"] == "ok" and state["measuring"]:
            lat.append(now - t_sent)
            state["done"] += 1
        if state["running"]:
            request(c)

    for c in conns:
        c.on_reply = on_reply
    label = f"presence, {clients} clients x {window} in flight, {where or 'spread'}"
    async with trio.open_nursery() as nursery:
        ok = await login_all(nursery, conns, concurrency=64)
        nursery.start_soon(keepalive, ok)
        task = prog.add_task(label, total=seconds)
        nursery.start_soon(ticker, prog, task, seconds)
        for c in ok:
            for _ in range(window):
                request(c)
        await trio.sleep(warmup)
        state["measuring"] = True
        t0 = time.perf_counter()
        cpu0 = bc.cpu.snapshot()
        await trio.sleep(max(0.1, seconds - warmup))
        state["measuring"] = False
        span = time.perf_counter() - t0
        cpu = bc.cpu.between(cpu0, bc.cpu.snapshot())
        state["running"] = False
        with trio.move_on_after(5.0):
            while any(c.pending for c in ok if not c.closed.is_set()):
                await trio.sleep(0.05)
        await logout_all(ok, timeout=10.0)
        nursery.cancel_scope.cancel()
    prog.update(task, completed=seconds)
    out = {"clients": clients, "window": window, "where": where or "spread", "node": node_id,
           "logged_in": len(ok), "window_s": span, "cpu": cpu,
           "ops_per_s": state["done"] / span, "latency": summarize(lat),
           "failures": counters.as_dict()}
    if keep_samples:
        out["_samples"] = lat
    return out
