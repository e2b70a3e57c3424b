"""Idle sessions for the capacity bench: ``python -m bench.capacity_sub ...``.

One process holds ``--count`` raw-protocol connections (``bench.loadgen``) to
one node, users ``PREFIX<start>`` ... ``PREFIX<start+count-1>``, each bound to
one of ``--sources`` (127.x.y.z addresses: one source address reaches one
server address through at most ~28k ephemeral ports). It logs them in, at most
``--concurrency`` at a time (a session whose login fails, e.g. refused
while its node had fenced itself, logs in again on a new connection, up to
``--retries`` times, as a client does), then keeps them alive with a ``ping`` whenever a
connection has sent nothing for ``--ping`` seconds, checked every second, so
the pings are spread as the logins were. Stamps are ``time.perf_counter()``
(``CLOCK_MONOTONIC``): comparable across processes of one machine.

Driven by JSON lines on stdin (answers on stdout): ``login``, ``status``,
``quit``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import trio

from node.auth import Keys, issue_token, read_secret

from .common import summarize
from .loadgen import Counters, RawConn, login_all
from .procs import serve_requests


class Holders:
    def __init__(self, args: argparse.Namespace):
        keys = Keys.from_secret(read_secret(Path(args.secret_file)))
        sources = args.sources.split(",")
        self.concurrency = args.concurrency
        self.ping_every = args.ping
        self.counters = Counters()
        self.retries = args.retries
        self.conns: list[RawConn] = []
        for i in range(args.count):
            user = f"{args.prefix}{args.start + i}"
            c = RawConn(args.addr, user, issue_token(keys.token, user, 6 * 3600),
                        self.counters, i)
            c.source = sources[i % len(sources)]
            self.conns.append(c)
        self.ok: list[RawConn] = []
        self.pings = 0

    def _again(self, c: RawConn) -> RawConn:
        """A new connection for a failed one's user, as a client reconnects."""
        fresh = RawConn(c.addr, c.user, c.token, self.counters, c.index)
        fresh.source = c.source
        return fresh

    def live(self) -> int:
        return sum(1 for c in self.ok if not c.closed.is_set())

    async def keepalive(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = time.perf_counter()
            for c in self.ok:
                if (c.session is not None and now - c.last_tx >= self.ping_every
                        and not c.closed.is_set()):
                    c.post({"type": "ping"})
                    self.pings += 1

    async def control(self, nursery: trio.Nursery, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "login":
            t0 = time.perf_counter()
            # Ping from the start: the first sessions must not fall silent while the
            # last ones are still logging in.
            self.ok = self.conns
            nursery.start_soon(self.keepalive)
            timeout = float(req.get("timeout", 60))
            ok = await login_all(nursery, self.conns, self.concurrency, timeout=timeout)
            done = {id(c) for c in ok}
            failed = [c for c in self.conns if id(c) not in done]
            first_failed = len(failed)
            retried = 0
            for _ in range(self.retries):  # a real client logs in again after a refusal
                if not failed:
                    break
                await trio.sleep(1.0)
                again = [self._again(c) for c in failed]
                retried += len(again)
                got = await login_all(nursery, again, self.concurrency, timeout=timeout)
                ok += got
                done = {id(c) for c in got}
                failed = [c for c in again if id(c) not in done]
            self.ok = ok
            t1 = time.perf_counter()
            lat = sorted(c.t_login_ok - c.t_connect for c in self.ok)
            oks = [c.t_login_ok for c in self.ok]
            return {"logged_in": len(self.ok), "failed_first": first_failed,
                    "retried": retried, "t0": t0, "t1": t1,
                    "first_ok": min(oks, default=t0), "last_ok": max(oks, default=t1),
                    "latency_s": summarize(lat) if lat else None,
                    "failures": self.counters.as_dict()}
        if op == "status":
            return {"live": self.live(), "pings": self.pings,
                    "failures": self.counters.as_dict()}
        return {"error": f"unknown op {op!r}"}


async def amain(args: argparse.Namespace) -> None:
    holders = Holders(args)

    async def close() -> None:
        # Closing without a bye: the sessions stay in their resume window, as after
        # a client crash; the bench stops the cluster next.
        for c in holders.conns:
            if c.stream is not None:
                c.closing = True
                c.stream.socket.close()

    await serve_requests(len(holders.conns), holders.control, close)


def main(argv: list[str] | None = None) -> int:
    os.nice(10)  # the load generator must not take the CPU from the node under test
    ap = argparse.ArgumentParser(prog="python -m bench.capacity_sub")
    ap.add_argument("--addr", required=True, help="the node's client address host:port")
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--sources", required=True, help="local addresses to bind, comma-separated")
    ap.add_argument("--prefix", default="idle")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--ping", type=float, default=25.0)
    ap.add_argument("--retries", type=int, default=3,
                    help="log a failed session in again up to this many times (1 s apart)")
    trio.run(amain, ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
