"""One node's settings, with the defaults documented in docs/failover.md."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from replication.raft import RaftTimings


class ConfigError(ValueError):
    """A setting is unusable; the message is one line for the operator."""


def parse_addr(text: str, what: str = "address") -> tuple[str, int]:
    """Parse ``host:port``; raise ``ConfigError`` with a one-line reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"bad {what} {text!r}: expected host:port")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"bad {what} {text!r}: port is not a number") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"bad {what} {text!r}: port out of range")
    return host, p


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class NodeConfig:
    id: str
    listen: tuple[str, int]  # client listener
    raft: str  # host:port, this node's Raft identity
    peers: tuple[str, ...]  # other members' Raft host:port
    data_dir: Path
    secret_file: Path | None  # None only with insecure=True
    admin: tuple[str, int] | None = None
    metrics: tuple[str, int] | None = None
    # Sessions and failure handling
    grace: float = 30.0  # a session not resumed within this expires
    node_timeout: float = 2.0  # a node silent this long has its sessions orphaned
    heartbeat_interval: float = 0.5  # node -> log liveness
    tick_interval: float = 0.5  # leader -> log clock
    # Sessions one tick may expire, and may orphan or re-attach for their node's
    # silence: every member applies a tick on its Raft thread, and doing either to
    # the 200,000 sessions of a node at once held it for seconds (elections).
    sessions_per_tick: int = 5000
    fence_after: float = 2.0  # no commit for this long: stop serving clients
    client_heartbeat: float = 10.0  # clients ping at least this often
    login_deadline: float = 5.0  # a connection must log in within this
    commit_timeout: float = 10.0  # a request not committed by then answers 'unavailable'
    # Limits (per-user ones are replicated: the leader's values apply everywhere)
    sessions_per_user: int = 16
    allow_list: int = 5000
    subscriptions: int = 5000
    mailbox: int = 10_000  # unacknowledged messages per user; a full mailbox refuses sends
    frame_rate: float = 500.0  # frames per second per connection (token bucket)
    frame_burst: int = 1000
    failed_logins: int = 20  # failed logins per source address per minute before refusing
    # TLS on the client listener (both or neither)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_frame: int = 256 * 1024
    max_inflight: int = 512  # requests per connection awaiting commit
    outbox_limit: int = 8 * 1024 * 1024  # bytes queued to a slow client before it is dropped
    max_connections: int = 19_000
    # Group commit
    batch_max_commands: int = 1000
    batch_max_bytes: int = 512 * 1024
    batches_in_flight: int = 4  # proposed and not yet applied (ordered: see node.core)
    # Replication
    join: bool = False  # a new member: serve clients only once an operator added it
    fsync: bool = True
    compaction_entries: int = 20_000  # snapshot the table after this many log entries
    timings: RaftTimings = field(default_factory=RaftTimings)
    log_format: str = "kv"  # kv or json
    insecure: bool = False  # no cluster secret: unauthenticated Raft traffic (tests only)
    # Gateway worker processes sharing the client port (0: the gateway runs in the
    # node's own process)
    workers: int = 0

    _PATHS = ("data_dir", "secret_file", "tls_cert", "tls_key")
    _TUPLES = ("listen", "peers", "admin", "metrics")

    def to_wire(self) -> dict[str, Any]:
        """The settings a gateway worker needs, as plain CBOR values (no Raft timings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "timings":
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(
                v, tuple) else v
        return out

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> NodeConfig:
        kw = dict(wire)
        for name in cls._PATHS:
            if kw.get(name) is not None:
                kw[name] = Path(kw[name])
        for name in cls._TUPLES:
            if kw.get(name) is not None:
                kw[name] = tuple(kw[name])
        return cls(**kw)
