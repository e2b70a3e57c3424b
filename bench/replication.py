"""replication: the replicated log itself, real state machine vs raw pysyncobj, same run.

Three ``python -m bench.repl_node`` processes on loopback form one Raft group;
the member elected leader proposes. Configurations (each a fresh group in a
fresh temporary directory, one after the other, alternating):

- ``fsm``: ``ReplicatedLog`` + ``SessionTable`` (fsync on, journal + dump,
  password), as in a node;
- ``raw``: the notes' "raw group commit" baseline: pysyncobj with a
  do-nothing ``@replicated apply_batch(blob)`` (password, journal + dump, the
  same timers; pysyncobj's own journal, never fsynced);
- full runs only, to split the difference: ``raw-fsync`` (the baseline with the
  node's fsyncing journal and its peer framing, `PeerCipher`) and ``fsm-nofsync``.

Every configuration gets the same proposer and the same commands
(``repl_node.Workload``): N sessions are logged in through the log (plus 4
allow + subscribe pairs each), then a mix of 50% ``SetPresence``, 40% ``Send``
(64-byte bodies) and 10% ``Ack``; batches of up to 1,000 commands encoded with
``encode_batch`` (``fsm``: ``ReplicatedLog.encode_batch``, as a node's core
does, so the leader applies them without decoding), up to K batches in
flight (``fsm``: 4, a node's default ``--batches-in-flight``; the raw
baselines: 1, the notes' method, as plain
pysyncobj gives each batch an entry of its own), the next formed from what
queued meanwhile.
Phases: max (the queue never runs dry: committed commands/s over a fixed
window) and offered loads of 5k, 20k and 50k commands/s (commit latency
from each command's scheduled enqueue time to its batch's apply on the
leader). At the end every member's table digest (raw: applied batch count and
bytes) is compared at the same log index.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.ports import free_base_port
from node.config import NodeConfig
from replication.raft import RaftTimings

from .common import (
    CpuMeter,
    Options,
    burst_text,
    bursts,
    emit,
    fmt_ms,
    fmt_rate,
    machine_info,
    make_table,
    progress,
)
from .procs import HelperError, LineProc, loadavg

CONFIGS: dict[str, tuple[str, bool, bool]] = {  # mode, fsync, pre-encoded batches
    "raw-prebuilt": ("raw", False, True),
    "raw": ("raw", False, False),
    "fsm": ("fsm", True, False),
    "raw-fsync": ("raw", True, False),
    "fsm-nofsync": ("fsm", False, False),
}
LABELS = {
    "raw-prebuilt": "raw pysyncobj, no-op apply, pre-encoded batches (the notes' raw group "
                    "commit; pysyncobj journal, no fsync)",
    "raw": "raw pysyncobj, no-op apply, same proposer as fsm (pysyncobj journal, no fsync)",
    "fsm": "ReplicatedLog + SessionTable, fsync on",
    "raw-fsync": "raw pysyncobj, no-op apply, node's fsyncing journal and peer framing",
    "fsm-nofsync": "ReplicatedLog + SessionTable, fsync off",
}


LOG_PATTERNS = ("Traceback", "failed _onTick", "pickle data was truncated",
                "truncating already-applied", "replacing log entry", "CRITICAL", "ERROR")
"""Counted in the members' stderr: tracebacks, pysyncobj's tick failures (e.g. a
chunked entry reassembled wrongly), its follower log truncations (CRITICAL in
pysyncobj, printed without level; ``ReplicatedLog`` counts them instead)."""


@dataclass(frozen=True)
class Plan:
    configs: tuple[str, ...]
    sessions: int
    max_seconds: float
    max_warmup: float
    rates: tuple[float, ...]
    rate_seconds: float
    rate_warmup: float
    batch: int = 1000
    batches_in_flight: int = NodeConfig.batches_in_flight


FULL = Plan(configs=("raw-prebuilt", "raw", "fsm", "raw-fsync", "fsm-nofsync", "fsm", "raw",
                     "raw-prebuilt"),
            sessions=1000, max_seconds=12.0, max_warmup=2.0,
            rates=(5000.0, 10000.0, 20000.0, 50000.0),
            rate_seconds=10.0, rate_warmup=2.0)
QUICK = Plan(configs=("raw-prebuilt", "raw", "fsm"), sessions=200, max_seconds=3.0,
             max_warmup=1.0, rates=(5000.0, 20000.0, 50000.0), rate_seconds=2.0,
             rate_warmup=0.5)

GOAL_RATE = 80_000.0
GOAL_RATIO = 0.70
GOAL_P50_MS = 2.0
GOAL_P99_MS = 10.0


class ReplGroup:
    """Three repl_node processes; ``with`` stops them (by PID) and removes the temp dir."""

    def __init__(self, opts: Options, config: str, run: int, batch: int, k: int = 2):
        self.opts = opts
        self.config = config
        self.mode, self.fsync, self.prebuilt = CONFIGS[config]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"switchboard-bench-repl-{config}-"))
        self.run = run
        self.batch = batch
        # Plain pysyncobj appends each proposal as an entry of its own, so K batches
        # are K entries in flight, which makes it re-send entries (the notes). The
        # baselines keep the notes' K=1; the node's leader merges queued batches
        # into one entry.
        self.k = k if self.mode == "fsm" else 1
        self.procs: list[LineProc] = []
        self.addrs: list[str] = []
        self.leader = -1

    def start(self) -> None:
        base = free_base_port(3)
        self.addrs = [f"127.0.0.1:{base + 100 + k}" for k in range(3)]
        password = secrets.token_hex(16)
        timings = json.dumps(asdict(RaftTimings()))
        for k, addr in enumerate(self.addrs):
            peers = ",".join(a for a in self.addrs if a != addr)
            args = ["--mode", self.mode, "--id", f"r{k + 1}", "--self-addr", addr,
                    "--peers", peers, "--data-dir", str(self.tmp / f"r{k + 1}"),
                    "--password", password, "--timings", timings,
                    "--fsync" if self.fsync else "--no-fsync", "--batch", str(self.batch),
                    "--batches-in-flight", str(self.k),
                    *(["--prebuilt"] if self.prebuilt else [])]
            self.procs.append(LineProc.python("bench.repl_node", args,
                                              self.tmp / f"r{k + 1}.log", f"r{k + 1}"))
        for p in self.procs:
            up = p.read(60)
            if up.get("event") != "up":
                raise HelperError(f"{p.name}: unexpected first line {up}")
        self.leader = self.wait_leader(30.0)

    def wait_leader(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = [p.call({"op": "status"}, 5) for p in self.procs]
            leaders = [k for k, s in enumerate(last) if s["role"] == "leader"]
            if (len(leaders) == 1 and last[leaders[0]]["has_quorum"]
                    and all(s["leader"] == self.addrs[leaders[0]] for s in last)):
                return leaders[0]
            time.sleep(0.1)
        raise HelperError(f"no leader within {timeout:g} s: {last}")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.alive()]

    def compare(self, timeout: float = 15.0) -> dict[str, Any]:
        """Every member's digest at the same applied index."""
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            got = [p.call({"op": "digest"}, 30) for p in self.procs]
            if len({g["last_applied"] for g in got}) == 1:
                return {"agree": len({g["digest"] for g in got}) == 1,
                        "index": got[0]["last_applied"],
                        "digests": [g["digest"][:16] for g in got]}
            time.sleep(0.2)
        return {"agree": False, "error": "indexes never converged",
                "at": [(g["last_applied"], g["digest"][:16]) for g in got]}

    def logs(self) -> dict[str, int]:
        """Lines of interest in the members' stderr (pysyncobj logs there, unformatted)."""
        counts: dict[str, int] = {}
        for p in self.procs:
            try:
                text = p.log_path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                for key in LOG_PATTERNS:
                    if key in line:
                        counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        for p in self.procs:
            if p.alive():
                try:
                    p.send({"op": "quit"})
                except HelperError:
                    pass
        for p in self.procs:
            p.stop(10)
        if self.opts.out is not None:
            dest = self.opts.out / "replication-logs" / f"{self.run}-{self.config}"
            dest.mkdir(parents=True, exist_ok=True)
            for p in self.procs:
                if p.log_path.exists():
                    shutil.copy2(p.log_path, dest / p.log_path.name)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ReplGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_config(opts: Options, plan: Plan, config: str, run: int, prog: Any,
               task: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"config": config, "label": LABELS[config], "run": run}
    t_start = time.monotonic()
    with ReplGroup(opts, config, run, plan.batch, plan.batches_in_flight) as g:
        leader = g.procs[g.leader]
        meter = CpuMeter(g.pids)
        out["leader"] = leader.name
        out["setup"] = leader.call({"op": "setup", "sessions": plan.sessions, "contacts": 4,
                                    "timeout": 120}, 150)
        phases: list[tuple[str, float | None, float, float]] = [
            ("max", None, plan.max_seconds, plan.max_warmup)]
        phases += [(f"{int(r)}", r, plan.rate_seconds, plan.rate_warmup) for r in plan.rates]
        for name, rate, seconds, warmup in phases:
            la = loadavg()
            c0 = meter.snapshot()
            res = leader.call({"op": "run", "rate": rate, "seconds": seconds,
                               "warmup": warmup}, seconds + 60)
            res["cpu"] = CpuMeter.between(c0, meter.snapshot())
            res["loadavg"] = la
            out[name] = res
            prog.update(task, advance=1)
        out["leader_still"] = g.wait_leader(10) == g.leader
        out["replicas"] = g.compare()
        out["stats"] = {p.name: p.call({"op": "stats"}, 10) for p in g.procs}
        out["stalls"] = stalls(out, list(plan.rates))
        out["log_lines"] = g.logs()
    out["seconds"] = time.monotonic() - t_start
    return out


def _best(runs: list[dict[str, Any]], config: str) -> dict[str, Any] | None:
    rs = [r for r in runs if r["config"] == config and "max" in r]
    return max(rs, key=lambda r: r["max"]["commands_per_s"]) if rs else None


def verdicts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    fsm = [r for r in runs if r["config"] == "fsm" and "max" in r]
    v: dict[str, Any] = {}
    if fsm:
        rates = [r["max"]["commands_per_s"] for r in fsm]
        v["throughput"] = {"goal": f">= {GOAL_RATE:,.0f} commands/s (fsm, 3 nodes)",
                           "best": max(rates), "all": rates,
                           "met": max(rates) >= GOAL_RATE,
                           "met_in": sum(1 for x in rates if x >= GOAL_RATE)}
    for base in ("raw-prebuilt", "raw"):
        raw = [r for r in runs if r["config"] == base and "max" in r]
        if not (fsm and raw):
            continue
        bf = max(r["max"]["commands_per_s"] for r in fsm)
        br = max(r["max"]["commands_per_s"] for r in raw)
        pairs = []
        for f in fsm:  # each fsm run against the baseline run nearest to it in time
            near = min(raw, key=lambda r: abs(r["run"] - f["run"]))
            pairs.append(f["max"]["commands_per_s"] / near["max"]["commands_per_s"])
        v[f"ratio_vs_{base}"] = {
            "goal": f">= {GOAL_RATIO:.0%} of raw group commit (same run), baseline {base}",
            "best_over_best": bf / br, "adjacent_pairs": pairs, "met": bf / br >= GOAL_RATIO,
            "met_in": sum(1 for x in pairs if x >= GOAL_RATIO)}
    lat = [(r["20000"]["latency_ms"]["p50"], r["20000"]["latency_ms"]["p99"],
            r["20000"]["commands_per_s"]) for r in fsm if "20000" in r]
    if lat:
        ok = [p50 is not None and p99 is not None and p50 <= GOAL_P50_MS and p99 <= GOAL_P99_MS
              for p50, p99, _ in lat]
        v["latency_20k"] = {"goal": f"p50 <= {GOAL_P50_MS:g} ms and p99 <= {GOAL_P99_MS:g} ms "
                                    "at 20,000 commands/s, fsync on",
                            "runs": [{"p50_ms": a, "p99_ms": b, "achieved_per_s": c}
                                     for a, b, c in lat],
                            "met": all(ok), "met_in": sum(ok)}
    return v


def unit_costs(batches: int = 10, sessions: int = 1000) -> dict[str, float]:
    """Microseconds per command of each step, measured in this process (one core,
    no Raft): generating, encoding, applying on the leader (its own batches, not
    decoded; effects for local sessions) and on a follower (decoded)."""
    from replication.batch import BatchApplier, encode_batch
    from replication.table import SessionTable

    from .repl_node import Workload

    w = Workload("r1", 12345, sessions)
    setup = w.setup(4)
    tables = [BatchApplier(SessionTable(local=("r1", 12345))),
              BatchApplier(SessionTable(local=("r2", 1)))]
    for i in range(0, len(setup), 1000):
        blob = encode_batch("r1", 12345, i, list(enumerate(setup[i:i + 1000])))
        for t in tables:
            t.apply(blob)
    n = batches * 1000
    t0 = time.perf_counter()
    cmds = [[w.next(time.time()) for _ in range(1000)] for _ in range(batches)]
    t1 = time.perf_counter()
    # The leader proposed these: it encodes them as a node's core does, and
    # applies them without decoding (``BatchApplier.encode``); the follower decodes.
    blobs = [tables[0].encode("r1", 12345, b, list(enumerate(c))) for b, c in enumerate(cmds)]
    t2 = time.perf_counter()
    out = {"generate_us": (t1 - t0) / n * 1e6, "encode_us": (t2 - t1) / n * 1e6,
           "blob_bytes_per_command": sum(len(b) for b in blobs) / n}
    for name, t in zip(("apply_leader_us", "apply_follower_us"), tables, strict=True):
        t3 = time.perf_counter()
        for b in blobs:
            t.apply(b)
        out[name] = (time.perf_counter() - t3) / n * 1e6
    return out


class _Link:
    """One end of a Raft peer link, as ``PeerCipher`` sees it: its two random keys."""

    def __init__(self, send_key: bytes | None, recv_key: bytes | None):
        self.sendRandKey = send_key
        self.recvRandKey = recv_key


def _best_us(fn: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e6


def _frame_costs_of(blob: bytes, repeat: int) -> dict[str, float]:
    import pickle
    import zlib

    from cryptography.fernet import Fernet

    from replication.raft import PeerCipher

    fernet = Fernet(Fernet.generate_key())
    cipher = PeerCipher("bench")
    key = secrets.token_bytes(32)
    entry = b"\x01" + pickle.dumps((7, (blob,), {}))
    msg = (key, {"type": "append_entries", "term": 3, "commit_index": 99,
                 "entries": [(entry, 100, 3)], "prevLogIdx": 99, "prevLogTerm": 3})

    def old_send() -> bytes:
        return fernet.encrypt_at_time(zlib.compress(pickle.dumps(msg), 3), 100)

    token = old_send()

    def old_read() -> None:
        fernet.extract_timestamp(token)
        pickle.loads(zlib.decompress(fernet.decrypt(token)))

    # An opened link: the connecting side (own key ``key``, peer's ``other``) sends,
    # the accepting side reads; each side's opening frame is out of the way.
    other = secrets.token_bytes(32)
    ahead, rx = _Link(other, key), _Link(key, other)

    def seal(link: _Link, data: bytes) -> bytes:
        frame = cipher.seal(link, data)
        assert frame is not None  # both random keys are known
        return frame

    cipher.open(rx, seal(ahead, b"opening"))
    frames = iter([seal(ahead, pickle.dumps(msg)) for _ in range(5 * repeat)])
    tx = _Link(other, key)
    cipher.seal(tx, b"opening")

    def new_send() -> bytes:
        return seal(tx, pickle.dumps(msg))

    def new_read() -> None:
        pickle.loads(cipher.open(rx, next(frames)))

    return {"entry_bytes": float(len(entry)),
            "pysyncobj_send_us": _best_us(old_send, repeat),
            "pysyncobj_read_us": _best_us(old_read, repeat),
            "node_send_us": _best_us(new_send, repeat),
            "node_read_us": _best_us(new_read, repeat)}


def frame_costs(repeat: int = 200) -> dict[str, float]:
    """Microseconds to frame one append_entries message and to read it back, for a
    full batch entry (1,000 commands) and a one-command entry: pysyncobj's own
    framing (pickle, zlib level 3, Fernet) against the node's (pickle,
    ``PeerCipher``). Measured in this process; the lowest of 5 rounds."""
    from replication.batch import encode_batch

    from .repl_node import Workload

    w = Workload("r1", 12345, 1000)
    w.setup(4)
    cmds = [w.next(time.time()) for _ in range(1000)]
    out: dict[str, float] = {}
    for name, n in (("batch", 1000), ("one", 1)):
        blob = encode_batch("r1", 12345, 1, list(enumerate(cmds[:n])))
        for k, v in _frame_costs_of(blob, repeat).items():
            out[f"{name}_{k}"] = v
    return out


def run(opts: Options) -> dict[str, Any]:
    plan = QUICK if opts.quick else FULL
    t0 = time.monotonic()
    machine = machine_info()
    opts.console.print(
        f"revision {machine['revision']}; 3 repl_node processes on 127.0.0.1 per configuration; "
        f"{plan.sessions} sessions; batches of <= {plan.batch} commands, "
        f"K={plan.batches_in_flight} in flight (raw: 1); configurations "
        f"in order: {', '.join(plan.configs)}")
    runs: list[dict[str, Any]] = []
    phases = 1 + len(plan.rates)
    with progress(opts) as prog:
        task = prog.add_task("replication phases", total=phases * len(plan.configs))
        for i, config in enumerate(plan.configs):
            try:
                runs.append(run_config(opts, plan, config, i, prog, task))
            except HelperError as e:
                opts.err.print(f"[bold red]{config} (run {i}) failed: {e}")
                runs.append({"config": config, "run": i, "failed": str(e)})
    la = loadavg()
    costs = unit_costs(5 if opts.quick else 20)
    costs["loadavg"] = la  # type: ignore[assignment]
    frames = frame_costs(50 if opts.quick else 200)
    res = {"bench": "replication", "command": opts.argv(), "quick": opts.quick,
           "machine": machine, "plan": asdict(plan), "timings": asdict(RaftTimings()),
           "unit_costs": costs, "frame_costs": frames, "runs": runs, "goals": verdicts(runs),
           "loadavg_at_end": loadavg(),
           "duration_s": time.monotonic() - t0}
    _print(opts, res)
    opts.console.print(f"total {res['duration_s']:.1f} s")
    emit(opts, res)
    return res


def stalls(run: dict[str, Any], rates: list[float], gap: float = 0.1,
           before: float = 0.5) -> list[dict[str, Any]]:
    """The leader's slow batches (oldest command waited 10 ms or more) of each rate
    phase, grouped into bursts (``gap`` s apart at least), each with the
    members' tick-thread holds (compaction fork, journal cut, an fsync of 5 ms or
    more) and collections of 5 ms or more that began from ``before`` s ahead of
    the burst to its end."""
    events = [(t, name, kind, ms) for name, st in run.get("stats", {}).items()
              for t, kind, ms in st.get("events", [])]
    out: list[dict[str, Any]] = []
    for rate in rates:
        p = run.get(f"{int(rate)}", {})
        t0 = p.get("t0_monotonic")
        if t0 is not None:
            out += [{"rate": rate, **b}
                    for b in bursts(p.get("slow_batches") or [], events, t0, gap, before)]
    return out


def _print(opts: Options, res: dict[str, Any]) -> None:
    con = opts.console
    rows = []
    for r in res["runs"]:
        if "failed" in r:
            rows.append([f"{r['run']} {r['config']}", "FAILED", r["failed"][:60], "", "", "", ""])
            continue
        m = r["max"]
        rows.append([f"{r['run']} {r['config']}", fmt_rate(m["commands_per_s"]),
                     f"{m['batch_mean']:.0f}", f"{m['cpu']['nodes_cores']:.2f}",
                     f"{m['leader_cpu_cores']:.2f}", f"{m['cpu']['others_cores']:.2f}",
                     "yes" if r["replicas"].get("agree") else f"NO {r['replicas']}"])
    con.print(make_table("replication: max throughput (queue never empty)",
                         ["run config", "commands/s", "mean batch", "CPU nodes", "CPU leader",
                          "CPU others", "replicas agree"], rows))
    rows = []
    for r in res["runs"]:
        if "failed" in r:
            continue
        for rate in res["plan"]["rates"]:
            p = r[f"{int(rate)}"]
            lat = p["latency_ms"]
            rows.append([f"{r['run']} {r['config']}", fmt_rate(rate),
                         fmt_rate(p["commands_per_s"]), fmt_ms(lat["p50"] or float("nan")),
                         fmt_ms(lat["p99"] or float("nan")), fmt_ms(lat["max"] or float("nan")),
                         f"{p['batch_mean']:.0f}", f"{p['cpu']['nodes_cores']:.2f}",
                         f"{p['cpu']['others_cores']:.2f}",
                         str(sum(p["errors"].values())) if p["errors"] else "0"])
    con.print(make_table("replication: commit latency at offered loads (ms, enqueue -> applied "
                         "on the leader)",
                         ["run config", "offered/s", "committed/s", "p50", "p99", "max",
                          "mean batch", "CPU nodes", "CPU others", "cmd errors"], rows))
    for r in res["runs"]:
        if "failed" in r:
            continue
        errs = {k: r[k]["errors"] for k in r if isinstance(r[k], dict) and r[k].get("errors")}
        extra = f"; command errors {errs}" if errs else ""
        st = r["stats"]
        fs = {n: s.get("fsyncs") for n, s in st.items() if "fsyncs" in s}
        resent = {n: s["resent_identical_skipped"] for n, s in st.items()
                  if s.get("resent_identical_skipped")}
        batches = max((s.get("batches_applied", 0) for s in st.values()), default=0)
        cuts = {n: f"{s['journal_cuts']} (held max {s['journal_cut_max_ms']:.0f} ms, "
                   f"copied off-thread {1000 * s.get('journal_cut_copy_seconds', 0):.0f} ms; "
                   f"fork max {s.get('compaction_start_max_ms', 0):.0f} ms)"
                for n, s in st.items() if s.get("journal_cuts")}
        gcs = {n: "/".join(f"{g['longest_ms']:.0f}" for g in s["gc"])
               for n, s in st.items() if s.get("gc")}
        con.print(f"run {r['run']} {r['config']}: leader {r['leader']} (kept: "
                  f"{r['leader_still']}), setup {r['setup']['committed']}/"
                  f"{r['setup']['commands']} commands in {r['setup']['seconds']:.2f} s "
                  f"(errors {r['setup']['errors'] or 0}); {batches} batches applied; fsyncs "
                  f"{fs or '-'}; journal cuts {cuts or '-'}; longest collection of "
                  f"generation 0/1/2, ms {gcs or '-'}; re-sent entries followers "
                  f"skipped {resent or '-'}; helper log "
                  f"lines {r['log_lines'] or 'none'}{extra}")
        worst = sorted(stalls(r, res["plan"]["rates"]), key=lambda b: -b["worst_ms"])[:4]
        for b in worst:
            con.print(f"  stall at {fmt_rate(b['rate'])}/s, {burst_text(b, 'commands')}")
    u = res["unit_costs"]
    con.print("per-command cost in one process (µs): generate {:.1f}, encode {:.1f}, apply on "
              "the leader {:.1f}, on a follower {:.1f}; {:.0f} bytes per command in a batch"
              .format(u["generate_us"], u["encode_us"], u["apply_leader_us"],
                      u["apply_follower_us"], u["blob_bytes_per_command"]))
    f = res["frame_costs"]
    for name, what in (("batch", "a 1,000-command entry"), ("one", "a 1-command entry")):
        con.print(f"framing {what} ({f[name + '_entry_bytes']:,.0f} bytes), µs to send / to read "
                  f"back: pysyncobj (zlib + Fernet) {f[name + '_pysyncobj_send_us']:,.0f} / "
                  f"{f[name + '_pysyncobj_read_us']:,.0f}; node (PeerCipher) "
                  f"{f[name + '_node_send_us']:,.0f} / {f[name + '_node_read_us']:,.0f}")
    g = res["goals"]
    for key, v in g.items():
        con.print(f"goal {key}: {v['goal']}: [bold]{'MET' if v['met'] else 'NOT MET'}[/] "
                  f"({json.dumps({k: x for k, x in v.items() if k not in ('goal', 'met')})})")
