"""zookeeper: Switchboard side by side with a 3-server ZooKeeper ensemble, same run.

The bench starts a 3-server ZooKeeper ensemble on loopback (Debian's
``zookeeper`` package, ``QuorumPeerMain``, one JVM per server, in a temporary
directory; tickTime 2000, maxClientCnxns 0, the transaction log fsynced as ZK
does by default) and a 3-node Switchboard cluster (defaults, fsync on, except
``--frame-rate``: ZooKeeper limits no connection's request rate, and a node's
default of 500 frames/s per connection would cap the one-client figure), both up
for the whole run, and alternates the systems workload by workload:

(a) sessions: 1,000 sessions established, 64 at a time. ZooKeeper: a kazoo
    client connects (session timeout 10 s) and creates one ephemeral presence
    znode. Switchboard: a raw-protocol login (which commits the session and its
    presence). Figure: sessions per second of wall time, and per-session
    latency.
(b) presence updates: 1 client (on a follower) and 64 clients (spread over the
    3 servers), each with one update in flight, for a fixed time. ZooKeeper:
    ``set`` of the client's ephemeral znode (kazoo, async API chained);
    Switchboard: the ``presence`` request (``bench.presence``). ops/s, p50/p99.
(c) session survival: SIGKILL the server the client is connected to (a
    follower, or the leader), alternating. ZooKeeper: kazoo (hosts in order,
    the victim first; reconnect 50 ms x1.5 up to 1 s as in the notes); the time
    from the kill to the first successful ``set`` on the session's ephemeral
    znode, and whether the session (id, ephemeral znode) survived.
    Switchboard: ``bench.failover``'s round (client library): kill -> session
    resumed and kill -> first message received. The victim is restarted after
    each round and the bench waits for the whole ensemble/cluster, then a few
    seconds more (``settle``): a restarted JVM (or node) keeps a core busy for a
    while, which slowed the next round's election in earlier runs.

Clients: kazoo 2.x for ZooKeeper (a full client library, threads per
session), ``bench.loadgen`` (raw protocol) for Switchboard's (a) and (b) and
the client library for (c). The bench process's CPU is reported per phase:
the Python clients cost CPU on 2 cores, more so kazoo's.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from cluster.ports import free_base_port

from . import failover
from .common import (
    BenchCluster,
    CpuMeter,
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
from .loadgen import Counters, RawConn, login_all, logout_all, spread
from .presence import presence_workload
from .procs import _pdeathsig, loadavg, with_children

ZK_JARS = ("/usr/share/java/zookeeper.jar", "/usr/share/java/slf4j-log4j12.jar",
           "/usr/share/java/log4j-1.2.jar")
JAVA = "/usr/bin/java"
ZK_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
TICK_MS = 2000
SESSION_TIMEOUT = 10.0
KAZOO_CLIENT = "kazoo (threading handler)"
SB_CLIENT = "bench.loadgen (raw protocol) for (a) and (b); client.connect for (c)"


@dataclass(frozen=True)
class Plan:
    sessions: int
    concurrency: int
    presence_seconds: float
    warmup: float
    kills_per_kind: int
    round_timeout: float
    settle: float  # seconds of calm after a victim's restart (a JVM starting eats CPU)


FULL = Plan(sessions=1000, concurrency=64, presence_seconds=15.0, warmup=2.0, kills_per_kind=5,
             round_timeout=30.0, settle=3.0)
QUICK = Plan(sessions=150, concurrency=64, presence_seconds=2.0, warmup=0.5, kills_per_kind=1,
             round_timeout=8.0, settle=0.5)


def missing() -> str | None:
    """Why ZooKeeper cannot run here (None: it can)."""
    for path in (JAVA, *ZK_JARS):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install -y zookeeper)"
    try:
        import kazoo  # noqa: F401
    except ImportError:
        return "kazoo is not installed (pip install kazoo)"
    return None


# --- the ensemble ----------------------------------------------------------------------------


class ZkEnsemble:
    """Three ZooKeeper servers on loopback, started and stopped by PID."""

    def __init__(self, n: int = 3):
        self.n = n
        self.tmp = Path(tempfile.mkdtemp(prefix="switchboard-bench-zk-"))
        base = free_base_port(n)
        self.client_ports = [base + k for k in range(n)]
        self.quorum_ports = [base + 100 + k for k in range(n)]
        self.election_ports = [base + 200 + k for k in range(n)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def conf_dir(self, i: int) -> Path:
        return self.tmp / f"zk{i + 1}" / "conf"

    def write_configs(self) -> None:
        servers = "\n".join(
            f"server.{k + 1}=127.0.0.1:{self.quorum_ports[k]}:{self.election_ports[k]}"
            for k in range(self.n))
        for i in range(self.n):
            data = self.tmp / f"zk{i + 1}" / "data"
            data.mkdir(parents=True, exist_ok=True)
            (data / "myid").write_text(f"{i + 1}\n")
            conf = self.conf_dir(i)
            conf.mkdir(parents=True, exist_ok=True)
            (conf / "zoo.cfg").write_text(
                f"tickTime={TICK_MS}\ninitLimit=10\nsyncLimit=5\ndataDir={data}\n"
                f"clientPort={self.client_ports[i]}\nclientPortAddress=127.0.0.1\n"
                "maxClientCnxns=0\nadmin.enableServer=false\n"
                "4lw.commands.whitelist=srvr\n" + servers + "\n")
            (conf / "log4j.properties").write_text(
                "log4j.rootLogger=WARN, CONSOLE\n"
                "log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
                "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n"
                "log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c{1}: "
                "%m%n\n")

    def start_server(self, i: int) -> None:
        cp = ":".join([str(self.conf_dir(i)), *ZK_JARS])
        log = open(self.tmp / f"zk{i + 1}.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.procs[i] = subprocess.Popen(
            [JAVA, "-Xmx512m", "-cp", cp, ZK_MAIN, str(self.conf_dir(i) / "zoo.cfg")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=(_pdeathsig if threading.current_thread() is threading.main_thread()
                        else None))
        log.close()

    def start(self, timeout: float = 90.0) -> None:
        self.write_configs()
        for i in range(self.n):
            self.start_server(i)
        self.wait_ready(timeout)

    def mode(self, i: int) -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", self.client_ports[i]), timeout=1) as s:
                s.settimeout(1)
                s.sendall(b"srvr")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def modes(self) -> list[str | None]:
        return [self.mode(i) if self.alive(i) else None for i in range(self.n)]

    def wait_ready(self, timeout: float) -> int:
        """Wait until every running server serves and exactly one leads; its index."""
        deadline = time.monotonic() + timeout
        last: list[str | None] = []
        while time.monotonic() < deadline:
            last = self.modes()
            dead = [i for i in range(self.n) if not self.alive(i)]
            if dead and all(self.procs[i].returncode not in (None, -9) for i in dead):
                raise RuntimeError(f"zk{dead[0] + 1} exited: {self.tail(dead[0])}")
            up = [m for i, m in enumerate(last) if self.alive(i)]
            if all(m in ("leader", "follower") for m in up) and up.count("leader") == 1:
                return last.index("leader")
            time.sleep(0.1)
        raise RuntimeError(f"the ZooKeeper ensemble was not ready within {timeout:g} s: {last}")

    def alive(self, i: int) -> bool:
        p = self.procs.get(i)
        return p is not None and p.poll() is None

    def tail(self, i: int) -> str:
        try:
            lines = (self.tmp / f"zk{i + 1}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-2:])

    def hosts(self, first: int | None = None) -> str:
        order = list(range(self.n))
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        return ",".join(f"127.0.0.1:{self.client_ports[k]}" for k in order)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def kill(self, i: int) -> None:
        p = self.procs[i]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def log_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(self.n):
            try:
                text = (self.tmp / f"zk{i + 1}.log").read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                for lvl in ("WARN", "ERROR"):
                    if f" {lvl} " in line:
                        out[lvl] = out.get(lvl, 0) + 1
        return out

    def stop(self, out: Path | None = None) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if out is not None:
            dest = out / "zookeeper-logs"
            dest.mkdir(parents=True, exist_ok=True)
            for log in self.tmp.glob("zk*.log"):
                shutil.copy2(log, dest / log.name)
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- kazoo workloads -----------------------------------------------------------------------------


def _kazoo(hosts: str, randomize: bool = True) -> Any:
    from kazoo.client import KazooClient
    from kazoo.retry import KazooRetry

    return KazooClient(hosts=hosts, timeout=SESSION_TIMEOUT, randomize_hosts=randomize,
                       connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=1.5,
                                                   max_delay=1.0))


def _close_all(clients: list[Any]) -> None:
    def one(c: Any) -> None:
        try:
            c.stop()
            c.close()
        except Exception:  # a client that failed to start: nothing to close
            pass

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, clients))


def zk_sessions(zk: ZkEnsemble, plan: Plan, meter: CpuMeter) -> dict[str, Any]:
    setup = _kazoo(zk.hosts())
    setup.start(timeout=30)
    setup.ensure_path("/presence")
    clients: list[Any] = []
    lat: list[float] = []
    failures: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        c = _kazoo(zk.hosts())
        with lock:
            clients.append(c)
        try:
            c.start(timeout=30)
            c.create(f"/presence/s{i}", b"online", ephemeral=True)
        except Exception as e:
            with lock:
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            return
        with lock:
            lat.append(time.perf_counter() - t0)

    c0 = meter.snapshot()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(plan.concurrency) as pool:
        list(pool.map(one, range(plan.sessions)))
    span = time.perf_counter() - t0
    cpu = CpuMeter.between(c0, meter.snapshot())
    children = len(setup.get_children("/presence"))
    _close_all(clients)
    setup.delete("/presence", recursive=True)
    setup.stop()
    setup.close()
    return {"sessions": plan.sessions, "established": len(lat), "seconds": span,
            "per_s": len(lat) / span, "latency": summarize(lat), "ephemerals": children,
            "failures": failures, "cpu": cpu}


def zk_presence(zk: ZkEnsemble, plan: Plan, clients: int, meter: CpuMeter) -> dict[str, Any]:
    """``clients`` kazoo sessions, each one ``set`` in flight (async API, chained)."""
    modes = zk.modes()
    if clients == 1:
        targets = [next(i for i, m in enumerate(modes) if m == "follower")]
    else:
        targets = [i % zk.n for i in range(clients)]
    ks = [_kazoo(f"127.0.0.1:{zk.client_ports[t]}") for t in targets]
    for k in ks:
        k.start(timeout=30)
    paths = []
    for n, k in enumerate(ks):
        path = f"/p{clients}x{n}"
        k.create(path, b"online", ephemeral=True)
        paths.append(path)
    lat: list[float] = []
    state = {"measuring": False, "running": True, "done": 0, "errors": 0}
    lock = threading.Lock()

    def issue(k: Any, path: str, n: int) -> None:
        t = time.perf_counter()
        k.set_async(path, b"away" if n & 1 else b"online").rawlink(
            lambda r: done(k, path, n, t, r))

    def done(k: Any, path: str, n: int, t: float, r: Any) -> None:
        now = time.perf_counter()
        ok = r.successful()
        with lock:
            if state["measuring"]:
                if ok:
                    lat.append(now - t)
                    state["done"] += 1
                else:
                    state["errors"] += 1
        if state["running"]:
            issue(k, path, n + 1)

    for k, path in zip(ks, paths, strict=True):
        issue(k, path, 0)
    time.sleep(plan.warmup)
    c0 = meter.snapshot()
    with lock:
        state["measuring"] = True
        t0 = time.perf_counter()
    time.sleep(max(0.1, plan.presence_seconds - plan.warmup))
    with lock:
        state["measuring"] = False
        span = time.perf_counter() - t0
        n_done, errors = state["done"], state["errors"]
        samples = list(lat)
    cpu = CpuMeter.between(c0, meter.snapshot())
    state["running"] = False
    time.sleep(0.3)
    _close_all(ks)
    return {"clients": clients, "servers": [f"zk{t + 1}:{modes[t]}" for t in sorted(set(targets))]
            if clients == 1 else "spread", "ops_per_s": n_done / span, "window_s": span,
            "latency": summarize(samples), "errors": errors, "cpu": cpu}


def zk_kill_round(zk: ZkEnsemble, n: int, kind: str, follower_turn: int,
                  timeout: float) -> dict[str, Any]:
    from kazoo.exceptions import KazooException

    leader = zk.wait_ready(60)
    followers = [i for i in range(zk.n) if i != leader]
    victim = leader if kind == "leader" else followers[follower_turn % len(followers)]
    r: dict[str, Any] = {"n": n, "kind": kind, "victim": f"zk{victim + 1}",
                         "leader_before": f"zk{leader + 1}", "violations": []}
    k = _kazoo(zk.hosts(first=victim), randomize=False)
    events: list[tuple[float, str]] = []
    k.add_listener(lambda st: events.append((time.perf_counter(), str(st))))
    k.start(timeout=30)
    path = f"/fo{n}"
    k.create(path, b"online", ephemeral=True)
    sid = k.client_id[0]
    try:
        connected_to = k._connection._socket.getpeername()[1]
    except (AttributeError, OSError):
        connected_to = None
    if connected_to is not None and connected_to != zk.client_ports[victim]:
        r["violations"].append(f"client connected to port {connected_to}, not the victim")
    t0 = time.perf_counter()
    zk.kill(victim)
    usable = None
    attempts = 0
    while time.perf_counter() - t0 < timeout:
        attempts += 1
        try:
            k.set_async(path, b"away").get(timeout=max(0.05, timeout - (time.perf_counter() - t0)))
            usable = time.perf_counter() - t0
            break
        except KazooException:
            time.sleep(0.005)
        except Exception as e:  # a timeout of .get
            r["violations"].append(f"set failed: {type(e).__name__}: {e}")
            break
    r["usable_s"] = usable
    r["attempts"] = attempts
    r["reconnected_s"] = next((t - t0 for t, s in events if t > t0 and s == "CONNECTED"), None)
    if usable is None:
        r["violations"].append(f"session not usable within {timeout:g} s")
    else:
        r["session_kept"] = k.client_id[0] == sid
        st = k.exists(path)
        r["ephemeral_kept"] = st is not None and st.ephemeralOwner == sid
        if not (r["session_kept"] and r["ephemeral_kept"]):
            r["violations"].append("session or ephemeral znode lost")
    _close_all([k])
    t1 = time.monotonic()
    zk.start_server(victim)
    r["leader_after"] = f"zk{zk.wait_ready(90) + 1}"
    r["restart_s"] = time.monotonic() - t1
    return r


SB_FRAME_RATE = 100_000
"""The nodes' ``--frame-rate`` in this bench (see ``run``)."""


# --- Switchboard workloads -------------------------------------------------------------------


async def sb_sessions(bc: BenchCluster, plan: Plan, meter: CpuMeter) -> dict[str, Any]:
    counters = Counters()
    addrs = bc.addresses()
    conns = [RawConn(spread(addrs, i), f"sess{i}", bc.token(f"sess{i}"), counters, i)
             for i in range(plan.sessions)]
    async with trio.open_nursery() as nursery:
        c0 = meter.snapshot()
        t0 = time.perf_counter()
        ok = await login_all(nursery, conns, plan.concurrency, timeout=60)
        span = time.perf_counter() - t0
        cpu = CpuMeter.between(c0, meter.snapshot())
        lat = [c.t_login_ok - c.t_connect for c in ok]
        await logout_all(ok)
        nursery.cancel_scope.cancel()
    return {"sessions": plan.sessions, "established": len(ok), "seconds": span,
            "per_s": len(ok) / span, "latency": summarize(lat),
            "failures": counters.as_dict(), "cpu": cpu}


async def sb_presence(bc: BenchCluster, plan: Plan, clients: int, prog: Any,
                      meter: CpuMeter) -> dict[str, Any]:
    c0 = meter.snapshot()
    res = await presence_workload(bc, prog, clients=clients, seconds=plan.presence_seconds,
                                  warmup=plan.warmup, where="follower" if clients == 1 else None,
                                  tag="zkcmp")
    cpu_all = CpuMeter.between(c0, meter.snapshot())
    res["cpu_with_children"] = cpu_all  # nodes incl. gateway workers, login/logout included
    return res


# --- the run ----------------------------------------------------------------------------------


def _both(f_zk: Callable[[], dict[str, Any]], f_sb: Callable[[], dict[str, Any]],
          zk_on: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if zk_on:
        out["zookeeper"] = f_zk()
    out["switchboard"] = f_sb()
    if zk_on:
        out["loadavg"] = loadavg()
    return out


def run(opts: Options) -> dict[str, Any]:
    plan = QUICK if opts.quick else FULL
    t_start = time.monotonic()
    machine = machine_info()
    why = missing()
    in_ci = bool(os.environ.get("CI"))
    if why is not None and (not opts.quick or in_ci):
        # Only a --quick run outside CI may skip ZooKeeper (and says so).
        raise SystemExit(f"zookeeper bench: {why}" + (" (CI is set: ZooKeeper is required)"
                                                      if in_ci and opts.quick else ""))
    zk_on = why is None
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # reconnect chatter after kills
    res: dict[str, Any] = {"bench": "zookeeper", "command": opts.argv(), "quick": opts.quick,
                           "machine": machine, "plan": asdict(plan),
                           "node_args": ["--frame-rate", str(SB_FRAME_RATE)],
                           "zookeeper_skipped": why, "clients": {"zookeeper": KAZOO_CLIENT,
                                                                 "switchboard": SB_CLIENT}}
    if not zk_on:
        opts.console.print(f"[bold yellow]ZooKeeper SKIPPED (--quick): {why}; only the "
                           "Switchboard side runs")
    zk = ZkEnsemble() if zk_on else None
    # ZooKeeper limits no connection's request rate; a node's default limit (500
    # frames/s per connection, an abuse guard) would cap the one-client figure.
    bc = BenchCluster(opts, "zookeeper", node_args=["--frame-rate", str(SB_FRAME_RATE)])
    try:
        zk_error: list[BaseException] = []
        zk_thread = None
        if zk is not None:
            def start_zk() -> None:
                try:
                    zk.start()
                except BaseException as e:  # reported below
                    zk_error.append(e)

            zk_thread = threading.Thread(target=start_zk)
            zk_thread.start()
        bc.start()
        if zk_thread is not None:
            zk_thread.join(120)
            if zk_error:
                raise zk_error[0]
        res["versions"] = {"kazoo": _kazoo_version() if zk_on else None,
                           "zookeeper": _zk_version() if zk_on else None}
        opts.console.print(
            f"revision {machine['revision']}; Switchboard: 3 nodes on "
            f"{', '.join(bc.addresses())} (defaults but --frame-rate {SB_FRAME_RATE}, fsync "
            f"on); ZooKeeper "
            f"{res['versions']['zookeeper']}: 3 servers on "
            f"{zk.hosts() if zk else '-'} (tickTime {TICK_MS} ms, session timeout "
            f"{SESSION_TIMEOUT:g} s); clients: {KAZOO_CLIENT} / {SB_CLIENT}")
        zk_meter = CpuMeter(lambda: zk.pids() if zk else [])
        sb_meter = CpuMeter(lambda: with_children(list(bc.pids().values())))
        with progress(opts) as prog:
            task = prog.add_task("zookeeper vs switchboard", total=4 + 2 * (zk_on + 1))
            res["sessions"] = _both(lambda: zk_sessions(zk, plan, zk_meter),  # type: ignore[arg-type]
                                    lambda: trio.run(sb_sessions, bc, plan, sb_meter), zk_on)
            prog.update(task, advance=1)
            for clients in (1, 64):
                res[f"presence_{clients}"] = _both(
                    lambda: zk_presence(zk, plan, clients, zk_meter),  # type: ignore[arg-type]  # noqa: B023
                    lambda: trio.run(sb_presence, bc, plan, clients, prog, sb_meter),  # noqa: B023
                    zk_on)
                prog.update(task, advance=1)
            rounds: dict[str, list[dict[str, Any]]] = {"zookeeper": [], "switchboard": []}
            turns = {"zookeeper": 0, "switchboard": 0}
            for n in range(2 * plan.kills_per_kind):
                kind = "follower" if n % 2 == 0 else "leader"
                if zk is not None:
                    rounds["zookeeper"].append(
                        zk_kill_round(zk, n, kind, turns["zookeeper"], plan.round_timeout))
                    time.sleep(plan.settle)
                r = trio.run(failover.one_round, bc, n, kind, turns["switchboard"],
                             plan.round_timeout)
                time.sleep(plan.settle)
                rounds["switchboard"].append(asdict(r))
                if kind == "follower":
                    turns["zookeeper"] += 1
                    turns["switchboard"] += 1
                prog.update(task, advance=1)
            res["kills"] = _summarize_kills(rounds)
            res["kill_rounds"] = rounds
        res["node_counters"] = bc.node_counters()
        res["replicas"] = bc.check_replicas()
        res["zookeeper_log_lines"] = zk.log_counts() if zk else None
    finally:
        if zk is not None:
            zk.stop(opts.out)
        bc.stop()
    res["node_logs"] = bc.logs.as_dict()
    res["ratios"] = _ratios(res)
    res["duration_s"] = time.monotonic() - t_start
    _print(opts, res)
    report_replicas(opts, res["replicas"])
    return finish(opts, res, bc.logs)


def _kazoo_version() -> str:
    from importlib.metadata import version

    return version("kazoo")


def _zk_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "zookeeper"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"Debian zookeeper {out}" if out else "?"


def _summarize_kills(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("follower", "leader"):
        zr = [r for r in rounds["zookeeper"] if r["kind"] == kind]
        sr = [r for r in rounds["switchboard"] if r["kind"] == kind]
        out[kind] = {
            "zookeeper": {"kills": len(zr),
                          "usable": summarize([r["usable_s"] for r in zr
                                               if r.get("usable_s") is not None]),
                          "violations": sum(1 for r in zr if r["violations"])} if zr else None,
            "switchboard": {"kills": len(sr),
                            "resumed": summarize([r["resumed_s"] for r in sr
                                                  if r["resumed_s"] is not None]),
                            "message": summarize([r["message_s"] for r in sr
                                                  if r["message_s"] is not None]),
                            "violations": sum(1 for r in sr if r["violations"])},
        }
    return out


def _ratios(res: dict[str, Any]) -> dict[str, float | None]:
    """Switchboard / ZooKeeper for each figure (throughputs: > 1 is better for
    Switchboard; latencies and times: < 1 is better for Switchboard)."""
    out: dict[str, float | None] = {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    s = res.get("sessions", {})
    if "zookeeper" in s:
        out["sessions_per_s"] = ratio(s["switchboard"]["per_s"], s["zookeeper"]["per_s"])
    for c in (1, 64):
        p = res.get(f"presence_{c}", {})
        if "zookeeper" in p:
            out[f"presence_{c}_ops_per_s"] = ratio(p["switchboard"]["ops_per_s"],
                                                   p["zookeeper"]["ops_per_s"])
            for q in ("p50_ms", "p99_ms"):
                out[f"presence_{c}_{q}"] = ratio(p["switchboard"]["latency"][q],
                                                 p["zookeeper"]["latency"][q])
    for kind, k in res.get("kills", {}).items():
        if k["zookeeper"] and k["zookeeper"]["usable"]["n"]:
            out[f"kill_{kind}_p50"] = ratio(k["switchboard"]["resumed"]["p50_ms"],
                                            k["zookeeper"]["usable"]["p50_ms"])
    return out


def _print(opts: Options, res: dict[str, Any]) -> None:
    con = opts.console
    rows = []

    def cpu(d: dict[str, Any]) -> str:
        c = d.get("cpu_with_children") or d.get("cpu") or {}
        return (f"{c.get('nodes_cores', float('nan')):.2f}/{c.get('bench_cores', float('nan')):.2f}"
                f"/{c.get('others_cores', float('nan')):.2f}")

    s = res["sessions"]
    for sysname in ("zookeeper", "switchboard"):
        if sysname in s:
            d = s[sysname]
            rows.append([f"(a) sessions, {sysname}", f"{d['established']}/{d['sessions']}",
                         fmt_rate(d["per_s"]), fmt_ms(d["latency"]["p50_ms"]),
                         fmt_ms(d["latency"]["p99_ms"]), cpu(d)])
    for c in (1, 64):
        p = res[f"presence_{c}"]
        for sysname in ("zookeeper", "switchboard"):
            if sysname in p:
                d = p[sysname]
                rows.append([f"(b) presence, {c} client{'s' if c > 1 else ''}, {sysname}",
                             str(d["latency"]["n"]), fmt_rate(d["ops_per_s"]),
                             fmt_ms(d["latency"]["p50_ms"]), fmt_ms(d["latency"]["p99_ms"]),
                             cpu(d)])
    con.print(make_table("zookeeper vs switchboard: (a) sessions, (b) presence updates",
                         ["workload", "n", "per s", "p50 ms", "p99 ms",
                          "CPU servers/bench/others"], rows))
    rows = []
    for kind, k in res["kills"].items():
        z = k["zookeeper"]
        if z:
            u = z["usable"]
            rows.append([f"{kind} killed, zookeeper: kill -> set ok", f"{u['n']}/{z['kills']}",
                         fmt_ms(u["p50_ms"]), fmt_ms(u["max_ms"]), str(z["violations"])])
        sb = k["switchboard"]
        for what, label in (("resumed", "kill -> session resumed"),
                            ("message", "kill -> first message")):
            u = sb[what]
            rows.append([f"{kind} killed, switchboard: {label}", f"{u['n']}/{sb['kills']}",
                         fmt_ms(u["p50_ms"]), fmt_ms(u["max_ms"]), str(sb["violations"])])
    con.print(make_table("(c) session survival after SIGKILL of the client's server (ms)",
                         ["round", "n", "p50", "max", "rounds with violations"], rows))
    for sysname, rs in res["kill_rounds"].items():
        for r in rs:
            if r["violations"]:
                con.print(f"[red]{sysname} round {r['n']} ({r['kind']} {r['victim']}): "
                          f"{'; '.join(r['violations'])}")
    if res["ratios"]:
        con.print("Switchboard / ZooKeeper: " + ", ".join(
            f"{k} {v:.2f}" for k, v in res["ratios"].items() if v is not None))
    if res.get("zookeeper_skipped"):
        con.print(f"[bold yellow]ZooKeeper was skipped: {res['zookeeper_skipped']}")
    con.print(f"ZooKeeper log lines: {res.get('zookeeper_log_lines')}")
