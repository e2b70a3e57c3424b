"""Subscriber connections for the fanout bench: ``python -m bench.fanout_sub ...``.

One process holds ``--count`` raw-protocol connections (``bench.loadgen``; users
``PREFIX<start>`` ... ``PREFIX<start+count-1>``, spread round-robin over the
nodes), logs them in, subscribes each to ``--star`` and records, per
connection, when each ``presence-event`` of the star arrived (keyed by its
status text): when this process handled it and when the kernel received it
(``SO_TIMESTAMPNS``, converted to the same time base). Stamps are
``time.perf_counter()``, which on Linux is ``CLOCK_MONOTONIC``: comparable
across processes of one machine.

Driven by JSON lines on stdin (answers on stdout): ``login``, ``visible``,
``report``, ``logout``, ``quit`` (see ``control``).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from node.auth import Keys, issue_token, read_secret

from .loadgen import Counters, RawConn, keepalive, login_all, logout_all, spread
from .procs import serve_requests


class Subscribers:
    def __init__(self, args: argparse.Namespace):
        keys = Keys.from_secret(read_secret(Path(args.secret_file)))
        addrs = args.addrs.split(",")
        self.star = args.star
        self.concurrency = args.concurrency
        self.counters = Counters()
        self.conns: list[RawConn] = []
        for i in range(args.count):
            n = args.start + i
            user = f"{args.prefix}{n}"
            c = RawConn(spread(addrs, n), user, issue_token(keys.token, user, 3 * 3600),
                        self.counters, i)
            c.kernel_stamps = True
            c.on_presence = self._on_presence
            c.on_reply = self._on_reply
            self.conns.append(c)
        self.ok: list[RawConn] = []
        self.visible: set[int] = set()
        # text -> conn index -> (processed here, kernel receive time); perf_counter base
        self.arrivals: dict[str, dict[int, tuple[float, float | None]]] = {}
        self.replies: dict[str, int] = {}
        self.errors: Counter[str] = Counter()
        self.changed = trio.Event()

    def _on_presence(self, c: RawConn, f: dict[str, Any], now: float) -> None:
        if f["user"] != self.star:
            return
        if f["status"] != "unknown":
            self.visible.add(c.index)
        text = f.get("text")
        if text:
            k = c.rx_kernel
            kt = None if k is None else k - (time.time() - time.perf_counter())
            self.arrivals.setdefault(text, {}).setdefault(c.index, (now, kt))
        self.changed.set()

    def _on_reply(self, c: RawConn, kind: str, _t: float, f: dict[str, Any], _n: float) -> None:
        self.replies[kind] = self.replies.get(kind, 0) + 1
        if f["type"] == "error":
            self.errors[f"{kind}:{f.get('code')}"] += 1
        self.changed.set()

    def live(self) -> list[RawConn]:
        return [c for c in self.ok if not c.closed.is_set()]

    async def wait_for(self, pred: Any, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not pred():
                self.changed = trio.Event()
                with trio.move_on_after(0.2):
                    await self.changed.wait()

    async def control(self, nursery: trio.Nursery, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "login":
            t0 = time.perf_counter()
            self.ok = await login_all(nursery, self.conns, self.concurrency, timeout=60)
            t1 = time.perf_counter()
            nursery.start_soon(keepalive, self.ok, 8.0)
            for c in self.ok:
                c.request({"type": "subscribe", "user": self.star}, "subscribe")
            n = len(self.ok)
            await self.wait_for(lambda: self.replies.get("subscribe", 0) >= n,
                                float(req.get("timeout", 120)))
            return {"logged_in": n, "login_s": t1 - t0, "subscribe_s": time.perf_counter() - t1,
                    "subscribed": self.replies.get("subscribe", 0) - sum(
                        v for k, v in self.errors.items() if k.startswith("subscribe:")),
                    "by_node": dict(Counter(c.node or "?" for c in self.ok)),
                    "errors": dict(self.errors), "failures": self.counters.as_dict()}
        if op == "visible":
            await self.wait_for(lambda: len(self.visible) >= len(self.live()),
                                float(req.get("timeout", 60)))
            return {"visible": len(self.visible), "live": len(self.live())}
        if op == "report":
            text = req["text"]
            await self.wait_for(
                lambda: len(self.arrivals.get(text, {})) >= len(self.live()),
                float(req.get("timeout", 15)))
            got = self.arrivals.get(text, {})
            node_of = {c.index: c.node or "?" for c in self.ok}
            return {"live": len(self.live()), "got": len(got),
                    "times": [[node_of.get(i, "?"), t, kt] for i, (t, kt) in got.items()],
                    "failures": self.counters.as_dict()}
        if op == "logout":
            await logout_all(self.live(), timeout=20)
            return {"done": True, "failures": self.counters.as_dict()}
        return {"error": f"unknown op {op!r}"}


async def amain(args: argparse.Namespace) -> None:
    subs = Subscribers(args)

    async def close() -> None:
        for c in subs.conns:
            await c.aclose()

    await serve_requests(len(subs.conns), subs.control, close)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fanout_sub")
    ap.add_argument("--addrs", required=True, help="node client addresses, comma-separated")
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--prefix", default="sub")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--star", default="star")
    ap.add_argument("--concurrency", type=int, default=64)
    trio.run(amain, ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
