"""``bench capacity`` counts a node's gateway workers in its memory, not the
node's other children (a compaction fork, a copy of the node whose pages it
shares): one such fork alive at the measurement once put the workers at
7.0 KB per session instead of 4.0 (2026-11-27)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.capacity import _is_worker, _memory


def test_only_gateway_workers_count_as_workers() -> None:
    sleep = "import time; time.sleep(30)"
    worker = subprocess.Popen([sys.executable, "-c", sleep, "-m", "node.worker"])
    fork = subprocess.Popen([sys.executable, "-c", sleep, "cluster", "node"])
    try:
        deadline = time.monotonic() + 10
        while not (_is_worker(worker.pid) and _memory(os.getpid())["other_children"] >= 1):
            assert time.monotonic() < deadline, "children never seen"
            time.sleep(0.05)
        assert not _is_worker(fork.pid)
        m = _memory(os.getpid())
        assert m["processes"] == 2  # this process and the one worker
        assert m["workers_rss"] > 0
    finally:
        for p in (worker, fork):
            p.kill()
            p.wait()
