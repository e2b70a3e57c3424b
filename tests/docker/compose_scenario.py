"""The docker-compose end-to-end scenario; scripts/compose-e2e.sh runs it from the
host venv once the cluster is healthy.

Real clients (the ``client`` library) log in through the client ports the
containers publish on 127.0.0.1: presence (allow, subscribe, away, busy) and a
steady stream of messages, each user to a user homed on another node. Then three
faults, one at a time, each healed (and the node healthy again) before the next:

* ``docker kill`` of the Raft leader, then ``docker start``;
* ``docker pause`` of the node with the most clients, then ``docker unpause``;
* ``docker network disconnect`` of the node with the most clients, then
  ``docker network connect`` (with its service name as alias).

After each fault every client that was connected to the faulty node must resume
on another node: a ``Reconnected`` event with ``resumed=True`` and the same
session id. At the end every message whose ``send`` returned must have been
received exactly once, nobody may have been seen going offline, and the final
presence change must reach every watcher. Prints a report and, as its last line,
``E2E-RESULT {json}``; exits 1 if a check failed.

Times per fault: ``failover`` runs from issuing the docker command (which itself
takes ``docker_command_s``) to the client's ``Reconnected`` event; ``first_send``
to the first send, started once the fault was in place, that returned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from client import Message, PresenceEvent, Reconnected, Session, connect
from node.auth import Keys, issue_token, read_secret

SEND_INTERVAL = 0.1  # per client: 10 messages/s
FAILOVER_LIMIT = 45.0  # seconds for the affected clients to resume after a fault
HEAL_LIMIT = 120.0  # seconds for a healed node to be healthy again
DRAIN_LIMIT = 60.0  # seconds for every sent message to arrive at the end


def log(text: str) -> None:
    print(f"[scenario {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def health(container: str) -> str:
    return docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                  container, check=False) or "?"


def leader(metrics: dict[str, str]) -> str | None:
    """The node whose /metrics says it is the Raft leader (if exactly one does)."""
    found = []
    for node, addr in metrics.items():
        try:
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            continue
        if 'switchboard_raft_role{role="leader"} 1.0' in text:
            found.append(node)
    return found[0] if len(found) == 1 else None


def readyz(addr: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Client:
    user: str
    home: str  # node id it first connects to
    to: str  # user it sends to
    watches: str  # user whose presence it follows
    session: Session | None = None
    first_session: str | None = None
    sent: list[str] = field(default_factory=list)  # bodies whose send returned
    sent_times: list[tuple[float, float]] = field(default_factory=list)  # (started, returned)
    send_errors: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # bodies, in arrival order
    reconnects: list[tuple[float, Reconnected]] = field(default_factory=list)
    presence: list[tuple[float, PresenceEvent]] = field(default_factory=list)
    ack_errors: int = 0
    sending: bool = True


@dataclass
class Fault:
    kind: str
    node: str
    affected: list[str]
    started: float  # the docker command was issued
    injected: float = 0.0  # the docker command returned: the fault is in place
    failover_s: list[float] = field(default_factory=list)  # per client, from `started`
    first_send_s: float | None = None  # first new send back, over the affected clients
    heal_s: float | None = None  # from healing to the node healthy again


class Scenario:
    def __init__(self, args: argparse.Namespace):
        self.nodes = _pairs(args.nodes)  # node id -> host:port (client)
        self.metrics = _pairs(args.metrics)
        self.containers = _pairs(args.containers)
        self.order = sorted(self.nodes)
        self.keys = Keys.from_secret(read_secret(Path(args.secret_file)))
        self.per_node = args.clients_per_node
        n = len(self.order) * self.per_node
        self.clients: list[Client] = []
        for i in range(n):
            home = self.order[i % len(self.order)]
            # user i sends to user i+1 (homed on the next node) and watches it
            self.clients.append(Client(f"e2e-u{i}", home, f"e2e-u{(i + 1) % n}",
                                       f"e2e-u{(i + 1) % n}"))
        self.by_user = {c.user: c for c in self.clients}
        self.faults: list[Fault] = []
        self.failures: list[str] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def node_list(self, home: str) -> list[str]:
        k = self.order.index(home)
        rotated = self.order[k:] + self.order[:k]
        return [self.nodes[n] for n in rotated]

    def check(self, ok: bool, what: str) -> None:
        if ok:
            log(f"ok: {what}")
        else:
            log(f"FAILED: {what}")
            self.failures.append(what)

    # --- client tasks -----------------------------------------------------------------

    async def run_client(self, c: Client, ready: trio.Event, stop: trio.Event,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = issue_token(self.keys.token, c.user, 3600)
        async with connect(self.node_list(c.home), user=c.user, token=token, ordered=True,
                           connection_events=True, request_timeout=60,
                           give_up_after=120) as s:
            c.session = s
            c.first_session = s.session_id
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.receive, c)
                task_status.started()
                await ready.wait()
                nursery.start_soon(self.send_loop, c)
                await stop.wait()
                nursery.cancel_scope.cancel()

    async def receive(self, c: Client) -> None:
        assert c.session is not None
        async for ev in c.session.events():
            if isinstance(ev, Message):
                c.received.append(str(ev.body))
                try:
                    await c.session.ack(ev)
                except Exception:
                    c.ack_errors += 1
            elif isinstance(ev, PresenceEvent):
                c.presence.append((self.now(), ev))
            elif isinstance(ev, Reconnected):
                c.reconnects.append((self.now(), ev))

    async def send_loop(self, c: Client) -> None:
        assert c.session is not None
        k = 0
        while c.sending:
            body = f"{c.user}->{c.to}#{k}"
            k += 1
            started = self.now()
            try:
                await c.session.send(c.to, body)
            except Exception as e:  # the library retries itself: this is a failure
                c.send_errors.append(f"{body}: {type(e).__name__}: {e}")
            else:
                c.sent.append(body)
                c.sent_times.append((started, self.now()))
            await trio.sleep(SEND_INTERVAL)

    # --- faults -------------------------------------------------------------------------

    def connected_to(self, node: str) -> list[Client]:
        return [c for c in self.clients if c.session is not None and c.session.node_id == node]

    def busiest(self) -> str:
        return max(self.order, key=lambda n: (len(self.connected_to(n)), n))

    async def wait_healthy(self, nodes: list[str], limit: float) -> float:
        """Wait until every node's /readyz (through its published port) answers 200
        and Docker reports the container healthy."""
        start = time.monotonic()
        while True:
            states = {n: await trio.to_thread.run_sync(health, self.containers[n]) for n in nodes}
            for n in nodes:
                if states[n] == "healthy" and not await trio.to_thread.run_sync(
                        readyz, self.metrics[n]):
                    states[n] = "healthy, but /readyz is not 200"
            if all(s == "healthy" for s in states.values()):
                return time.monotonic() - start
            if time.monotonic() - start > limit:
                raise RuntimeError(f"not healthy after {limit:g} s: {states}")
            await trio.sleep(0.5)

    async def fault(self, kind: str, node: str, network: str) -> Fault:
        affected = self.connected_to(node)
        cid = self.containers[node]
        log(f"{kind}: {node} ({cid[:12]}), {len(affected)} clients on it: "
            f"{', '.join(c.user for c in affected)}")
        f = Fault(kind, node, [c.user for c in affected], self.now())
        self.faults.append(f)
        if kind == "kill":
            await trio.to_thread.run_sync(docker, "kill", cid)
        elif kind == "pause":
            await trio.to_thread.run_sync(docker, "pause", cid)
        else:
            await trio.to_thread.run_sync(docker, "network", "disconnect", network, cid)
        f.injected = self.now()
        # Every affected client resumes elsewhere, with the same session.
        deadline = time.monotonic() + FAILOVER_LIMIT
        pending = {c.user for c in affected}
        while pending and time.monotonic() < deadline:
            for c in affected:
                if c.user not in pending:
                    continue
                after = [(t, ev) for t, ev in c.reconnects if t >= f.started]
                if after and c.session is not None and c.session.node_id != node:
                    f.failover_s.append(after[0][0] - f.started)
                    pending.discard(c.user)
            await trio.sleep(0.05)
        self.check(not pending, f"{kind} {node}: every client on it resumed elsewhere "
                   f"({len(affected) - len(pending)}/{len(affected)})")
        # ... and gets its sends through again: the first send started after the fault
        # that returned, over the affected clients.
        while affected and time.monotonic() < deadline:
            done = [end for c in affected for start, end in c.sent_times if start >= f.injected]
            if done:
                f.first_send_s = min(done) - f.started
                break
            await trio.sleep(0.05)
        self.check(not affected or f.first_send_s is not None,
                   f"{kind} {node}: its clients' sends go through again")
        log(f"{kind} {node}: docker {kind} took {f.injected - f.started:.2f} s")
        if f.failover_s:
            log(f"{kind} {node}: resumed after {', '.join(f'{s:.2f}' for s in f.failover_s)} s; "
                f"first send through after {f.first_send_s or 0:.2f} s")
        # Heal, and wait until the whole cluster is healthy again.
        await trio.sleep(1.0)
        heal_start = time.monotonic()
        if kind == "kill":
            running = await trio.to_thread.run_sync(docker, "inspect", "-f",
                                                     "{{.State.Running}}", cid)
            if running != "true":
                await trio.to_thread.run_sync(docker, "start", cid)
        elif kind == "pause":
            await trio.to_thread.run_sync(docker, "unpause", cid)
        else:
            await trio.to_thread.run_sync(docker, "network", "connect", "--alias", node,
                                          network, cid)
        await self.wait_healthy(self.order, HEAL_LIMIT)
        f.heal_s = time.monotonic() - heal_start
        log(f"{kind} {node}: healed, cluster healthy again after {f.heal_s:.1f} s")
        return f

    # --- the run ------------------------------------------------------------------------

    async def run(self, network: str, settle: float) -> dict[str, Any]:
        ready, stop = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            for c in self.clients:
                await nursery.start(self.run_client, c, ready, stop)
            log(f"{len(self.clients)} clients logged in")
            self.check(all(c.session is not None and c.session.node_id == c.home
                           for c in self.clients),
                       "each client logged in on its home node "
                       f"({', '.join(f'{c.user}@{c.home}' for c in self.clients)})")
            await self.presence_setup()
            ready.set()
            await trio.sleep(settle)

            for kind in ("kill", "pause", "disconnect"):
                if kind == "kill":
                    node = await trio.to_thread.run_sync(leader, self.metrics) \
                        or self.busiest()
                else:
                    node = self.busiest()
                await self.fault(kind, node, network)
                await trio.sleep(settle)

            for c in self.clients:
                c.sending = False
            await self.presence_final()
            await self.drain()
            stop.set()
        return self.report()

    async def presence_setup(self) -> None:
        for c in self.clients:
            assert c.session is not None
            watcher = next(w for w in self.clients if w.watches == c.user)
            await c.session.allow(watcher.user)
        hidden = []
        for c in self.clients:
            assert c.session is not None
            if not await c.session.subscribe(c.watches):
                hidden.append(f"{c.user}->{c.watches}")
        self.check(not hidden, f"every watcher may see its user's presence {hidden}")
        for c in self.clients:
            assert c.session is not None
            await c.session.set_presence("away", "e2e")
        await self.expect_presence("away", "presence 'away' reached every watcher")

    async def presence_final(self) -> None:
        for c in self.clients:
            assert c.session is not None
            await c.session.set_presence("busy", "after the faults")
        await self.expect_presence("busy", "presence 'busy' after the faults reached every "
                                   "watcher (subscriptions survived the resumes)")

    async def expect_presence(self, status: str, what: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(any(ev.user == c.watches and ev.status == status for _, ev in c.presence)
                   for c in self.clients):
                break
            await trio.sleep(0.1)
        self.check(all(any(ev.user == c.watches and ev.status == status for _, ev in c.presence)
                       for c in self.clients), what)

    async def drain(self) -> None:
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            if all(set(self.by_user[c.to].received) >= set(c.sent) for c in self.clients):
                break
            await trio.sleep(0.2)
        await trio.sleep(1.0)  # late duplicates, if any, would show up now

    def report(self) -> dict[str, Any]:
        sent = sum(len(c.sent) for c in self.clients)
        lost = duplicated = unexpected = 0
        for c in self.clients:
            got = self.by_user[c.to].received
            counts: dict[str, int] = {}
            for body in got:
                if body.startswith(f"{c.user}->"):
                    counts[body] = counts.get(body, 0) + 1
            lost += sum(1 for b in c.sent if counts.get(b, 0) == 0)
            duplicated += sum(n - 1 for n in counts.values() if n > 1)
            unexpected += sum(1 for b in counts if b not in set(c.sent))
        received = sum(len(c.received) for c in self.clients)
        send_errors = [e for c in self.clients for e in c.send_errors]
        self.check(lost == 0, f"messages lost: {lost} of {sent}")
        self.check(duplicated == 0, f"messages received twice: {duplicated}")
        self.check(not send_errors, f"sends that failed: {len(send_errors)} "
                   f"{send_errors[:3] if send_errors else ''}")
        changed = [c.user for c in self.clients
                   if c.session is None or c.session.session_id != c.first_session]
        self.check(not changed, f"session ids unchanged ({len(self.clients)} clients"
                   f"{'; changed: ' + ', '.join(changed) if changed else ''})")
        fresh = [(c.user, ev.session_id) for c in self.clients for _, ev in c.reconnects
                 if not ev.resumed or ev.session_id != c.first_session]
        self.check(not fresh, f"every reconnect resumed the same session {fresh[:3]}")
        offline = [(c.user, ev.user) for c in self.clients for _, ev in c.presence
                   if ev.status == "offline"]
        self.check(not offline, f"nobody was seen offline (no presence flap) {offline[:3]}")
        for f in self.faults:
            if f.affected:
                self.check(len(f.failover_s) == len(f.affected),
                           f"{f.kind}: all {len(f.affected)} clients resumed")
        result: dict[str, Any] = {
            "ok": not self.failures,
            "failures": self.failures,
            "clients": len(self.clients),
            "messages_sent": sent,
            "messages_received": received,
            "messages_lost": lost,
            "messages_duplicated": duplicated,
            "messages_unexpected": unexpected,
            "send_errors": len(send_errors),
            "reconnects": sum(len(c.reconnects) for c in self.clients),
            "faults": [
                {"kind": f.kind, "node": f.node, "clients": len(f.affected),
                 "failover_max_s": round(max(f.failover_s), 3) if f.failover_s else None,
                 "failover_median_s": (round(statistics.median(f.failover_s), 3)
                                       if f.failover_s else None),
                 "first_send_s": round(f.first_send_s, 3) if f.first_send_s else None,
                 "docker_command_s": round(f.injected - f.started, 3),
                 "heal_to_healthy_s": round(f.heal_s, 1) if f.heal_s else None}
                for f in self.faults
            ],
            "duration_s": round(self.now(), 1),
        }
        return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", required=True, help="n1=127.0.0.1:PORT,... (client ports)")
    p.add_argument("--metrics", required=True, help="n1=127.0.0.1:PORT,... (metrics ports)")
    p.add_argument("--containers", required=True, help="n1=CONTAINER_ID,...")
    p.add_argument("--network", required=True, help="the compose network's name")
    p.add_argument("--secret-file", required=True)
    p.add_argument("--clients-per-node", type=int, default=2)
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of steady traffic before and after each fault")
    args = p.parse_args()
    scenario = Scenario(args)
    try:
        result = trio.run(scenario.run, args.network, args.settle)
    except Exception as e:  # a fault that could not be injected or healed, a client that died
        while isinstance(e, ExceptionGroup) and len(e.exceptions) == 1:
            e = e.exceptions[0]
        log(f"FAILED: {type(e).__name__}: {e}")
        result = {"ok": False, "failures": [*scenario.failures, f"{type(e).__name__}: {e}"]}
    print("E2E-RESULT " + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
