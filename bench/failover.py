"""failover: SIGKILL a follower or the leader; how long until the session resumes
and its first message arrives?

Each round, on a 3-node cluster with the production settings (fsync on):

1. re-read the leader; pick the victim (the leader, or a follower: the two
   followers in turn);
2. alice (the client library, ``ordered=True``, the victim's address first,
   ``connection_events=True``) is logged in on the victim; bob (client library)
   on a surviving node; bob sends alice one warm-up message, she receives and
   acknowledges it;
3. t0 = just before ``os.kill(victim, SIGKILL)``; right after, bob sends alice
   one message;
4. measured: t0 -> alice's ``Reconnected`` event (session resumed on a surviving
   node) and t0 -> alice's ``events()`` yielding bob's message; also t0 -> bob's
   send acknowledged (committed);
5. checked: alice's session id is unchanged and ``resumed`` is true, and bob's
   message arrived exactly once (0.5 s are allowed for a duplicate to show);
6. both log out; the victim is restarted (``LocalCluster.restart`` +
   ``wait_ready``) before the next round.

Rounds alternate follower / leader kills.
"""

from __future__ import annotations

import inspect
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

import client
from client import Message, Reconnected
from cluster.launcher import LaunchError
from node.config import NodeConfig
from replication.raft import RaftTimings

from .common import (
    BenchCluster,
    Options,
    finish,
    fmt_ms,
    machine_info,
    make_table,
    progress,
    report_replicas,
    summarize,
)

CLIENT_NAME = "client.connect (the client library, anyio on Trio)"
ROUND_TIMEOUT = 30.0  # how long a round waits for the resume and the message
QUICK_ROUND_TIMEOUT = 8.0  # --quick must stay short even when rounds fail
DUPLICATE_WAIT = 0.5


@dataclass
class Round:
    n: int
    kind: str  # "follower" or "leader"
    victim: str
    leader_before: str
    alice_to: str | None = None  # node alice resumed on
    bob_on: str = ""
    resumed_s: float | None = None
    message_s: float | None = None
    send_ok_s: float | None = None
    copies: int = 0
    session_kept: bool = False
    resumed_flag: bool = False
    reconnects: int = 0
    unexpected: int = 0
    restart_s: float = 0.0
    leader_after: str | None = None
    violations: list[str] = field(default_factory=list)


def _describe(e: BaseException) -> str:
    """The exception, or the leaf exceptions of a group, in one line."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}"


async def one_round(bc: BenchCluster, n: int, kind: str, follower_turn: int,
                    timeout: float = ROUND_TIMEOUT) -> Round:
    c = bc.c
    leader = await trio.to_thread.run_sync(lambda: c.wait_ready(timeout=60))
    ids = bc.node_ids()
    followers = [i for i in ids if i != leader]
    victim = leader if kind == "leader" else followers[follower_turn % len(followers)]
    survivors = [i for i in ids if i != victim]
    addr = {s.id: s.client for s in c.specs}
    bob_node = survivors[-1]  # alice resumes on survivors[0] first: the message crosses nodes
    r = Round(n, kind, victim, leader, bob_on=bob_node)
    alice_user, bob_user = f"alice{n}", f"bob{n}"
    body = f"after-kill-{n}"
    pid = c.procs[victim].pid
    try:
        with trio.fail_after(timeout + 15):
            async with client.connect([addr[victim], *[addr[s] for s in survivors]],
                                      user=alice_user, token=bc.token(alice_user),
                                      ordered=True, connection_events=True) as alice, \
                    client.connect([addr[bob_node]], user=bob_user, token=bc.token(bob_user),
                                   ordered=True) as bob:
                if alice.node_id != victim:
                    r.violations.append(f"alice logged in on {alice.node_id}, not {victim}")
                sid = alice.session_id
                await bob.send(alice_user, "warm-up")
                with trio.fail_after(10):
                    ev = await alice.next_event()
                    while not (isinstance(ev, Message) and ev.body == "warm-up"):
                        ev = await alice.next_event()
                    await alice.ack(ev)
                got_msg = trio.Event()
                got_resume = trio.Event()
                t0 = 0.0

                async def alice_reads() -> None:
                    async for e in alice.events():
                        now = time.perf_counter()
                        if isinstance(e, Reconnected):
                            r.reconnects += 1
                            if r.resumed_s is None:
                                r.resumed_s = now - t0
                                r.alice_to = alice.node_id
                                r.resumed_flag = e.resumed
                                if e.session_id != sid:
                                    r.violations.append(
                                        f"session id changed: {sid} -> {e.session_id}")
                            got_resume.set()
                        elif isinstance(e, Message):
                            if e.body == body:
                                r.copies += 1
                                if r.message_s is None:
                                    r.message_s = now - t0
                                got_msg.set()
                            else:
                                r.unexpected += 1
                            await alice.ack(e)

                async def bob_sends() -> None:
                    await bob.send(alice_user, body)
                    r.send_ok_s = time.perf_counter() - t0

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(alice_reads)
                    t0 = time.perf_counter()
                    os.kill(pid, signal.SIGKILL)
                    nursery.start_soon(bob_sends)
                    with trio.move_on_after(timeout):
                        await got_msg.wait()
                        await got_resume.wait()
                    await trio.sleep(DUPLICATE_WAIT)
                    nursery.cancel_scope.cancel()
                r.session_kept = alice.session_id == sid
    except Exception as e:  # a failed round is a finding, not a crash of the bench
        r.violations.append(f"round failed: {_describe(e)}")
    # Reap the victim, restart it and wait for the whole cluster to be ready.
    if r.message_s is None:
        r.violations.append(f"message not received within {timeout:g} s")
    elif r.copies != 1:
        r.violations.append(f"message received {r.copies} times")
    if r.resumed_s is None:
        r.violations.append("no Reconnected event")
    elif not r.resumed_flag:
        r.violations.append("Reconnected.resumed is false (a new session was opened)")
    if not r.session_kept and not any("session id" in v for v in r.violations):
        r.violations.append("alice.session_id changed")
    if r.unexpected:
        r.violations.append(f"{r.unexpected} unexpected messages")
    t1 = time.monotonic()

    def restart() -> str:
        c.procs[victim].proc.wait(10)
        c.restart(victim, timeout=60)
        return c.wait_ready(timeout=60)

    r.leader_after = await trio.to_thread.run_sync(restart)
    r.restart_s = time.monotonic() - t1
    return r


async def _run(opts: Options, bc: BenchCluster, per_kind: int) -> list[Round]:
    rounds: list[Round] = []
    with progress(opts) as prog:
        task = prog.add_task("SIGKILL rounds", total=2 * per_kind)
        follower_turn = 0
        for n in range(2 * per_kind):
            kind = "follower" if n % 2 == 0 else "leader"
            try:
                r = await one_round(bc, n, kind, follower_turn,
                                    QUICK_ROUND_TIMEOUT if opts.quick else ROUND_TIMEOUT)
            except LaunchError as e:  # the victim did not come back: stop here, report
                opts.err.print(f"[bold red]round {n}: the cluster did not recover: {e}")
                rounds.append(Round(n, kind, "?", "?", violations=[f"cluster lost: {e}"]))
                break
            if kind == "follower":
                follower_turn += 1
            rounds.append(r)
            if r.violations:
                opts.err.print(f"[bold red]round {n} ({kind} {r.victim} killed): "
                               f"{'; '.join(r.violations)}")
            prog.update(task, advance=1)
    return rounds


def _timings() -> dict[str, Any]:
    node_defaults = NodeConfig.__dataclass_fields__
    wanted = ("node_timeout", "heartbeat_interval", "tick_interval", "fence_after",
              "client_heartbeat", "grace", "commit_timeout")
    return {
        "raft": asdict(RaftTimings()),
        "node": {k: node_defaults[k].default for k in wanted},
        "client": {k: p.default for k, p in inspect.signature(client.connect).parameters.items()
                   if k in ("connect_timeout", "max_backoff", "request_timeout")},
    }


def run(opts: Options) -> dict[str, Any]:
    per_kind = 2 if opts.quick else 20
    t0 = time.monotonic()
    machine = machine_info()
    bc = BenchCluster(opts, "failover")
    try:
        bc.start()
        opts.console.print(f"revision {machine['revision']}; "
                           f"cluster: 3 nodes on {', '.join(bc.addresses())}, default settings "
                           f"(fsync on); client: {CLIENT_NAME}; {per_kind} kills of each kind")
        cpu0 = bc.cpu.snapshot()
        rounds = trio.run(_run, opts, bc, per_kind)
        cpu = bc.cpu.between(cpu0, bc.cpu.snapshot())
        replicas = bc.check_replicas()
        # Node PIDs change with every restart: only the machine and this process count.
        cpu = {k: v for k, v in cpu.items() if k in ("machine_busy_cores", "bench_cores")}
    finally:
        bc.stop()
    by_kind: dict[str, Any] = {}
    for kind in ("follower", "leader"):
        rs = [r for r in rounds if r.kind == kind]
        by_kind[kind] = {
            "kills": len(rs),
            "to_message": summarize([r.message_s for r in rs if r.message_s is not None]),
            "to_resumed": summarize([r.resumed_s for r in rs if r.resumed_s is not None]),
            "to_send_committed": summarize([r.send_ok_s for r in rs if r.send_ok_s is not None]),
            "violations": sum(1 for r in rs if r.violations),
            # After the victim's restart: a follower kill should not move leadership.
            "leader_changed": sum(1 for r in rs if r.leader_after != r.leader_before),
            "restart_s": summarize([r.restart_s for r in rs]),
        }
    res = {
        "bench": "failover", "command": opts.argv(), "quick": opts.quick,
        "client": CLIENT_NAME, "machine": machine, "timings": _timings(),
        "kinds": by_kind, "rounds": [asdict(r) for r in rounds],
        "violations": [f"round {r.n} ({r.kind} {r.victim}): {v}"
                       for r in rounds for v in r.violations],
        "cpu": cpu, "replicas": replicas, "node_logs": bc.logs.as_dict(),
        "duration_s": time.monotonic() - t0,
    }
    _print(opts, res)
    report_replicas(opts, replicas)
    return finish(opts, res, bc.logs)


def _print(opts: Options, res: dict[str, Any]) -> None:
    con = opts.console
    rows = []
    for kind, k in res["kinds"].items():
        for what, label in (("to_resumed", "SIGKILL -> session resumed"),
                            ("to_message", "SIGKILL -> first message received"),
                            ("to_send_committed", "SIGKILL -> bob's send committed")):
            s = k[what]
            rows.append([f"{kind} killed", label, f"{s['n']}/{k['kills']}", fmt_ms(s["p50_ms"]),
                         fmt_ms(s["p99_ms"]), fmt_ms(s["max_ms"])])
    con.print(make_table("failover (ms)", ["victim", "interval", "n", "p50", "p99", "max"],
                         rows))
    for kind, k in res["kinds"].items():
        con.print(f"{kind} kills: leader different after the victim's restart in "
                  f"{k['leader_changed']}/{k['kills']} rounds; restart + ready p50 "
                  f"{fmt_ms(k['restart_s']['p50_ms'])} ms")
    t = res["timings"]
    con.print("Raft timings: " + ", ".join(f"{k}={v:g}s" for k, v in t["raft"].items()))
    con.print("node: " + ", ".join(f"{k}={v:g}s" for k, v in t["node"].items()))
    con.print("client: " + ", ".join(f"{k}={v:g}s" for k, v in t["client"].items()))
    con.print(f"CPU during the run (cores): {res['cpu']}")
    if res["violations"]:
        con.print(f"[bold red]INVARIANT VIOLATIONS ({len(res['violations'])}):")
        for v in res["violations"]:
            con.print(f"[red]  {v}")
    else:
        con.print("every round: session id unchanged, resumed, the message arrived exactly once")
