"""After a snapshot install, a node's connected sessions get the messages the
snapshot skipped, once, in order: a real ``Core`` hands the table's restore
view to a real ``Gateway``, whose connections write to real sockets.

Found by a chaos run (seed 1126): a node that caught up through a snapshot
never pushed the messages committed inside it to its still-connected
recipients, who then saw a gap in their sequence numbers; the messages stayed
in the mailboxes but were never delivered (a later resume asks only for what
follows the highest sequence number the client has).
"""

from __future__ import annotations

import socket
from pathlib import Path

from node.auth import Keys
from node.config import NodeConfig
from node.core import Core
from node.gateway import LOGGED_IN, ClientConnection, Gateway
from replication.commands import Allow, Login, Send, SetPresence, Subscribe
from tests.unit.sockframes import read_frames

H = b"resume-hash"


def test_a_snapshot_install_delivers_what_it_skipped_once(tmp_path: Path) -> None:
    cfg = NodeConfig(id="n1", listen=("127.0.0.1", 0), raft="127.0.0.1:1", peers=(),
                     data_dir=tmp_path, secret_file=None, insecure=True)
    core = Core(cfg, None)
    gateway = Gateway(cfg, core, Keys.insecure())
    table = core.table
    n1, inc = core.node_id, core.inc
    # bob is connected to this node and has already been pushed message 1.
    table.apply(Login("b1", "bob", n1, inc, H, "online", None, 1.0))
    table.apply(Login("z1", "zoe", "n2", 1, H, "online", None, 1.0))
    table.apply(Allow("z1", 1, "n2", "bob"))
    table.apply(Subscribe("b1", 1, n1, "zoe"))
    _, effects = table.apply(Send("z1", 1, "n2", 1, "bob", "m1", 2.0))
    ours, theirs = socket.socketpair()
    conn = ClientConnection(gateway, ours, ("127.0.0.1", 5000))
    conn.session, conn.epoch, conn.user, conn.phase = "b1", 1, "bob", LOGGED_IN
    gateway.register(conn)
    gateway.handle_effects(effects)
    assert [f["seq"] for f in read_frames(theirs) if f["type"] == "deliver"] == [1]
    # The leader committed more; this node catches up through a snapshot.
    leader = type(table)(local=("n2", 1))
    leader.restore(table.snapshot())
    leader.apply(Send("z1", 1, "n2", 2, "bob", "m2", 3.0))
    leader.apply(SetPresence("z1", 1, "n2", "away", "lunch", 3.0))
    leader.apply(Send("z1", 1, "n2", 3, "bob", "m3", 4.0))
    table.restore(leader.snapshot())
    core._on_restored()  # on the replication thread in a node; hands over to Trio
    with core._handoff_lock:
        items = list(core._handoff)
        core._handoff.clear()
    core._handle_events(items)
    got = read_frames(theirs)
    assert [(f["seq"], f["body"]) for f in got if f["type"] == "deliver"] == [
        (2, "m2"), (3, "m3")]
    assert [(f["user"], f["status"]) for f in got if f["type"] == "presence-event"] == [
        ("zoe", "away")]
    assert not conn.closing
    ours.close()
    theirs.close()
