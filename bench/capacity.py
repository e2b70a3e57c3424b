"""capacity: idle logged-in sessions held by one node, memory per session, login rate.

A 3-node cluster; node n1 (the node under test) runs W gateway worker
processes (``--workers W``, sharing the client port with ``SO_REUSEPORT``; one
process may hold at most 19,000 client sockets here), n2 and n3 run the
defaults. Every node runs with ``--client-heartbeat 120`` (clients ping at least
every 120 s; a connection silent for 300 s is closed): idle mobile-style
sessions, not the interactive default of 10 s. (With 30 s, the pings of 150,000
sessions took most of this 2-core machine, shared with the load generator,
and the login ramp stalled at about 158,000.)

S sessions, users ``idle0`` ... ``idle<S-1>``, are held by H helper processes
(``python -m bench.capacity_sub``, fewer than 20,000 sockets each), all
connected to n1, each helper's connections bound round-robin to four source
addresses of its own (127.<h+1>.<k>.1): one source address reaches one server
address through at most ~28k ephemeral ports. Every helper logs its sessions in
at once (C logins in flight each); then the sessions stay idle, pinging every
100 s, for an idle window. Measured: logins/s over the whole ramp (first
connect to last ``login-ok``, all helpers), login latency, the resident memory
of n1's processes (the node process and its workers) and of the replicas
before and after, per session, the kernel's TCP memory, CPU while idle, and
that every session is still connected at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
from .procs import LineProc, call_all, children_of, loadavg, stop_all, with_children

HEARTBEAT = 120.0
PING = 100.0
GOAL_SESSIONS = 200_000
GOAL_BYTES = 8 * 1024
GOAL_LOGINS = 5_000.0
PAGE = 4096


@dataclass(frozen=True)
class Plan:
    sessions: int
    helpers: int
    workers: int  # gateway workers on n1
    concurrency: int  # logins in flight per helper
    idle_s: float


FULL = Plan(sessions=200_000, helpers=12, workers=12, concurrency=32, idle_s=60.0)
QUICK = Plan(sessions=2_000, helpers=2, workers=2, concurrency=32, idle_s=5.0)


def _rss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def _memory(pid: int, workers: Sequence[int]) -> dict[str, Any]:
    """A node's memory: its own process and its gateway ``workers`` (their pids, as
    the node's admin status lists them), in bytes. The node's other children are
    compaction forks, copies of the node whose pages it shares: counting them
    would count the node's memory twice; they are only counted in number."""
    kids = children_of([pid])
    own = _rss(pid)
    listed = set(workers)
    worker_pids = [k for k in kids if k in listed]
    mem = [_rss(k) for k in worker_pids]
    return {"processes": 1 + len(worker_pids), "other_children": len(kids) - len(worker_pids),
            "core_rss": own[0], "core_pss": own[1],
            "workers_rss": sum(m[0] for m in mem), "workers_pss": sum(m[1] for m in mem),
            "rss": own[0] + sum(m[0] for m in mem),
            "pss": own[1] + sum(m[1] for m in mem)}


def _worker_pids(bc: BenchCluster, node: str) -> list[int]:
    """The node's gateway worker processes, from its admin status."""
    return [w["pid"] for w in bc.c.status(node, timeout=10)["workers"]]


def _sockstat() -> dict[str, int]:
    """The kernel's TCP sockets in use and their memory (bytes)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                kv = dict(zip(parts[::2], parts[1::2], strict=False))
                out = {"inuse": int(kv.get("inuse", 0)), "mem_bytes": int(kv.get("mem", 0)) * PAGE}
    except OSError:
        pass
    return out


def _merge_failures(reps: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"closed_early": 0, "protocol_errors": 0, "errors": {},
                             "byes": {}, "login_failures": {}}
    for r in reps:
        f = r["failures"]
        total["closed_early"] += f["closed_early"]
        total["protocol_errors"] += f["protocol_errors"]
        for key in ("errors", "byes", "login_failures"):
            for k, v in f[key].items():
                total[key][k] = total[key].get(k, 0) + v
    return total


def run(opts: Options) -> dict[str, Any]:
    plan = QUICK if opts.quick else FULL
    t_start = time.monotonic()
    machine = machine_info()
    node_args = ["--client-heartbeat", str(HEARTBEAT)]
    bc = BenchCluster(opts, "capacity", node_args=node_args,
                      per_node_args={"n1": ["--workers", str(plan.workers)]})
    helpers: list[LineProc] = []
    res: dict[str, Any] = {"bench": "capacity", "command": opts.argv(), "quick": opts.quick,
                           "machine": machine, "plan": asdict(plan), "node_args": node_args,
                           "n1_args": ["--workers", str(plan.workers)]}
    try:
        bc.start()
        leader = bc.c.wait_ready(timeout=60)
        pids = bc.pids()
        target = bc.c.spec("n1").client
        res.update(leader=leader, target=target)
        opts.console.print(
            f"revision {machine['revision']}; cluster: 3 nodes (leader {leader}); node under "
            f"test n1 at {target} with {plan.workers} gateway workers; {plan.sessions:,} "
            f"sessions from {plan.helpers} helper processes, {plan.concurrency} logins in "
            f"flight each; client heartbeat {HEARTBEAT:g} s (pings every {PING:g} s)")
        per = math.ceil(plan.sessions / plan.helpers)
        for h in range(plan.helpers):
            start = h * per
            count = min(per, plan.sessions - start)
            sources = ",".join(f"127.{h + 1}.{k}.1" for k in range(4))
            helpers.append(LineProc.python(
                "bench.capacity_sub",
                ["--addr", target, "--secret-file", str(bc.c.secret_file), "--prefix", "idle",
                 "--start", str(start), "--count", str(count), "--sources", sources,
                 "--concurrency", str(plan.concurrency), "--ping", str(PING)],
                bc.tmp / f"holder{h}.log", f"capacity_sub{h}"))
        for hp in helpers:
            hp.read(60)
        time.sleep(1.0)
        mem0 = {n: _memory(p, _worker_pids(bc, n)) for n, p in pids.items()}
        sock0 = _sockstat()
        n1_meter = CpuMeter(lambda: with_children([pids["n1"]]))
        all_meter = CpuMeter(lambda: with_children(list(pids.values())))
        helper_meter = CpuMeter(lambda: [hp.pid for hp in helpers if hp.alive()])
        with progress(opts) as prog:
            task = prog.add_task(f"log in {plan.sessions:,} sessions", total=None)
            la0 = loadavg()
            c0, a0, h0 = n1_meter.snapshot(), all_meter.snapshot(), helper_meter.snapshot()
            logins = call_all(helpers, {"op": "login", "timeout": 120}, 1800)
            c1, a1, h1 = n1_meter.snapshot(), all_meter.snapshot(), helper_meter.snapshot()
            prog.update(task, total=1, completed=1)
            n_ok = sum(r["logged_in"] for r in logins)
            t_first = min(r["t0"] for r in logins)
            t_last = max(r["last_ok"] for r in logins)
            ramp = max(1e-6, t_last - t_first)
            res["login"] = {
                "logged_in": n_ok, "seconds": ramp, "per_s": n_ok / ramp,
                "failed_first_attempt": sum(r["failed_first"] for r in logins),
                "retried": sum(r["retried"] for r in logins),
                "latency_p50_ms_by_helper": [r["latency_s"]["p50_ms"] for r in logins
                                             if r["latency_s"]],
                "latency_p99_ms_by_helper": [r["latency_s"]["p99_ms"] for r in logins
                                             if r["latency_s"]],
                "failures": _merge_failures(logins),
                "cpu_n1": CpuMeter.between(c0, c1), "cpu_nodes": CpuMeter.between(a0, a1),
                "cpu_helpers_cores": CpuMeter.between(h0, h1)["nodes_cores"], "loadavg": la0}
            task = prog.add_task(f"idle for {plan.idle_s:g} s", total=plan.idle_s)
            time.sleep(min(10.0, plan.idle_s / 2))  # let the last logins' garbage settle
            la1 = loadavg()
            pings0 = sum(st0["pings"] for st0 in call_all(helpers, {"op": "status"}, 60))
            c2, a2, h2 = n1_meter.snapshot(), all_meter.snapshot(), helper_meter.snapshot()
            t_idle = time.monotonic()
            while time.monotonic() - t_idle < plan.idle_s:
                time.sleep(1.0)
                prog.update(task, completed=min(plan.idle_s, time.monotonic() - t_idle))
            c3, a3, h3 = n1_meter.snapshot(), all_meter.snapshot(), helper_meter.snapshot()
            mem1 = {n: _memory(p, _worker_pids(bc, n)) for n, p in pids.items()}
            sock1 = _sockstat()
            status = call_all(helpers, {"op": "status"}, 60)
            st = bc.c.status("n1")
        res["idle"] = {"seconds": plan.idle_s, "loadavg": la1,
                       "cpu_n1": CpuMeter.between(c2, c3), "cpu_nodes": CpuMeter.between(a2, a3),
                       "cpu_helpers_cores": CpuMeter.between(h2, h3)["nodes_cores"],
                       "live": sum(s["live"] for s in status),
                       "pings": sum(s["pings"] for s in status) - pings0,
                       "failures": _merge_failures(status),
                       "n1_status_sessions": st.get("sessions", st.get("local_sessions"))}
        res["memory_before"], res["memory_after"] = mem0, mem1
        res["sockstat_before"], res["sockstat_after"] = sock0, sock1
        grow = {n: {k: mem1[n][k] - mem0[n][k] for k in ("rss", "pss", "core_rss",
                                                          "workers_rss")} for n in pids}
        per_session = {n: {k: (v / n_ok if n_ok else math.nan) for k, v in g.items()}
                       for n, g in grow.items()}
        res["memory_growth"] = grow
        res["bytes_per_session"] = per_session
        res["kernel_tcp_bytes_per_connection"] = (
            (sock1.get("mem_bytes", 0) - sock0.get("mem_bytes", 0)) / n_ok if n_ok else None)
        res["counters"] = bc.node_counters()
    finally:
        stop_all(helpers, 30)
        try:
            res["replicas"] = bc.check_replicas()
        except Exception as e:  # the figures above stand; say why the check failed
            res["replicas"] = {"error": f"{type(e).__name__}: {e}"}
        bc.stop()
    res["node_logs"] = bc.logs.as_dict()
    res["goal"] = _verdict(res)
    res["duration_s"] = time.monotonic() - t_start
    _print(opts, res)
    if "error" not in res["replicas"]:
        report_replicas(opts, res["replicas"])
    return finish(opts, res, bc.logs)


def _verdict(res: dict[str, Any]) -> dict[str, Any]:
    live = res["idle"]["live"]
    per = res["bytes_per_session"]["n1"]["rss"]
    rate = res["login"]["per_s"]
    return {"sessions": {"goal": GOAL_SESSIONS, "measured": live, "met": live >= GOAL_SESSIONS},
            "bytes_per_session": {"goal": GOAL_BYTES, "measured": per,
                                  "met": per <= GOAL_BYTES},
            "logins_per_s": {"goal": GOAL_LOGINS, "measured": rate, "met": rate >= GOAL_LOGINS}}


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _print(opts: Options, res: dict[str, Any]) -> None:
    con = opts.console
    lg, idle = res["login"], res["idle"]
    con.print(f"logged in {lg['logged_in']:,} sessions in {lg['seconds']:.1f} s: "
              f"[bold]{lg['per_s']:,.0f} logins/s[/]; connect + login latency p50 by helper "
              f"{', '.join(fmt_ms(x) for x in lg['latency_p50_ms_by_helper'])} ms, p99 "
              f"{', '.join(fmt_ms(x) for x in lg['latency_p99_ms_by_helper'])} ms; "
              f"{lg['failed_first_attempt']:,} failed at the first attempt, "
              f"{lg['retried']:,} login retries; failures {lg['failures']}")
    con.print(f"CPU during the logins (cores): n1 {lg['cpu_n1']['nodes_cores']}, all nodes "
              f"{lg['cpu_nodes']['nodes_cores']}, helpers {lg['cpu_helpers_cores']}, machine "
              f"{lg['cpu_nodes']['machine_busy_cores']}")
    rows = []
    for n in sorted(res["memory_after"]):
        m0, m1 = res["memory_before"][n], res["memory_after"][n]
        ps = res["bytes_per_session"][n]
        procs = str(m1["processes"]) + (f" (+{m1['other_children']} fork not counted)"
                                        if m1.get("other_children") else "")
        rows.append([n, procs, _mib(m0["rss"]), _mib(m1["rss"]),
                     f"{ps['rss']:,.0f}", f"{ps['pss']:,.0f}", f"{ps['core_rss']:,.0f}",
                     f"{ps['workers_rss']:,.0f}"])
    con.print(make_table(
        f"memory: {idle['live']:,} idle sessions on n1 (RSS, MiB; growth per session, bytes)",
        ["node", "processes", "RSS before", "RSS after", "RSS/session", "PSS/session",
         "node process/session", "workers/session"], rows))
    k = res.get("kernel_tcp_bytes_per_connection")
    con.print(f"kernel TCP memory: {res['sockstat_before']} -> {res['sockstat_after']}"
              + (f" ({k:,.0f} bytes per connection, both ends)" if k is not None else ""))
    con.print(f"idle {idle['seconds']:g} s: live {idle['live']:,}, pings in the window "
              f"{idle['pings']:,}; "
              f"CPU (cores) n1 {idle['cpu_n1']['nodes_cores']}, all nodes "
              f"{idle['cpu_nodes']['nodes_cores']}, helpers {idle['cpu_helpers_cores']}, "
              f"machine {idle['cpu_nodes']['machine_busy_cores']}; failures {idle['failures']}")
    g = res["goal"]
    for key, label in (("sessions", "idle logged-in sessions on one node"),
                       ("bytes_per_session", "bytes of process memory per session (n1 RSS)"),
                       ("logins_per_s", "logins/s on one node")):
        v = g[key]
        con.print(f"goal: {label} {'≥' if key != 'bytes_per_session' else '≤'} "
                  f"{v['goal']:,}: [bold]{'MET' if v['met'] else 'NOT MET'}[/] "
                  f"(measured {v['measured']:,.0f})")
