"""The replication bench's raw baselines run plain pysyncobj: ``bench.repl_node``
must not load ``replication.raft`` unless its mode asks for it, since importing
that module patches pysyncobj (the node's peer framing, cipher and serializer)."""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_bench_server_leaves_pysyncobj_unpatched() -> None:
    code = "import sys, bench.repl_node; print('replication.raft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr
