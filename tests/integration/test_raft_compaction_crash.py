"""A node killed between writing its snapshot and cutting its log keeps every
entry after the snapshot: a real one-member ``ReplicatedLog`` in a child
process, killed (``os._exit``) at the moment the log would be cut, then started
again on the same files.

pysyncobj's start-up load clears a journal that does not begin exactly at the
snapshot's last two entries, so it dropped every entry after the snapshot,
entries this node had acknowledged (with peers: counted toward a commit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.ports import free_base_port

pytestmark = [pytest.mark.integration]

CHILD = r'''
import json, os, sys, time
from pathlib import Path
import replication.raft as raft
from replication.batch import encode_batch
from replication.commands import Login
from replication.raft import RaftConfig, ReplicatedLog
from replication.table import SessionTable

mode, data_dir, addr = sys.argv[1:4]
table = SessionTable()
beyond = [0]
if mode == "crash":
    cut = raft._DurableFileJournal.deleteEntriesTo

    def crash(self, entry_to):
        beyond[0] = len(self) - entry_to - 2  # entries after the snapshot's last
        if beyond[0] < 3:
            return cut(self, entry_to)
        print(json.dumps({"sessions": len(table.sessions), "after_snapshot": beyond[0]}),
              flush=True)
        os._exit(9)

    raft._DurableFileJournal.deleteEntriesTo = crash
elif mode == "crash-copying":
    finish = raft._DurableFileJournal._finish_cut

    def crash_copying(self):
        beyond[0] = len(self) - 2  # the log holds from the snapshot's last two on
        if beyond[0] < 3:
            return finish(self)
        print(json.dumps({"sessions": len(table.sessions), "after_snapshot": beyond[0]}),
              flush=True)
        os._exit(9)

    raft._DurableFileJournal._finish_cut = crash_copying
cfg = RaftConfig(self_addr=addr, peers=(), data_dir=Path(data_dir), password="test-secret",
                 fsync=True, compaction_entries=40, compaction_seconds=3600)
log = ReplicatedLog(cfg, table, lambda _i, _b: None)
deadline = time.monotonic() + 30
if mode.startswith("crash"):
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        cmd = Login(f"s{seq}", f"u{seq}", "n1", 1, b"h" * 32, "online", None, 1000.0 + seq)
        log.propose(encode_batch("t", 1, seq, [(seq, cmd)]), lambda _r, _m: None)
        time.sleep(0.002)
    sys.exit("no compaction with entries after the snapshot")
last = (-1, -1)
while time.monotonic() < deadline:
    st = log.status()
    now = (st.last_applied, len(table.sessions))
    if st.role == "leader" and st.last_applied == st.commit_index and now == last:
        break
    last = now
    time.sleep(0.3)
print(json.dumps({"sessions": len(table.sessions)}), flush=True)
log.close()
'''


def _run(mode: str, data: Path, addr: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(data), addr],
                         capture_output=True, text=True, timeout=60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, out.stderr[-2000:]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["crash", "crash-copying"])
def test_a_crash_between_the_snapshot_and_the_cut_loses_no_entry(tmp_path: Path,
                                                                  mode: str) -> None:
    """``crash``: killed at the cut; ``crash-copying``: killed once the journal's
    live records were copied off the tick thread, before the copy replaced it."""
    addr = f"127.0.0.1:{free_base_port(1)}"
    before = _run(mode, tmp_path / "m0", addr)
    assert before["after_snapshot"] >= 3
    after = _run("check", tmp_path / "m0", addr)
    assert after["sessions"] >= before["sessions"]
