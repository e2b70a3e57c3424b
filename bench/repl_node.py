"""A bench-only replication server: ``python -m bench.repl_node --mode MODE ...``.

Started three times by ``bench.replication`` (one process per Raft member, on
loopback) and driven through JSON lines on stdin/stdout. Modes:

- ``fsm``: the real thing: ``replication.raft.ReplicatedLog`` carrying a real
  ``SessionTable`` (journal + dump in the data dir, password set, fsync per
  ``--fsync``), exactly as a node builds it, minus the node around it.
- ``raw``: the "raw group commit" baseline of the notes: a plain pysyncobj
  ``SyncObj`` whose ``@replicated apply_batch(blob)`` does nothing. **pysyncobj
  is imported here only for this baseline** (the product imports it only in
  ``replication/raft.py``). Same configuration as ``ReplicatedLog`` (password,
  journal + dump, ``appendEntriesUseBatch=False``, the same timers and
  compaction thresholds); with ``--fsync`` the node's fsyncing journal is
  installed, otherwise pysyncobj's own (never fsynced) journal is used.

The proposer (on whichever member is leader) is the same in both modes: it
generates real commands (``SetPresence``, ``Send``, ``Ack`` for sessions it
logged in through the log first), stamps each with its (scheduled) enqueue
time, and keeps up to ``--batches-in-flight`` batches (K, a node's default:
4) of up to ``batch`` commands in flight, as a node's core does: whenever fewer
are, the next one is formed at once from whatever queued meanwhile (group
commit) and encoded with ``replication.batch.encode_batch`` (``fsm`` mode:
ordered, and through ``ReplicatedLog.encode_batch``, as a node's core does,
so that the leader applies its batches without decoding them; a batch the
table skips or refuses counts as
failed: the bench does not re-propose). Commit latency = enqueue time -> the
batch's apply on the leader (seen from pysyncobj's tick thread).

Requests (one JSON object per line) and answers: see ``handle``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node import collector
from replication.batch import AppliedBatch, encode_batch
from replication.commands import Ack, Allow, Command, Login, Send, SetPresence, Subscribe
from replication.table import BATCH_APPLY

Done = Callable[[int, bool, dict[str, int]], None]
"""(seq, applied, error codes of the batch's commands -> count) on the tick thread."""

STATUSES = ("online", "away", "busy")
BODY = b"m" * 64


# --- the two servers -----------------------------------------------------------------------


def _journal_stats() -> dict[str, Any]:
    """The node's fsyncing journal in this process: fsyncs and compaction cuts."""
    from replication.raft import ReplicatedLog

    fs, fsec = ReplicatedLog.fsync_statistics()
    cuts, cut_s, cut_max, cut_copy = ReplicatedLog.cut_statistics()
    starts, _start_s, start_max = ReplicatedLog.compaction_statistics()
    return {"fsyncs": fs, "fsync_seconds": round(fsec, 3), "journal_cuts": cuts,
            "journal_cut_seconds": round(cut_s, 3), "journal_cut_max_ms": round(cut_max * 1000, 1),
            "journal_cut_copy_seconds": round(cut_copy, 3),
            "compaction_starts": starts, "compaction_start_max_ms": round(start_max * 1000, 1)}


class FsmServer:
    """ReplicatedLog + SessionTable, as in a node."""

    def __init__(self, args: argparse.Namespace, origin: str, inc: int):
        from replication.raft import RaftConfig, RaftTimings, ReplicatedLog
        from replication.table import SessionTable

        self.origin = origin
        self.table = SessionTable(local=(origin, inc))
        self._waiting: dict[int, Done] = {}
        self._lock = threading.Lock()
        self.failed: dict[str, int] = {}
        cfg = RaftConfig(self_addr=args.self_addr, peers=tuple(args.peers.split(",")),
                         data_dir=Path(args.data_dir), password=args.password,
                         timings=RaftTimings(**json.loads(args.timings)), fsync=args.fsync,
                         compaction_entries=args.compaction_entries,
                         compaction_seconds=args.compaction_seconds)
        self.log = ReplicatedLog(cfg, self.table, self._on_applied)
        self.log.wait_bound()

    def _on_applied(self, _index: int, applied: AppliedBatch) -> None:
        if applied.origin != self.origin:
            return
        with self._lock:
            done = self._waiting.pop(applied.seq, None)
        if done is None:
            return
        if applied.status != BATCH_APPLY:
            done(applied.seq, False, {f"batch-{applied.status}": 1})
            return
        errors: dict[str, int] = {}
        for o in applied.outcomes:
            if not o.result.ok:
                code = o.result.code or "?"
                errors[code] = errors.get(code, 0) + 1
        done(applied.seq, True, errors)

    def encode(self, origin: str, inc: int, seq: int, items: list[tuple[int, Command]],
               ordered: bool) -> bytes:
        """As a node's core encodes its batches: applied here without decoding."""
        return self.log.encode_batch(origin, inc, seq, items, ordered)

    def propose(self, seq: int, blob: bytes, done: Done) -> None:
        with self._lock:
            self._waiting[seq] = done

        def on_fail(reason: str, maybe: bool) -> None:
            self.failed[reason] = self.failed.get(reason, 0) + 1
            with self._lock:
                d = self._waiting.pop(seq, None)
            if d is not None:
                d(seq, False, {f"raft-{reason}": 1})

        self.log.propose(blob, on_fail)

    def status(self) -> dict[str, Any]:
        st = self.log.status()
        return {"role": st.role, "leader": st.leader, "commit_index": st.commit_index,
                "last_applied": st.last_applied, "has_quorum": st.has_quorum}

    def stats(self) -> dict[str, Any]:
        skipped, replaced, truncations = self.log.rewrite_statistics()
        ts = self.table.statistics()
        return {**_journal_stats(),
                "resent_identical_skipped": skipped, "entries_replaced": replaced,
                "truncation_events": truncations,
                "next_kept_ahead": self.log.send_statistics()[4],
                "proposal_failures": self.failed,
                "table": {"sessions": ts.sessions, "users": ts.users,
                          "mailbox_messages": ts.mailbox_messages,
                          "messages_sent": ts.messages_sent, "messages_acked": ts.messages_acked,
                          "presence_updates": ts.presence_updates},
                "batches_applied": self.log.applier.batches,
                "commands_applied": self.log.applier.commands}

    def digest(self) -> str:
        return self.table.digest()

    def close(self) -> None:
        self.log.close()


class RawServer:
    """pysyncobj with a do-nothing ``apply_batch``: the raw group commit baseline."""

    def __init__(self, args: argparse.Namespace, origin: str, inc: int):
        # Bench-only import of pysyncobj, for the baseline (see the module docstring).
        from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

        self.fsync = bool(args.fsync)
        if args.fsync:
            from replication.raft import _install_durability

            _install_durability(True)  # the node's fsyncing journal, nothing else
        t = json.loads(args.timings)
        d = Path(args.data_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.applied_batches = 0
        self.applied_bytes = 0
        self.failed: dict[str, int] = {}
        server = self

        class Raw(SyncObj):
            @replicated
            def apply_batch(self, blob: bytes) -> None:
                server.applied_batches += 1  # counting only: "does nothing"
                server.applied_bytes += len(blob)

        conf = SyncObjConf(
            password=args.password, autoTick=True, autoTickPeriod=t["tick"],
            appendEntriesUseBatch=False, appendEntriesPeriod=t["append_entries_period"],
            raftMinTimeout=t["election_min"], raftMaxTimeout=t["election_max"],
            connectionTimeout=t["connection_timeout"], connectionRetryTime=t["connection_retry"],
            leaderFallbackTimeout=t["leader_fallback"],
            journalFile=str(d / "raft.journal"), fullDumpFile=str(d / "raft.dump"),
            logCompactionMinEntries=args.compaction_entries,
            logCompactionMinTime=args.compaction_seconds,
            bindAddress=args.self_addr, maxBindRetries=20, bindRetryTime=0.25,
            dynamicMembershipChange=True, commandsWaitLeader=True, tcp_keepalive=(5, 1, 3))
        self._fail_ok = FAIL_REASON.SUCCESS
        self.sync = Raw(args.self_addr, args.peers.split(","), conf=conf)
        self.sync.waitBinded()

    @staticmethod
    def encode(origin: str, inc: int, seq: int, items: list[tuple[int, Command]],
               ordered: bool) -> bytes:
        return encode_batch(origin, inc, seq, items, ordered)

    def propose(self, seq: int, blob: bytes, done: Done) -> None:
        def callback(_res: Any, err: int) -> None:
            if err == self._fail_ok:
                done(seq, True, {})
            else:
                self.failed[str(err)] = self.failed.get(str(err), 0) + 1
                done(seq, False, {f"raft-{err}": 1})

        self.sync.apply_batch(blob, callback=callback)

    def status(self) -> dict[str, Any]:
        st = self.sync.getStatus()
        leader = st.get("leader")
        return {"role": {0: "follower", 1: "candidate", 2: "leader"}.get(st["state"], "?"),
                "leader": leader.address if leader is not None else None,
                "commit_index": st["commit_idx"], "last_applied": st["last_applied"],
                "has_quorum": bool(st["has_quorum"])}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batches_applied": self.applied_batches,
                               "bytes_applied": self.applied_bytes,
                               "proposal_failures": self.failed}
        if self.fsync:
            out.update(_journal_stats())
        return out

    def digest(self) -> str:
        return f"{self.applied_batches}:{self.applied_bytes}"

    def close(self) -> None:
        self.sync.destroy()
        time.sleep(0.2)


Server = FsmServer | RawServer


# --- the proposer ----------------------------------------------------------------------------


class Workload:
    """Real commands for ``n`` sessions this member logged in through the log."""

    def __init__(self, origin: str, inc: int, n: int):
        self.origin = origin
        self.inc = inc
        self.n = n
        self.sids = [f"{inc & 0xFFFF:04x}{i:020x}" for i in range(n)]
        self.users = [f"user{i}" for i in range(n)]
        self.next_cmid = [1] * n
        self.next_seq = [1] * n  # per recipient: the seq its next message will get
        self.acked = [0] * n
        self.i = 0
        self.rr_presence = 0
        self.rr_send = 0
        self.rr_ack = 0

    def setup(self, contacts: int) -> list[Command]:
        now = time.time()
        cmds: list[Command] = []
        for i in range(self.n):
            cmds.append(Login(self.sids[i], self.users[i], self.origin, self.inc,
                              secrets.token_bytes(32), "online", None, now))
        for i in range(self.n):
            for k in range(1, contacts + 1):
                other = self.users[(i + k) % self.n]
                cmds.append(Allow(self.sids[i], 1, self.origin, other))
                cmds.append(Subscribe(self.sids[i], 1, self.origin, other))
        return cmds

    def next(self, now: float) -> Command:
        """50% presence, 40% sends (to users round-robin), 10% acks of a recipient's
        unacknowledged messages (mailboxes stay small)."""
        k = self.i % 10
        self.i += 1
        n = self.n
        if k < 5:
            j = self.rr_presence % n
            self.rr_presence += 1
            return SetPresence(self.sids[j], 1, self.origin, STATUSES[self.i % 3],
                               f"status {self.i % 100}", now)
        if k < 9:
            j = self.rr_send % n
            to = (j * 7 + 1 + self.rr_send // n) % n
            self.rr_send += 1
            cmid = self.next_cmid[j]
            self.next_cmid[j] += 1
            self.next_seq[to] += 1
            return Send(self.sids[j], 1, self.origin, cmid, self.users[to], BODY, now)
        j = self.rr_ack % n
        self.rr_ack += 1
        lo, hi = self.acked[j] + 1, min(self.next_seq[j], self.acked[j] + 1 + 1024)
        self.acked[j] = hi - 1
        return Ack(self.sids[j], 1, self.origin, list(range(lo, hi)))


class Proposer:
    """Up to ``k`` batches in flight; the next one formed whenever fewer are."""

    def __init__(self, server: Server, origin: str, inc: int, batch: int, k: int = 2,
                 prebuilt: list[Command] | None = None, ordered: bool = False):
        self.server = server
        # Raw baseline as the notes measured it: one pre-encoded blob per batch size,
        # no per-command Python work in the proposer.
        self.prebuilt = prebuilt
        self._blobs: dict[int, bytes] = {}
        self.origin = origin
        self.inc = inc
        self.batch = batch
        self.lock = threading.Lock()
        # Numbering and proposing go together, in one thread at a time: the generator
        # and the tick thread's callbacks both propose, and an ordered batch that
        # reaches the log after its successor is refused as a gap, with every later
        # one (the bench does not re-propose). Re-entrant: a refused proposal calls
        # back in the proposing thread, which proposes the next batch.
        self._sending = threading.RLock()
        self.queue: deque[tuple[float, Command | None]] = deque()
        self.k = k
        self.ordered = ordered
        self.inflight = 0
        self.seq = 0
        self.measuring = False
        self.lat: list[float] = []
        self.slow: list[tuple[float, float, int]] = []  # (monotonic, worst s, commands)
        self.committed = 0
        self.batch_sizes: list[int] = []
        self.errors: dict[str, int] = {}
        self.failed_batches = 0
        self.idle = threading.Event()
        self.idle.set()

    def enqueue(self, items: list[tuple[float, Command | None]]) -> None:
        with self.lock:
            self.queue.extend(items)
            if self.inflight >= self.k:
                return
            take = self._take()
        self._propose(take)

    def _take(self) -> list[tuple[float, Command | None]]:
        """Pop the next batch (lock held) and count it in flight, if there is one."""
        q = self.queue
        n = min(self.batch, len(q))
        take = [q.popleft() for _ in range(n)]
        if take:
            self.inflight += 1
            self.idle.clear()
        elif not self.inflight:
            self.idle.set()
        return take

    def _propose(self, take: list[tuple[float, Command | None]]) -> None:
        if not take:
            return
        with self._sending:
            self.seq += 1
            self._send(self.seq, take)

    def _send(self, seq: int, take: list[tuple[float, Command | None]]) -> None:
        if self.prebuilt is not None:
            blob = self._blobs.get(len(take))
            if blob is None:
                blob = encode_batch(self.origin, self.inc, 0,
                                    list(enumerate(self.prebuilt[:len(take)])))
                self._blobs[len(take)] = blob
        else:
            blob = self.server.encode(
                self.origin, self.inc, seq,
                [(i, c) for i, (_, c) in enumerate(take) if c is not None], self.ordered)
        times = [t for t, _ in take]

        def done(_seq: int, ok: bool, errors: dict[str, int]) -> None:
            now = time.perf_counter()
            with self.lock:
                if self.measuring:
                    if ok:
                        self.lat.extend(now - t for t in times)
                        if now - times[0] >= SLOW:
                            self.slow.append((time.monotonic(), now - times[0], len(times)))
                        self.committed += len(times)
                        self.batch_sizes.append(len(times))
                    else:
                        self.failed_batches += 1
                    for k, v in errors.items():
                        self.errors[k] = self.errors.get(k, 0) + v
                self.inflight -= 1
                nxt = self._take()
            self._propose(nxt)

        self.server.propose(seq, blob, done)

    def drain(self, timeout: float, discard: bool) -> int:
        """Wait for the batches in flight; with ``discard`` drop what is still queued."""
        dropped = 0
        if discard:
            with self.lock:
                dropped = len(self.queue)
                self.queue.clear()
        self.idle.wait(timeout)
        return dropped


SLOW = 0.010
"""A batch whose oldest command waited this long is listed with its time."""


def run_phase(p: Proposer, w: Workload, rate: float | None, seconds: float,
              warmup: float) -> dict[str, Any]:
    """Offer ``rate`` commands/s (None: as fast as they commit) for ``seconds``,
    measuring after ``warmup``; commands are stamped with their scheduled time."""
    with p.lock:
        p.lat, p.committed, p.batch_sizes, p.errors, p.failed_batches = [], 0, [], {}, 0
        p.slow = []
        p.measuring = False
    gc.collect()
    t_start = time.perf_counter()
    t_meas = t_start + warmup
    t_end = t_start + seconds
    produced = 0
    measuring = False
    cpu0 = os.times()
    t0 = t_start
    t0_monotonic = time.monotonic()
    lag_max = 0.0
    make: Callable[[float], Command | None] = (
        (lambda _now: None) if p.prebuilt is not None else w.next)
    while True:
        now = time.perf_counter()
        if not measuring and now >= t_meas:
            with p.lock:
                p.measuring = True
            measuring = True
            t0 = now
            t0_monotonic = time.monotonic()
            cpu0 = os.times()
        if now >= t_end:
            break
        if rate is None:
            if len(p.queue) < 2 * p.batch:
                wall = time.time()
                p.enqueue([(now, make(wall)) for _ in range(p.batch)])
            else:
                time.sleep(0.0005)
            continue
        due = int((now - t_start) * rate)
        if due > produced:
            wall = time.time()
            items = [(t_start + i / rate, make(wall)) for i in range(produced, due)]
            lag_max = max(lag_max, now - items[0][0])
            produced = due
            p.enqueue(items)
        time.sleep(0.0005)
    with p.lock:
        p.measuring = False
        span = time.perf_counter() - t0
        lat = sorted(p.lat)
        committed = p.committed
        sizes = p.batch_sizes
        errors = dict(p.errors)
        failed = p.failed_batches
        slow = [(round(t - t0_monotonic, 4), round(w * 1000, 1), n) for t, w, n in p.slow]
    cpu1 = os.times()
    queued = len(p.queue)
    dropped = p.drain(15.0, discard=True)
    return {
        "rate": rate, "window_s": span, "committed": committed,
        "commands_per_s": committed / span if span > 0 else 0.0,
        "offered": produced, "queued_at_end": queued, "dropped_at_end": dropped,
        "latency_ms": _pcts(lat), "batches": len(sizes),
        "batch_mean": (sum(sizes) / len(sizes)) if sizes else 0.0,
        "batch_max": max(sizes) if sizes else 0,
        "errors": errors, "failed_batches": failed,
        "generator_lag_max_ms": lag_max * 1000,
        "t0_monotonic": t0_monotonic,
        "slow_batches": slow[:500],
        "leader_cpu_cores": ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / span
        if span > 0 else 0.0,
    }


def _pcts(s: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank percentiles of sorted seconds, in milliseconds."""
    if not s:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    n = len(s)

    def at(p: float) -> float:
        return s[max(0, min(n - 1, math.ceil(p / 100 * n) - 1))] * 1000

    return {"n": n, "p50": at(50), "p90": at(90), "p99": at(99), "max": s[-1] * 1000}


# --- the control loop ---------------------------------------------------------------------


def quiet_digest(server: Server, timeout: float) -> dict[str, Any]:
    """The state's digest once everything committed is applied (the table belongs to
    the tick thread: read it only while nothing is being applied)."""
    deadline = time.monotonic() + timeout
    while True:
        a = server.status()
        if a["last_applied"] >= a["commit_index"]:
            try:
                d = server.digest()
            except RuntimeError:  # changed while read: something was still applied
                d = None
            b = server.status()
            if d is not None and b["last_applied"] == a["last_applied"]:
                return {"digest": d, "last_applied": b["last_applied"],
                        "commit_index": b["commit_index"]}
        if time.monotonic() > deadline:
            return {"digest": "?", "last_applied": a["last_applied"],
                    "commit_index": a["commit_index"]}
        time.sleep(0.05)



def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.repl_node")
    ap.add_argument("--mode", choices=["fsm", "raw"], required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--self-addr", required=True)
    ap.add_argument("--peers", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--timings", required=True, help="RaftTimings as JSON")
    ap.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compaction-entries", type=int, default=20_000)
    ap.add_argument("--compaction-seconds", type=int, default=600)
    ap.add_argument("--batch", type=int, default=1000)
    # Always given by bench.replication (a node's default for ``fsm``): no default
    # here, whose import (node.config -> replication.raft) would patch the raw
    # baselines' pysyncobj with the node's peer framing.
    ap.add_argument("--batches-in-flight", type=int, required=True)
    ap.add_argument("--prebuilt", action="store_true",
                    help="raw mode: propose pre-encoded batches (the notes' method)")
    args = ap.parse_args(argv)
    inc = secrets.randbits(62) | 1
    # The node process's collector settings, in every mode: the baselines get them too.
    collector.tune(collector.CORE_THRESHOLDS)
    collector.pause_meter()
    server: Server = (FsmServer(args, args.id, inc) if args.mode == "fsm"
                      else RawServer(args, args.id, inc))
    if args.prebuilt and args.mode != "raw":
        ap.error("--prebuilt is for --mode raw only")
    proposer = Proposer(server, args.id, inc, args.batch, args.batches_in_flight,
                        ordered=args.mode == "fsm")
    workload: Workload | None = None
    reply({"event": "up", "pid": os.getpid(), "mode": args.mode, "fsync": args.fsync})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "status":
                reply(server.status())
            elif op == "setup":
                workload = Workload(args.id, inc, int(req["sessions"]))
                cmds = workload.setup(int(req.get("contacts", 4)))
                t0 = time.perf_counter()
                with proposer.lock:
                    proposer.errors = {}
                    proposer.measuring = True
                    proposer.lat, proposer.committed = [], 0
                now = time.perf_counter()
                proposer.enqueue([(now, c) for c in cmds])
                proposer.drain(float(req.get("timeout", 60)), discard=False)
                if args.prebuilt:
                    proposer.prebuilt = [workload.next(time.time()) for _ in range(args.batch)]
                with proposer.lock:
                    proposer.measuring = False
                    res = {"commands": len(cmds), "committed": proposer.committed,
                           "errors": dict(proposer.errors),
                           "seconds": time.perf_counter() - t0}
                reply(res)
            elif op == "run":
                if workload is None:
                    raise RuntimeError("setup first")
                rate = req.get("rate")
                reply(run_phase(proposer, workload, None if rate is None else float(rate),
                                float(req["seconds"]), float(req["warmup"])))
            elif op == "stats":
                gcs = collector.pause_meter().statistics()
                # Not imported here by a plain ``raw`` member: importing it installs
                # the node's peer framing, which the running SyncObj's links do not use.
                raft = sys.modules.get("replication.raft")
                holds = [(t, kind, round(sec * 1000, 1))
                         for t, kind, sec in (raft.ReplicatedLog.recent_holds() if raft else [])]
                pauses = [(t, f"gc{gen}", round(sec * 1000, 1))
                          for t, gen, sec in collector.pause_meter().long_pauses()]
                reply({**server.stats(),
                       "gc": [{"count": g.count, "seconds": round(g.seconds, 3),
                               "longest_ms": round(g.longest * 1000, 1)} for g in gcs],
                       "events": sorted(holds + pauses)})
            elif op == "digest":
                reply(quiet_digest(server, float(req.get("timeout", 10))))
            elif op == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # answer, do not die: the bench reports it
            reply({"error": f"{type(e).__name__}: {e}"})
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
