"""What every bench shares: options, a fresh cluster per run, statistics, output.

Every bench starts its own cluster of real node processes (``LocalCluster``) on
free ports in a temporary directory and stops every process it started, by PID,
through ``LocalCluster.stop`` (SIGTERM, then SIGKILL for stragglers), even when
the bench fails. After stopping, the node logs are scanned for warnings and
errors, which the bench reports.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from cluster.adminclient import AdminCallError, admin_call
from cluster.launcher import LaunchError, LocalCluster
from cluster.ports import free_base_port
from node.auth import issue_token


@dataclass
class Options:
    name: str
    quick: bool = False
    json: bool = False
    out: Path | None = None
    console: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    workers: int | None = None  # core: the nodes' --workers (None: their default)

    def argv(self) -> str:
        """The command line that reproduces this run."""
        cmd = f"python -m bench {self.name}"
        if self.quick:
            cmd += " --quick"
        if self.workers is not None:
            cmd += f" --workers {self.workers}"
        return cmd

    def node_args(self) -> list[str]:
        """Flags for every node of the bench's cluster (none: production defaults)."""
        return [] if self.workers is None else ["--workers", str(self.workers)]


# --- statistics -----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def bursts(slow: Sequence[tuple[float, float, int]],
           events: Sequence[tuple[float, str, str, float]], t0: float, gap: float = 0.1,
           before: float = 0.5) -> list[dict[str, Any]]:
    """Slow operations grouped into bursts, each beside the events near it (pure).

    ``slow``: (start, worst ms, count), starts in seconds from ``t0``, sorted;
    starts less than ``gap`` s apart join one burst. ``events``: (time.monotonic(),
    source, kind, ms), e.g. a member's compaction hold or long collection; an
    event is listed with a burst if it began from ``before`` s ahead of the
    burst's first start to its last, with ``at_ms`` its start relative to the
    burst's first."""
    groups: list[list[Any]] = []
    for t, worst, n in slow:
        if groups and t - groups[-1][1] <= gap:
            b = groups[-1]
            b[1], b[2], b[3] = t, max(b[2], worst), b[3] + n
        else:
            groups.append([t, t, worst, n])
    ordered = sorted(events)
    out = []
    for start, end, worst, n in groups:
        near = [{"member": src, "kind": kind, "ms": ms, "at_ms": round((t - t0 - start) * 1000)}
                for t, src, kind, ms in ordered if start - before <= t - t0 <= end]
        out.append({"at_s": round(start, 2), "worst_ms": worst, "commands": n, "near": near})
    return out


def burst_text(b: dict[str, Any], unit: str, near_max: int | None = None) -> str:
    """One burst of ``bursts`` in words: when, how slow, how many ``unit``, what was near."""
    near = ", ".join(f"{e['member']} {e['kind']} {e['ms']:.0f} ms at {e['at_ms']:+d} ms"
                     for e in b["near"][:near_max]) or (
        "no fork, cut, slow fsync or collection of 5 ms or more")
    return (f"{b['at_s']:.2f} s into the phase: worst {b['worst_ms']:.0f} ms, "
            f"{b['commands']} {unit}; near: {near}")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """count, p50, p90, p99, max and mean of ``values`` (seconds in, milliseconds out)."""
    s = sorted(values)
    ms = 1000.0
    return {
        "n": len(s),
        "p50_ms": percentile(s, 50) * ms,
        "p90_ms": percentile(s, 90) * ms,
        "p99_ms": percentile(s, 99) * ms,
        "max_ms": (s[-1] * ms) if s else math.nan,
        "mean_ms": (sum(s) / len(s) * ms) if s else math.nan,
    }


def fmt_ms(v: float) -> str:
    if v != v:  # nan
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_rate(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:,.0f}"


def clean_json(obj: Any) -> Any:
    """NaN and infinities are not JSON: turn them into null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    return obj


# --- the machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1024 * 1024)
                break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "revision": git_revision(),
    }


# --- CPU accounting ---------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_jiffies(pid: int | str, children: bool = True) -> int | None:
    """utime + stime of one process and its reaped children (the nodes' compaction
    children), in clock ticks (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15 if children else 13])


def _system_busy() -> int:
    """Busy clock ticks of all CPUs together (everything but idle and iowait)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0
    vals = [int(x) for x in first[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle


@dataclass
class CpuSnapshot:
    t: float
    system: int
    own: int
    nodes: dict[int, int]


class CpuMeter:
    """CPU used between two snapshots, in cores: the nodes, this process (the load
    generator and clients) and everything else on the machine (other users)."""

    def __init__(self, node_pids: Callable[[], Sequence[int]]):
        self.node_pids = node_pids

    def snapshot(self) -> CpuSnapshot:
        nodes = {}
        for pid in self.node_pids():
            j = _proc_jiffies(pid)
            if j is not None:
                nodes[pid] = j
        own = _proc_jiffies("self", children=False) or 0
        return CpuSnapshot(time.monotonic(), _system_busy(), own, nodes)

    @staticmethod
    def between(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
        dt = max(1e-6, b.t - a.t) * CLK_TCK
        nodes = sum(b.nodes[p] - a.nodes[p] for p in b.nodes if p in a.nodes)
        own = b.own - a.own
        total = b.system - a.system
        return {"nodes_cores": round(nodes / dt, 2), "bench_cores": round(own / dt, 2),
                "others_cores": round(max(0, total - nodes - own) / dt, 2),
                "machine_busy_cores": round(total / dt, 2)}


# --- clusters -----------------------------------------------------------------------------------

LOG_LEVEL_RE = re.compile(r"level='?(warning|error|critical)'?")
DIGITS_RE = re.compile(r"\d+")
EVENT_RE = re.compile(r"event=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


@dataclass
class LogReport:
    """Warnings and errors found in the node logs of one cluster."""

    counts: dict[str, int] = field(default_factory=dict)  # level -> lines
    events: dict[str, int] = field(default_factory=dict)  # "level node: event" -> lines
    tracebacks: int = 0
    examples: list[str] = field(default_factory=list)

    def merge(self, other: LogReport) -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for k, v in other.events.items():
            self.events[k] = self.events.get(k, 0) + v
        self.tracebacks += other.tracebacks
        for ex in other.examples:
            if len(self.examples) < 8:
                self.examples.append(ex)

    def lines_with(self, text: str, level: str | None = None) -> int:
        """Lines whose event starts with ``text`` (all nodes), optionally at ``level``."""
        n = 0
        for key, count in self.events.items():
            lvl, _, rest = key.partition(" ")
            event = rest.split(": ", 1)[1] if ": " in rest else rest
            if event.startswith(text) and (level is None or lvl == level):
                n += count
        return n

    def as_dict(self) -> dict[str, Any]:
        top = sorted(self.events.items(), key=lambda kv: -kv[1])[:20]
        return {"counts": self.counts, "tracebacks": self.tracebacks,
                "top_events": dict(top), "examples": self.examples}


def scan_logs(data_dir: Path) -> LogReport:
    rep = LogReport()
    for log in sorted(data_dir.glob("*/node.log")):
        node = log.parent.name
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("Traceback"):
                rep.tracebacks += 1
                continue
            m = LOG_LEVEL_RE.search(line)
            if m is None:
                continue
            level = m.group(1)
            rep.counts[level] = rep.counts.get(level, 0) + 1
            ev = EVENT_RE.search(line)
            event = DIGITS_RE.sub("N", ev.group(1).strip("'\"") if ev else line)[:90]
            key = f"{level} {node}: {event}"
            rep.events[key] = rep.events.get(key, 0) + 1
            if level in ("error", "critical") and len(rep.examples) < 8:
                rep.examples.append(f"{node}: {line[:300]}")
    return rep


NODE_COUNTERS = {
    "raft_term", "raft_commit_index", "batches_committed_total", "commands_committed_total",
    "proposal_retries_total", "request_timeouts_total", "clients_dropped_slow_total",
    "batches_skipped_total", "batches_gapped_total",
    "refused_fenced_total", "protocol_errors_total", "session_expiries_total",
    "journal_fsyncs_total", "journal_fsync_seconds_total", "mailbox_messages",
    "sessions", "sessions_orphaned", "journal_cuts_total", "journal_cut_seconds_max",
    "compaction_start_seconds_max", "append_sends_total", "append_sends_skipped_total",
    "append_answers_skipped_total", "append_next_kept_ahead_total", "raft_messages_sent_total",
    *(f"gc_pause_seconds_max_gen{g}" for g in range(3)),
}


class BenchCluster:
    """A fresh cluster on free ports in a temporary directory; ``with`` stops it.

    ``node_args`` are extra flags for every node (none: the production defaults).
    """

    def __init__(self, opts: Options, label: str, nodes: int = 3,
                 node_args: list[str] | None = None,
                 per_node_args: dict[str, list[str]] | None = None):
        self.opts = opts
        self.label = label
        self.nodes = nodes
        self.node_args = list(node_args or [])
        self.per_node_args = dict(per_node_args or {})
        self.tmp = Path(tempfile.mkdtemp(prefix=f"switchboard-bench-{label}-"))
        self.cluster: LocalCluster | None = None
        self.logs = LogReport()
        self.started_at = 0.0
        self.cpu = CpuMeter(lambda: list(self.pids().values()) if self.cluster else [])

    @property
    def c(self) -> LocalCluster:
        assert self.cluster is not None
        return self.cluster

    def start(self) -> LocalCluster:
        last: Exception | None = None
        for attempt in range(3):  # a free port can be taken by someone else meanwhile
            base = free_base_port(self.nodes)
            c = LocalCluster(self.tmp / f"cluster{attempt}", self.nodes, "127.0.0.1", base,
                             self.node_args, per_node_args=self.per_node_args)
            self.cluster = c
            try:
                c.start(timeout=60)
                self.started_at = time.monotonic()
                return c
            except LaunchError as e:
                last = e
                c.stop()
                self._collect(c)
        raise LaunchError(f"could not start a cluster for {self.label}: {last}")

    def token(self, user: str, ttl: float = 3 * 3600) -> str:
        return issue_token(self.c.keys.token, user, ttl)

    def addresses(self) -> list[str]:
        return self.c.client_addresses()

    def node_ids(self) -> list[str]:
        return [s.id for s in self.c.specs]

    def pids(self) -> dict[str, int]:
        return {nid: np.pid for nid, np in self.c.procs.items()}

    def metrics(self, node_id: str, timeout: float = 2.0) -> dict[str, float]:
        """The node's Prometheus counters and gauges (unlabelled ones), by name."""
        return scrape_metrics(self.c.spec(node_id).metrics, timeout)

    def node_counters(self) -> dict[str, dict[str, float]]:
        """Counters worth a look after a run, per live node (a bench reports them)."""
        out: dict[str, dict[str, float]] = {}
        for nid, np in self.c.procs.items():
            if not np.alive():
                continue
            m = self.metrics(nid)
            out[nid] = {k.removeprefix("switchboard_").removesuffix("_total"): v
                        for k, v in m.items() if k.removeprefix("switchboard_") in NODE_COUNTERS}
        return out

    def check_replicas(self) -> dict[str, Any]:
        """Commit a checkpoint and compare every live replica's table digest there."""
        live = [nid for nid, np in self.c.procs.items() if np.alive()]
        t0 = time.monotonic()
        try:
            leader = self.c.wait_ready(timeout=60)
            ready_after = time.monotonic() - t0
            cp = admin_call(self.c.spec(leader).admin, self.c.keys, "checkpoint", timeout=15)
            digests = {}
            for nid in live:
                d = admin_call(self.c.spec(nid).admin, self.c.keys, "digest",
                               {"tag": cp["tag"], "timeout": 10}, timeout=15)
                digests[nid] = f"{d['index']}:{d['digest']}"
        except (AdminCallError, LaunchError) as e:
            st = self.c.statuses()
            lag = {nid: {k: s.get(k) for k in ("role", "commit_index", "last_applied",
                                               "fenced", "ready")} if s else None
                   for nid, s in st.items()}
            return {"agree": False, "error": str(e), "status": lag}
        return {"agree": len(set(digests.values())) == 1, "index": cp["index"],
                "digests": digests, "ready_after_s": round(ready_after, 2)}

    def _collect(self, c: LocalCluster) -> None:
        self.logs.merge(scan_logs(c.data_dir))
        if self.opts.out is not None:
            dest = self.opts.out / f"{self.opts.name}-logs" / self.label / c.data_dir.name
            for log in sorted(c.data_dir.glob("*/node.log")):
                (dest / log.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(log, dest / log.parent.name / "node.log")

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self._collect(self.cluster)
            self.cluster = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BenchCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape_metrics(addr: str, timeout: float = 2.0) -> dict[str, float]:
    host, _, port = addr.rpartition(":")
    out: dict[str, float] = {}
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return out
    body = b"".join(chunks).split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:  # labelled: only the collector's, as name_gen<N>
            if not line.startswith("switchboard_gc_"):
                continue
            name, _, rest = line.partition("{")
            label, _, value = rest.partition("}")
            gen = label.partition("=")[2].strip('"')
            line = f"{name}_gen{gen} {value.strip()}"
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


# --- output -------------------------------------------------------------------------------------


def make_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
               caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def progress(opts: Options) -> Progress:
    """A progress display on stderr (stdout carries the results and the JSON line)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=opts.err, transient=True,
    )


def report_replicas(opts: Options, check: dict[str, Any]) -> None:
    if check.get("agree"):
        opts.console.print(f"replicas agree: one table digest on every node at log index "
                           f"{check['index']} (all nodes ready {check['ready_after_s']} s after "
                           "the load)")
    else:
        opts.console.print(f"[bold red]REPLICAS DISAGREE or could not be compared: {check}")


def report_logs(opts: Options, logs: LogReport) -> None:
    if not logs.counts and not logs.tracebacks:
        opts.console.print("node logs: no warnings or errors")
        return
    rows = [[k, str(v)] for k, v in sorted(logs.events.items(), key=lambda kv: -kv[1])[:15]]
    opts.console.print(make_table(
        f"node logs: {logs.counts} ({logs.tracebacks} tracebacks)", ["level node: event", "lines"],
        rows))


def finish(opts: Options, res: dict[str, Any], logs: LogReport) -> dict[str, Any]:
    """Every bench's last words: the node logs' warnings, the total time (from
    ``res["duration_s"]``), the JSON result; returns ``res``."""
    report_logs(opts, logs)
    opts.console.print(f"total {res['duration_s']:.1f} s")
    emit(opts, res)
    return res


def emit(opts: Options, result: dict[str, Any]) -> None:
    """Write the result file (--out) and the JSON line (--json), which is stdout's last."""
    data = clean_json(result)
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = opts.out / f"{opts.name}{'-quick' if opts.quick else ''}-{stamp}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        opts.console.print(f"results written to {path}")
    if opts.json:
        opts.console.file.flush()
        sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
        sys.stdout.flush()


def git_revision() -> str:
    """HEAD's short hash, with ``+dirty`` if the code under test has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=root).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "node", "replication",
                                "client", "cluster"], capture_output=True, text=True,
                               timeout=5, cwd=root).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return rev + ("+dirty" if dirty else "")
