"""fanout: one presence change reaching 10,000 subscribers.

A 3-node cluster (node flags below), S subscriber connections (raw protocol,
``bench.loadgen``) spread round-robin over the 3 nodes and held by P helper
processes (``python -m bench.fanout_sub``: one process holds fewer than 20,000
sockets, and two processes use both cores). Each subscriber logs in and
subscribes to ``star``; ``star`` (one connection of this process, on a
follower) allows all S of them with S pipelined ``allow`` requests; every
subscriber then sees star's presence. Then star changes its presence K times
(status text ``change-k``), one at a time; for each change the bench measures
the time from star's request write (and from star's ``ok``, i.e. the commit
as seen on star's node) until the last of the S subscribers received the
``presence-event``, per node too. Stamps are ``time.perf_counter()``
(``CLOCK_MONOTONIC``), comparable across the helper processes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import trio

from .common import (
    BenchCluster,
    CpuMeter,
    Options,
    finish,
    fmt_ms,
    machine_info,
    make_table,
    progress,
    report_replicas,
)
from .loadgen import Counters, RawConn, keepalive, open_and_login
from .procs import HelperError, LineProc, call_all, loadavg, stop_all, with_children

NODE_ARGS = ["--frame-rate", "100000", "--allow-list-limit", "20000"]
"""--frame-rate: star sends S allow requests on one connection (default 500/s);
--allow-list-limit: star allows S > 5,000 users (default 5,000)."""
GOAL_S = 1.0


@dataclass(frozen=True)
class Plan:
    subscribers: int
    procs: int
    changes: int
    gap: float  # seconds between changes
    concurrency: int  # logins in flight per helper process


FULL = Plan(subscribers=10_000, procs=2, changes=5, gap=1.0, concurrency=64)
QUICK = Plan(subscribers=2_000, procs=2, changes=3, gap=0.5, concurrency=64)


def _ms(x: float) -> float:
    return x * 1000.0


async def _star_session(bc: BenchCluster, plan: Plan, helpers: list[LineProc], star_node: str,
                        prog: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    counters = Counters()
    star = RawConn(bc.c.spec(star_node).client, "star", bc.token("star"), counters)
    replies: dict[str, int] = {}
    errors: dict[str, int] = {}
    oks: dict[int, float] = {}
    got = trio.Event()

    def on_reply(c: RawConn, kind: str, t: float, f: dict[str, Any], now: float) -> None:
        nonlocal got
        replies[kind] = replies.get(kind, 0) + 1
        if f["type"] == "error":
            errors[f"{kind}:{f.get('code')}"] = errors.get(f"{kind}:{f.get('code')}", 0) + 1
        elif kind.startswith("change-"):
            oks[int(kind.split("-")[1])] = now
        got.set()

    star.on_reply = on_reply
    async with trio.open_nursery() as nursery:
        if not await open_and_login(nursery, star, 30):
            raise HelperError(f"star could not log in: {counters.as_dict()}")
        nursery.start_soon(keepalive, [star], 4.0)
        # Allow every subscriber, pipelined (the node reads at most 512 ahead).
        users = [f"sub{i}" for i in range(plan.subscribers)]
        t0 = time.perf_counter()
        for u in users:
            star.request({"type": "allow", "user": u}, "allow")
        with trio.move_on_after(300):
            while replies.get("allow", 0) < len(users) and not star.closed.is_set():
                got = trio.Event()
                with trio.move_on_after(0.5):
                    await got.wait()
        out["allow"] = {"requests": len(users), "replies": replies.get("allow", 0),
                        "errors": dict(errors), "seconds": time.perf_counter() - t0,
                        "per_s": replies.get("allow", 0) / (time.perf_counter() - t0)}
        vis = await trio.to_thread.run_sync(
            lambda: call_all(helpers, {"op": "visible", "timeout": 60}, 90))
        out["visible"] = {"visible": sum(v["visible"] for v in vis),
                          "live": sum(v["live"] for v in vis),
                          "seconds_after_allows": time.perf_counter() - t0 - out["allow"][
                              "seconds"]}
        # The presence changes, one at a time.
        task = prog.add_task("presence changes", total=plan.changes)
        changes: list[dict[str, Any]] = []
        for k in range(plan.changes):
            await trio.sleep(plan.gap)
            text = f"change-{k}"
            t_send = time.perf_counter()
            star.request({"type": "presence", "status": "away" if k % 2 == 0 else "online",
                          "text": text}, text, t0=t_send)
            req = {"op": "report", "text": text, "timeout": 20}
            reps = await trio.to_thread.run_sync(call_all, helpers, req, 40.0)
            t_ok = oks.get(k)
            rows = [(node, t, kt) for r in reps for node, t, kt in r["times"]]
            expected = sum(r["live"] for r in reps)
            ch: dict[str, Any] = {"k": k, "expected": expected, "received": len(rows),
                                  "star_ok_ms": _ms(t_ok - t_send) if t_ok else None,
                                  "kernel_stamps": sum(1 for *_, kt in rows if kt is not None)}
            # "arrival": the kernel's receive time in the subscriber's socket (the
            # system's delivery); "handled": when the load generator processed it.
            for label, idx in (("arrival", 2), ("handled", 1)):
                ts = sorted(x[idx] for x in rows if x[idx] is not None)
                if not ts:
                    continue
                d: dict[str, Any] = {
                    "first_ms": _ms(ts[0] - t_send),
                    "median_ms": _ms(statistics.median(ts) - t_send),
                    "last_ms": _ms(ts[-1] - t_send),
                    "last_from_ok_ms": _ms(ts[-1] - t_ok) if t_ok else None}
                per: dict[str, Any] = {}
                for node in sorted({x[0] for x in rows}):
                    nts = sorted(x[idx] for x in rows if x[0] == node and x[idx] is not None)
                    if nts:
                        per[node] = {"received": len(nts), "first_ms": _ms(nts[0] - t_send),
                                     "median_ms": _ms(statistics.median(nts) - t_send),
                                     "last_ms": _ms(nts[-1] - t_send)}
                d["per_node"] = per
                ch[label] = d
            changes.append(ch)
            prog.update(task, advance=1)
        out["changes"] = changes
        out["star_failures"] = counters.as_dict()
        await star.logout()
        nursery.cancel_scope.cancel()
    return out


def run(opts: Options) -> dict[str, Any]:
    plan = QUICK if opts.quick else FULL
    t_start = time.monotonic()
    machine = machine_info()
    bc = BenchCluster(opts, "fanout", node_args=NODE_ARGS)
    helpers: list[LineProc] = []
    res: dict[str, Any] = {"bench": "fanout", "command": opts.argv(), "quick": opts.quick,
                           "machine": machine, "plan": asdict(plan), "node_args": NODE_ARGS}
    try:
        bc.start()
        leader = bc.c.wait_ready(timeout=60)
        ids = bc.node_ids()
        star_node = next(n for n in ids if n != leader)
        res.update(leader=leader, star_node=star_node)
        opts.console.print(
            f"revision {machine['revision']}; cluster: 3 nodes on {', '.join(bc.addresses())}, "
            f"flags {' '.join(NODE_ARGS)} (otherwise defaults: fsync on, gateway workers = "
            f"CPUs); {plan.subscribers:,} subscribers in {plan.procs} helper processes; star "
            f"on {star_node} (leader {leader})")
        per = plan.subscribers // plan.procs
        addrs = ",".join(bc.addresses())
        for i in range(plan.procs):
            count = per if i < plan.procs - 1 else plan.subscribers - per * (plan.procs - 1)
            helpers.append(LineProc.python(
                "bench.fanout_sub",
                ["--addrs", addrs, "--secret-file", str(bc.c.secret_file), "--prefix", "sub",
                 "--start", str(i * per), "--count", str(count), "--star", "star",
                 "--concurrency", str(plan.concurrency)],
                bc.tmp / f"sub{i}.log", f"fanout_sub{i}"))
        for h in helpers:
            h.read(30)
        node_meter = CpuMeter(lambda: with_children(list(bc.pids().values())))
        sub_meter = CpuMeter(lambda: [h.pid for h in helpers if h.alive()])
        with progress(opts) as prog:
            t_login = prog.add_task("subscribers: log in + subscribe", total=None)
            la0 = loadavg()
            c0 = node_meter.snapshot()
            logins = call_all(helpers, {"op": "login", "timeout": 300}, 900)
            res["logins"] = {
                "logged_in": sum(r["logged_in"] for r in logins),
                "login_s": max(r["login_s"] for r in logins),
                "subscribe_s": max(r["subscribe_s"] for r in logins),
                "subscribed": sum(r["subscribed"] for r in logins),
                "by_node": {n: sum(r["by_node"].get(n, 0) for r in logins) for n in ids},
                "errors": [r["errors"] for r in logins],
                "failures": [r["failures"] for r in logins],
                "cpu": CpuMeter.between(c0, node_meter.snapshot()), "loadavg": la0}
            prog.update(t_login, total=1, completed=1)
            la1 = loadavg()
            c1, s1 = node_meter.snapshot(), sub_meter.snapshot()
            star = trio.run(_star_session, bc, plan, helpers, star_node, prog)
            cpu = CpuMeter.between(c1, node_meter.snapshot())
            scpu = CpuMeter.between(s1, sub_meter.snapshot())
            res.update(star)
            res["cpu_allow_and_changes"] = {"nodes_cores": cpu["nodes_cores"],
                                            "subscriber_procs_cores": scpu["nodes_cores"],
                                            "machine_busy_cores": cpu["machine_busy_cores"],
                                            "others_cores": round(max(
                                                0.0, cpu["others_cores"]
                                                - scpu["nodes_cores"]), 2),
                                            "loadavg": la1}
            res["counters"] = bc.node_counters()
            call_all(helpers, {"op": "logout"}, 60)
        res["replicas"] = bc.check_replicas()
    finally:
        stop_all(helpers, 15)
        bc.stop()
    res["node_logs"] = bc.logs.as_dict()
    res["goal"] = _verdict(res)
    res["duration_s"] = time.monotonic() - t_start
    _print(opts, res)
    report_replicas(opts, res["replicas"])
    return finish(opts, res, bc.logs)


def _lasts(res: dict[str, Any], label: str) -> list[float]:
    return sorted(c[label]["last_ms"] for c in res.get("changes") or [] if label in c)


def _verdict(res: dict[str, Any]) -> dict[str, Any]:
    ch = res.get("changes") or []
    complete = bool(ch) and all(c["received"] == c["expected"] for c in ch)
    arrival, handled = _lasts(res, "arrival"), _lasts(res, "handled")
    worst = arrival[-1] if arrival else float("nan")
    return {"goal": f"every subscriber has the change within {GOAL_S:g} s",
            "max_last_arrival_ms": worst,
            "p50_last_arrival_ms": statistics.median(arrival) if arrival else None,
            "max_last_handled_ms": handled[-1] if handled else None,
            "all_received": complete, "subscribers": res.get("logins", {}).get("logged_in"),
            "met": complete and len(arrival) == len(ch) and worst <= GOAL_S * 1000}


def _print(opts: Options, res: dict[str, Any]) -> None:
    con = opts.console
    lg = res["logins"]
    con.print(f"subscribers logged in: {lg['logged_in']:,} in {lg['login_s']:.1f} s, subscribed "
              f"{lg['subscribed']:,} in {lg['subscribe_s']:.1f} s; by node {lg['by_node']}; "
              f"errors {lg['errors']}; failures {lg['failures']}")
    al = res["allow"]
    con.print(f"star allowed {al['replies']:,}/{al['requests']:,} in {al['seconds']:.1f} s "
              f"({al['per_s']:,.0f}/s, errors {al['errors'] or 0}); visible to "
              f"{res['visible']['visible']:,}/{res['visible']['live']:,} subscribers")
    for label, what in (("arrival", "arrived in the subscriber's socket (kernel time stamp)"),
                        ("handled", "handled by the load generator")):
        rows = []
        for c in res["changes"]:
            d = c.get(label)
            if d is None:
                continue
            rows.append([str(c["k"]), f"{c['received']:,}/{c['expected']:,}",
                         fmt_ms(c["star_ok_ms"] or float("nan")), fmt_ms(d["first_ms"]),
                         fmt_ms(d["median_ms"]), fmt_ms(d["last_ms"]),
                         fmt_ms(d["last_from_ok_ms"] or float("nan")),
                         "  ".join(f"{n} {fmt_ms(v['last_ms'])}"
                                   for n, v in d["per_node"].items())])
        con.print(make_table(
            f"fanout: star's presence change -> {what} (ms from star's send)",
            ["change", "received", "star ok", "first", "median", "last", "last from ok",
             "last per node"], rows))
        lasts = _lasts(res, label)
        if lasts:
            con.print(f"last subscriber ({label}) over {len(lasts)} changes: p50 "
                      f"{fmt_ms(statistics.median(lasts))} ms, max {fmt_ms(lasts[-1])} ms")
    con.print(f"CPU during allows + changes (cores): {res['cpu_allow_and_changes']}")
    g = res["goal"]
    con.print(f"goal: {g['goal']}: [bold]{'MET' if g['met'] else 'NOT MET'}[/] "
              f"(last arrival: max {fmt_ms(g['max_last_arrival_ms'])} ms; last handled by the "
              f"load generator: max {fmt_ms(g['max_last_handled_ms'] or float('nan'))} ms; all "
              f"received: {g['all_received']})")
