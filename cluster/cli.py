"""The ``switchboard`` command: up, node, token, chat, admin.

Every operator error (a bad flag, an unusable address, a missing secret, an
unreachable node) is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

PROG = "switchboard"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return code


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= v <= 65535 - 400:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return v


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Switchboard: a fault-tolerant presence and "
                "messaging cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    up = sub.add_parser("up", help="start a local cluster and keep it running")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="where node data and the cluster secret live (default ./data)")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    up.add_argument("--base-port", type=_port, default=7100,
                    help="clients on BASE+k, Raft BASE+100+k, admin BASE+200+k, metrics "
                    "BASE+300+k (default 7100)")
    up.add_argument("--json", action="store_true", help="one JSON object per node on stdout")
    up.add_argument("--grace", type=_positive, help="session resume window in seconds")
    up.add_argument("--no-fsync", action="store_true", help="do not fsync the Raft journal")
    up.add_argument("--workers", type=int, default=None,
                    help="gateway worker processes per node (default: the number of CPUs; "
                    "0: in the node's process)")

    nd = sub.add_parser("node", help="run one node")
    nd.add_argument("--id", required=True, help="this node's id, e.g. n1")
    nd.add_argument("--listen", required=True, help="client address host:port")
    nd.add_argument("--raft", required=True, help="Raft address host:port (its identity)")
    nd.add_argument("--peers", default="",
                    help="the other members' Raft addresses, comma-separated")
    nd.add_argument("--data-dir", type=Path, required=True)
    nd.add_argument("--secret-file", type=Path, help="cluster secret (default DATA_DIR/secret)")
    nd.add_argument("--admin", help="admin address host:port")
    nd.add_argument("--metrics", help="metrics and health address host:port")
    nd.add_argument("--grace", type=_positive, default=30.0,
                    help="seconds a session may wait for a resume (default 30)")
    nd.add_argument("--node-timeout", type=_positive, default=2.0,
                    help="a node silent this long has its sessions orphaned (default 2)")
    nd.add_argument("--fence-after", type=_positive, default=2.0,
                    help="stop serving after this long without a commit (default 2)")
    nd.add_argument("--client-heartbeat", type=_positive, default=10.0,
                    help="clients ping at least this often, seconds (default 10)")
    nd.add_argument("--no-fsync", action="store_true", help="do not fsync the Raft journal")
    nd.add_argument("--tls-cert", type=Path, help="PEM certificate chain for the client port")
    nd.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    nd.add_argument("--insecure-no-secret", action="store_true",
                    help="INSECURE: run without a cluster secret (unauthenticated Raft "
                    "traffic; local experiments only)")
    nd.add_argument("--sessions-per-user", type=int, default=16, help="default 16 (0: no limit)")
    nd.add_argument("--allow-list-limit", type=int, default=5000, help="default 5000")
    nd.add_argument("--subscription-limit", type=int, default=5000, help="default 5000")
    nd.add_argument("--mailbox-limit", type=int, default=10_000,
                    help="unacknowledged messages per user (default 10000)")
    nd.add_argument("--frame-rate", type=_positive, default=500.0,
                    help="frames per second per connection (default 500, bursts of twice that)")
    nd.add_argument("--failed-logins", type=int, default=20,
                    help="failed logins per source address per minute (default 20)")
    nd.add_argument("--workers", type=int, default=None,
                    help="gateway worker processes sharing the client port (default: the "
                    "number of CPUs); 0 runs the gateway in the node's own process")
    nd.add_argument("--max-connections", type=int, default=None,
                    help="client connections per node (default 19000 per gateway process)")
    nd.add_argument("--login-deadline", type=_positive, default=5.0,
                    help="seconds a new connection has to log in (default 5)")
    nd.add_argument("--max-frame", type=int, default=256 * 1024,
                    help="largest client frame in bytes (default 262144)")
    nd.add_argument("--join", action="store_true",
                    help="a new member: serve clients only after `switchboard admin add`")
    nd.add_argument("--batches-in-flight", type=int, default=4,
                    help="group-commit batches this node keeps proposed and not yet "
                    "applied (1-16, default 4)")
    nd.add_argument("--sessions-per-tick", type=int, default=5000,
                    help="sessions one clock tick may expire, and about as many it may "
                    "orphan or re-attach when their node falls silent, speaks again, "
                    "restarts, shuts down or is removed; the rest in the next ticks "
                    "(1-1000000, default 5000)")
    nd.add_argument("--compaction-entries", type=int, default=20_000,
                    help="snapshot the table after this many log entries (default 20000)")
    nd.add_argument("--log-format", choices=["kv", "json"], default="kv")
    nd.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                    default="info")

    tk = sub.add_parser("token", help="print a login token for USER")
    tk.add_argument("user")
    tk.add_argument("--secret-file", type=Path, default=_env_path("SWITCHBOARD_SECRET_FILE"),
                    required=_env_path("SWITCHBOARD_SECRET_FILE") is None,
                    help="the cluster secret (or $SWITCHBOARD_SECRET_FILE)")
    tk.add_argument("--ttl", type=_positive, default=86400.0,
                    help="seconds until the token expires (default one day)")

    ch = sub.add_parser("chat", help="a terminal chat client")
    ch.add_argument("--nodes", required=True, help="client addresses host:port,...")
    ch.add_argument("--user", required=True)
    ch.add_argument("--token", required=True)
    ch.add_argument("--ordered", action="store_true", help="try the nodes in the order given")
    ch.add_argument("--tls", action="store_true", help="connect with TLS (verified)")
    ch.add_argument("--ca-file", type=Path, help="CA certificate to verify the nodes with")

    cx = sub.add_parser("chaos", help="run a chaos test: faults, workload, checkers (root)")
    cx.add_argument("--nodes", type=int, default=3, help="3 to 7 (default 3)")
    cx.add_argument("--duration", type=_positive, default=60.0, help="seconds of faults")
    cx.add_argument("--faults", default="kill,pause,partition,loss,clock",
                    help="comma-separated: kill,pause,partition,loss,clock,member")
    cx.add_argument("--seed", type=int, default=None, help="schedule seed (default: random)")
    cx.add_argument("--clients", type=int, default=None,
                    help="workload clients (default 2 per node, at least 4)")
    cx.add_argument("--rate", type=_positive, default=8.0, help="ops/s per client (default 8)")
    cx.add_argument("--out", type=Path, default=None,
                    help="run folder (default chaos-runs/TIME-seedS)")
    cx.add_argument("--json", action="store_true", help="a JSON report as the last line")
    cx.add_argument("--cleanup", action="store_true",
                    help="only remove namespaces left by runs that died, then exit")

    ad = sub.add_parser("admin", help="inspect and change a running cluster")
    ad.add_argument("--cluster", default=os.environ.get("SWITCHBOARD_CLUSTER"),
                    required=os.environ.get("SWITCHBOARD_CLUSTER") is None,
                    help="admin addresses host:port,... (or $SWITCHBOARD_CLUSTER)")
    ad.add_argument("--secret-file", type=Path,
                    default=_env_path("SWITCHBOARD_SECRET_FILE") or Path("data/secret"),
                    help="the cluster secret (or $SWITCHBOARD_SECRET_FILE; default "
                    "data/secret)")
    adsub = ad.add_subparsers(dest="admin_command", metavar="ACTION", parser_class=_Parser)
    adsub.required = True
    st = adsub.add_parser("status", help="one row per node")
    st.add_argument("--json", action="store_true")
    a = adsub.add_parser("add", help="add a node started with --join (give its admin address)")
    a.add_argument("node_admin", metavar="ADMIN_ADDR")
    a.add_argument("--wait", type=_positive, default=120.0,
                   help="seconds to wait for it to catch up (default 120)")
    r = adsub.add_parser("remove", help="drain and remove a member (the leader too)")
    r.add_argument("node", metavar="NODE", help="node id, or a dead node's Raft address")
    r.add_argument("--no-retire", action="store_true", help="leave the removed process running")
    d = adsub.add_parser("drain", help="move a node's clients to other nodes")
    d.add_argument("node", metavar="NODE")
    u = adsub.add_parser("undrain", help="let a drained node serve clients again")
    u.add_argument("node", metavar="NODE")
    t = adsub.add_parser("transfer", help="hand Raft leadership to another node")
    t.add_argument("node", metavar="NODE", nargs="?", help="target (default: most caught up)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "node":
            return cmd_node(args)
        if args.command == "token":
            return cmd_token(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "admin":
            return cmd_admin(args)
        if args.command == "chaos":
            return cmd_chaos(args)
    except KeyboardInterrupt:
        return 130
    return _fail(f"unknown command {args.command}")


# --- node ------------------------------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    import trio

    from node import collector, logs
    from node.auth import SecretError, read_secret
    from node.config import ConfigError, NodeConfig, parse_addr
    from node.server import run_node
    from node.workers import WorkerError

    try:
        listen = parse_addr(args.listen, "--listen address")
        parse_addr(args.raft, "--raft address")
        peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() and
                      p.strip() != args.raft)
        for peer in peers:
            parse_addr(peer, "--peers address")
        admin = parse_addr(args.admin, "--admin address") if args.admin else None
        metrics = parse_addr(args.metrics, "--metrics address") if args.metrics else None
        secret_file = args.secret_file or args.data_dir / "secret"
        if args.insecure_no_secret:
            secret_file = None
            sys.stderr.write(f"{PROG}: WARNING: --insecure-no-secret: Raft traffic is neither "
                             "authenticated nor encrypted and tokens can be forged\n")
        else:
            try:
                read_secret(secret_file)
            except SecretError as e:
                raise SecretError(f"{e} (a cluster needs its secret; --insecure-no-secret "
                                  "runs without one, for local experiments only)") from None
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        for path in (args.tls_cert, args.tls_key):
            if path is not None and not path.is_file():
                raise ConfigError(f"cannot read {path}")
        _check_bindable(args.raft, "--raft")
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        if not 0 <= workers <= 64:
            raise ConfigError("--workers must be between 0 and 64")
        if not 1 <= args.batches_in_flight <= 16:
            raise ConfigError("--batches-in-flight must be between 1 and 16")
        if not 1 <= args.sessions_per_tick <= 1_000_000:
            raise ConfigError("--sessions-per-tick must be between 1 and 1000000")
        max_connections = (args.max_connections if args.max_connections is not None
                           else 19_000 * max(1, workers))
    except (ConfigError, SecretError) as e:
        return _fail(str(e))
    config = NodeConfig(
        id=args.id, listen=listen, raft=args.raft, peers=peers, data_dir=args.data_dir,
        secret_file=secret_file, admin=admin, metrics=metrics, grace=args.grace,
        node_timeout=args.node_timeout, fence_after=args.fence_after,
        client_heartbeat=args.client_heartbeat, fsync=not args.no_fsync,
        compaction_entries=max(50, args.compaction_entries), log_format=args.log_format,
        join=args.join, insecure=args.insecure_no_secret, tls_cert=args.tls_cert,
        tls_key=args.tls_key, sessions_per_user=args.sessions_per_user,
        allow_list=args.allow_list_limit, subscriptions=args.subscription_limit,
        mailbox=args.mailbox_limit, frame_rate=args.frame_rate,
        frame_burst=max(1, int(args.frame_rate * 2)), failed_logins=args.failed_logins,
        max_connections=max_connections, login_deadline=args.login_deadline,
        max_frame=args.max_frame, workers=workers, batches_in_flight=args.batches_in_flight,
        sessions_per_tick=args.sessions_per_tick,
    )
    logs.configure(args.id, args.log_format, getattr(logging, args.log_level.upper()))

    def announce(info: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()

    collector.tune(collector.CORE_THRESHOLDS)
    collector.pause_meter()
    try:
        trio.run(run_node, config, announce)
    except BaseException as exc:
        worker_error = _find(exc, WorkerError)
        if worker_error is not None:
            return _fail(f"node {args.id}: {worker_error}")
        os_error = _find(exc, OSError)
        if os_error is not None:
            what = f" ({os_error.filename})" if os_error.filename else ""
            return _fail(f"node {args.id}: {os_error.strerror or os_error}{what}")
        if _find(exc, KeyboardInterrupt) is not None:
            return 0
        raise
    return 0


def _find(exc: BaseException, kind: type[BaseException]) -> Any:
    """The first exception of ``kind`` in ``exc`` or the groups nested in it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _check_bindable(addr: str, flag: str) -> None:
    from node.config import ConfigError, parse_addr

    host, port = parse_addr(addr, f"{flag} address")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot use {flag} {addr}: {e.strerror}") from None


# --- up -----------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from .launcher import LaunchError, LocalCluster

    node_args: list[str] = []
    if args.grace:
        node_args += ["--grace", str(args.grace)]
    if args.no_fsync:
        node_args.append("--no-fsync")
    if args.workers is not None:
        node_args += ["--workers", str(args.workers)]
    try:
        cluster = LocalCluster(args.data_dir, args.nodes, args.host, args.base_port, node_args)
    except LaunchError as e:
        return _fail(str(e))
    stop = {"requested": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        infos = cluster.start(timeout=60)
        leader = cluster.leader()
    except LaunchError as e:
        cluster.stop()
        return _fail(str(e))
    except Exception as e:  # e.g. an unwritable data dir
        cluster.stop()
        return _fail(f"{type(e).__name__}: {e}")
    for info in infos:
        row = {k: info[k] for k in ("id", "client", "raft", "admin", "metrics", "pid")}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['id']}  client {row['client']}  raft {row['raft']}  admin "
                  f"{row['admin']}  metrics {row['metrics']}  pid {row['pid']}", flush=True)
    nodes = ",".join(i["client"] for i in infos)
    admins = ",".join(i["admin"] for i in infos)
    secret = cluster.secret_file
    howto = (
        f"cluster is up: {len(infos)} nodes, leader {leader}. Talk to it from another shell:\n"
        f"  TOKEN=$(switchboard token alice --secret-file {secret})\n"
        f"  switchboard chat --nodes {nodes} --user alice --token $TOKEN\n"
        f"  switchboard admin --cluster {admins} --secret-file {secret} status\n"
        "Ctrl-C stops the cluster."
    )
    print(howto, file=sys.stderr if args.json else sys.stdout, flush=True)
    try:
        while not stop["requested"]:
            time.sleep(0.2)
            dead = [np.spec.id for np in cluster.procs.values() if not np.alive()]
            if dead:
                print(f"{PROG}: node {dead[0]} exited: {cluster.log_tail(dead[0])}",
                      file=sys.stderr, flush=True)
                break
    finally:
        cluster.stop()
    print("cluster stopped", file=sys.stderr, flush=True)
    return 0


# --- token, chat, admin --------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    from node.auth import Keys, SecretError, issue_token, read_secret

    try:
        keys = Keys.from_secret(read_secret(args.secret_file))
    except SecretError as e:
        return _fail(str(e))
    print(issue_token(keys.token, args.user, args.ttl))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import anyio

    from client.chat import run_chat
    from node.config import ConfigError, parse_addr

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    try:
        for n in nodes:
            parse_addr(n, "--nodes address")
    except ConfigError as e:
        return _fail(str(e))
    if not nodes:
        return _fail("--nodes needs at least one host:port")
    tls: Any = False
    if args.tls or args.ca_file:
        import ssl

        tls = ssl.create_default_context(cafile=str(args.ca_file) if args.ca_file else None)
    return int(anyio.run(run_chat, nodes, args.user, args.token, args.ordered, tls))


def cmd_admin(args: argparse.Namespace) -> int:
    from node.auth import Keys, SecretError, read_secret
    from node.config import ConfigError, parse_addr

    from .adminclient import AdminCallError, admin_call
    from .membership import ClusterAdmin

    addrs = [a.strip() for a in args.cluster.split(",") if a.strip()]
    try:
        for a in addrs:
            parse_addr(a, "--cluster address")
        keys = Keys.from_secret(read_secret(args.secret_file))
    except (ConfigError, SecretError) as e:
        return _fail(str(e))
    if args.admin_command != "status":
        try:
            ca = ClusterAdmin(addrs, keys)
            if args.admin_command == "add":
                parse_addr(args.node_admin, "ADMIN_ADDR")
                res = ca.add(args.node_admin, wait=args.wait)
                print(f"added {res['added']} ({res['raft']}); members: "
                      f"{', '.join(res['members'])}")
            elif args.admin_command == "remove":
                res = ca.remove(args.node, retire=not args.no_retire)
                print(f"removed {res['removed']} ({res['raft']}); members: "
                      f"{', '.join(res['members'])}")
            elif args.admin_command == "drain":
                res = ca.drain(args.node)
                print(f"drained {res['drained']}: {res['connections']} connections left")
            elif args.admin_command == "undrain":
                res = ca.undrain(args.node)
                print(f"{res['undrained']} serves clients again")
            elif args.admin_command == "transfer":
                res = ca.transfer(args.node)
                print(f"leader is now {res['leader']}")
        except AdminCallError as e:
            return _fail(f"{args.admin_command}: {e.reason}")
        except ConfigError as e:
            return _fail(str(e))
        return 0
    if args.admin_command == "status":
        rows: list[dict[str, Any]] = []
        errors = 0
        for a in addrs:
            try:
                st = admin_call(a, keys, "status")
                st["reachable"] = True
            except AdminCallError as e:
                if e.code == "auth-failed":
                    return _fail(f"{a}: wrong secret ({e.reason})")
                st = {"admin": a, "reachable": False, "error": e.reason, "role": "unreachable",
                      "id": "?"}
                errors += 1
            rows.append(st)
        if errors == len(addrs):
            if args.json:
                print(json.dumps({"nodes": rows}))
            return _fail("cluster unreachable: " + "; ".join(r["error"] for r in rows))
        if args.json:
            print(json.dumps({"nodes": rows}))
        else:
            _print_status(rows)
        return 0
    return _fail(f"unknown admin action {args.admin_command}")


def _print_status(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="switchboard cluster")
    for col in ("id", "role", "term", "commit", "applied", "lag", "conns", "sessions",
                "fenced", "ready", "uptime", "client", "admin"):
        table.add_column(col)
    commit = max((r.get("commit_index", 0) for r in rows if r.get("reachable")), default=0)
    for r in rows:
        if not r.get("reachable"):
            table.add_row(r.get("id", "?"), "[red]unreachable[/red]", "", "", "", "", "", "",
                          "", "", "", "", r["admin"])
            continue
        table.add_row(
            r["id"], r["role"], str(r["term"]), str(r["commit_index"]), str(r["last_applied"]),
            str(commit - r["last_applied"]), str(r["connections"]),
            f"{r['sessions_local']}/{r['sessions']}", "yes" if r["fenced"] else "no",
            "drained" if r.get("drained") else ("yes" if r.get("ready") else "no"),
            f"{r['uptime']:.0f}s", str(r.get("client")), str(r.get("admin")),
        )
    Console().print(table)


# --- chaos ----------------------------------------------------------------------------------


def cmd_chaos(args: argparse.Namespace) -> int:
    import random

    import trio
    from rich.console import Console
    from rich.table import Table

    from chaos.generator import KINDS
    from chaos.netns import NetnsError, cleanup_stale
    from chaos.runner import ChaosError, ChaosOptions, run_chaos

    if args.cleanup:
        removed = cleanup_stale()
        print(f"removed {len(removed)} stale namespaces/links")
        return 0
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in KINDS]
    if bad or not faults:
        return _fail(f"--faults: unknown kind {bad[0] if bad else '(none)'}; "
                     f"choose from {','.join(KINDS)}", 2)
    if not 3 <= args.nodes <= 7:
        return _fail("--nodes must be between 3 and 7", 2)
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 31)
    opts = ChaosOptions(nodes=args.nodes, duration=args.duration, faults=faults, seed=seed,
                        clients=args.clients, rate=args.rate, out=args.out)
    console = Console(stderr=args.json)

    def progress(f: Any) -> None:
        console.print(f"[dim]{f.start:6.1f}s[/dim] fault {f.number}: [bold]{f.kind}[/bold] "
                      f"{f.variant} for {f.duration:.1f}s")

    console.print(f"chaos: {args.nodes} nodes, {args.duration:g} s, faults {','.join(faults)}, "
                  f"seed {seed}")
    try:
        report = trio.run(run_chaos, opts, progress)
    except (ChaosError, NetnsError) as e:
        return _fail(f"chaos: {e}")
    table = Table(title="chaos run " + ("[green]VALID[/green]" if report["valid"]
                                        else "[red]INVALID[/red]"))
    table.add_column("check")
    table.add_column("result")
    table.add_row("faults", ", ".join(f"{k} {v}" for k, v in report["faults"].items()) or "-")
    table.add_row("ops", ", ".join(f"{k} {v}" for k, v in report["ops"].items()))
    for key in ("lost", "duplicated", "reordered", "failover_p50_s", "failover_p99_s"):
        v = report.get(key)
        table.add_row(key, f"{v:.3f}" if isinstance(v, float) else str(v))
    for name, result in report.get("checks", {}).items():
        if isinstance(result, dict):
            table.add_row(name, "ok" if result.get("valid") else "[red]FAILED[/red]")
    console.print(table)
    console.print(f"history, report and timeline in {report['out']}")
    if not report["valid"]:
        console.print(f"[red]INVALID run, seed {seed}. Replay with:[/red] {report['replay']}")
    if args.json:
        summary = {k: report.get(k) for k in ("valid", "faults", "ops", "lost", "duplicated",
                                              "reordered", "failover_p50_s", "failover_p99_s",
                                              "seed")}
        summary.update(out=report["out"], replay=report["replay"])
        print(json.dumps(summary))
    return 0 if report["valid"] else 1
