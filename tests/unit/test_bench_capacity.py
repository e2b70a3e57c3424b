"""``bench capacity`` counts a node's gateway workers (the pids its admin status
lists) in its memory, not the node's other children (a compaction fork, a copy
of the node whose pages it shares): one such fork alive at the measurement once
put the workers at 7.0 KB per session instead of 4.0 (2026-11-27)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.capacity import _memory


def test_only_the_listed_workers_count_as_workers() -> None:
    sleep = "import time; time.sleep(30)"
    worker = subprocess.Popen([sys.executable, "-c", sleep])
    fork = subprocess.Popen([sys.executable, "-c", sleep])
    try:
        deadline = time.monotonic() + 10
        while _memory(os.getpid(), [worker.pid])["other_children"] < 1:
            assert time.monotonic() < deadline, "children never seen"
            time.sleep(0.05)
        m = _memory(os.getpid(), [worker.pid])
        assert m["processes"] == 2  # this process and the one worker
        assert m["other_children"] == 1  # the fork, left out
        assert m["workers_rss"] > 0
    finally:
        for p in (worker, fork):
            p.kill()
            p.wait()
