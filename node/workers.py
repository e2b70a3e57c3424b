"""The core process's side of its gateway workers (``--workers K``, K > 0).

One Python process holds fewer than 20,000 sockets here and uses one core, so a
node runs K gateway worker processes (``node.worker``) that share the client
port with SO_REUSEPORT; the kernel spreads new connections over them. The node's
own process (the *core process*) keeps the core, admin and metrics, and talks to
each worker over a Unix socket pair (``node.ipc``).

``WorkerPool`` spawns the workers, serves their channels, and is the client side
of the node for everyone else in the core process (``node.interfaces.GatewayLike``):

* it takes the core's sinks and routes effects: a map session id → (worker,
  epoch), set when a login or resume that a worker submitted commits, removed
  when the session closes or its connection is gone. Each worker gets only its
  own sessions of an effect, in one frame. A command's result and its effects
  are written, in that order, to the worker's single ordered stream.
* it aggregates the workers' statistics (sent every 0.5 s) for admin status,
  /metrics and /readyz, and forwards drain, undrain and shutdown to every worker.
* it mirrors the core's state (fenced, member, serving) to the workers, counts
  failed logins node-wide (and tells every worker which addresses are blocked),
  and sends a beat every 0.25 s so a worker notices a paused core.
* if a worker dies, it submits ``Detach`` for each session the worker held (they
  wait for a resume, and expire if their clients never come back) and starts the
  worker again.

The node-wide connection limit uses a small shared memory table (a memfd given to
every worker): slot i holds worker i's connection count, so a worker decides
admission at accept time without a round trip.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from replication.commands import CommandError, Detach, Login, Resume, from_wire
from replication.table import Deliver, Effect, PresenceNotice, Result, SessionClosed

from .config import NodeConfig, format_addr
from .core import Core
from .gateway import GatewayStats
from .ipc import Channel, poll_all

log = structlog.get_logger("switchboard.workers")

BEAT_PERIOD = 0.25
START_TIMEOUT = 30.0
RESTART_BACKOFF = (0.2, 5.0)  # first delay, cap (doubling while workers die young)
STABLE_AFTER = 10.0  # a worker that lived this long restarts without delay
GAUGES = ("connections", "outbox_bytes", "sessions_local")
WORKER_BITS = 6
WORKER_MASK = (1 << WORKER_BITS) - 1
MAX_WORKERS = 1 << WORKER_BITS
STAT_FIELDS = tuple(f.name for f in dataclasses.fields(GatewayStats))


class WorkerError(Exception):
    """A gateway worker could not be started; the message is one line."""


@dataclass(eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    pid: int = 0
    listening: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    started_once: trio.Event = field(default_factory=trio.Event)
    start_error: str | None = None
    acks: dict[int, tuple[trio.Event, list[int]]] = field(default_factory=dict)


def _ignore(_result: Result) -> None:
    pass


def bind_client_port(host: str, port: int) -> socket.socket:
    """Reserve the client port for the node's workers: a bound (not listening)
    socket with SO_REUSEPORT. It turns an unusable address into an error here,
    picks the port when ``port`` is 0, and keeps the port while workers restart."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class WorkerPool:
    """See the module docstring."""

    def __init__(self, config: NodeConfig, core: Core, count: int):
        assert 1 <= count <= MAX_WORKERS
        self.config = config
        self.core = core
        self.children = [_Worker(i) for i in range(count)]
        # session id -> epoch << 6 | worker: one int per session (small ints are shared)
        self.route: dict[str, int] = {}
        self._drained = False
        self.closing = False
        self.address: str | None = None
        self._retired = GatewayStats()  # counters of worker processes that are gone
        self._state: tuple[bool, bool, bool] | None = None
        self._next_ack = 1
        self._counts_fd = os.memfd_create("switchboard-connections", 0)
        os.ftruncate(self._counts_fd, 8 * count)
        self._counts = mmap.mmap(self._counts_fd, 8 * count)
        self._port_holder: socket.socket | None = None
        self._worker_config = config
        core.effect_sink = self._effects
        core.restore_sink = self._restore
        core.fence_sink = lambda fenced: self._push_state()
        core.state_sink = self._push_state

    # --- GatewayLike ------------------------------------------------------------------

    @property
    def drained(self) -> bool:
        return self._drained

    def listening(self) -> bool:
        return not self.closing and any(w.listening for w in self.children)

    def statistics(self) -> GatewayStats:
        total = dataclasses.asdict(self._retired)
        for w in self.children:
            for name, value in w.stats.items():
                if name in total:
                    total[name] += value
        return GatewayStats(**total)

    def workers(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.pid, "listening": w.listening,
                 "connections": w.stats.get("connections", 0),
                 "sessions": w.stats.get("sessions_local", 0), "restarts": w.restarts}
                for w in self.children]

    async def drain(self, timeout: float = 10.0) -> int:
        """Every worker moves its clients away and refuses new ones; wait for them."""
        self._drained = True
        return await self._ask_all("drain", timeout, timeout + 2.0)

    def undrain(self) -> None:
        self._drained = False
        for w in self.children:
            if w.channel is not None:
                w.channel.send({"t": "undrain"})

    async def shutdown(self) -> None:
        """Stop restarting workers; every worker tells its clients to move and stops
        accepting (the channels close when the pool's task ends)."""
        self.closing = True
        await self._ask_all("shutdown", 1.0, 3.0)

    async def refresh(self) -> None:
        """Ask every worker for its statistics now (at most 0.5 s)."""
        await self._ask_all("stats?", 0.0, 0.5)

    async def _ask_all(self, kind: str, timeout: float, wait: float) -> int:
        asked: list[tuple[_Worker, trio.Event, list[int]]] = []
        for w in self.children:
            if w.channel is None or w.channel.closed or not w.listening:
                continue
            ack_id = self._next_ack
            self._next_ack += 1
            done, box = trio.Event(), list[int]()
            w.acks[ack_id] = (done, box)
            w.channel.send({"t": kind, "id": ack_id, "timeout": timeout})
            asked.append((w, done, box))
        left = 0
        with trio.move_on_after(wait):
            for _w, done, _box in asked:
                await done.wait()
        for w, _done, box in asked:
            left += box[0] if box else w.stats.get("connections", 0)
        return left

    # --- running the workers ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        host, port = self.config.listen
        self._port_holder = bind_client_port(host, port)
        port = self._port_holder.getsockname()[1]
        self.address = format_addr(host, port)
        self._worker_config = dataclasses.replace(self.config, listen=(host, port))
        try:
            async with trio.open_nursery() as nursery:
                for w in self.children:
                    nursery.start_soon(self._supervise, w)
                nursery.start_soon(self._beats)
                with trio.move_on_after(START_TIMEOUT):
                    for w in self.children:
                        await w.started_once.wait()
                failed = [w for w in self.children if not w.listening]
                if failed:
                    w = failed[0]
                    raise WorkerError(f"gateway worker {w.index} did not start: "
                                      f"{w.start_error or 'no answer'}")
                task_status.started(self.address)
        finally:
            self.closing = True
            self._port_holder.close()
            self._counts.close()
            os.close(self._counts_fd)

    async def _supervise(self, w: _Worker) -> None:
        delay = RESTART_BACKOFF[0]
        while not self.closing:
            began = time.monotonic()
            code = await self._run_one(w)
            if self.closing:
                return
            lived = time.monotonic() - began
            self._worker_gone(w, code)
            if not w.started_once.is_set():
                w.start_error = w.start_error or f"exited with code {code}"
                w.started_once.set()
                return
            if lived > STABLE_AFTER:
                delay = RESTART_BACKOFF[0]
            log.info("restarting the worker", index=w.index, delay=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF[1])
            w.restarts += 1

    async def _run_one(self, w: _Worker) -> int | None:
        """Spawn worker ``w``, serve its channel until it ends; returns the exit code."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # From the main thread (Trio's): the worker's PR_SET_PDEATHSIG refers
            # to the spawning thread, and this one lives as long as the process.
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.worker", "--index", str(w.index),
                 "--ipc-fd", str(theirs.fileno()), "--counts-fd", str(self._counts_fd),
                 "--slots", str(len(self.children)), "--parent", str(os.getpid())],
                pass_fds=(theirs.fileno(), self._counts_fd), stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(), close_fds=True,
            )
        except OSError as e:
            mine.close()
            w.start_error = str(e)
            return None
        finally:
            theirs.close()
        w.proc, w.pid = proc, proc.pid
        channel = w.channel = Channel(mine, f"worker {w.index}")
        log.info("worker started", index=w.index, pid=proc.pid)
        pidfd = os.pidfd_open(proc.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.writer)

                async def watch_exit() -> None:
                    await trio.lowlevel.wait_readable(pidfd)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_exit)
                await channel.reader(lambda frame: self._from_worker(w, frame))
                nursery.cancel_scope.cancel()
        finally:
            w.listening = False
            channel.close()
            with trio.CancelScope(shield=True):
                await channel.aclose()
                # The worker exits on its own once the channel is closed.
                with trio.move_on_after(3.0):
                    await trio.lowlevel.wait_readable(pidfd)
                if proc.poll() is None:
                    log.warning("worker did not exit; killing it", index=w.index,
                                pid=proc.pid)
                    proc.kill()
                    with trio.move_on_after(2.0):
                        await trio.lowlevel.wait_readable(pidfd)
                os.close(pidfd)
        return proc.poll()

    def _worker_gone(self, w: _Worker, code: int | None) -> None:
        log.warning("worker exited", index=w.index, pid=w.pid, code=code)
        struct.pack_into("<q", self._counts, 8 * w.index, 0)
        for name in STAT_FIELDS:
            if name not in GAUGES and name in w.stats:
                setattr(self._retired, name, getattr(self._retired, name) + w.stats[name])
        w.stats = {}
        for done, _box in w.acks.values():
            done.set()
        w.acks.clear()
        # Its clients lost their connections: their sessions wait for a resume.
        node = self.core.node_id
        gone = [(sid, here >> WORKER_BITS) for sid, here in self.route.items()
                if here & WORKER_MASK == w.index]
        for sid, epoch in gone:
            del self.route[sid]
            self.core.submit(Detach(sid, epoch, node), _ignore)
        if gone:
            log.info("detached the dead worker's sessions", index=w.index, sessions=len(gone))

    async def _beats(self) -> None:
        while True:
            await trio.sleep(BEAT_PERIOD)
            for w in self.children:
                if w.channel is not None:
                    w.channel.send({"t": "beat"})

    # --- frames from workers --------------------------------------------------------------

    def _from_worker(self, w: _Worker, f: dict[str, Any]) -> None:
        t = f["t"]
        if t == "submit":
            self._submit(w, f)
        elif t == "stats":
            w.stats = f["s"]
        elif t == "failed":
            until = self.core.failed_logins.failed(f["ip"])
            if until is not None:
                for other in self.children:
                    if other.channel is not None:
                        other.channel.send({"t": "block", "ip": f["ip"], "until": until},
                                           now=True)
        elif t == "ack":
            w.stats = f["s"]
            entry = w.acks.pop(f["id"], None)
            if entry is not None:
                entry[1].append(f["left"])
                entry[0].set()
        elif t == "hello":
            self._hello(w, f)
        elif t == "listening":
            w.listening = True
            w.started_once.set()
            log.info("worker listening", index=w.index, pid=w.pid, address=f["address"])
        elif t == "failed-to-listen":
            w.start_error = f["error"]
        elif t != "bye":
            log.warning("unknown IPC frame", index=w.index, type=t)

    def _hello(self, w: _Worker, f: dict[str, Any]) -> None:
        assert w.channel is not None
        if f.get("pid") != w.pid:
            log.error("IPC hello from an unexpected process", index=w.index, pid=f.get("pid"))
            w.channel.close()
            return
        core = self.core
        w.channel.send({
            "t": "config", "node": core.node_id, "inc": core.inc,
            "cfg": self._worker_config.to_wire(), "log_level": logging.getLogger().level,
            "state": {**self._state_frame(), "drained": self._drained},
        })

    def _submit(self, w: _Worker, f: dict[str, Any]) -> None:
        channel = w.channel
        assert channel is not None
        wrid = f["w"]
        try:
            cmd = from_wire(f["c"])
        except CommandError as e:
            log.error("bad command from a worker", index=w.index, error=str(e))
            channel.send({"t": "result", "w": wrid, "ok": False, "code": "internal",
                          "reason": "malformed command"})
            return
        ip = f.get("ip")
        if ip is not None:
            # A login or resume. Failed logins count node-wide: first take in what
            # the other workers sent already (the failure this client saw before it
            # came back on another worker is in there), then check its address.
            poll_all([other.channel for other in self.children
                      if other is not w and other.channel is not None])
            if self.core.failed_logins.blocked(ip):
                channel.send({"t": "result", "w": wrid, "ok": False, "code": "rate-limited",
                              "reason": "too many failed logins from this address; try "
                              "again in a minute"})
                return
        kind = type(cmd)
        if (isinstance(cmd, Detach)  # the connection is gone: nothing more to route to it
                and self.route.get(cmd.session) == cmd.epoch << WORKER_BITS | w.index):
            del self.route[cmd.session]

        def on_done(result: Result) -> None:
            if result.ok and (kind is Login or kind is Resume):
                sid = cmd.session  # type: ignore[attr-defined]
                epoch = result.value["epoch"]  # type: ignore[index]
                if w.channel is channel and not channel.closed:
                    self.route[sid] = epoch << WORKER_BITS | w.index
                else:  # the worker died meanwhile: nobody holds the connection
                    self.core.submit(Detach(sid, epoch, self.core.node_id), _ignore)
            channel.send({"t": "result", "w": wrid, "ok": result.ok, "v": result.value,
                          "code": result.code, "reason": result.reason})

        self.core.submit(cmd, on_done, f.get("to"), bool(f.get("k", True)))

    # --- the core's sinks ------------------------------------------------------------------

    def _send(self, index: int, frame: dict[str, Any]) -> None:
        channel = self.children[index].channel
        if channel is not None:
            channel.send(frame)

    def _broadcast(self, frame: dict[str, Any]) -> None:
        for w in self.children:
            if w.channel is not None:
                w.channel.send(frame)

    def _split(self, sessions: list[str]) -> dict[int, list[str]]:
        route = self.route
        out: dict[int, list[str]] = {}
        for sid in sessions:
            here = route.get(sid)
            if here is not None:
                group = out.get(here & WORKER_MASK)
                if group is None:
                    out[here & WORKER_MASK] = [sid]
                else:
                    group.append(sid)
        return out

    def _effects(self, effects: list[Effect]) -> None:
        for e in effects:
            kind = type(e)
            if kind is Deliver:
                assert isinstance(e, Deliver)
                m = e.message
                body = [m.id, m.seq, m.sender, m.body, m.ts]
                for index, sids in self._split(e.sessions).items():
                    self._send(index, {"t": "deliver", "s": sids, "m": body})
            elif kind is PresenceNotice:
                assert isinstance(e, PresenceNotice)
                for index, sids in self._split(e.sessions).items():
                    self._send(index, {"t": "presence", "s": sids, "user": e.user,
                                       "status": e.status, "text": e.text,
                                       "seen": e.last_seen})
            elif kind is SessionClosed:
                assert isinstance(e, SessionClosed)
                frame = {"t": "closed", "s": e.session, "e": e.epoch, "r": e.reason}
                here = self.route.get(e.session)
                if here is not None and here >> WORKER_BITS == e.epoch:
                    del self.route[e.session]
                    self._send(here & WORKER_MASK, frame)
                else:
                    # An older epoch (e.g. moved to another worker of this node): the
                    # worker that still holds it is not in the map; workers check epochs.
                    self._broadcast(frame)

    def _restore(self, local: list[tuple[str, int]]) -> None:
        """A snapshot replaced the table: each worker keeps only sessions still local."""
        keep: dict[int, list[list[Any]]] = {w.index: [] for w in self.children}
        route = self.route
        new_route: dict[str, int] = {}
        for sid, epoch in local:
            here = route.get(sid)
            if here is not None:
                keep[here & WORKER_MASK].append([sid, epoch])
                if here >> WORKER_BITS == epoch:
                    new_route[sid] = here
        self.route = new_route
        for index, sessions in keep.items():
            self._send(index, {"t": "restore", "keep": sessions})

    def _state_frame(self) -> dict[str, Any]:
        core = self.core
        return {"t": "state", "fenced": core.fenced, "member": core.member,
                "serving": core.serving()}

    def _push_state(self) -> None:
        core = self.core
        state = (core.fenced, core.member, core.serving())
        if state != self._state:
            self._state = state
            self._broadcast(self._state_frame())
