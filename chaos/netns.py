"""Network namespaces for chaos runs: one per node, joined by a bridge namespace.

Topology (``P`` a per-run prefix, ``S`` a free 10.x.y.0/24 subnet)::

    root ns (harness, clients) ── P-h ═ h0 ──┐
                                             br0 (namespace P-br)
    node ns P-n1 (S.11) ── eth0 ═ v1 ────────┤
    node ns P-n2 (S.12) ── eth0 ═ v2 ────────┘ ...

The harness and the clients live in the root namespace (``S.1``) and reach every
node over the bridge. Faults are nftables rules *inside the node namespaces*
that drop traffic between node addresses only, so a partition never cuts the
harness's control path (admin, signals) nor the clients. Everything created is
removed by ``destroy`` (and by ``cleanup_stale`` for runs that died).
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import subprocess
from dataclasses import dataclass, field

PREFIX = "sbx"  # every namespace and link of ours starts with this


class NetnsError(Exception):
    """A namespace operation failed (usually: not root, or iproute2/nft missing)."""


def _run(*args: str, check: bool = True, input: str | None = None) -> str:
    p = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def _used_subnets() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = _run("ip", "-4", "-o", "addr", "show", check=False)
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(ipaddress.ip_network(parts[parts.index("inet") + 1], strict=False))
    return nets


@dataclass
class Network:
    """The namespaces of one chaos run; see the module docstring."""

    nodes: list[str]  # node ids, e.g. ["n1", "n2", "n3"]
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: ipaddress.IPv4Network | None = None
    created: bool = False
    _loss: dict[str, int] = field(default_factory=dict)
    _blocked_in: dict[str, set[str]] = field(default_factory=dict)
    _blocked_out: dict[str, set[str]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.tag}"

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    @property
    def host_ip(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def ip(self, node: str) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 11 + self.nodes.index(node))

    def add_node(self, node: str) -> None:
        """Add a namespace for a node joining later (membership changes)."""
        self.nodes.append(node)
        if self.created:
            self._create_node(node)

    # --- lifecycle ----------------------------------------------------------------

    def create(self) -> None:
        used = _used_subnets()
        rng = random.Random()
        for _ in range(200):
            net = ipaddress.IPv4Network(
                f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 255)}.0/24")
            if not any(net.overlaps(u) for u in used):
                self.subnet = net
                break
        else:
            raise NetnsError("no free 10.x.y.0/24 subnet")
        try:
            _run("ip", "netns", "add", self.bridge_ns)
            self.created = True
            b = ["ip", "-n", self.bridge_ns]
            _run(*b, "link", "add", "br0", "type", "bridge")
            _run(*b, "link", "set", "br0", "up")
            _run(*b, "link", "set", "lo", "up")
            host = f"{self.prefix}h"
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", "h0", "netns",
                 self.bridge_ns)
            _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", host)
            _run("ip", "link", "set", host, "up")
            _run(*b, "link", "set", "h0", "master", "br0")
            _run(*b, "link", "set", "h0", "up")
            for node in self.nodes:
                self._create_node(node)
        except NetnsError:
            self.destroy()
            raise

    def _create_node(self, node: str) -> None:
        ns = self.ns(node)
        k = self.nodes.index(node)
        _run("ip", "netns", "add", ns)
        b = ["ip", "-n", self.bridge_ns]
        _run(*b, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run(*b, "link", "set", f"v{k}", "master", "br0")
        _run(*b, "link", "set", f"v{k}", "up")
        n = ["ip", "-n", ns]
        _run(*n, "addr", "add", f"{self.ip(node)}/24", "dev", "eth0")
        _run(*n, "link", "set", "eth0", "up")
        _run(*n, "link", "set", "lo", "up")
        self._blocked_in[node] = set()
        self._blocked_out[node] = set()
        self._apply(node)

    def destroy(self) -> None:
        for node in self.nodes:
            _run("ip", "netns", "del", self.ns(node), check=False)
        _run("ip", "netns", "del", self.bridge_ns, check=False)
        _run("ip", "link", "del", f"{self.prefix}h", check=False)
        self.created = False

    def wrap(self, node: str) -> list[str]:
        """The command prefix that runs a program inside ``node``'s namespace."""
        return ["ip", "netns", "exec", self.ns(node)]

    # --- faults ---------------------------------------------------------------------

    def _apply(self, node: str) -> None:
        """Rewrite ``node``'s nftables table from the current fault state."""
        ips_in = sorted(self.ip(o) for o in self._blocked_in.get(node, ()))
        ips_out = sorted(self.ip(o) for o in self._blocked_out.get(node, ()))
        loss = self._loss.get(node, 0)
        assert self.subnet is not None
        rules = ["table inet chaos {", " chain input {",
                 "  type filter hook input priority 0; policy accept;"]
        if ips_in:
            rules.append(f"  ip saddr {{ {', '.join(ips_in)} }} drop")
        if loss >= 100:
            rules.append(f"  ip saddr {self.subnet} ip saddr != {self.host_ip} drop")
        elif loss > 0:
            rules.append(f"  ip saddr {self.subnet} ip saddr != {self.host_ip} "
                         f"numgen random mod 100 < {loss} drop")
        rules += [" }", " chain output {",
                  "  type filter hook output priority 0; policy accept;"]
        if ips_out:
            rules.append(f"  ip daddr {{ {', '.join(ips_out)} }} drop")
        rules += [" }", "}"]
        script = "\n".join(rules) + "\n"
        ns = self.ns(node)
        _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "chaos", check=False)
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=script)

    def partition(self, groups: list[list[str]]) -> None:
        """Nodes in different groups cannot talk (both directions)."""
        where = {n: i for i, g in enumerate(groups) for n in g}
        for node in self.nodes:
            others = {o for o in self.nodes
                      if o != node and where.get(o, -1) != where.get(node, -2)}
            self._blocked_in[node] = set(others)
            self._blocked_out[node] = set(others)
            self._apply(node)

    def cut(self, pairs: list[tuple[str, str]], one_way: bool = False) -> None:
        """Drop traffic for each (a, b): b stops hearing a (and, unless ``one_way``,
        a stops hearing b)."""
        for a, b in pairs:
            self._blocked_in[b].add(a)
            if not one_way:
                self._blocked_in[a].add(b)
        for node in self.nodes:
            self._apply(node)

    def loss(self, nodes: list[str], percent: int) -> None:
        """Drop ``percent``% of the inter-node packets arriving at ``nodes``."""
        for node in nodes:
            self._loss[node] = max(0, min(100, percent))
            self._apply(node)

    def heal(self) -> None:
        for node in self.nodes:
            self._blocked_in[node] = set()
            self._blocked_out[node] = set()
            self._loss[node] = 0
            self._apply(node)


def cleanup_stale() -> list[str]:
    """Remove namespaces and links left by chaos runs that died; returns their names."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for line in _run("ip", "-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(PREFIX):
                _run("ip", "link", "del", name, check=False)
                removed.append(name)
    return removed


def available() -> str | None:
    """None if namespaces and nftables can be used here, else why not."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "chaos runs need root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"chaos runs need `{tool}`"
    return None
