"""One chaos run: namespaces, a cluster, the workload, the nemesis, the checkers.

``run_chaos`` sets up a network namespace per node, starts the cluster in them,
starts one workload client per user (real client library, in the root
namespace), lets the nemesis play the seeded fault schedule, heals everything,
waits for the cluster to settle, collects the replicas' digests at one log
position, stops everything it started and checks the history. The history,
a JSON report, a Markdown summary and a PNG timeline go to the run's folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from cluster.adminclient import AdminCallError, admin_call
from cluster.launcher import LocalCluster
from node.auth import issue_token

from .checker import check_all
from .generator import Fault, schedule
from .history import History
from .nemesis import Membership, Nemesis
from .netns import Network, available
from .workload import WorkloadClient, WorkloadConfig

BASE_PORT = 7000
log = structlog.get_logger("switchboard.chaos")


class ChaosError(Exception):
    """The run could not be carried out (not a checker failure); one line."""


@dataclass
class ChaosOptions:
    nodes: int = 3
    duration: float = 60.0
    faults: list[str] = field(default_factory=lambda: ["kill", "pause", "partition",
                                                       "loss", "clock"])
    seed: int = 1
    clients: int | None = None
    rate: float = 8.0
    out: Path | None = None
    grace: float = 30.0
    converge_bound: float = 15.0
    client_heartbeat: float = 2.0

    def replay_command(self) -> str:
        return (f"switchboard chaos --nodes {self.nodes} --duration {self.duration:g} "
                f"--faults {','.join(self.faults)} --seed {self.seed}"
                + (f" --clients {self.clients}" if self.clients else ""))


async def run_chaos(opts: ChaosOptions, progress: Any = None) -> dict[str, Any]:
    """Run, check, write the folder; return the report (``valid`` says the verdict)."""
    why = available()
    if why is not None:
        raise ChaosError(why)
    if not 3 <= opts.nodes <= 7:
        raise ChaosError("--nodes must be between 3 and 7")
    out = opts.out or Path("chaos-runs") / (
        time.strftime("%Y%m%d-%H%M%S") + f"-seed{opts.seed}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    faults = schedule(opts.seed, opts.duration, opts.faults, opts.nodes)
    node_ids = [f"n{k + 1}" for k in range(opts.nodes)]
    net = Network(list(node_ids))
    clock_dir = out / "clock"
    clock_dir.mkdir(exist_ok=True)
    clock_files = {n: clock_dir / n for n in node_ids}
    for p in clock_files.values():
        p.write_text("+0\n")
    t0 = time.monotonic()
    history = History(clock=lambda: time.monotonic() - t0)
    digests: dict[str, str | None] = {}
    last_heal = 0.0
    await trio.to_thread.run_sync(net.create)
    cluster: LocalCluster | None = None
    try:
        cluster = LocalCluster(
            out / "data", opts.nodes, base_port=BASE_PORT,
            node_args=["--client-heartbeat", str(opts.client_heartbeat),
                       "--grace", str(opts.grace)],
            hosts=[net.ip(n) for n in node_ids],
            wrap=lambda spec: net.wrap(spec.id),
            node_env=lambda spec: {"SWITCHBOARD_CLOCK_OFFSET_FILE": str(clock_files[spec.id])},
        )
        try:
            # On the main thread, so that the nodes die with this process (PDEATHSIG).
            cluster.start(timeout=60)
        except Exception as e:
            raise ChaosError(f"the cluster did not start: {e}") from e
        membership: Membership | None = None
        if "member" in opts.faults:
            from .membership import MembershipNemesis

            membership = MembershipNemesis(cluster, net, history, clock_files).run
        nemesis = Nemesis(cluster, net, history, clock_files, membership)
        users = opts.clients or max(4, 2 * opts.nodes)
        cfg = WorkloadConfig(users=users, rate=opts.rate)
        nodes = [s.client for s in cluster.specs]
        clients = [WorkloadClient(k, cfg, nodes, issue_token(cluster.keys.token, f"u{k}",
                                                             ttl=24 * 3600),
                                  history, opts.seed * 1000 + k) for k in range(users)]
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(c.run, stop)
            with trio.fail_after(60):
                for c in clients:
                    await c.ready.wait()
            start = time.monotonic()
            try:
                await _play(nemesis, faults, start, progress, opts.duration)
            finally:
                await nemesis.heal_all()
                last_heal = history.record("nemesis", "info", "heal-all", {}).time
            await trio.to_thread.run_sync(lambda: cluster.wait_ready(timeout=60))
            await trio.sleep(opts.converge_bound * 0.6)
            stop.set()
            await trio.sleep(opts.converge_bound * 0.4)
            history.record("nemesis", "info", "end", {})
            nursery.cancel_scope.cancel()
        digests = await trio.to_thread.run_sync(_final_digests, cluster)
    finally:
        with trio.CancelScope(shield=True):
            if cluster is not None:
                await trio.to_thread.run_sync(cluster.stop)
            await trio.to_thread.run_sync(net.destroy)
            # Also when the run breaks: the history so far is the evidence.
            history.dump(out / "history.jsonl")
    report = check_all(history, digests, last_heal, opts.converge_bound).to_json()
    report["seed"] = opts.seed
    report["nodes"] = opts.nodes
    report["duration_s"] = opts.duration
    report["schedule"] = [f.describe() for f in faults]
    report["out"] = str(out)
    report["replay"] = opts.replay_command()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    try:
        from .timeline import plot_timeline  # matplotlib: the optional 'chaos' extra

        plot_timeline(history, out / "timeline.png",
                      f"switchboard chaos: {opts.nodes} nodes, seed {opts.seed}, "
                      f"{'valid' if report['valid'] else 'INVALID'}")
    except Exception as e:  # a picture must not hide a verdict
        report["timeline_error"] = str(e)
    if cluster is not None:
        for spec in cluster.specs:
            log = spec.data_dir / "node.log"
            if log.exists():
                shutil.copy(log, out / f"{spec.id}.log")
    return report


async def _play(nemesis: Nemesis, faults: list[Fault], start: float, progress: Any,
                duration: float) -> None:
    for f in faults:
        delay = start + f.start - time.monotonic()
        if delay > 0:
            await trio.sleep(delay)
        if progress is not None:
            progress(f)
        try:
            await nemesis.run(f)
        except Exception as e:  # a fault that could not be carried out is not a verdict
            log.warning("fault failed", fault=f.number, kind=f.kind, error=str(e)[:200])
            nemesis.h.record("nemesis", "info", f.kind, {"fault": f.number, "healed": True,
                                                          "error": str(e)[:200]})
            await nemesis.heal_all()
    rest = start + duration - time.monotonic()
    if rest > 0:
        await trio.sleep(rest)


def _final_digests(cluster: LocalCluster) -> dict[str, str | None]:
    """Every replica's digest at one checkpoint committed after the last heal."""
    deadline = time.monotonic() + 60
    while True:
        leader = cluster.leader()
        try:
            if leader is None:
                raise AdminCallError("no-leader", "no leader yet")
            cp = admin_call(cluster.spec(leader).admin, cluster.keys, "checkpoint",
                            timeout=15)
            break
        except AdminCallError as e:
            if time.monotonic() > deadline:
                alive = {sid: np.alive() for sid, np in cluster.procs.items()}
                errs = {}
                for sp in cluster.specs:
                    try:
                        admin_call(sp.admin, cluster.keys, "status", timeout=2)
                    except AdminCallError as e2:
                        errs[sp.id] = e2.reason
                log.warning("no final checkpoint", reason=e.reason, alive=alive, errs=errs)
                return {s.id: None for s in cluster.specs}
            time.sleep(0.5)
    out: dict[str, str | None] = {}
    for s in cluster.specs:
        try:
            d = admin_call(s.admin, cluster.keys, "digest", {"tag": cp["tag"], "timeout": 30},
                           timeout=35)
            out[s.id] = d["digest"]
        except AdminCallError as e:
            log.warning("no final digest", node=s.id, reason=e.reason)
            out[s.id] = None
    return out
