"""Helper processes of the benches: started by the bench, spoken to with JSON lines on
their stdin/stdout, stopped by PID.

``LineProc`` starts ``python -m MODULE ...`` (or any command) with
``PR_SET_PDEATHSIG`` (it never outlives the bench), sends one JSON object per
line and reads one JSON object per line back, with a deadline on every read.
``stop`` closes stdin (the helper exits on EOF), then SIGTERM, then SIGKILL,
always by the PID it started; ``call_all`` and ``stop_all`` do that for a
group. ``serve_requests`` is the other side: a helper's request loop. Also: the
CPU of a process and its live descendants (node gateway workers), for
``CpuMeter``.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import trio


class HelperError(Exception):
    """A helper process died, timed out or answered with an error."""


def _pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LineProc:
    """One helper process; see the module docstring."""

    def __init__(self, argv: Sequence[str], log_path: Path, name: str,
                 env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 (the child keeps it)
        e = dict(os.environ)
        e.setdefault("PYTHONUNBUFFERED", "1")
        e.update(env or {})
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=e,
            preexec_fn=(_pdeathsig if threading.current_thread() is threading.main_thread()
                        else None))
        log.close()
        self._buf = b""
        self._lock = threading.Lock()

    @classmethod
    def python(cls, module: str, args: Sequence[str], log_path: Path, name: str) -> LineProc:
        return cls([sys.executable, "-m", module, *args], log_path, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line (HelperError on EOF or timeout)."""
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HelperError(f"{self.name}: no answer within {timeout:g} s "
                                      f"({self.tail()})")
                if not sel.select(left):
                    continue
                chunk = os.read(out.fileno(), 1 << 20)
                if not chunk:
                    self.proc.poll()
                    raise HelperError(f"{self.name} exited (rc {self.proc.returncode}): "
                                      f"{self.tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, msg: dict[str, Any]) -> None:
        inp: IO[bytes] | None = self.proc.stdin
        assert inp is not None
        try:
            inp.write(json.dumps(msg).encode() + b"\n")
            inp.flush()
        except (BrokenPipeError, OSError) as e:
            raise HelperError(f"{self.name}: cannot write: {e} ({self.tail()})") from None

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and return its answer (HelperError if it is an error)."""
        with self._lock:
            self.send(msg)
            ans = self.read(timeout)
        if "error" in ans:
            raise HelperError(f"{self.name}: {ans['error']}")
        return ans

    def stop(self, timeout: float = 10.0) -> int | None:
        """Close stdin (the helper exits), then SIGTERM, then SIGKILL; by PID."""
        p = self.proc
        if p.stdin is not None:
            try:
                p.stdin.close()
            except OSError:
                pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p.stdout is not None:
            p.stdout.close()
        return p.returncode


def call_all(procs: Sequence[LineProc], msg: dict[str, Any],
             timeout: float) -> list[dict[str, Any]]:
    """The same request to every helper at once; their answers in order (the first
    HelperError or other failure is raised in the caller's thread)."""
    out: list[dict[str, Any] | BaseException] = [HelperError("no answer")] * len(procs)

    def one(i: int, p: LineProc) -> None:
        try:
            out[i] = p.call(msg, timeout)
        except BaseException as e:  # re-raised below, in the caller's thread
            out[i] = e

    ts = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(procs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout + 5)
    res: list[dict[str, Any]] = []
    for o in out:
        if isinstance(o, BaseException):
            raise o
        res.append(o)
    return res


def stop_all(procs: Sequence[LineProc], timeout: float) -> None:
    """Ask every live helper to quit, then stop each by PID."""
    for p in procs:
        try:
            if p.alive():
                p.send({"op": "quit"})
        except HelperError:
            pass
        p.stop(timeout)


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_requests(
        count: int,
        control: Callable[[trio.Nursery, dict[str, Any]], Awaitable[dict[str, Any]]],
        close: Callable[[], Awaitable[None]]) -> None:
    """A helper's side: announce ``count`` connections, then answer each JSON line
    on stdin with ``control``'s answer (an exception becomes an ``error`` answer:
    the bench reports it) until ``quit`` or EOF; then ``close`` and cancel every
    task started in the nursery handed to ``control``."""
    _reply({"event": "up", "count": count})
    async with trio.open_nursery() as nursery:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                break
            req = json.loads(line)
            if req["op"] == "quit":
                _reply({"bye": True})
                break
            try:
                _reply(await control(nursery, req))
            except Exception as e:  # answer, do not die: the bench reports it
                _reply({"error": f"{type(e).__name__}: {e}"})
        await close()
        nursery.cancel_scope.cancel()


def children_of(pids: Sequence[int]) -> list[int]:
    """Live descendants of ``pids`` (the nodes' gateway workers, compaction children)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        parent[int(d)] = int(fields[1])
    want = set(pids)
    out: list[int] = []
    grew = True
    while grew:
        grew = False
        for pid, pp in parent.items():
            if pp in want and pid not in want:
                want.add(pid)
                out.append(pid)
                grew = True
    return out


def with_children(pids: Sequence[int]) -> list[int]:
    return [*pids, *children_of(pids)]


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
