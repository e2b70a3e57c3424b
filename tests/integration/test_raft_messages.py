"""Raft messages per committed entry: three real ``ReplicatedLog`` members on
loopback.

pysyncobj's leader sends every follower at least one message each time it is
asked to send, and a follower answers every message. After an entry commits the
leader sent the next entry (carrying the new commit index) and then, for the
apply, a commit-only message telling the same; and the followers' answers to a
commit-only message repeated the answers to the entry before it. That was 8
messages per entry (2 entries out, 2 commit-only out, 4 answers back); the
commit-only messages are now sent only when they tell something new that a
follower needs at once (a commit with an effect for one of its sessions, or
one it proposed), and repeated answers are not sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import replication.raft as raft
from replication.batch import AppliedBatch
from replication.commands import Login, Send
from replication.raft import ReplicatedLog

from .raftgroup import leader_of, propose, propose_noop, raft_group

pytestmark = [pytest.mark.integration]


class Applied:
    """Every member's last applied log index, and a wait for all to reach one."""

    def __init__(self) -> None:
        self.index = [0, 0, 0]
        self.changed = threading.Condition()

    def callback(self, k: int):  # type: ignore[no-untyped-def]
        def on_applied(index: int, _batch: AppliedBatch) -> None:
            with self.changed:
                self.index[k] = index
                self.changed.notify_all()
        return on_applied

    def wait_all(self, index: int, timeout: float = 20.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: min(self.index) >= index, timeout), \
                (self.index, index)

    def wait_one(self, k: int, index: int, timeout: float = 20.0) -> int:
        """Wait for member k to apply ``index``; its applied index then."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.index[k] >= index, timeout), \
                (self.index, index)
            return self.index[k]

    def settle(self, timeout: float = 30.0) -> int:
        """Wait until every member has applied the same index and nothing more
        arrives for a while; that index."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            with self.changed:
                now = (min(self.index), max(self.index))
            if now == last and now[0] == now[1] and now[0] > 0:
                return now[0]
            assert time.monotonic() < deadline, self.index
            last = now
            time.sleep(0.2)


def _burst(tmp_path: Path, interval: float, for_follower: bool = False,
           ) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """Entries and peer frames for 3,000 proposals queued while entries are in
    flight (each entry commits with the next one already queued). The proposals
    are ``Noop``s, or with ``for_follower`` messages to a session on a follower,
    so that each commit concerns a follower (its commit-only message goes out)."""
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True, local=for_follower,
                    timings=raft.RaftTimings(entry_interval=interval)) as logs:
        k = leader_of(logs)
        leader = logs[k]
        if for_follower:
            propose(leader, 1, Login("a1", "alice", f"m{k}", 1, b"h", "online", None, 1.0))
            propose(leader, 2, Login("b1", "bob", f"m{(k + 1) % 3}", 1, b"h", "online",
                                     None, 1.0))
        else:
            propose_noop(leader, 1)
            propose_noop(leader, 2)
        start = applied.settle()
        sends0 = ReplicatedLog.send_statistics()
        for seq in range(3, 3003):
            if for_follower:
                propose(leader, seq, Send("a1", 1, f"m{k}", seq, "bob", "x", 2.0))
            else:
                propose_noop(leader, seq)
            if seq % 10 == 0:
                time.sleep(0.001)
        entries = applied.settle() - start
        sends1 = ReplicatedLog.send_statistics()
    return entries, sends1[3] - sends0[3], sends0, sends1


def test_a_burst_costs_about_one_message_per_follower_each_way(tmp_path: Path) -> None:
    # Unpaced: the next entry goes out at the commit, carrying the commit index.
    entries, frames, sends0, sends1 = _burst(tmp_path, 0.0)
    assert entries >= 20, entries
    # 4 for an entry (out to 2 followers, 2 answers) plus heartbeats; 8 before.
    assert frames / entries < 6.0, (frames, entries)
    assert sends1[1] > sends0[1]  # commit-only sends skipped
    assert sends1[2] >= sends0[2]


def test_a_paced_burst_adds_only_the_commit_only_messages(tmp_path: Path) -> None:
    """Paced, a commit that concerns a follower goes out at once in a
    commit-only message (the next entry waits): 2 more frames per entry, and
    the followers do not answer them (their answer would repeat the one for
    the entry). Paced at 5 ms, every commit arrives while the next entry waits,
    however fast the machine commits (at 1 ms a slow one often has the next
    entry due at the commit, and it carries the commit instead)."""
    entries, frames, sends0, sends1 = _burst(tmp_path, 0.005, for_follower=True)
    assert entries >= 20, entries
    assert frames / entries < 7.0, (frames, entries)  # 8 if the followers answered them
    assert sends1[2] > sends0[2]  # repeated answers skipped


def test_one_proposal_at_a_time_followers_answer_once(tmp_path: Path) -> None:
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True) as logs:
        k = leader_of(logs)
        leader = logs[k]
        propose_noop(leader, 1)
        start = index = applied.settle()
        sends0 = ReplicatedLog.send_statistics()
        quiet0 = raft._AppendEntriesSends.quiet
        for seq in range(2, 202):
            propose_noop(leader, seq)
            index = applied.wait_one(k, index + 1)
        applied.wait_all(index)  # the followers learn the last commit too
        sends1 = ReplicatedLog.send_statistics()
        quiet = raft._AppendEntriesSends.quiet - quiet0
        entries = index - start
    frames = sends1[3] - sends0[3]
    assert entries == 200
    # The entry to each follower and one answer from each (4 an entry, plus
    # heartbeats): no commit-only message, since no follower holds a session
    # the Noops touch or proposed one (6 with them and no repeated answers; 8
    # before).
    assert frames / entries < 5.0, (frames, entries)
    assert quiet >= 0.75 * entries, quiet  # some coincide with a heartbeat


def _lags(applied: Applied, logs: list[ReplicatedLog], watch: int,
          propose_next: Callable[[int], None], start: int, rounds: int = 20) -> list[float]:
    """For each of ``rounds`` proposals (after a quiet spell past a heartbeat), the
    time from the leader's apply to member ``watch``'s, sorted."""
    k = leader_of(logs)
    index = start
    lags: list[float] = []
    for r in range(rounds):
        propose_next(r)
        index = applied.wait_one(k, index + 1)
        t0 = time.monotonic()
        applied.wait_one(watch, index)
        lags.append(time.monotonic() - t0)
        time.sleep(0.06)  # past a heartbeat: the next proposal starts idle
    return sorted(lags)


def test_a_commit_for_a_followers_session_goes_out_at_once(tmp_path: Path) -> None:
    """A commit with an effect for a session on a follower (a message to bob,
    on that follower) reaches it in a commit-only message at once, well before
    a heartbeat (50 ms away) would have told it."""
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True, local=True) as logs:
        k = leader_of(logs)
        f = (k + 1) % 3
        propose(logs[k], 1, Login("a1", "alice", f"m{k}", 1, b"h", "online", None, 1.0))
        propose(logs[k], 2, Login("b1", "bob", f"m{f}", 1, b"h", "online", None, 1.0))
        start = applied.settle()
        lags = _lags(applied, logs, f, lambda r: propose(
            logs[k], 3 + r, Send("a1", 1, f"m{k}", r + 1, "bob", "hi", 2.0)), start)
    assert lags[len(lags) // 2] < 0.02, lags


def test_a_followers_own_proposal_commits_there_at_once(tmp_path: Path) -> None:
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True, local=True) as logs:
        k = leader_of(logs)
        f = (k + 1) % 3
        propose_noop(logs[f], 1)
        start = applied.settle()
        lags = _lags(applied, logs, f, lambda r: propose_noop(logs[f], 2 + r), start)
    assert lags[len(lags) // 2] < 0.02, lags


def test_a_commit_that_concerns_no_follower_waits_for_the_next_message(
        tmp_path: Path) -> None:
    """No follower holds a session the commit has effects for, nor proposed it:
    no commit-only message (a message less per entry for each follower); the
    followers learn of it at the next entry or heartbeat."""
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True, local=True) as logs:
        k = leader_of(logs)
        f = (k + 1) % 3
        propose_noop(logs[k], 1)
        start = applied.settle()
        quiet0 = raft._AppendEntriesSends.quiet
        lags = _lags(applied, logs, f, lambda r: propose_noop(logs[k], 2 + r), start)
        quiet = raft._AppendEntriesSends.quiet - quiet0
    assert quiet >= 15, quiet
    assert lags[len(lags) // 2] > 0.02, lags  # the heartbeat told it


def test_the_counters_are_process_wide() -> None:
    assert len(ReplicatedLog.send_statistics()) == 5
    assert isinstance(raft.sent_peer_frames, int)


def test_a_lagging_followers_answers_never_send_the_leader_back(tmp_path: Path) -> None:
    """A follower outside the quorum (here: a slow disk) answers each entry after
    the leader has sent it the next ones. pysyncobj then set the follower's next
    index back to the answer's and re-sent it every entry from there, in one
    message, which the follower skipped as already held; the leader now keeps the
    next index where it was, and sends each entry once."""
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True,
                    timings=raft.RaftTimings(entry_interval=0.0)) as logs:
        k = leader_of(logs)
        journal = logs[(k + 1) % 3]._sync._SyncObj__raftLog
        sync = journal._sync

        def slow_sync() -> None:
            time.sleep(0.004)
            sync()

        propose_noop(logs[k], 1)
        applied.settle()
        journal._sync = slow_sync
        skipped0 = raft._DurableFileJournal.skipped_identical
        kept0 = ReplicatedLog.send_statistics()[4]
        for seq in range(2, 1002):
            propose_noop(logs[k], seq)
            if seq % 10 == 0:
                time.sleep(0.001)
        applied.settle()
        skipped = raft._DurableFileJournal.skipped_identical - skipped0
        kept = ReplicatedLog.send_statistics()[4] - kept0
    assert kept > 0, kept
    assert skipped == 0, skipped  # entries re-sent to the slow follower


def test_a_new_link_forgets_the_last_answer(tmp_path: Path) -> None:
    """The repeat filter is per link: an answer sent on a link that then broke
    may never have arrived, so after a reconnect the same answer goes out again."""
    applied = Applied()
    with raft_group(tmp_path, applied.callback, fsync=True) as logs:
        k = leader_of(logs)
        propose_noop(logs[k], 1)
        applied.settle()
        follower = logs[(k + 1) % 3]._sync
        answered = follower._sb_answered
        assert answered, "the follower has answered the leader"
        node = next(iter(answered))
        follower._SyncObj__onNodeDisconnected(node)
        assert node not in answered
        answered[node] = (0, 0, 0.0)
        follower._SyncObj__onNodeConnected(node)
        assert node not in answered
