"""Start and stop a cluster of real node processes on one machine.

Used by ``switchboard up``, the integration tests, the benchmarks and the
chaos harness. Each node is ``python -m cluster node ...``; it announces its
bound addresses as one JSON line on stdout and logs to ``DATA/ID/node.log``.
Nodes get ``PR_SET_PDEATHSIG`` so they never outlive the launcher.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.auth import Keys, create_secret_file, read_secret
from node.config import format_addr

from .adminclient import AdminCallError, admin_call


class LaunchError(Exception):
    """The cluster could not be started; the message is one line."""


@dataclass(frozen=True)
class NodeSpec:
    id: str
    client: str
    raft: str
    admin: str
    metrics: str
    data_dir: Path


def layout(n: int, host: str, base_port: int, data_dir: Path,
           hosts: list[str] | None = None) -> list[NodeSpec]:
    """Node k (0-based) listens on base+k (clients), base+100+k (Raft),
    base+200+k (admin) and base+300+k (metrics). With ``hosts`` (one address per
    node, e.g. each in its own network namespace) every node uses the base ports."""
    specs = []
    for k in range(n):
        h, off = (hosts[k], 0) if hosts else (host, k)
        specs.append(NodeSpec(
            id=f"n{k + 1}",
            client=format_addr(h, base_port + off),
            raft=format_addr(h, base_port + 100 + off),
            admin=format_addr(h, base_port + 200 + off),
            metrics=format_addr(h, base_port + 300 + off),
            data_dir=data_dir / f"n{k + 1}",
        ))
    return specs


def _set_pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class NodeProcess:
    spec: NodeSpec
    proc: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """N node processes on this machine; see the module docstring."""

    def __init__(self, data_dir: Path, nodes: int = 3, host: str = "127.0.0.1",
                 base_port: int = 7100, node_args: list[str] | None = None,
                 python: str = sys.executable, env: dict[str, str] | None = None,
                 hosts: list[str] | None = None,
                 wrap: Callable[[NodeSpec], list[str]] | None = None,
                 node_env: Callable[[NodeSpec], dict[str, str]] | None = None,
                 per_node_args: dict[str, list[str]] | None = None):
        if not 1 <= nodes <= 99:
            raise LaunchError("--nodes must be between 1 and 99")
        self.data_dir = Path(data_dir).resolve()
        self.n = nodes
        self.host = host
        self.base_port = base_port
        self.node_args = list(node_args or [])
        self.per_node_args = dict(per_node_args or {})  # node id -> flags after node_args
        self.python = python
        self.env = env
        self.wrap = wrap
        self.node_env = node_env
        self.specs = layout(nodes, host, base_port, self.data_dir, hosts)
        self.secret_file = self.data_dir / "secret"
        self.procs: dict[str, NodeProcess] = {}
        self.removed: set[str] = set()
        self._keys: Keys | None = None

    @property
    def keys(self) -> Keys:
        if self._keys is None:
            self._keys = Keys.from_secret(read_secret(self.secret_file))
        return self._keys

    def spec(self, node_id: str) -> NodeSpec:
        for s in self.specs:
            if s.id == node_id:
                return s
        raise KeyError(node_id)

    # --- starting -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the data dir and secret, and check the layout against an earlier run."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        create_secret_file(self.secret_file)
        marker = self.data_dir / "cluster.json"
        want = {"nodes": self.n, "host": self.host, "base_port": self.base_port}
        if marker.exists():
            have = json.loads(marker.read_text())
            if have != want:
                raise LaunchError(
                    f"{self.data_dir} holds a cluster started with --nodes {have['nodes']} "
                    f"--host {have['host']} --base-port {have['base_port']}; "
                    "use the same flags or another --data-dir")
        else:
            marker.write_text(json.dumps(want) + "\n")

    def add_spec(self, host: str | None = None) -> NodeSpec:
        """Lay out one more node (for membership changes); start it with ``--join``."""
        k = len(self.specs)
        h, off = (host, 0) if host is not None else (self.host, k)
        spec = NodeSpec(
            id=f"n{k + 1}",
            client=format_addr(h, self.base_port + off),
            raft=format_addr(h, self.base_port + 100 + off),
            admin=format_addr(h, self.base_port + 200 + off),
            metrics=format_addr(h, self.base_port + 300 + off),
            data_dir=self.data_dir / f"n{k + 1}",
        )
        self.specs.append(spec)
        return spec

    def members(self) -> list[NodeSpec]:
        return [s for s in self.specs if s.id not in self.removed]

    def command(self, spec: NodeSpec) -> list[str]:
        peers = ",".join(s.raft for s in self.members() if s.id != spec.id)
        return [
            self.python, "-m", "cluster", "node",
            "--id", spec.id, "--listen", spec.client, "--raft", spec.raft,
            "--peers", peers, "--data-dir", str(spec.data_dir),
            "--secret-file", str(self.secret_file),
            "--admin", spec.admin, "--metrics", spec.metrics,
            *self.node_args, *self.per_node_args.get(spec.id, []),
        ]

    def start_node(self, node_id: str, extra_args: list[str] | None = None) -> NodeProcess:
        spec = self.spec(node_id)
        spec.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(spec.data_dir / "node.log", "ab")  # noqa: SIM115 (the child keeps it)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.node_env is not None:
            env.update(self.node_env(spec))
        prefix = self.wrap(spec) if self.wrap is not None else []
        proc = subprocess.Popen(
            [*prefix, *self.command(spec), *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
            # The death signal fires when the spawning *thread* exits, so only a
            # node spawned from the main thread gets it (worker threads come and go).
            preexec_fn=(_set_pdeathsig if threading.current_thread() is threading.main_thread()
                        else None),
        )
        log.close()
        np = NodeProcess(spec, proc)
        self.procs[node_id] = np
        return np

    def wait_announced(self, np: NodeProcess, timeout: float = 30.0) -> dict[str, Any]:
        """Read the node's 'listening' line; raise LaunchError if it dies first."""
        assert np.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(np.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    continue
                chunk = os.read(np.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    np.info = json.loads(buf.split(b"\n", 1)[0])
                    return np.info
        finally:
            sel.close()
        np.proc.poll()
        tail = self.log_tail(np.spec.id)
        raise LaunchError(f"node {np.spec.id} did not start: {tail or 'no output'}")

    def log_tail(self, node_id: str, lines: int = 1) -> str:
        path = self.spec(node_id).data_dir / "node.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def start(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Start every node, wait for their listeners and for a leader."""
        self.prepare()
        for spec in self.specs:
            self.start_node(spec.id)
        infos = [self.wait_announced(self.procs[s.id], timeout) for s in self.specs]
        self.wait_ready(timeout=timeout)
        return infos

    # --- observing ------------------------------------------------------------------------

    def status(self, node_id: str, timeout: float = 2.0) -> dict[str, Any]:
        return admin_call(self.spec(node_id).admin, self.keys, "status", timeout=timeout)

    def statuses(self, timeout: float = 1.0) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for s in self.specs:
            np = self.procs.get(s.id)
            if np is None or not np.alive():
                out[s.id] = None
                continue
            try:
                out[s.id] = self.status(s.id, timeout)
            except AdminCallError:
                out[s.id] = None
        return out

    def leader(self) -> str | None:
        """The id of the node that says it is leader, if exactly one does."""
        leaders = [nid for nid, st in self.statuses().items()
                   if st is not None and st["role"] == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def wait_ready(self, nodes: list[str] | None = None, timeout: float = 30.0) -> str:
        """Wait until there is a leader, ``nodes`` (default: all running) are ready and
        the leader's per-user limits are in force."""
        deadline = time.monotonic() + timeout
        want = nodes or [nid for nid, np in self.procs.items() if np.alive()]
        last = ""
        while time.monotonic() < deadline:
            sts = self.statuses()
            leaders = [n for n, st in sts.items() if st is not None and st["role"] == "leader"]
            ready = [n for n in want if sts.get(n) is not None and sts[n]["ready"]]  # type: ignore[index]
            # The leader's flags set the per-user limits; ready means they are in force.
            if (len(leaders) == 1 and len(ready) == len(want)
                    and not sts[leaders[0]].get("limits_pending")):  # type: ignore[union-attr]
                return leaders[0]
            dead = [n for n in want if not self.procs[n].alive()]
            if dead:
                raise LaunchError(f"node {dead[0]} exited: {self.log_tail(dead[0])}")
            last = f"leaders={leaders} ready={ready}"
            time.sleep(0.1)
        raise LaunchError(f"the cluster did not become ready within {timeout:g} s ({last})")

    # --- faults and stopping ----------------------------------------------------------------

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        np = self.procs[node_id]
        if np.alive():
            np.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            np.proc.wait(10)

    def restart(self, node_id: str, timeout: float = 30.0) -> dict[str, Any]:
        np = self.procs.get(node_id)
        if np is not None and np.alive():
            self.stop_node(node_id)
        np = self.start_node(node_id)
        return self.wait_announced(np, timeout)

    def stop_node(self, node_id: str, timeout: float = 10.0) -> None:
        np = self.procs[node_id]
        if np.alive():
            np.proc.send_signal(signal.SIGCONT)
            np.proc.terminate()
            try:
                np.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                np.proc.kill()
                np.proc.wait(5)
        if np.proc.stdout is not None:
            np.proc.stdout.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node: SIGTERM (they leave cleanly), then SIGKILL stragglers."""
        for np in self.procs.values():
            if np.alive():
                np.proc.send_signal(signal.SIGCONT)
                np.proc.terminate()
        deadline = time.monotonic() + timeout
        for np in self.procs.values():
            try:
                np.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                np.proc.kill()
                np.proc.wait(5)
            if np.proc.stdout is not None:
                np.proc.stdout.close()

    def client_addresses(self) -> list[str]:
        return [s.client for s in self.specs]

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
