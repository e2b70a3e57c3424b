"""A gateway worker process: ``python -m node.worker`` (started by the node's core
process, ``node.workers.WorkerPool``; never by hand).

It runs the ordinary ``Gateway`` against ``CoreClient``, which implements
``node.interfaces.CoreLike`` over the IPC channel (``node.ipc``) to the core
process: commands go up as ``submit`` frames; results, effects, state changes
and control requests come down, in one ordered stream, so a command's result
still reaches the gateway before that command's effects.

The worker listens on the node's client port with SO_REUSEPORT next to its
siblings. It exits when the channel closes (the core went away), on SIGTERM (it
also asks for SIGTERM when the core process dies, PR_SET_PDEATHSIG), and on a
``shutdown`` request; in every case it first tells its clients to reconnect
elsewhere. If the core stops talking (a paused or wedged core process) for
longer than the fencing delay, the worker fences itself: it closes its
connections (``bye fenced``) and refuses logins until the core speaks again.

Garbage collection (``node.collector``): young collections every 20,000
allocations instead of 700, and the heap frozen once the worker listens and
again after every 2,000 accepted connections, so that full collections do not
walk the long-lived connection objects.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import gc
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from replication.commands import Command
from replication.table import (
    Deliver,
    Effect,
    Message,
    PresenceNotice,
    Result,
    SessionClosed,
    error,
)

from . import collector, logs
from .auth import Keys, read_secret
from .config import NodeConfig
from .gateway import Gateway
from .ipc import Channel

log = structlog.get_logger("switchboard.worker")

SHUTDOWN = error("shutdown", "the node is shutting down")
STATS_PERIOD = 0.5
WORKER_NICE = 5  # below the core's scheduling priority (see main)
SILENCE_MARGIN = 1.0  # fence after fence_after + this without a word from the core
LOGIN_SILENCE = 1.0  # refuse logins after this long without a word from the core
FREEZE_AFTER = 2_000  # freeze once this many connections were accepted since the last


class CoreClient:
    """``CoreLike`` for a worker: the core is in the node's core process."""

    def __init__(self, channel: Channel, index: int, counts_fd: int, counts: mmap.mmap,
                 slots: int, config: NodeConfig, node_id: str, inc: int):
        self.channel = channel
        self.index = index
        self.config = config
        self.node_id = node_id
        self.inc = inc
        self.fenced = True
        self._member = False
        self._serving = False
        self.effect_sink: Callable[[list[Effect]], None] = lambda effects: None
        self.restore_sink: Callable[[list[tuple[str, int]]], None] = lambda sessions: None
        self.fence_sink: Callable[[bool], None] = lambda fenced: None
        self.batch_sink: Callable[[bool], None] = lambda start: None
        self.control: Callable[[dict[str, Any]], None] = lambda frame: None
        self._pending: dict[int, Callable[[Result], None]] = {}
        self._next = 1
        self._blocks: dict[str, float] = {}  # source address -> blocked until (monotonic)
        self._counts_fd = counts_fd
        self._counts = counts
        self._counts_fmt = f"<{slots}q"
        self._max = config.max_connections
        self._here = 0
        self.last_heard = time.monotonic()
        self.silent = False
        self.closed = False

    # --- CoreLike ---------------------------------------------------------------------

    @property
    def member(self) -> bool:
        return self._member

    def serving(self) -> bool:
        # A login needs a core that answers: after a second without a word (a beat
        # is due every 0.25 s) it would wait for a paused core, and commit later
        # on a connection its client may have given up on.
        return (self._serving and not self.silent and not self.closed
                and time.monotonic() - self.last_heard < LOGIN_SILENCE)

    def submit(self, cmd: Command, on_done: Callable[[Result], None],
               timeout: float | None = None, keep: bool = True,
               source: str | None = None) -> None:
        if self.closed or self.channel.closed:
            on_done(SHUTDOWN)
            return
        wrid = self._next
        self._next += 1
        self._pending[wrid] = on_done
        frame = {"t": "submit", "w": wrid, "c": cmd.to_wire(), "to": timeout, "k": keep}
        if source is not None:
            frame["ip"] = source
        self.channel.send(frame)

    def login_blocked(self, ip: str) -> bool:
        until = self._blocks.get(ip)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._blocks[ip]
            return False
        return True

    def login_failed(self, ip: str) -> None:
        # Sent before the client hears its error: a retry on a sibling worker is
        # submitted after the core counted this failure.
        self.channel.send({"t": "failed", "ip": ip}, now=True)

    def reserve_connection(self) -> bool:
        # Read every worker's count and add ours under one lock, so two workers
        # accepting at the same moment cannot both take the last place. (Which of
        # two near-simultaneous connections gets it is up to the race.)
        fcntl.lockf(self._counts_fd, fcntl.LOCK_EX)
        try:
            if sum(struct.unpack_from(self._counts_fmt, self._counts)) >= self._max:
                return False
            self._here += 1
            struct.pack_into("<q", self._counts, 8 * self.index, self._here)
            return True
        finally:
            fcntl.lockf(self._counts_fd, fcntl.LOCK_UN)

    def release_connection(self) -> None:
        fcntl.lockf(self._counts_fd, fcntl.LOCK_EX)
        try:
            self._here -= 1
            struct.pack_into("<q", self._counts, 8 * self.index, self._here)
        finally:
            fcntl.lockf(self._counts_fd, fcntl.LOCK_UN)

    # --- frames from the core -----------------------------------------------------------

    def handle(self, frame: dict[str, Any]) -> None:
        self.last_heard = time.monotonic()
        if self.silent:
            self.silent = False
            log.info("the core answers again")
        t = frame["t"]
        if t == "result":
            on_done = self._pending.pop(frame["w"], None)
            if on_done is not None:
                on_done(Result(frame["ok"], frame.get("v"), frame.get("code"),
                               frame.get("reason")))
        elif t == "deliver":
            m = frame["m"]
            self.effect_sink([Deliver(frame["s"], Message(m[0], m[1], m[2], "", m[3], m[4]))])
        elif t == "presence":
            self.effect_sink([PresenceNotice(frame["s"], frame["user"], frame["status"],
                                             frame.get("text"), frame.get("seen"))])
        elif t == "closed":
            self.effect_sink([SessionClosed(frame["s"], frame["e"], frame["r"])])
        elif t == "state":
            self._set_state(frame)
        elif t == "restore":
            self.restore_sink([(sid, epoch) for sid, epoch in frame["keep"]])
        elif t == "block":
            self._blocks[frame["ip"]] = frame["until"]
        elif t in ("drain", "undrain", "shutdown", "stats?"):
            self.control(frame)
        elif t != "beat":
            log.warning("unknown IPC frame", type=t)

    def _set_state(self, frame: dict[str, Any]) -> None:
        was = self.fenced
        self.fenced = frame["fenced"]
        self._member = frame["member"]
        self._serving = frame["serving"]
        if self.fenced and not was:
            self.fence_sink(True)

    def check_silence(self) -> None:
        """Fence this worker if the core has said nothing for too long (paused or wedged)."""
        quiet = time.monotonic() - self.last_heard
        if not self.silent and quiet > self.config.fence_after + SILENCE_MARGIN:
            self.silent = True
            log.warning("the core is silent; fencing this worker", quiet=round(quiet, 2))
            self.fence_sink(True)

    def channel_closed(self) -> None:
        """The core is gone: every request still waiting gets 'shutdown'."""
        self.closed = True
        pending, self._pending = self._pending, {}
        for on_done in pending.values():
            try:
                on_done(SHUTDOWN)
            except Exception:
                log.exception("on_done failed")


async def run_worker(index: int, ipc_fd: int, counts_fd: int, slots: int) -> int:
    channel = Channel(socket.socket(fileno=ipc_fd), "core")
    counts = mmap.mmap(counts_fd, 8 * slots)
    box: dict[str, Any] = {}
    configured = trio.Event()
    stop = trio.Event()

    def on_frame(frame: dict[str, Any]) -> None:
        client: CoreClient | None = box.get("client")
        if client is not None:
            client.handle(frame)
            return
        if frame["t"] != "config":
            return
        config = NodeConfig.from_wire(frame["cfg"])
        logs.configure(config.id, config.log_format, frame["log_level"], worker=index)
        if config.insecure:
            keys = Keys.insecure()
        else:
            assert config.secret_file is not None
            keys = Keys.from_secret(read_secret(config.secret_file))
        client = CoreClient(channel, index, counts_fd, counts, slots, config, frame["node"],
                            frame["inc"])
        box["client"] = client
        box["gateway"] = gateway = Gateway(config, client, keys)
        client._set_state(frame["state"])
        if frame["state"].get("drained"):
            gateway._drained = True
        configured.set()

    def on_batch(start: bool) -> None:
        client: CoreClient | None = box.get("client")
        if client is not None:
            client.batch_sink(start)

    async def read() -> None:
        await channel.reader(on_frame, on_batch)
        client = box.get("client")
        if client is not None:
            client.channel_closed()
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.writer)
        nursery.start_soon(read)
        channel.send({"t": "hello", "pid": os.getpid(), "index": index})
        with trio.move_on_after(30):
            await configured.wait()
        if not configured.is_set():
            nursery.cancel_scope.cancel()
            return 1
        client: CoreClient = box["client"]
        gateway: Gateway = box["gateway"]
        try:
            address = await nursery.start(_serve, gateway)
        except OSError as e:
            log.error("cannot listen", error=str(e))
            channel.send({"t": "failed-to-listen", "error": str(e)})
            await trio.sleep(0.2)  # let the frame out
            nursery.cancel_scope.cancel()
            return 1
        client.control = lambda frame: nursery.start_soon(_control, client, gateway, frame)
        channel.send({"t": "listening", "address": address, "pid": os.getpid()})
        log.info("worker listening", address=address, pid=os.getpid())
        gc.freeze()  # startup objects (modules, config) are never garbage
        nursery.start_soon(_housekeeping, client, gateway)
        nursery.start_soon(_signals, stop)
        await stop.wait()
        await gateway.shutdown()
        channel.send({"t": "bye"})
        await trio.sleep(0)  # one more chance for the writer
        nursery.cancel_scope.cancel()
    return 0


async def _serve(gateway: Gateway, *, task_status: trio.TaskStatus[str]) -> None:
    await gateway.serve(reuse_port=True, task_status=task_status)


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _sig in signals:
            log.info("stopping on SIGTERM")
            stop.set()
            return


async def _control(client: CoreClient, gateway: Gateway, frame: dict[str, Any]) -> None:
    t = frame["t"]
    if t == "undrain":
        gateway.undrain()
        return
    if t == "stats?":
        left = len(gateway.connections)
    elif t == "drain":
        left = await gateway.drain(float(frame.get("timeout", 10.0)))
    else:
        await gateway.shutdown()
        left = len(gateway.connections)
    client.channel.send({"t": "ack", "id": frame["id"], "left": left,
                         "s": dataclasses.asdict(gateway.statistics())})


async def _housekeeping(client: CoreClient, gateway: Gateway) -> None:
    """Statistics to the core, the silence check, and the garbage collector."""
    while True:
        await trio.sleep(STATS_PERIOD)
        client.check_silence()
        client.channel.send({"t": "stats", "s": dataclasses.asdict(gateway.statistics())})
        if gateway.accepted_burst >= FREEZE_AFTER:  # many new long-lived connections
            gateway.accepted_burst = 0
            collector.freeze_long_lived()


def _set_pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--ipc-fd", type=int, required=True)
    p.add_argument("--counts-fd", type=int, required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    # The death signal is set here rather than in a preexec_fn (not safe in the
    # core's threaded process); the core spawns from its main thread, which lives
    # as long as the process. Check the parent did not die before we got here.
    _set_pdeathsig()
    if os.getppid() != args.parent:
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the core to handle
    # The core (Raft, the table, every worker's requests) is the node's one serial
    # path: when the machine is saturated it must not get a 1/(K+1) share of the
    # CPU against its own K workers, or it falls silent, its workers fence and the
    # cluster declares the node dead. Workers then slow down instead.
    os.nice(WORKER_NICE)
    collector.tune(collector.WORKER_THRESHOLDS)
    logging.getLogger().setLevel(logging.INFO)
    return trio.run(run_worker, args.index, args.ipc_fd, args.counts_fd, args.slots)


if __name__ == "__main__":
    sys.exit(main())
