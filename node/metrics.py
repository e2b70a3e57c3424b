"""Prometheus metrics and health endpoints: the only module that touches prometheus_client.

Everything is read at scrape time from the components' ``statistics()``,
except the commit latency histogram, which the core feeds per command.
Served over plain HTTP (h11 on Trio): ``/metrics``, ``/healthz`` (the process
is up) and ``/readyz`` (a member of a quorum, caught up and not fenced).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import h11
import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import format_addr
from .core import Core
from .interfaces import GatewayLike

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _NodeCollector(Collector):
    def __init__(self, node_id: str, core: Core, gateway: GatewayLike):
        self.node_id = node_id
        self.core = core
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        cs = self.core.statistics()
        gs = self.gateway.statistics()
        ts = self.core.table.statistics()
        raft = cs.raft

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily("switchboard_" + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily("switchboard_" + name, doc, value=value)

        info = GaugeMetricFamily("switchboard_node_info", "This node's identity",
                                 labels=["id"])
        info.add_metric([self.node_id], 1.0)
        yield info
        yield gauge("connections", "Open client connections on this node", gs.connections)
        yield counter("refused_rate_limited", "Frames throttled and logins refused by rate "
                      "limits", gs.rejected_rate)
        yield counter("refused_full", "Connections refused at the connection limit",
                      gs.rejected_full)
        yield counter("connections", "Client connections accepted", gs.connections_total)
        yield counter("logins", "Successful logins on this node", gs.logins)
        yield counter("resumes", "Sessions resumed on this node", gs.resumes)
        yield counter("auth_failures", "Logins and resumes refused for a bad token",
                      gs.auth_failures)
        yield counter("protocol_errors", "Connections closed for a protocol violation",
                      gs.protocol_errors)
        yield counter("clients_dropped_slow", "Connections dropped for a full outbox",
                      gs.dropped_slow)
        yield counter("refused_fenced", "Logins refused while fenced or shutting down",
                      gs.rejected_fenced)
        yield gauge("sessions", "Sessions in the cluster (replicated table)", ts.sessions)
        yield gauge("sessions_local", "Sessions attached to this node", gs.sessions_local)
        yield gauge("sessions_orphaned", "Sessions waiting for a resume (cluster)", ts.orphaned)
        yield counter("session_expiries", "Sessions expired after the grace window (cluster)",
                      ts.expired)
        yield counter("presence_updates", "Presence changes committed (cluster)",
                      ts.presence_updates)
        yield counter("presence_events", "Presence events pushed to local clients",
                      gs.presence_events)
        yield counter("messages_sent", "Messages committed (cluster)", ts.messages_sent)
        yield counter("messages_delivered", "Message deliveries pushed to local clients",
                      gs.messages_delivered)
        yield counter("messages_acked", "Messages acknowledged by recipients (cluster)",
                      ts.messages_acked)
        yield gauge("mailbox_messages", "Messages awaiting acknowledgement (cluster)",
                    ts.mailbox_messages)
        role = GaugeMetricFamily("switchboard_raft_role", "1 for this node's Raft role",
                                 labels=["role"])
        for r in ("leader", "follower", "candidate"):
            role.add_metric([r], 1.0 if raft.role == r else 0.0)
        yield role
        yield gauge("raft_term", "Current Raft term", raft.term)
        yield gauge("raft_commit_index", "Raft commit index", raft.commit_index)
        yield gauge("raft_last_applied", "Last Raft index applied here", raft.last_applied)
        yield gauge("raft_log_entries", "Entries in the Raft log (since compaction)",
                    raft.log_len)
        yield gauge("raft_has_quorum", "1 if connected to a majority", float(raft.has_quorum))
        yield counter("raft_compactions", "Log compactions started (snapshot children forked); "
                      "members take turns", raft.compactions)
        yield gauge("fenced", "1 if this node has stopped serving (no majority)",
                    float(cs.fenced))
        yield gauge("core_queue_depth", "Commands waiting for the next batch", cs.queued)
        yield gauge("core_pending_requests", "Commands awaiting commit", cs.pending)
        yield gauge("gateway_outbox_bytes", "Bytes queued to clients", gs.outbox_bytes)
        yield counter("batches_committed", "Log entries (batches) committed from this node",
                      cs.batches_committed)
        yield counter("commands_committed", "Commands committed from this node",
                      cs.commands_committed)
        yield counter("proposal_retries", "Batches re-proposed after a refusal or silence",
                      cs.retries)
        yield gauge("core_batches_in_flight", "Batches proposed and not yet applied",
                    cs.inflight_batches)
        yield counter("batches_skipped", "Copies of this node's batches that had applied "
                      "already, skipped by the log", cs.batches_skipped)
        yield counter("batches_gapped", "This node's batches refused because an earlier one "
                      "was lost (proposed again, in order)", cs.batches_gapped)
        yield counter("request_timeouts", "Requests answered 'unavailable'", cs.timeouts)
        yield counter("journal_fsyncs", "Syncs of the Raft journal's records", cs.fsyncs)
        yield counter("journal_fsync_seconds", "Time spent in those syncs", cs.fsync_seconds)
        skipped, replaced, _resent = cs.rewrites
        yield counter("journal_resent_skipped", "Re-sent log entries already in place "
                      "(not rewritten)", skipped)
        yield counter("journal_replaced", "Log entries replaced by different ones "
                      "(uncommitted entries of a deposed leader)", replaced)
        cuts, cut_seconds, cut_max, cut_copy = cs.cuts
        yield counter("journal_cuts", "Journal cuts after a compaction (kept entries copied "
                      "to a new file)", cuts)
        yield counter("journal_cut_seconds", "Time journal cuts held the Raft thread",
                      cut_seconds)
        yield gauge("journal_cut_seconds_max", "The longest a journal cut held the Raft "
                    "thread at once", cut_max)
        yield counter("journal_cut_copy_seconds", "Time spent copying the kept entries, "
                      "off the Raft thread", cut_copy)
        sends, skipped_sends, skipped_answers, peer_frames, kept_ahead = cs.append_sends
        yield counter("raft_messages_sent", "Messages sent to the other Raft members",
                      peer_frames)
        yield counter("append_sends", "Rounds of append-entries messages the node sent its "
                      "followers as leader", sends)
        yield counter("append_sends_skipped", "Rounds of append-entries messages not sent "
                      "(each follower already had every entry and the commit index)",
                      skipped_sends)
        yield counter("append_answers_skipped", "Answers to the leader not sent as follower "
                      "(a repeat of the answer sent a moment before)", skipped_answers)
        yield counter("append_next_kept_ahead", "Followers' answers to older messages that "
                      "pysyncobj would have let send the leader back to entries already "
                      "sent", kept_ahead)
        keepalives, probes, early = cs.links
        yield counter("raft_keepalives", "Keep-alives sent on Raft links that carry no "
                      "heartbeats (between followers)", keepalives)
        yield counter("raft_leader_probes", "Connections tried to the leader's address as "
                      "follower after the link to it closed", probes)
        yield counter("raft_early_campaigns", "Elections brought forward as follower because "
                      "the leader's address refused (or at once reset) a connection after its "
                      "link closed", early)
        _starts, start_seconds, start_max = cs.compaction_starts
        yield counter("compaction_start_seconds", "Time compaction starts (the fork of the "
                      "snapshot child) held the Raft thread", start_seconds)
        yield gauge("compaction_start_seconds_max", "The longest a compaction start held the "
                    "Raft thread", start_max)
        collections = CounterMetricFamily("switchboard_gc_collections", "Garbage collections "
                                          "of the node process", labels=["generation"])
        paused = CounterMetricFamily("switchboard_gc_pause_seconds", "Time the node process "
                                     "spent in garbage collections", labels=["generation"])
        longest = GaugeMetricFamily("switchboard_gc_pause_seconds_max", "The longest garbage "
                                    "collection of the node process", labels=["generation"])
        for gen, p in enumerate(cs.gc):
            collections.add_metric([str(gen)], p.count)
            paused.add_metric([str(gen)], p.seconds)
            longest.add_metric([str(gen)], p.longest)
        yield collections
        yield paused
        yield longest


class NodeMetrics:
    """The node's registry and its HTTP endpoint."""

    def __init__(self, node_id: str, core: Core, gateway: GatewayLike,
                 ready: Callable[[], bool]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_NodeCollector(node_id, core, gateway))
        self.commit_latency = Histogram(
            "switchboard_commit_latency_seconds",
            "Time from a request's submission to its commit",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        core.observe_commit = self.commit_latency.observe
        self.ready = ready
        self.gateway = gateway
        self.address: str | None = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.address = format_addr(host, listeners[0].socket.getsockname()[1])
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(10):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        break
                    return
                target = event.target.decode("latin-1")
                if target.split("?", 1)[0] == "/metrics":
                    await self.gateway.refresh()
                status, body, ctype = self._route(target)
                headers = [("content-type", ctype), ("content-length", str(len(body))),
                           ("connection", "close")]
                await stream.send_all(conn.send(h11.Response(status_code=status,
                                                             headers=headers)) or b"")
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _route(self, target: str) -> tuple[int, bytes, str]:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, self.exposition(), CONTENT_TYPE
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            if self.ready():
                return 200, b"ready\n", "text/plain"
            return 503, b"not ready\n", "text/plain"
        return 404, b"not found\n", "text/plain"
