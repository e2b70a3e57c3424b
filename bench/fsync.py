"""fsync: what the journal fsync costs. The same presence workloads on a cluster
with the default settings (every Raft log entry fsynced on every node before it
counts) and on one started with ``--no-fsync``, in the same run, side by side.

Workloads (raw-protocol clients, ``bench.presence``):
- 1 client on the leader, sequential: the latency of one commit, unloaded;
- 64 clients spread over the nodes, sequential (each awaits its commit);
- max: 64 clients x 16 requests in flight each, the throughput ceiling.

The configurations alternate (full run: fsync, no-fsync, then no-fsync, fsync),
each on a fresh cluster, so slow drift of the shared machine hits both alike;
latencies are pooled over the rounds and throughput averaged. The nodes' own
fsync counters confirm which configuration really ran.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import trio

from replication.raft import RaftTimings

from . import loadgen
from .common import (
    BenchCluster,
    Options,
    finish,
    fmt_ms,
    fmt_rate,
    machine_info,
    make_table,
    progress,
    report_replicas,
    summarize,
)
from .presence import presence_workload

CONFIGS: dict[str, list[str]] = {"fsync": [], "no-fsync": ["--no-fsync"]}


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    window: int
    where: str | None


WORKLOADS = (
    Workload("1 client on the leader, sequential", 1, 1, "leader"),
    Workload("64 clients, sequential", 64, 1, None),
    Workload("max: 64 clients x 16 in flight", 64, 16, None),
)


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: float
    warmup: float


FULL = Plan(rounds=2, seconds=12.0, warmup=2.0)
QUICK = Plan(rounds=1, seconds=3.0, warmup=0.5)


async def _workloads(bc: BenchCluster, plan: Plan, prog: Any, tag: str) -> list[dict[str, Any]]:
    out = []
    for w in WORKLOADS:
        r = await presence_workload(bc, prog, clients=w.clients, seconds=plan.seconds,
                                    warmup=plan.warmup, where=w.where, window=w.window,
                                    tag=tag, keep_samples=True)
        r["workload"] = w.name
        out.append(r)
    return out


def _one_config(opts: Options, plan: Plan, config: str, rnd: int, prog: Any
                ) -> dict[str, Any]:
    bc = BenchCluster(opts, f"fsync-{config}-{rnd}", node_args=CONFIGS[config])
    try:
        bc.start()
        before = bc.node_counters()
        results = trio.run(_workloads, bc, plan, prog, f"r{rnd}")
        after = bc.node_counters()
        replicas = bc.check_replicas()
        leader = bc.c.leader()
    finally:
        bc.stop()
    def delta(nid: str, key: str) -> float:
        return after[nid].get(key, 0.0) - before[nid].get(key, 0.0)

    fs = {nid: {"fsyncs": delta(nid, "journal_fsyncs"),
                "fsync_seconds": delta(nid, "journal_fsync_seconds"),
                "batches_committed": delta(nid, "batches_committed")}
          for nid in after if nid in before}
    return {"config": config, "round": rnd, "results": results, "fsync_counters": fs,
            "replicas": replicas, "leader": leader,
            "fenced_events": bc.logs.lines_with("fenced"),
            "truncations_logged": bc.logs.lines_with("truncating already-applied"),
            "node_logs": bc.logs}


def run(opts: Options) -> dict[str, Any]:
    plan = QUICK if opts.quick else FULL
    t0 = time.monotonic()
    machine = machine_info()
    order = [["fsync", "no-fsync"], ["no-fsync", "fsync"]]
    runs: list[dict[str, Any]] = []
    opts.console.print(f"revision {machine['revision']}; "
                       f"3-node clusters, default settings vs --no-fsync; load: "
                       f"{loadgen.CLIENT_NAME}; {plan.rounds} round(s)")
    with progress(opts) as prog:
        for rnd in range(plan.rounds):
            for config in order[rnd % 2]:
                runs.append(_one_config(opts, plan, config, rnd, prog))
    logs = runs[0]["node_logs"]
    for r in runs[1:]:
        logs.merge(r["node_logs"])
    for r in runs:
        del r["node_logs"]
    # Pool per configuration and workload.
    table: list[dict[str, Any]] = []
    for w in WORKLOADS:
        row: dict[str, Any] = {"workload": w.name, "clients": w.clients, "window": w.window}
        for config in CONFIGS:
            rs = [x for r in runs if r["config"] == config for x in r["results"]
                  if x["workload"] == w.name]
            lat_pool: list[float] = []
            for x in rs:
                lat_pool.extend(x.pop("_samples", []))
            row[config] = {
                "ops_per_s": sum(x["ops_per_s"] for x in rs) / len(rs) if rs else 0.0,
                "ops_per_s_runs": [x["ops_per_s"] for x in rs],
                "p50_ms_runs": [x["latency"]["p50_ms"] for x in rs],
                "p99_ms_runs": [x["latency"]["p99_ms"] for x in rs],
                "latency": summarize(lat_pool) if lat_pool else None,
                "errors": sum(sum(x["failures"]["errors"].values())
                              + x["failures"]["closed_early"] for x in rs),
            }
        a, b = row["fsync"], row["no-fsync"]
        row["ratio_fsync_over_nofsync"] = {
            "ops_per_s": _ratio(a["ops_per_s"], b["ops_per_s"]),
            "p50": _ratio(_lat(a, "p50_ms"), _lat(b, "p50_ms")),
            "p99": _ratio(_lat(a, "p99_ms"), _lat(b, "p99_ms")),
        }
        table.append(row)
    res = {"bench": "fsync", "command": opts.argv(), "quick": opts.quick,
           "client": loadgen.CLIENT_NAME, "plan": asdict(plan), "machine": machine,
           "raft_timings": asdict(RaftTimings()), "comparison": table, "runs": runs,
           "node_logs": logs.as_dict(), "duration_s": time.monotonic() - t0}
    _print(opts, res)
    for r in runs:
        opts.console.print(f"{r['config']} round {r['round']}: ", end="")
        report_replicas(opts, r["replicas"])
    return finish(opts, res, logs)


def _lat(cfg: dict[str, Any], key: str) -> float:
    lat = cfg["latency"]
    return float(lat[key]) if lat else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def _print(opts: Options, res: dict[str, Any]) -> None:
    rows = []
    for row in res["comparison"]:
        a, b, q = row["fsync"], row["no-fsync"], row["ratio_fsync_over_nofsync"]
        rows.append([row["workload"], "fsync", fmt_rate(a["ops_per_s"]),
                     fmt_ms(_lat(a, "p50_ms")), fmt_ms(_lat(a, "p99_ms")), str(a["errors"])])
        rows.append(["", "--no-fsync", fmt_rate(b["ops_per_s"]), fmt_ms(_lat(b, "p50_ms")),
                     fmt_ms(_lat(b, "p99_ms")), str(b["errors"])])
        rows.append(["", "ratio fsync/no-fsync", f"{q['ops_per_s']:.2f}x", f"{q['p50']:.2f}x",
                     f"{q['p99']:.2f}x", ""])
    opts.console.print(make_table(
        "presence updates: fsync on vs --no-fsync (committed/s; commit latency ms)",
        ["workload", "config", "committed/s", "p50", "p99", "err/drop"], rows))
    frows = []
    for r in res["runs"]:
        for nid, f in r["fsync_counters"].items():
            n = f["fsyncs"]
            role = "leader" if nid == r["leader"] else "follower"
            frows.append([f"{r['config']} round {r['round']}", f"{nid} ({role})", f"{n:.0f}",
                          fmt_ms(f["fsync_seconds"] / n * 1000 if n else float("nan")),
                          f"{f['batches_committed']:.0f}"])
    opts.console.print(make_table("journal fsyncs during the run (node counters)",
                                  ["cluster", "node", "fsyncs", "mean fsync ms",
                                   "batches from node"], frows))
    opts.console.print(make_table(
        "per cluster, from the node logs", ["cluster", "'fenced' events",
                                            "'truncating already-applied' lines"],
        [[f"{r['config']} round {r['round']}", str(r["fenced_events"]),
          str(r["truncations_logged"])] for r in res["runs"]]))
