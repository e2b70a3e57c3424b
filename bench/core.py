"""core: logins/s, presence updates/s and message throughput on a local 3-node cluster.

(a) logins: L clients log in at once, spread round-robin over the nodes, then
    L clients all on the leader (one node's rate); the figure is logins
    completed per second of wall time (first connect to last ``login-ok``) and
    per-client latency from TCP connect to ``login-ok``. The logins come from
    ``bench.burst`` (one epoll loop for every connection), which costs the
    machine far less CPU per login than a Trio task pair per connection.
(b) presence: C clients each do sequential ``presence`` requests, each awaiting
    its ``ok`` (sent once the update is committed); committed updates per second
    and per-request latency. C = 1 on the leader, C = 1 on a follower, C = 64
    spread over the nodes.
(c) messages: senders and recipients in pairs, the recipient on the sender's node
    ("same node") or on the next node ("other node"); end-to-end latency from the
    sender's send start to the recipient's receipt of the ``deliver`` frame, at
    offered rates of 500/s and 5,000/s (open loop: latency counted from the
    scheduled send time, so a late load generator cannot hide queueing) and at
    the maximum (closed loop, a window of sends in flight per sender). Recipients acknowledge in
    batches, as a real client would, so mailboxes stay small.

The nodes run the production settings but ``--frame-rate 100000``
(``NODE_ARGS``), as in ``bench zookeeper`` and ``bench fanout``: a node answers
a connection's frames beyond that rate (500/s by default, an abuse guard) with
``rate-limited``, and on a 2-core AMD EPYC the default capped the max phases at
senders x 500/s (12,036-12,622/s with 24 senders, 17,153-17,803/s with 36,
thousands of sends answered ``rate-limited``) and one sequential presence
client at about 500 updates/s.

Load comes from ``bench.burst`` (the logins of (a) and (c)), ``bench.loadgen``
((b)) and ``bench.pump`` (the messages of (c)), all the raw protocol, not the
client library; the burst and the pump drive every connection from one epoll
loop.
``--workers K`` starts the nodes with that many gateway workers instead of one
per core (0: the gateway in the node process).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import trio

from replication.raft import RaftTimings

from . import burst, loadgen, pump
from .burst import LoginBurst
from .common import (
    BenchCluster,
    Options,
    burst_text,
    bursts,
    finish,
    fmt_ms,
    fmt_rate,
    machine_info,
    make_table,
    progress,
    report_replicas,
    summarize,
)
from .loadgen import Counters, spread
from .presence import presence_workload, ticker
from .pump import MessagePump


@dataclass(frozen=True)
class Plan:
    login_clients: int
    login_waves: int
    presence_clients: tuple[int, ...]
    presence_seconds: float
    warmup: float
    pairs_per_node: int
    target_rates: tuple[float, ...]  # offered message rates (open loop)
    window: int
    message_seconds: float
    body_size: int = 100


FULL = Plan(login_clients=1000, login_waves=3, presence_clients=(64,), presence_seconds=15.0,
            warmup=2.0, pairs_per_node=8, target_rates=(500.0, 5000.0), window=32,
            message_seconds=15.0)
QUICK = Plan(login_clients=150, login_waves=1, presence_clients=(64,), presence_seconds=3.0,
             warmup=0.5, pairs_per_node=2, target_rates=(300.0,), window=16,
             message_seconds=3.0)

NODE_ARGS = ["--frame-rate", "100000"]
"""Every node's flags in this bench (the module docstring says why)."""

ACK_BATCH = 128
ACK_FLUSH = 0.05
DRAIN_SECONDS = 5.0
MAX_SENDER_INFLIGHT = 2000
SLOW_E2E = 0.1
"""A message delivered this long after its send started is listed in the phase's
stalls, grouped into bursts beside the nodes' own stalls (``stalls`` in their
admin status: Raft-thread holds and long collections of the node process)."""


# --- (a) logins -----------------------------------------------------------------------------


async def bench_logins(bc: BenchCluster, plan: Plan, prog: Any,
                       where: str = "spread") -> dict[str, Any]:
    """``where``: "spread" (round-robin over the nodes) or "leader" (every client
    on the leader: one node's rate, the node also doing the leader's Raft work)."""
    addrs = bc.addresses()
    node_id: str | None = None
    if where == "leader":
        node_id = await trio.to_thread.run_sync(bc.c.wait_ready)
        addrs = [bc.c.spec(node_id).client]
    counters = Counters()
    lat: list[float] = []
    waves: list[dict[str, Any]] = []
    logout_s: list[float] = []
    task = prog.add_task(f"logins ({where})", total=plan.login_waves)
    for w in range(plan.login_waves):
        tag = f"login{where[0]}{w}"
        logins = LoginBurst([(spread(addrs, i), f"{tag}-{i}", bc.token(f"{tag}-{i}"))
                            for i in range(plan.login_clients)])
        try:
            cpu0 = bc.cpu.snapshot()
            t0 = time.perf_counter()
            await trio.to_thread.run_sync(logins.login, 30.0)
            cpu = bc.cpu.between(cpu0, bc.cpu.snapshot())
            ok = logins.ok
            if ok:
                wall = max(c.t_login_ok for c in ok) - min(c.t_connect for c in logins.conns)
            else:
                wall = time.perf_counter() - t0
            for code, n in logins.failures().items():
                counters.login_failures[code] = counters.login_failures.get(code, 0) + n
            lat.extend(c.t_login_ok - c.t_connect for c in ok)
            waves.append({"clients": plan.login_clients, "ok": len(ok), "wall_s": wall,
                          "logins_per_s": len(ok) / wall if wall > 0 else 0.0, "cpu": cpu})
            t1 = time.perf_counter()
            await trio.to_thread.run_sync(logins.logout, 15.0)
            logout_s.append(time.perf_counter() - t1)
        finally:
            logins.close()
        prog.update(task, advance=1)
        await trio.sleep(0.5)
    total_ok = sum(w["ok"] for w in waves)
    total_wall = sum(w["wall_s"] for w in waves)
    return {
        "where": where,
        "node": node_id,
        "clients_per_wave": plan.login_clients,
        "waves": waves,
        "logins_per_s": total_ok / total_wall if total_wall > 0 else 0.0,
        "latency": summarize(lat),
        "logout_all_seconds": logout_s,
        "failures": counters.as_dict(),
    }


# --- (b) presence: bench.presence.presence_workload ---------------------------------------------


# --- (c) messages -------------------------------------------------------------------------------


async def bench_messages(bc: BenchCluster, plan: Plan, placement: str, rate: float | None,
                         prog: Any) -> dict[str, Any]:
    """Messages at an offered ``rate`` per second, or at the maximum (``None``).

    The pairs log in from one ``LoginBurst`` and ``MessagePump`` drives them, both
    from one epoll loop in a thread (see ``bench.pump`` for why)."""
    addrs = bc.addresses()
    n_nodes = len(addrs)
    pairs = plan.pairs_per_node * n_nodes
    tag = f"m{placement[0]}{'m' if rate is None else f'r{int(rate)}'}"
    targets = []
    for role in ("r", "s"):
        for i in range(pairs):
            node = i % n_nodes
            if role == "r" and placement != "same":
                node = (node + 1) % n_nodes
            targets.append((addrs[node], f"{tag}-{role}{i}", bc.token(f"{tag}-{role}{i}")))
    logins = LoginBurst(targets)
    label = f"messages, {placement} node, {'max' if rate is None else f'rate {rate:g}/s'}"
    task = prog.add_task(label, total=plan.message_seconds)
    try:
        await trio.to_thread.run_sync(logins.login, 30.0)
        recipients, senders = logins.conns[:pairs], logins.conns[pairs:]
        # Only complete pairs send: a recipient that could not log in (a node refused
        # it) would leave every message in its mailbox.
        active = [i for i in range(pairs) if senders[i].ok and recipients[i].ok]
        msgs = MessagePump([senders[i] for i in active], [recipients[i] for i in active],
                           body_size=plan.body_size, ack_batch=ACK_BATCH, ack_every=ACK_FLUSH,
                           max_inflight=MAX_SENDER_INFLIGHT, slow=SLOW_E2E)
        start = time.perf_counter()
        measure_from = start + plan.warmup
        measure_to = start + plan.message_seconds
        pumped = trio.Event()

        async def drive() -> None:
            if active:
                await trio.to_thread.run_sync(partial(
                    msgs.run, rate=rate, window=plan.window, measure_from=measure_from,
                    measure_to=measure_to, drain=DRAIN_SECONDS))
            pumped.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker, prog, task, plan.message_seconds)
            nursery.start_soon(drive)
            await trio.sleep(plan.warmup)
            cpu0 = bc.cpu.snapshot()
            await trio.sleep(max(0.0, measure_to - time.perf_counter()))
            cpu = bc.cpu.between(cpu0, bc.cpu.snapshot())
            await pumped.wait()
            nursery.cancel_scope.cancel()
        st = msgs.stats
        st.failures.login_failures = logins.failures()
        stalls = await _phase_stalls(bc, st.slow, measure_from)
        await trio.to_thread.run_sync(logins.logout, 10.0)
    finally:
        logins.close()
    prog.update(task, completed=plan.message_seconds)
    window = plan.message_seconds - plan.warmup
    # A committed message must reach a recipient that stayed connected; one whose
    # connection the node closed (this load generator does not resume) keeps it in
    # its mailbox: counted apart.
    missing = st.undelivered(dropped=False)
    stranded = st.undelivered(dropped=True)
    return {
        "placement": placement, "mode": "max" if rate is None else "rate", "pairs": pairs,
        "pairs_active": len(active),
        "offered_per_s": rate,
        "window": plan.window if rate is None else None,
        "window_s": window,
        "delivered_per_s": st.delivered_in_window / window,
        "sent": st.sent, "committed": st.committed, "delivered": st.delivered,
        "shed": st.shed, "duplicates": st.duplicates, "missing": missing,
        "undelivered_closed_recipient": stranded, "cpu": cpu,
        "e2e": summarize(st.e2e), "commit": summarize(st.commit),
        "stalls": stalls,
        "failures": st.failures.as_dict(),
    }


# --- the bench ------------------------------------------------------------------------------------


async def _run(opts: Options, bc: BenchCluster, plan: Plan) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with progress(opts) as prog:
        result["logins"] = await bench_logins(bc, plan, prog)
        result["logins_one_node"] = await bench_logins(bc, plan, prog, where="leader")
        result["presence"] = [
            await presence_workload(bc, prog, clients=1, seconds=plan.presence_seconds,
                                    warmup=plan.warmup, where="leader"),
            await presence_workload(bc, prog, clients=1, seconds=plan.presence_seconds,
                                    warmup=plan.warmup, where="follower"),
            *[await presence_workload(bc, prog, clients=c, seconds=plan.presence_seconds,
                                      warmup=plan.warmup) for c in plan.presence_clients],
        ]
        msgs = []
        for placement in ("same", "other"):
            for rate in (*plan.target_rates, None):
                msgs.append(await bench_messages(bc, plan, placement, rate, prog))
        result["messages"] = msgs
    return result


def _cpu(c: dict[str, float]) -> str:
    return f"{c['nodes_cores']:.2f}/{c['bench_cores']:.2f}/{c['others_cores']:.2f}"


async def _phase_stalls(bc: BenchCluster, slow_sends: list[tuple[float, float]],
                        t0: float) -> list[dict[str, Any]]:
    """The phase's slow deliveries (send time, e2e s) in bursts from ``t0``, beside the
    nodes' stalls (the bench's ``perf_counter`` and the nodes' ``monotonic`` are the
    same clock)."""
    statuses = await trio.to_thread.run_sync(bc.c.statuses)
    events = [(t, nid, kind, ms) for nid, s in statuses.items() if s
              for t, kind, ms in s.get("stalls", [])]
    slow = [(t - t0, round(e2e * 1000, 1), 1) for t, e2e in sorted(slow_sends)]
    return bursts(slow, events, t0)


def _print(opts: Options, res: dict[str, Any]) -> None:
    con = opts.console
    for lg in (res["logins"], res.get("logins_one_node")):
        if lg is None:
            continue
        on = ("spread over the nodes" if lg.get("where", "spread") == "spread"
              else f"all on {lg['node']} (the leader)")
        con.print(make_table(
            f"(a) logins: {lg['clients_per_wave']} clients at once x {len(lg['waves'])} waves, "
            f"{on}",
            ["figure", "value"],
            [["logins/s", fmt_rate(lg["logins_per_s"])],
             ["per wave", ", ".join(fmt_rate(w["logins_per_s"]) for w in lg["waves"])],
             ["connect+login p50 ms", fmt_ms(lg["latency"]["p50_ms"])],
             ["connect+login p99 ms", fmt_ms(lg["latency"]["p99_ms"])],
             ["failed logins", str(sum(lg["failures"]["login_failures"].values()))],
             ["CPU nodes/bench/others (cores)",
              ", ".join(_cpu(w["cpu"]) for w in lg["waves"])]]))
    con.print(make_table(
        "(b) presence updates (each client: sequential, awaiting the commit)",
        ["clients", "on", "committed/s", "p50 ms", "p99 ms", "max ms", "err/drop",
         "CPU nodes/bench/others"],
        [[str(p["clients"]), p["where"], fmt_rate(p["ops_per_s"]),
          fmt_ms(p["latency"]["p50_ms"]), fmt_ms(p["latency"]["p99_ms"]),
          fmt_ms(p["latency"]["max_ms"]),
          f"{sum(p['failures']['errors'].values())}/{p['failures']['closed_early']}",
          _cpu(p["cpu"])] for p in res["presence"]]))
    rows = []
    for m in res["messages"]:
        load = (f"{fmt_rate(m['offered_per_s'])}/s" if m["mode"] == "rate"
                else f"max, {m['window']}/sender")
        fails = m["failures"]
        issues = (f"{m['missing']}/{m['duplicates']}/{m['shed']}/"
                  f"{fails['closed_early']}/{sum(fails['errors'].values())}")
        rows.append([f"{m['placement']} node", load, f"{m['pairs_active']}/{m['pairs']}",
                     fmt_rate(m["delivered_per_s"]),
                     fmt_ms(m["e2e"]["p50_ms"]), fmt_ms(m["e2e"]["p99_ms"]),
                     fmt_ms(m["commit"]["p50_ms"]), fmt_ms(m["commit"]["p99_ms"]), issues,
                     _cpu(m["cpu"])])
    pairs = res["messages"][0]["pairs"] if res["messages"] else 0
    con.print(make_table(
        f"(c) messages, {pairs} sender/recipient pairs (e2e: sender's send start -> "
        "recipient reads deliver; commit: send -> ok)",
        ["recipient", "load", "pairs", "delivered/s", "e2e p50", "e2e p99", "commit p50",
         "commit p99", "miss/dup/shed/drop/err", "CPU n/b/o"], rows,
        caption="latencies in ms; CPU in cores: nodes/bench process/other processes; "
                "drop = connections the node closed"))
    for m in res["messages"]:
        load = f"{fmt_rate(m['offered_per_s'])}/s" if m["offered_per_s"] else "max"
        for b in sorted(m.get("stalls", []), key=lambda b: -b["worst_ms"])[:3]:
            con.print(f"  deliveries >= {SLOW_E2E * 1000:.0f} ms, {m['placement']} node, {load}, "
                      f"{burst_text(b, 'messages', near_max=4)}")
    con.print(make_table(
        "node counters after the run", ["node", "term", "batches", "commands", "retries",
                                        "timeouts", "fenced refusals", "dropped slow",
                                        "journal fsyncs", "journal cuts (longest ms)",
                                        "longest fork ms",
                                        "longest gc ms, gen 0/1/2"],
        [[nid + (" (leader)" if nid == res.get("leader_at_end") else ""),
          f"{c.get('raft_term', 0):.0f}", f"{c.get('batches_committed', 0):.0f}",
          f"{c.get('commands_committed', 0):.0f}", f"{c.get('proposal_retries', 0):.0f}",
          f"{c.get('request_timeouts', 0):.0f}", f"{c.get('refused_fenced', 0):.0f}",
          f"{c.get('clients_dropped_slow', 0):.0f}", f"{c.get('journal_fsyncs', 0):.0f}",
          f"{c.get('journal_cuts', 0):.0f} ({1000 * c.get('journal_cut_seconds_max', 0):.0f})",
          f"{1000 * c.get('compaction_start_seconds_max', 0):.0f}",
          "/".join(f"{1000 * c.get(f'gc_pause_seconds_max_gen{g}', 0):.0f}" for g in range(3))]
         for nid, c in res.get("node_counters", {}).items()]))
    con.print(f"nodes fenced themselves {res['fenced_events']} times; pysyncobj logged "
              f"'truncating already-applied log entries' {res['truncations_logged']} times")
    con.print(f"clients: logins {res['login_client']}; presence {res['client']}; "
              f"messages {res.get('message_client', res['client'])}")


def run(opts: Options) -> dict[str, Any]:
    plan = QUICK if opts.quick else FULL
    t0 = time.monotonic()
    machine = machine_info()
    node_args = [*NODE_ARGS, *opts.node_args()]
    bc = BenchCluster(opts, "core", node_args=node_args)
    settings = f"default settings but {' '.join(node_args)}"
    try:
        bc.start()
        opts.console.print(f"revision {machine['revision']}; "
                           f"cluster: 3 nodes on {', '.join(bc.addresses())}, {settings} "
                           f"(fsync on); logins: {burst.CLIENT_NAME}; presence: "
                           f"{loadgen.CLIENT_NAME}; messages: {pump.CLIENT_NAME}")
        res = trio.run(_run, opts, bc, plan)
        res["node_counters"] = bc.node_counters()
        res["replicas"] = bc.check_replicas()
        res["leader_at_end"] = bc.c.leader()
    finally:
        bc.stop()
    res = {"bench": "core", "command": opts.argv(), "quick": opts.quick,
           "node_args": node_args,
           "client": loadgen.CLIENT_NAME, "login_client": burst.CLIENT_NAME,
           "message_client": pump.CLIENT_NAME,
           "plan": asdict(plan), "machine": machine,
           "raft_timings": asdict(RaftTimings()), **res,
           "node_logs": bc.logs.as_dict(), "fenced_events": bc.logs.lines_with("fenced"),
           "truncations_logged": bc.logs.lines_with("truncating already-applied"),
           "duration_s": time.monotonic() - t0}
    _print(opts, res)
    report_replicas(opts, res["replicas"])
    return finish(opts, res, bc.logs)
